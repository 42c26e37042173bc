"""Results in long format, and everything made from them: `results.json` (one row per provider,
config and metric, each row carrying its device, versions, git sha and quick flag, so rows from
different runs can be pooled without losing where they came from), `results.md` (a table for the
README plus one sentence on the hardware) and `results.png`.

The table and plot are built from the rows alone, so `python -m bench report DIR` redraws them
from a results.json copied back from another machine.
"""
import json
from datetime import datetime, timezone
from pathlib import Path

REFERENCE = "torch-fused"
ROOFLINE_KIND, COPY_KIND, OPTIMIZER_KIND = "roofline", "copy", "optimizer"


def run_metadata(device, quick, system, allocations=1):
    """The fields every row carries."""
    versions = system.versions()
    return {
        "device": device.type,
        "device_name": system.device_name(device),
        "hardware": system.hardware_sentence(device),
        "torch": versions["torch"], "triton": versions["triton"], "numba": versions["numba"],
        "git_sha": system.git_sha(),
        "quick": bool(quick),
        "allocations": int(allocations),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def config_rows(config, subjects, stats, meta, huge_pages=None, skipped=()):
    """Rows for one config. `stats[name]` = {"step": summary, "iter": summary} (ms);
    `subjects` are what was timed (name, kind, bytes_per_step); `skipped` = [(name, reason)]."""
    base = dict(config=config.name, config_detail=config.detail, n_params=config.n_params,
                n_tensors=config.n_tensors, **meta)
    rows = []

    def add(subject, metric, value, unit, **extra):
        rows.append(dict(provider=subject.name, kind=getattr(subject, "kind", OPTIMIZER_KIND),
                         metric=metric, value=value, unit=unit, **base, **extra))

    roofline = next((s for s in subjects if getattr(s, "kind", "") == ROOFLINE_KIND), None)
    roofline_gbps = (roofline.bytes_per_step / stats[roofline.name]["step"]["median"] / 1e6
                     if roofline else None)
    reference_ms = stats.get(REFERENCE, {}).get("step", {}).get("median")
    for s in subjects:
        kind = getattr(s, "kind", OPTIMIZER_KIND)
        step = stats[s.name]["step"]
        for q in ("median", "p20", "p80"):
            add(s, f"step_ms_{q}", step[q], "ms", samples=step["n"])
        gbps = s.bytes_per_step / step["median"] / 1e6  # bytes/ms -> GB/s
        add(s, "GBps", gbps, "GB/s", bytes_per_step=s.bytes_per_step)
        if kind == COPY_KIND:
            continue  # 8 B/element: a different traffic pattern, shown beside, not divided by
        if roofline_gbps:
            add(s, "roofline_fraction", gbps / roofline_gbps, "fraction")
        if kind == OPTIMIZER_KIND:
            it = stats[s.name]["iter"]
            for q in ("median", "p20", "p80"):
                add(s, f"iter_ms_{q}", it[q], "ms", samples=it["n"])
            if reference_ms:
                add(s, "speedup_vs_torch_fused", reference_ms / step["median"], "x")
        if huge_pages and huge_pages.get(s.name) is not None:
            add(s, "huge_page_fraction", huge_pages[s.name], "fraction")
    for name, reason in skipped:
        rows.append(dict(provider=name, kind=OPTIMIZER_KIND, metric="skipped", value=None,
                         unit=None, reason=reason, **base))
    return rows


# ------------------------------------------------------------------------------------------------
# Reading rows back

def _index(rows):
    """{(config, provider): {metric: value}} plus first-seen orders of configs and providers."""
    table, configs, providers, kinds = {}, [], [], {}
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
        if r["provider"] not in providers:
            providers.append(r["provider"])
        kinds[r["provider"]] = r.get("kind", OPTIMIZER_KIND)
        table.setdefault((r["config"], r["provider"]), {})[r["metric"]] = r
    return table, configs, providers, kinds


def _tensors(n):
    return f"{n} tensor" + ("" if n == 1 else "s")


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _ms(cell, prefix):
    if f"{prefix}_median" not in cell:
        return "—"
    med, lo, hi = (cell[f"{prefix}_{q}"]["value"] for q in ("median", "p20", "p80"))
    digits = ".3f" if med < 1 else ".2f" if med < 100 else ".0f"
    return f"{med:{digits}} [{lo:{digits}}–{hi:{digits}}]"


def markdown(rows):
    table, configs, providers, kinds = _index(rows)
    first = rows[0]
    lines = [f"# Adam step benchmark: {first['device_name']} ({first['device']})", ""]
    if first["quick"]:
        lines += ["**Quick mode**: scaled-down configs and few iterations; a check that the "
                  "machinery works, not numbers to quote.", ""]
    lines += [
        f"Hardware: {first['hardware']}",
        "",
        f"torch {first['torch']}, triton {first['triton']}, numba {first['numba']}, "
        f"git {first['git_sha']}, {first['timestamp']}.",
        "",
        "Step = `optimizer.step()` alone, after a real backward (fresh gradients from autograd "
        "every iteration); median [p20–p80] of the timed rounds, subjects interleaved round-robin"
        + (f", pooled over {first['allocations']} fresh allocations of every subject's buffers. "
           if first.get("allocations", 1) > 1 else ". ") +
        "GB/s = bytes per parameter x parameters / median step time: 28 B for fp32 (read param, "
        "grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq); `:bf16-states` (fp32 "
        "params, bf16 moments) 20 B; `:bf16-master` (bf16 params, fp32 master and moments) 28 B; "
        "`torch-fused:bf16` (bf16 params and moments) 14 B. Roofline = a no-math kernel moving the same 28 B/param in "
        "the same run, after a stand-in backward that reads its params and writes its gradients "
        "(on a config that fits in the last-level cache it runs partly from cache, faster than "
        "memory); `copy_` moves 8 B/element and is shown for reference. Iteration = forward "
        "+ backward of a cheap loss over all parameters + step + zero_grad.",
        "",
        "| config | provider | step ms median [p20–p80] | GB/s | % of roofline | "
        "speedup vs torch-fused | iteration ms median [p20–p80] |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        detail = next(r for r in rows if r["config"] == config)
        label = f"{config} ({detail['n_params']:,} params, {_tensors(detail['n_tensors'])})"
        for provider in providers:
            cell = table.get((config, provider))
            if not cell:
                continue
            if "skipped" in cell:
                lines.append(f"| {label} | {provider} | skipped: {cell['skipped'].get('reason')} "
                             "| | | | |")
                continue
            frac = cell.get("roofline_fraction", {}).get("value")
            speed = cell.get("speedup_vs_torch_fused", {}).get("value")
            lines.append(
                f"| {label} | {provider} | {_ms(cell, 'step_ms')} | "
                f"{_fmt(cell['GBps']['value'], '.1f')} | "
                f"{'—' if frac is None else f'{100 * frac:.0f}%'} | "
                f"{'—' if speed is None else f'{speed:.2f}x'} | {_ms(cell, 'iter_ms')} |")
    details = {r["config"]: r["config_detail"] for r in rows}
    lines += ["", "Configs: " + "; ".join(f"`{c}` = {d}" for c, d in details.items()) + "."]
    huge = {(r["config"], r["provider"]): r["value"] for r in rows
            if r["metric"] == "huge_page_fraction"}
    if huge:
        lines += ["", "Share of params and optimizer state backed by transparent huge pages "
                  "(the roofline's arrays and fused_adam's arena are numpy-allocated, which asks "
                  "for them; torch's allocator does not): " + ", ".join(
                      f"{p} on {c} {100 * v:.0f}%" for (c, p), v in huge.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Grouped bars of GB/s per provider per config; the roofline (and copy_) as lines over each
    group; each optimizer bar labelled with its speedup over torch-fused."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, configs, providers, kinds = _index(rows)
    optimizers = [p for p in providers if kinds[p] == OPTIMIZER_KIND
                  and any("GBps" in table.get((c, p), {}) for c in configs)]
    hatches = ["", "//", "\\\\", "..", "xx", "--", "++"]
    colors = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD", "#8C8C8C"]
    width = 0.8 / max(len(optimizers), 1)
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(configs) + 2), 5.2))
    for i, provider in enumerate(optimizers):
        xs, ys, labels = [], [], []
        for j, config in enumerate(configs):
            cell = table.get((config, provider), {})
            if "GBps" not in cell:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(cell["GBps"]["value"])
            speed = cell.get("speedup_vs_torch_fused", {}).get("value")
            labels.append("" if speed is None else f"{speed:.2f}x")
        bars = ax.bar(xs, ys, width * 0.95, label=provider, color=colors[i % len(colors)],
                      hatch=hatches[i % len(hatches)], edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2, zorder=4,
                     bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.6))
    for kind, style, label in ((ROOFLINE_KIND, "-", "roofline: no-math kernel, 28 B/param"),
                               (COPY_KIND, ":", "copy_ bandwidth, 8 B/element")):
        for name in (p for p in providers if kinds[p] == kind):
            for j, config in enumerate(configs):
                cell = table.get((config, name), {})
                if "GBps" in cell:
                    ax.hlines(cell["GBps"]["value"], j - 0.45, j + 0.45, colors="black",
                              linestyles=style, linewidth=1.6, label=label)
                    label = None  # one legend entry per line kind
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the labels above the tallest bar
    ax.set_xticks(range(len(configs)))
    firsts = {c: next(r for r in rows if r["config"] == c) for c in configs}
    ax.set_xticklabels([f"{c}\n({firsts[c]['n_params'] / 1e6:.1f} M params, "
                        f"{_tensors(firsts[c]['n_tensors'])})" for c in configs], fontsize=9)
    ax.set_ylabel("effective bandwidth of optimizer.step(), GB/s\n(bytes the mode moves per parameter / median time)")
    first = rows[0]
    title = f"Adam step bandwidth on {first['device_name']} ({first['device']})"
    if first["quick"]:
        title += " - QUICK MODE (scaled-down configs)"
    ax.set_title(title + "\nbar labels: speedup of step time over torch-fused", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_rows(rows, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def write_all(rows, out_dir):
    """results.json, results.md and results.png in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"results.{name}" for name in ("json", "md", "png")}
    write_rows(rows, out_dir)
    paths["md"].write_text(markdown(rows))
    plot(rows, paths["png"])
    return paths


def redraw(out_dir):
    """Rebuild results.md and results.png from an existing results.json."""
    out_dir = Path(out_dir)
    rows = json.loads((out_dir / "results.json").read_text())
    return write_all(rows, out_dir)
