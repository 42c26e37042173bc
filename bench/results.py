"""The one row schema every command writes (step, breakdown, grad-layout, train), in long format:
one row per (config, provider, metric), each row carrying where and when it was measured, so rows
from different runs and machines can be pooled without losing where they came from.

    command        "step" | "breakdown" | "grad-layout" | "train" | "train-ddp" | "accuracy"
    config         "gpt2-small", "small-800", "large", "char-gpt", ...
    config_detail  the config in words (says when it was scaled down, and why)
    n_params, n_tensors
    provider       who was measured: "torch-fused", "fused_adam-numba:bf16-states",
                   "roofline (no-math)", "fused_adam flat-grads", ...
    kind           "optimizer" | "roofline" | "copy" | "part" (a part of a step)
    metric         "step_ms_median", "step_ms_p20", "GBps", "speedup_vs_torch_fused", "loss", ...
    value, unit    a number (None for "skipped") and its unit ("ms", "GB/s", "x", ...)
    samples        how many timed rounds a statistic comes from (None where not a statistic)
    + the run's metadata from `bench.system.run_metadata()`: device, device_name, hardware,
      torch/triton/numba/numpy/python versions, git_sha, timestamp, cpu_count,
      load_average_at_start, quick, settings
    + extras a metric needs: reason (skipped), iteration (loss), bytes_per_step, ...

`<stem>.json` holds a list of rows; `bench.report` makes every table and plot from rows alone,
so `python -m bench report DIR` redraws them from JSON copied back from another machine.
"""
import json
import os
from pathlib import Path

from bench.timing import summarize

QUANTILES = ("median", "p20", "p80")
# Which file each command's rows live in (one folder may hold several commands' files).
STEMS = {"step": "results", "breakdown": "breakdown", "grad-layout": "grad_layout",
         "train": "train", "train-ddp": "train_ddp", "accuracy": "accuracy"}


def config_fields(name, detail, n_params, n_tensors):
    return dict(config=name, config_detail=detail, n_params=int(n_params),
                n_tensors=int(n_tensors))


def row(meta, where, provider, metric, value, unit, *, kind="optimizer", samples=None, **extra):
    """One row: `meta` from run_metadata(), `where` from config_fields()."""
    return dict(**where, provider=provider, kind=kind, metric=metric, value=value, unit=unit,
                samples=samples, **meta, **extra)


def time_rows(meta, where, provider, name, seconds, *, kind="optimizer", **extra):
    """`{name}_ms_median`, `_p20`, `_p80` rows from a list of seconds."""
    stats = summarize(seconds)
    return [row(meta, where, provider, f"{name}_ms_{q}", stats[q], "ms", kind=kind,
                samples=stats["n"], **extra) for q in QUANTILES]


def write(rows, out_dir, command):
    """Write `rows` to `out_dir/<stem>.json` atomically (a reader, or an interrupted run, never
    sees half a file); returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{STEMS[command]}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read(path):
    return json.loads(Path(path).read_text())


class Table:
    """Rows indexed for reading: `get(config, provider, metric)`, configs and providers in the
    order they first appear, and each provider's kind."""

    def __init__(self, rows):
        self.rows = rows
        self.cells, self.configs, self.providers, self.kinds = {}, [], [], {}
        for r in rows:
            if r["config"] not in self.configs:
                self.configs.append(r["config"])
            if r["provider"] not in self.providers:
                self.providers.append(r["provider"])
            self.kinds.setdefault(r["provider"], r.get("kind", "optimizer"))
            self.cells.setdefault((r["config"], r["provider"]), {})[r["metric"]] = r

    def get(self, config, provider, metric, default=None):
        cell = self.cells.get((config, provider), {}).get(metric)
        return default if cell is None else cell["value"]

    def row(self, config, provider, metric):
        return self.cells.get((config, provider), {}).get(metric)

    def has(self, config, provider):
        return (config, provider) in self.cells

    def first(self, config=None):
        """The first row (of `config`): where the config's and the run's metadata are read."""
        return next(r for r in self.rows if config is None or r["config"] == config)
