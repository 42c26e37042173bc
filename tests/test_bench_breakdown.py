"""`python -m bench breakdown` times a FusedAdam step phase by phase through the library's own
seam (`FusedAdam._step` with a clock). Timed that way, a step must update exactly as `step()`
does, or the breakdown measures something else."""
import torch

from bench import configs, providers, results
from bench.studies import breakdown
from bench.__main__ import main

CPU = torch.device("cpu")
TINY = configs.Config("tiny", ((3, 5), (5,)) * 3, "3 x (3x5 weight, 5 bias)")


def test_timed_phases_update_exactly_as_step():
    stepped = providers.build("fused_adam-numba", TINY, CPU)
    phased = providers.build("fused_adam-numba", TINY, CPU)
    for _ in range(4):
        stepped.forward_backward()
        stepped.step()
        stepped.zero_grad()
        phased.forward_backward()
        seconds = breakdown.timed_phases(phased.optimizer, CPU)
        phased.zero_grad()
        assert set(breakdown.DROP_IN_CHECKS) <= set(seconds)
        assert {"visit gradients", "kernel"} <= set(seconds)
        assert all(s > 0 for s in seconds.values())
    for a, b in zip(stepped.params, phased.params):
        assert torch.equal(a, b)
    stepped_state, phased_state = stepped.optimizer.state_dict(), phased.optimizer.state_dict()
    assert stepped_state["state"].keys() == phased_state["state"].keys() == set(range(6))
    for index, state in stepped_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, phased_state["state"][index][name]), (index, name)
    assert phased_state["state"][0]["step"].item() == 4.0


def test_breakdown_writes_its_report(tmp_path):
    main(["breakdown", "--device", "cpu", "--warmup", "1", "--iters", "2", "--out",
          str(tmp_path)])
    rows = results.read(tmp_path / "breakdown.json")
    table = results.Table(rows)
    assert table.configs == ["small-800"]
    assert {r["command"] for r in rows} == {"breakdown"}
    medians = {(r["provider"], r["metric"]): r for r in rows if r["metric"].endswith("_median")}
    for provider in ("torch-fused", "roofline (no-math)", "FusedAdam"):
        assert (provider, "step_ms_median") in medians
    for phase in (*breakdown.DROP_IN_CHECKS, "visit gradients", "kernel"):
        assert ("FusedAdam", f"{breakdown.metric_of(phase)}_ms_median") in medians, phase
    assert all(r["samples"] == 2 and r["value"] > 0 for r in medians.values())
    assert (tmp_path / "breakdown.png").stat().st_size > 0
    text = (tmp_path / "breakdown.md").read_text()
    assert "10x torch-fused would be" in text and "Being a drop-in" in text
