"""The step benchmark's memory check: before each config it compares the config's dearest pair
of subjects with a budget, and runs the config at full size, scaled down, or not at all. Here the
budget is faked, so the decision can be checked on any machine."""
import pytest

from bench import configs, memory, providers, results, roofline, step
from bench.__main__ import main

ANCHOR = providers.footprint(providers.ANCHOR)
SUBJECTS = ([providers.footprint(p) for p in providers.default_providers("cpu")]
            + [roofline.footprint(name, "cpu") for name in roofline.SUBJECTS])
LARGE = configs.sizes("large", device_type="cpu")  # 2^26, 2^25, 2^24 elements
GB = memory.GB


def _estimates(sizes, baseline=0.0):
    budget = memory.Budget(float("inf"), baseline, "test")
    return [memory.plan((config,), ANCHOR, SUBJECTS, budget).estimate for config in sizes]


def test_estimate_grows_with_the_config_and_counts_the_baseline():
    estimates = _estimates(LARGE)
    assert estimates[0] > estimates[1] > estimates[2] > 0
    # 2^26 fp32 elements: two optimizers' params and moments (12 B each) at least.
    assert estimates[0] > 24 * 2 ** 26
    assert _estimates(LARGE[:1], baseline=GB)[0] == pytest.approx(estimates[0] + GB)


def test_ample_budget_runs_the_full_size_without_a_reason():
    plan = memory.plan(LARGE, ANCHOR, SUBJECTS, memory.Budget(100 * GB, 0.5 * GB, "test"))
    assert plan.config is LARGE[0]
    assert plan.reason is None


def test_budget_between_two_sizes_scales_down_to_the_one_that_fits():
    estimates = _estimates(LARGE, baseline=0.5 * GB)
    limit = (estimates[1] + estimates[0]) / 2
    plan = memory.plan(LARGE, ANCHOR, SUBJECTS, memory.Budget(limit, 0.5 * GB, "a fake budget"))
    assert plan.config is LARGE[1]
    assert plan.estimate == pytest.approx(estimates[1])
    assert "scaled down from 67.1 M to 33.6 M parameters" in plan.reason
    assert "a fake budget" in plan.reason


def test_budget_below_the_smallest_size_skips_the_config():
    estimates = _estimates(LARGE, baseline=0.5 * GB)
    plan = memory.plan(LARGE, ANCHOR, SUBJECTS,
                       memory.Budget(estimates[2] * 0.99, 0.5 * GB, "a fake budget"))
    assert plan.config is None
    assert plan.reason.startswith("skipped")


def test_the_dearest_subject_decides():
    """The config is sized for its dearest pair, not for the anchor alone."""
    cheap = memory.plan(LARGE, ANCHOR, [], memory.Budget(float("inf"), 0, "test")).estimate
    dear = memory.plan(LARGE, ANCHOR, SUBJECTS, memory.Budget(float("inf"), 0, "test")).estimate
    assert dear > cheap


def test_a_run_skips_what_does_not_fit_and_measures_the_rest(tmp_path, monkeypatch, capsys):
    """With a budget that holds small-800 but not even the smallest `large`, the run says why it
    skipped `large`, keeps going, and reports small-800."""
    quick_large = configs.sizes("large", quick=True)
    small = configs.sizes("small-800", quick=True)
    names = ["torch-fused", "fused_adam-numba"]
    subjects = [providers.footprint(n) for n in names] + [
        roofline.footprint(n, "cpu") for n in roofline.SUBJECTS]
    need = lambda sizes: memory.plan(sizes, ANCHOR, subjects,  # noqa: E731
                                     memory.Budget(float("inf"), 0, "t")).estimate
    limit = (need(small) + need(quick_large[-1:])) / 2
    assert need(small) < limit < need(quick_large[-1:])
    monkeypatch.setattr(step.memory, "budget",
                        lambda device, max_gb: memory.Budget(limit, 0, "a fake budget"))
    main(["--quick", "--device", "cpu", "--configs", "large", "small-800", "--providers", *names,
          "--warmup", "1", "--iters", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "large: skipped: even its smallest size" in out
    table = results.Table(results.read(tmp_path / "results.json"))
    assert table.row("large", "fused_adam-numba", "skipped")["reason"].startswith("skipped")
    assert table.get("large", "fused_adam-numba", "step_ms_median") is None
    assert table.get("small-800", "fused_adam-numba", "speedup_vs_torch_fused") > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "skipped: even its smallest size" in markdown
