"""What every report of bench/ shares: the formatting of times and configs, the header of a
results file, the figure's setup and saving, and `write`/`redraw`. Each command's tables and
plot come from the module that makes them (`MAKERS`), from result rows alone (`bench.results`),
so `python -m bench report DIR` redraws every one of them from the JSON in DIR.
"""
import importlib
from pathlib import Path

from bench import results

ANCHOR = "torch-fused"


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def spread(table, config, provider, name):
    """`median [p20–p80]` of `{name}_ms_*`."""
    med, lo, hi = (table.get(config, provider, f"{name}_ms_{q}") for q in results.QUANTILES)
    if med is None:
        return "—"
    return f"{fmt_ms(med)} [{fmt_ms(lo)}–{fmt_ms(hi)}]"


def config_label(table, config, short=False):
    first = table.first(config)
    n = first["n_tensors"]
    tensors = f"{n} tensor" + ("" if n == 1 else "s")
    if short:
        return f"{config} ({first['n_params'] / 1e6:.1f} M params, {tensors})"
    return f"{config} ({first['n_params']:,} params, {tensors})"


def header(first, title):
    """The lines every results file opens with: title, quick mode, hardware, versions, load."""
    lines = [f"# {title}: {first['device_name']} ({first['device']})", ""]
    if first.get("quick"):
        lines += ["**Quick mode**: scaled-down configs and few rounds; a check that the "
                  "machinery works, not numbers to quote.", ""]
    load = first.get("load_average_at_start")
    lines += [f"Hardware: {first['hardware']}", "",
              f"torch {first['torch']}, triton {first['triton']}, numba {first['numba']}, "
              f"git {first['git_sha']}, {first['timestamp']}"
              + (f"; load average {load:.1f} on {first['cpu_count']} cores at the start"
                 + (" (other work was running: read the times as noisy)"
                    if load is not None and first.get("cpu_count")
                    and load > 0.5 * first["cpu_count"] else "")
                 if load is not None else "") + ".", ""]
    return lines


def losses(rows, provider):
    """`provider`'s loss curve, in iteration order."""
    points = sorted((r["iteration"], r["value"]) for r in rows
                    if r["metric"] == "loss" and r["provider"] == provider)
    return [v for _, v in points]


def pyplot():
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, rect=None):
    """Lay out, write and close `fig`; returns `path`."""
    fig.tight_layout(**({} if rect is None else dict(rect=rect)))
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


# command -> (the module whose `markdown(rows)` and `plot(rows, path)` make its report, the plot
# file's suffix or None where it has no plot)
MAKERS = {
    "step": ("bench.report_step", ".png"),
    "breakdown": ("bench.studies.breakdown", ".png"),
    "grad-layout": ("bench.studies.grad_layout", None),
    "train": ("bench.report_training", "_loss.png"),
    "train-ddp": ("bench.report_training", "_loss.png"),
    "accuracy": ("bench.report_accuracy", "_loss.png"),
}


def write(rows, out_dir, command, *, plot=True):
    """`<stem>.json` and `<stem>.md` (and the plot, unless `plot=False`) in `out_dir`; returns
    the paths written."""
    out_dir = Path(out_dir)
    stem = results.STEMS[command]
    module, suffix = MAKERS[command]
    maker = importlib.import_module(module)
    paths = [results.write(rows, out_dir, command)]
    md = out_dir / f"{stem}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(maker.markdown(rows))
    tmp.replace(md)
    paths.append(md)
    if plot and suffix is not None:
        png = out_dir / f"{stem}{suffix}"
        tmp = out_dir / f".{stem}{suffix}"
        if maker.plot(rows, tmp) is not None:
            tmp.replace(png)
            paths.append(png)
    return paths


def redraw(out_dir):
    """Rebuild every table and plot in `out_dir` from the JSON files there; returns the paths."""
    out_dir = Path(out_dir)
    written = []
    for command, stem in results.STEMS.items():
        path = out_dir / f"{stem}.json"
        if path.exists():
            rows = results.read(path)
            if rows and "command" in rows[0]:
                written += write(rows, out_dir, command)
    if not written:
        raise SystemExit(f"no result files in the current format in {out_dir}")
    return written
