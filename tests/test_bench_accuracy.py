"""`python -m bench accuracy` as a user runs it: a short run of a few variants writes a report
with a row per variant (the reference included even when not named), optimizer-state bytes per
parameter that match each variant's layout, and a plot; an unknown variant is refused before
anything trains. Three iterations on tiny batches: this checks the machinery, not the accuracy."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results
from bench.accuracy import VARIANT_NAMES, _BY_NAME

REPO = Path(__file__).resolve().parents[1]
N_PARAMS = 822_400  # the char GPT of bench/train.py, vocabulary 163


def _bench(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bench", "accuracy", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    done = _bench("--device", "cpu", "--iters", "3", "--batch-size", "2", "--out", str(out),
                  "--variants", "fused-int8", "fused-bf16+16")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_writes_json_markdown_and_plot(short_run):
    out, stdout = short_run
    assert {p.name for p in out.iterdir()} >= {"accuracy.json", "accuracy.md",
                                               "accuracy_loss.png"}
    assert (out / "accuracy_loss.png").stat().st_size > 10_000
    # Progress, variant by variant, the reference first though not named.
    for name in ("torch-fp32", "fused-int8", "fused-bf16+16"):
        assert f"  {name}: iter    3/3" in stdout
    assert stdout.index("torch-fp32: iter") < stdout.index("fused-int8: iter")


def test_every_variant_has_its_row(short_run):
    out, _ = short_run
    rows = results.read(out / "accuracy.json")
    assert {r["command"] for r in rows} == {"accuracy"}
    for r in rows:  # the row schema every command writes (bench/results.py)
        assert set(r) >= {"config", "config_detail", "n_params", "n_tensors", "provider", "kind",
                          "metric", "value", "unit", "samples", "device", "hardware", "git_sha",
                          "timestamp", "settings"}
    table = results.Table(rows)
    assert table.providers == ["torch-fp32", "fused-int8", "fused-bf16+16"]
    markdown = (out / "accuracy.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith("| variant")}
    for name in table.providers:
        label = _BY_NAME[name].label
        assert label in lines, markdown
        assert len([r for r in rows if r["provider"] == name and r["metric"] == "loss"]) == 3
        final = table.get("char-gpt", name, "final_loss")
        assert 3 < final < 6  # ln(163) = 5.09 at the start
    assert "| reference |" in lines["torch AdamW fp32"]
    for name in ("fused-int8", "fused-bf16+16"):
        verdict = "PASS" if table.get("char-gpt", name, "within_tolerance") else "**FAIL**"
        assert f"| {verdict} |" in lines[_BY_NAME[name].label]
        rel = table.get("char-gpt", name, "final_loss_rel_diff")
        reference = table.get("char-gpt", "torch-fp32", "final_loss")
        assert rel == pytest.approx(table.get("char-gpt", name, "final_loss") / reference - 1)
        # Three iterations from one seed on the same batches: any variant is close here.
        assert abs(rel) < 0.01
    assert table.first()["n_params"] == N_PARAMS


def test_state_bytes_per_param_match_each_layout(short_run):
    out, _ = short_run
    table = results.Table(results.read(out / "accuracy.json"))
    state = {name: table.get("char-gpt", name, "state_bytes_per_param")
             for name in table.providers}
    params = {name: table.get("char-gpt", name, "param_bytes_per_param")
              for name in table.providers}
    # One fp32 step counter per parameter tensor, in torch's fused AdamW and in FusedAdamW.
    step_counters = 4 * table.first()["n_tensors"] / N_PARAMS
    # fp32 moments: 4 + 4 B.
    assert state["torch-fp32"] == pytest.approx(8 + step_counters, abs=1e-9)
    # 8-bit moments: 1 + 1 B of codes and an fp32 absmax per 256 values of each moment (a
    # little more: every parameter starts a block, so a small one has a block of its own).
    assert state["fused-int8"] == pytest.approx(2 + 8 / 256, abs=2e-3)
    assert state["fused-int8"] >= 2 + 8 / 256
    # bf16 params with a bf16+16 master: fp32 moments plus a 2 B int16 remainder; the params
    # themselves 2 B instead of 4, so params + state is what fp32 AdamW's is.
    assert state["fused-bf16+16"] == pytest.approx(8 + 2 + step_counters, abs=1e-9)
    assert params == {"torch-fp32": 4, "fused-int8": 4, "fused-bf16+16": 2}
    markdown = (out / "accuracy.md").read_text()
    assert "| 2.03" in markdown and "| 10.000 | 12.000 |" in markdown


def test_the_report_redraws_from_its_json(short_run, tmp_path):
    out, _ = short_run
    for name in ("accuracy.json",):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    from bench import report
    written = {Path(p).name for p in report.redraw(tmp_path)}
    assert written == {"accuracy.json", "accuracy.md", "accuracy_loss.png"}
    assert (tmp_path / "accuracy.md").read_text() == (out / "accuracy.md").read_text()


def test_an_unknown_variant_is_refused(tmp_path):
    done = _bench("--device", "cpu", "--iters", "3", "--out", str(tmp_path / "out"),
                  "--variants", "fused-int8", "fused-int4")
    assert done.returncode == 2
    assert "unknown variant 'fused-int4'" in done.stderr
    assert all(name in done.stderr for name in VARIANT_NAMES)  # the names it takes
    assert "iter" not in done.stdout  # refused before anything trained
    assert not (tmp_path / "out").exists()


def test_a_missing_third_party_package_is_a_row_that_says_why(tmp_path, monkeypatch, capsys):
    from bench.__main__ import main
    # None in sys.modules: `import bitsandbytes` raises ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    main(["accuracy", "--device", "cpu", "--iters", "2", "--batch-size", "2", "--out",
          str(tmp_path), "--variants", "bnb-adamw8bit", "torchao-adamw8bit"])
    table = results.Table(results.read(tmp_path / "accuracy.json"))
    assert table.providers == ["torch-fp32", "bnb-adamw8bit", "torchao-adamw8bit"]
    for name, package in (("bnb-adamw8bit", "bitsandbytes"), ("torchao-adamw8bit", "torchao")):
        reason = table.row("char-gpt", name, "skipped")["reason"]
        assert reason.startswith(f"{package} ") and "not installed" in reason
        assert table.get("char-gpt", name, "final_loss") is None
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "| bitsandbytes AdamW8bit | fp32 | skipped: bitsandbytes is not installed" in markdown
    assert "| torchao AdamW8bit | fp32 | skipped: torchao" in markdown
    assert "bnb-adamw8bit: skipped:" in capsys.readouterr().out
    assert (tmp_path / "accuracy_loss.png").stat().st_size > 0
