"""`python -m bench breakdown` times a FusedAdam step as its phases (`breakdown.split_step`, the
one function that knows the optimizer's private `_gather_grads` and `_launch`). Those phases must
add up to the real step, or the breakdown measures something else."""
import torch

from bench import breakdown, configs, providers, results
from bench.__main__ import main

CPU = torch.device("cpu")
TINY = configs.Config("tiny", ((3, 5), (5,)) * 3, "3 x (3x5 weight, 5 bias)")


def test_split_step_updates_exactly_as_step():
    stepped = providers.build("fused_adam-numba", TINY, CPU)
    split = providers.build("fused_adam-numba", TINY, CPU)
    for _ in range(4):
        stepped.forward_backward()
        stepped.step()
        stepped.zero_grad()
        split.forward_backward()
        seconds = breakdown.split_step(split.optimizer, CPU)
        split.zero_grad()
        assert set(seconds) == {"visit", "visit_warm", "launch"}
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
    rows = results.read(tmp_path / "breakdown.json")
    table = results.Table(rows)
    assert table.configs == ["small-800"]
    assert {r["command"] for r in rows} == {"breakdown"}
    medians = {(r["provider"], r["metric"]): r for r in rows if r["metric"].endswith("_median")}
    assert set(medians) == {("torch-fused", "step_ms_median"),
                            ("roofline (no-math)", "step_ms_median"),
                            ("FusedAdam", "step_ms_median"), ("FusedAdam", "visit_ms_median"),
                            ("FusedAdam", "visit_warm_ms_median"),
                            ("FusedAdam", "launch_ms_median")}
    assert all(r["samples"] == 2 and r["value"] > 0 for r in medians.values())
    assert (tmp_path / "breakdown.png").stat().st_size > 0
    assert "10x torch-fused would be" in (tmp_path / "breakdown.md").read_text()
