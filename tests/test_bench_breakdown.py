"""`python -m bench breakdown` times a FusedAdam step as its two parts (`_SplitStep`, which calls
the optimizer's `_gather_grads` and `_launch`). Those parts must add up to the real step, or the
breakdown measures something else."""
import json

import torch

from bench import breakdown, configs, providers
from bench.__main__ import main

CPU = torch.device("cpu")
TINY = configs.Config("tiny", ((3, 5), (5,)) * 3, "3 x (3x5 weight, 5 bias)")


def test_split_step_updates_exactly_as_step():
    stepped = providers.build("fused_adam-numba", TINY, CPU)
    split = providers.build("fused_adam-numba", TINY, CPU)
    split_step = breakdown._SplitStep(split, CPU)
    for _ in range(4):
        stepped.forward_backward()
        stepped.step()
        stepped.zero_grad()
        split.forward_backward()
        seconds = split_step()
        split.zero_grad()
        assert set(seconds) == {breakdown.VISIT, breakdown.VISIT_WARM, breakdown.LAUNCH}
        assert all(s > 0 for s in seconds.values())
    for a, b in zip(stepped.params, split.params):
        assert torch.equal(a, b)
    stepped_state, split_state = stepped.optimizer.state_dict(), split.optimizer.state_dict()
    assert stepped_state["state"].keys() == split_state["state"].keys() == set(range(6))
    for index, state in stepped_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, split_state["state"][index][name]), (index, name)
    assert split_state["state"][0]["step"].item() == 4.0


def test_breakdown_writes_its_report(tmp_path):
    main(["breakdown", "--device", "cpu", "--warmup", "1", "--iters", "2", "--out",
          str(tmp_path)])
    result = json.loads((tmp_path / "breakdown.json").read_text())
    assert result["config"] == "small-800"
    assert set(result["stats_ms"]) == set(breakdown.NAMES)
    assert all(s["n"] == 2 and s["median"] > 0 for s in result["stats_ms"].values())
    assert (tmp_path / "breakdown.png").stat().st_size > 0
    assert "10x torch-fused would be" in (tmp_path / "breakdown.md").read_text()
