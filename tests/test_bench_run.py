"""The step benchmark as a user meets it: it reports as it goes, an interrupted run leaves a
readable report, runs never share a folder, and every command writes the one row schema.

Small configs and one or two rounds: these check the machinery, never the speed."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import providers, report, report_step, results, system
from bench.__main__ import main

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--quick", "--device", "cpu", "--configs", "small-800", "--providers", "torch-fused",
            "fused_adam-numba", "--warmup", "1", "--iters", "1"]
# Fields every row carries, whichever command wrote it (bench/results.py).
SCHEMA = {"command", "config", "config_detail", "n_params", "n_tensors", "provider", "kind",
          "metric", "value", "unit", "samples", "device", "device_name", "hardware", "torch",
          "numba", "git_sha", "timestamp", "quick", "settings"}


def _bench(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_a_run_killed_after_its_first_config_leaves_a_readable_report(tmp_path):
    process = _bench("--quick", "--device", "cpu", "--configs", "small-800", "large",
                     "--providers", "torch-fused", "fused_adam-numba", "--warmup", "1",
                     "--iters", "2", "--out", str(tmp_path))
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("small-800: done"):
                process.send_signal(signal.SIGKILL)  # no handler runs: what is there was written
                break
    finally:
        process.kill()
        process.wait()
    assert any(line.startswith("small-800: done") for line in seen), "".join(seen)
    rows = results.read(tmp_path / "results.json")
    table = results.Table(rows)
    assert table.configs[0] == "small-800"
    assert table.get("small-800", "fused_adam-numba", "speedup_vs_torch_fused") > 0
    assert table.get("small-800", "torch-fused", "step_ms_median") > 0
    assert table.get("large", "fused_adam-numba", "step_ms_median") is None
    markdown = (tmp_path / "results.md").read_text()
    assert "| small-800 (1,664,000 params, 800 tensors) | fused_adam-numba |" in markdown
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp"))
    # ... and the partial report redraws from its JSON alone.
    (tmp_path / "results.md").unlink()
    report.redraw(tmp_path)
    assert "small-800" in (tmp_path / "results.md").read_text()


def test_two_runs_leave_two_folders_and_say_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(system, "RESULTS_ROOT", tmp_path)
    main(TINY_RUN)
    first = capsys.readouterr().out
    main(TINY_RUN)
    second = capsys.readouterr().out
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2
    slug = system.device_slug(__import__("torch").device("cpu"))
    for folder, out in zip(folders, (first, second)):
        assert folder.name.startswith(slug + "-")
        assert {p.name for p in folder.iterdir()} >= {"results.json", "results.md",
                                                      "results.png"}
        assert f"results folder: {folder}" in out.splitlines()[-1]
    # A line per provider as its pair finishes: its median and its ratio to torch-fused.
    numba_line = next(line for line in first.splitlines() if "fused_adam-numba" in line
                      and line.lstrip().startswith("small-800"))
    assert " ms" in numba_line and "x torch-fused" in numba_line
    # The headline table closes the run.
    assert "| config | torch-fused step | FusedAdam step | speedup |" in first


def test_every_row_carries_the_schema(tmp_path):
    main([*TINY_RUN, "--out", str(tmp_path)])
    rows = results.read(tmp_path / "results.json")
    assert rows and all(SCHEMA <= set(r) for r in rows)
    assert {r["command"] for r in rows} == {"step"}
    kinds = {r["provider"]: r["kind"] for r in rows}
    assert kinds == {"torch-fused": "optimizer", "fused_adam-numba": "optimizer",
                     "roofline (no-math)": "roofline", "copy_ (reference)": "copy"}


CLIP_METRICS = {f"clip_step_ms_{q}" for q in results.QUANTILES} | {
    f"clip_iter_ms_{q}" for q in results.QUANTILES} | {
    "clip_step_speedup_vs_torch_fused", "clip_cost_fraction", "grad_norm"}


def test_clip_step_is_timed_for_every_optimizer_and_reported(tmp_path):
    """Every optimizer's pair times clip+step too (torch's clip_grad_norm_ foreach vs
    FusedAdam.clip_grad_norm, then the step), in the same rounds as the step; the rows say so,
    and so do the headline and the table of every subject."""
    main([*TINY_RUN, "--providers", "torch-fused", "fused_adam-numba", "torch-foreach",
          "--out", str(tmp_path)])
    rows = results.read(tmp_path / "results.json")
    table = results.Table(rows)
    metrics = {}
    for r in rows:
        metrics.setdefault(r["provider"], set()).add(r["metric"])
    for provider in ("torch-fused", "fused_adam-numba", "torch-foreach"):
        assert CLIP_METRICS <= metrics[provider], (provider, CLIP_METRICS - metrics[provider])
        assert table.get("small-800", provider, "clip_step_ms_median") > 0
        # It really clips: the stand-in backward's gradients are all ones.
        norm = table.row("small-800", provider, "grad_norm")
        assert norm["value"] == pytest.approx(1_664_000 ** 0.5, rel=1e-5)
        assert norm["value"] > norm["max_norm"]
    for provider in ("fused_adam-numba", "torch-foreach"):
        # The same rounds as the step's: as many samples (torch-fused's step pools the
        # roofline's pairs too, its clip+step only the optimizers').
        assert (table.row("small-800", provider, "clip_step_ms_median")["samples"]
                == table.row("small-800", provider, "step_ms_median")["samples"])
        assert table.get("small-800", provider, "clip_step_speedup_vs_torch_fused") > 0
        assert table.get("small-800", provider, "torch_fused_clip_step_ms_in_pair") > 0
    assert table.get("small-800", "torch-fused", "clip_step_speedup_vs_torch_fused") == 1.0
    for provider in ("roofline (no-math)", "copy_ (reference)"):
        assert not CLIP_METRICS & metrics[provider]
    assert rows[0]["settings"]["clip_max_norm"] == 1.0

    headline = report_step.headline_markdown(rows)
    assert ("| torch-fused clip+step | FusedAdam clip+step (speedup) |"
            in headline.splitlines()[0])
    row = next(line for line in headline.splitlines() if line.startswith("| small-800"))
    # A cell per column (no compressed mode ran: no column for one), the last a speedup.
    assert row.count("|") == headline.splitlines()[0].count("|") == 8
    assert "x" in row.split("|")[-2]
    assert "Clip's own cost" in headline and "small-800 " in headline
    markdown = (tmp_path / "results.md").read_text()
    assert "clip+step ms median [p20–p80] (x torch-fused's) | clip (% of step) |" in markdown
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_clip_step_subjects_clip_alike():
    """What clip+step times is a real clip: torch's clip_grad_norm_ then torch's fused Adam and
    FusedAdam.clip_grad_norm then FusedAdam's step end at the same parameters, and both report
    the norm of the stand-in backward's gradients (all ones)."""
    import torch

    from bench import configs, providers, timing
    tiny = configs.Config("tiny", ((3, 5), (5,)) * 3, "3 x (3x5 weight, 5 bias)")
    cpu = torch.device("cpu")
    built = {name: providers.build(name, tiny, cpu) for name in ("torch-fused",
                                                                 "fused_adam-numba")}
    for _ in range(3):
        for subject in built.values():
            out = timing.iteration(subject, cpu, clip=providers.MAX_NORM)
            assert set(out) == {"clip_step", "clip_iter", "grad_norm"}
            assert out["grad_norm"] == pytest.approx(60 ** 0.5)
    for a, b in zip(built["torch-fused"].params, built["fused_adam-numba"].params):
        torch.testing.assert_close(a, b)


def test_which_pairs_time_clip_step():
    """By default torch-foreach's and the compiled FusedAdam's pairs (torch-fused's clip+step is
    timed in theirs); `all` every optimizer's, never the roofline's; --no-clip none."""
    from bench import step
    from bench.__main__ import _step_parser

    def chosen(*argv):
        args = _step_parser().parse_args(["--device", "cpu", "--out", "unused", *argv])
        return step.StepBenchmark(args).clip_providers

    assert chosen() == ["torch-foreach", "fused_adam-numba"]
    # Every optimizer the run times but the anchor (whose clip+step is timed in each pair).
    everything = [p for p in providers.default_providers("cpu") if p != "torch-fused"]
    assert "fused_adam-numba:int8-states" in everything
    assert chosen("--clip-providers", "all") == everything
    assert chosen("--clip-providers", "fused_adam-numba:bf16-states") == [
        "fused_adam-numba:bf16-states"]
    assert chosen("--no-clip") == []


def test_no_clip_times_the_step_only(tmp_path):
    main([*TINY_RUN, "--no-clip", "--out", str(tmp_path)])
    rows = results.read(tmp_path / "results.json")
    assert not CLIP_METRICS & {r["metric"] for r in rows}
    assert rows[0]["settings"]["clip_max_norm"] is None
    assert "clip+step" not in report_step.headline_markdown(rows)


@pytest.mark.parametrize("command", ["grad-layout", "train"])
def test_other_commands_write_the_same_schema(tmp_path, command):
    args = {"grad-layout": ["--quick", "--configs", "small-800", "--warmup", "1", "--iters", "1"],
            "train": ["--iters", "6", "--batch-size", "4"]}[command]
    # train clips at 1.0 by default: FusedAdamW's fused clip against torch's clip_grad_norm_.
    main([command, "--device", "cpu", "--out", str(tmp_path), *args])
    rows = results.read(tmp_path / f"{results.STEMS[command]}.json")
    assert rows and all(SCHEMA <= set(r) for r in rows)
    assert {r["command"] for r in rows} == {command}
    if command == "train":
        # Same seed, same batches: FusedAdamW's loss curve is torch's AdamW's, to rounding.
        table = results.Table(rows)
        assert table.get("char-gpt", "both", "max_abs_loss_diff") < 1e-4
        assert len([r for r in rows if r["metric"] == "loss"]) == 2 * 6
        assert (tmp_path / "train_loss.png").stat().st_size > 0
        assert rows[0]["settings"]["max_grad_norm"] == 1.0
        for run in ("fused_adam", "torch"):
            for metric in ("clip_ms_median", "step_ms_median", "clip_step_ms_median"):
                assert table.get("char-gpt", run, metric) > 0, (run, metric)
            assert table.get("char-gpt", run, "grad_norm_median") > 0
        markdown = (tmp_path / "train.md").read_text()
        assert "| clip ms | step ms | clip + step ms |" in markdown
    else:
        variants = {r["provider"] for r in rows}
        assert variants == {"torch-fused", "fused_adam grads-in-place", "fused_adam flat-grads"}
    assert (tmp_path / f"{results.STEMS[command]}.md").read_text().startswith("# ")


def test_train_without_clipping(tmp_path):
    main(["train", "--device", "cpu", "--out", str(tmp_path), "--iters", "4", "--batch-size",
          "2", "--max-grad-norm", "0"])
    rows = results.read(tmp_path / "train.json")
    assert rows[0]["settings"]["max_grad_norm"] is None
    metrics = {r["metric"] for r in rows}
    assert "step_ms_median" in metrics and not {"clip_ms_median", "clip_step_ms_median"} & metrics
    assert "clip ms" not in (tmp_path / "train.md").read_text()


def test_bench_gpu_selects_only_the_tests_that_need_a_gpu():
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_gpu.py", "tests/test_bench_memory.py",
         "-p", "bench.gpu_tests", "--collect-only", "-q"],
        cwd=REPO, capture_output=True, text=True).stdout
    ids = [line for line in listed.splitlines() if "::" in line]
    assert ids and all(line.startswith("tests/test_gpu.py::") for line in ids), listed


def test_a_pair_whose_torch_fused_strays_is_marked_noisy():
    """A pair in which torch-fused ran far from its usual time (other work started or stopped
    under it) gets its ratio marked, in the tables and the plot."""
    where = results.config_fields("c", "a config", 10, 1)
    rows = [results.row({}, where, "torch-fused", "step_ms_median", 10.0, "ms")]
    for provider, anchor_ms in (("steady", 14.0), ("slow", 16.0), ("fast", 6.0)):
        rows.append(results.row({}, where, provider, "torch_fused_step_ms_in_pair", anchor_ms,
                                "ms"))
    table = results.Table(rows)
    assert report_step.noisy(table, "c", "steady") is None
    assert report_step.noisy(table, "c", "slow") == pytest.approx(1.6)
    assert report_step.noisy(table, "c", "fast") == pytest.approx(0.6)
    assert report_step.noisy(table, "c", "torch-fused") is None
