"""`python -m bench breakdown` times a FusedAdam step as two parts by calling into the optimizer
(`_SplitStep`). Those parts must be the real step, or the breakdown measures something else."""
import argparse
import json

import torch

from bench import breakdown, configs, providers

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
        visit_seconds, kernel_seconds = split_step()
        split.zero_grad()
        assert visit_seconds > 0 and kernel_seconds > 0
    for a, b in zip(stepped.params, split.params):
        assert torch.equal(a, b)
    stepped_state, split_state = stepped.optimizer.state_dict(), split.optimizer.state_dict()
    assert stepped_state["state"].keys() == split_state["state"].keys() == set(range(6))
    for index, state in stepped_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, split_state["state"][index][name]), (index, name)
    assert split_state["state"][0]["step"].item() == 4.0


def test_breakdown_writes_its_report(tmp_path):
    args = argparse.Namespace(device="cpu", config="small-800", warmup=1, iters=2,
                              allocations=1, out=tmp_path)
    breakdown.run(args)
    result = json.loads((tmp_path / "breakdown.json").read_text())
    assert set(result["stats_ms"]) == {breakdown.TORCH, breakdown.STEP, breakdown.READS,
                                       breakdown.KERNEL, breakdown.ROOFLINE}
    assert all(s["n"] == 2 and s["median"] > 0 for s in result["stats_ms"].values())
    assert (tmp_path / "breakdown.png").stat().st_size > 0
    assert "10x torch-fused would be" in (tmp_path / "breakdown.md").read_text()
