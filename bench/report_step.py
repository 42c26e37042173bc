"""The step benchmark's report, from its rows alone: results.md (the headline table, then every
subject with its spread, rounds, bandwidth, roofline share and peak memory) and results.png
(bandwidth per optimizer and config, at torch-fused's pace, beside the roofline).
"""
from bench import results
from bench.report import ANCHOR, config_label, fmt_ms, header, pyplot, save, spread

ROOFLINE, COPY = "roofline (no-math)", "copy_ (reference)"
COMPILED = {"cpu": "fused_adam-numba", "cuda": "fused_adam-triton"}
CLIP_SPEEDUP = "clip_step_speedup_vs_torch_fused"


def _ordered(table):
    """Providers in the run's order (its --providers), then the roofline subjects."""
    order = table.first().get("settings", {}).get("providers") or []
    rank = lambda p: (order.index(p) if p in order else  # noqa: E731
                      len(order) + (0 if table.kinds.get(p) == "optimizer" else 1))
    return sorted(table.providers, key=rank)


def _ours(table, device):
    compiled = COMPILED.get(device, "fused_adam-numba")
    return compiled if compiled in table.providers else next(
        (p for p in table.providers if p.startswith("fused_adam-") and ":" not in p), None)


def has_clip(table):
    return any(table.get(c, p, "clip_step_ms_median") is not None
               for c in table.configs for p in table.providers)


def clip_cost_line(table, ours):
    """The clip's own cost, per config: clip+step's median over the step's in FusedAdam's own
    rounds (and torch-fused's, for comparison), as a share of the step."""
    cells = []
    for config in table.configs:
        cost = table.get(config, ours, "clip_cost_fraction")
        anchor = table.get(config, ANCHOR, "clip_cost_fraction")
        if cost is None:
            continue
        cells.append(f"{config} {100 * cost:+.0f}%"
                     + ("" if anchor is None else f" (torch-fused's clip {100 * anchor:+.0f}%)"))
    if not cells:
        return None
    norms = sorted({round(r["value"]) for r in table.rows if r["metric"] == "grad_norm"})
    max_norm = next((r.get("max_norm") for r in table.rows if r["metric"] == "grad_norm"), None)
    return ("Clip's own cost (FusedAdam's clip+step median over its step median, minus 1, "
            "from its own rounds; as a share of its step): " + "; ".join(cells) + "."
            + (f" Gradient norms before the clip {', '.join(f'{n:,}' for n in norms)}, clipped "
               f"to {max_norm:g} (every step clips)." if norms and max_norm else ""))


# The compressed modes the headline shows beside FusedAdam's step, when the run timed them.
HEADLINE_MODES = (("bf16-states", "bf16 moments"), ("int8-states", "8-bit moments"),
                  ("bf16+8-int8-states", "bf16+8 master, 8-bit moments"))


def headline_markdown(rows):
    """The compact table: per config, torch-fused's step, FusedAdam's, the speedup, its share of
    the roofline, and each compressed mode timed (step and speedup); then, where clip+step was
    timed, torch-fused's clip+step (torch's clip_grad_norm_ foreach, then the fused step) and
    FusedAdam's with its speedup, and below the table the clip's own cost."""
    table = results.Table([r for r in rows if r["command"] == "step"])
    first = table.first()
    ours = _ours(table, first["device"])
    modes = [(f"{ours}:{mode}", label) for mode, label in HEADLINE_MODES
             if any(table.get(config, f"{ours}:{mode}", "step_ms_median") is not None
                    for config in table.configs)]
    clip = has_clip(table)
    lines = ["| config | torch-fused step | FusedAdam step | speedup | FusedAdam GB/s "
             "(% of roofline) |" + "".join(f" {label} step (speedup) |" for _, label in modes)
             + (" torch-fused clip+step | FusedAdam clip+step (speedup) |" if clip else ""),
             "|---|---:|---:|---:|---:|" + "---:|" * len(modes) + ("---:|---:|" if clip else "")]
    # torch-fused's time in FusedAdam's own pair, so that a row's two times give its speedup
    # (on a busy machine the pairs ran at different paces).
    for config in table.configs:
        label = config_label(table, config, short=True)
        if table.get(config, ANCHOR, "step_ms_median") is None:
            reason = (table.row(config, ANCHOR, "skipped") or {}).get("reason", "not measured")
            lines.append(f"| {label} | {reason} | | | |" + " |" * len(modes)
                         + (" | |" if clip else ""))
            continue
        fraction = table.get(config, ours, "roofline_fraction")
        gbps = table.get(config, ours, "GBps")
        mode_cells = ""
        for provider, _ in modes:
            mode_ms = table.get(config, provider, "step_ms_median")
            mode_cells += (" —" if mode_ms is None else
                           f" {fmt_ms(mode_ms)} ms ({_speed(table, config, provider)})") + " |"
        lines.append(
            f"| {label} | {fmt_ms(table.get(config, ours, 'torch_fused_step_ms_in_pair'))} ms | "
            f"{fmt_ms(table.get(config, ours, 'step_ms_median'))} ms | "
            + _speed(table, config, ours) + " | "
            + ("—" if gbps is None else f"{gbps:.1f}")
            + ("" if fraction is None else f" ({100 * fraction:.0f}%)") + " |"
            + mode_cells
            + (_clip_cells(table, config, ours) if clip else ""))
    cost = clip_cost_line(table, ours) if clip else None
    if cost:
        lines += ["", cost]
    if any(noisy(table, c, p) for c in table.configs for p in table.providers):
        lines += ["", f"\\* a noisy pair: torch-fused's median in it was more than "
                  f"{NOISY_PAIR:g}x off its median over all pairs (the machine's load changed "
                  "under it); rerun it alone to quote it."]
    return "\n".join(lines) + "\n"


def _clip_cells(table, config, ours):
    """The headline's two clip+step cells: torch-fused's (in FusedAdam's pair) and FusedAdam's
    with its speedup over it."""
    anchor_ms = table.get(config, ours, "torch_fused_clip_step_ms_in_pair")
    ours_ms = table.get(config, ours, "clip_step_ms_median")
    return (f" {'—' if anchor_ms is None else fmt_ms(anchor_ms) + ' ms'} | "
            + ("—" if ours_ms is None else
               f"{fmt_ms(ours_ms)} ms ({_speed(table, config, ours, CLIP_SPEEDUP)})") + " |")


def markdown(rows):
    table = results.Table(rows)
    first = table.first()
    settings = first.get("settings", {})
    clip = has_clip(table)
    lines = header(first, "Adam step benchmark")
    lines += ["## Headline", "", f"FusedAdam = `{_ours(table, first['device'])}`; torch-fused "
              "and FusedAdam step = medians over the rounds the two shared, speedup = their "
              "ratio; each compressed mode's speedup is from its own pair."
              + (" Clip+step = the gradients' norm clipped, then the step, timed as the step is "
                 "and in the same rounds: torch-fused's is `torch.nn.utils.clip_grad_norm_("
                 "params, max_norm, foreach=True)` then its fused step, FusedAdam's is "
                 "`optimizer.clip_grad_norm(max_norm)` (the norm; the step's kernel scales) then "
                 "`step()`." if clip else ""), "",
              headline_markdown(rows), "## Every subject", ""]
    lines += [
        "Step = `optimizer.step()` alone, after a real backward (fresh gradients from autograd "
        "every iteration). Every subject is timed in a pair with torch-fused, the two "
        "interleaved round by round (order alternating); x torch-fused is the ratio of their "
        "medians over the rounds they shared"
        + (f", each pair rebuilt and pooled over {settings['allocations']} allocations"
           if settings.get("allocations", 1) > 1 else "")
        + ". torch-fused's own row pools its rounds from every pair. Step ms = median [p20–p80]. "
        "GB/s = bytes the mode must move per parameter x parameters / median: 28 B for fp32 "
        "(read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq); "
        "`:bf16-states` (fp32 params, bf16 moments) 20 B; `:bf16-master` (bf16 params, fp32 "
        "master and moments) 28 B; `torch-fused:bf16` 14 B. Roofline = a no-math kernel moving "
        "28 B per element (capped at 2^26 elements on CPU: bandwidth no longer depends on size "
        "there), after a stand-in backward; its % is chained through torch-fused (each link "
        "one pair's shared rounds). `copy_` moves 8 B per element, for reference. Iteration = "
        "forward + backward of a cheap loss + step + zero_grad. Peak = the process's peak "
        "resident memory during the pair, sampled every 50 ms (CUDA: peak allocated). The plot "
        "draws each subject at torch-fused's pace (its bytes x its ratio to torch-fused / "
        "torch-fused's median over all pairs), so that on a busy machine, where "
        "pairs ran at different paces, bars and roofline compare as the ratios do; on a quiet "
        "one that is its own GB/s."
        + (" Clip+step = a clip of the gradients' norm (torch's optimizers: "
           "`clip_grad_norm_(foreach=True)`; ours: `FusedAdam.clip_grad_norm`), then the step, "
           "timed in the same pair and rounds as the step (after the same backward); x is to "
           "torch-fused's clip+step in those rounds; clip = clip+step's median over the step's "
           "in the subject's own rounds, minus 1." if clip else ""), "",
        "| config | provider | step ms median [p20–p80] | x torch-fused (same rounds) | "
        "rounds | GB/s | % of roofline | iteration ms | peak GB |"
        + (" clip+step ms median [p20–p80] (x torch-fused's) | clip (% of step) |" if clip
           else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if clip else "")]
    for config in table.configs:
        label = config_label(table, config)
        for provider in _ordered(table):
            if not table.has(config, provider):
                continue
            skipped = table.row(config, provider, "skipped")
            if skipped:
                lines.append(f"| {label} | {provider} | skipped: {skipped.get('reason')} "
                             "| | | | | | |" + (" | |" if clip else ""))
                continue
            if table.get(config, provider, "step_ms_median") is None:
                continue
            speed = table.get(config, provider, "speedup_vs_torch_fused")
            fraction = table.get(config, provider, "roofline_fraction")
            peak = table.get(config, provider, "peak_memory_GB")
            rounds = table.row(config, provider, "step_ms_median")["samples"]
            speed_cell = ("—" if speed is None or table.kinds[provider] == "copy"
                          else "1 (reference)" if provider == ANCHOR
                          else _speed(table, config, provider))
            drift = noisy(table, config, provider)
            if drift and table.kinds[provider] != "copy":
                speed_cell += (f" (torch-fused {drift:.1f}x its usual time in this pair)")
            lines.append(
                f"| {label} | {provider} | {spread(table, config, provider, 'step')} | "
                f"{speed_cell} | {rounds} | {table.get(config, provider, 'GBps'):.1f} | "
                f"{'—' if fraction is None else f'{100 * fraction:.0f}%'} | "
                f"{spread(table, config, provider, 'iter')} | "
                f"{'—' if peak is None else f'{peak:.1f}'} |"
                + (_clip_subject_cells(table, config, provider) if clip else ""))
    details = {}
    for r in rows:
        load = r.get("load_average_at_config_start")
        details.setdefault(r["config"], r["config_detail"]
                           + ("" if load is None else f"; load average {load:.1f} when it began"))
    lines += ["", "Configs: " + "; ".join(f"`{c}` = {d}" for c, d in details.items()) + "."]
    huge = [(r["config"], r["provider"], r["value"]) for r in rows
            if r["metric"] == "huge_page_fraction"]
    if huge:
        lines += ["", "Share of params and optimizer state backed by transparent huge pages "
                  "(fused_adam's arena and the roofline's arrays are numpy-allocated, which asks "
                  "for them; torch's allocator does not): " + ", ".join(
                      f"{p} on {c} {100 * v:.0f}%" for c, p, v in huge) + "."]
    return "\n".join(lines) + "\n"


def _clip_subject_cells(table, config, provider):
    if table.get(config, provider, "clip_step_ms_median") is None:
        return " — | — |"
    speed = "reference" if provider == ANCHOR else _speed(table, config, provider, CLIP_SPEEDUP)
    cost = table.get(config, provider, "clip_cost_fraction")
    return (f" {spread(table, config, provider, 'clip_step')} ({speed}) | "
            f"{'—' if cost is None else f'{100 * cost:+.0f}%'} |")


# A pair whose torch-fused median strays this far from torch-fused's median over all pairs ran
# on a machine that changed under it (other work starting or stopping): its ratio is marked.
NOISY_PAIR = 1.5


def noisy(table, config, provider):
    """torch-fused's median in `provider`'s pair over its median over all pairs, when that is
    beyond NOISY_PAIR either way (else None)."""
    in_pair = table.get(config, provider, "torch_fused_step_ms_in_pair")
    pooled = table.get(config, ANCHOR, "step_ms_median")
    if provider == ANCHOR or not in_pair or not pooled:
        return None
    drift = in_pair / pooled
    return drift if not 1 / NOISY_PAIR <= drift <= NOISY_PAIR else None


def _speed(table, config, provider, metric="speedup_vs_torch_fused"):
    """`1.13x` (the step's, or clip+step's with `metric`), with a mark when the pair was noisy
    (see `noisy`)."""
    speed = table.get(config, provider, metric)
    if speed is None:
        return "—"
    return f"{speed:.2f}x" + ("*" if noisy(table, config, provider) else "")


# (its ratio to torch-fused, torch-fused's median) per timed phase.
_PACE_METRICS = {"step": ("speedup_vs_torch_fused", "step_ms_median"),
                 "clip+step": (CLIP_SPEEDUP, "clip_step_ms_median")}


def paced_gbps(table, config, provider, phase="step"):
    """`provider`'s GB/s as if its pair had run at torch-fused's pace: its bytes per step over
    (torch-fused's median over all pairs / its ratio to torch-fused in its own pair). On a quiet
    machine that is its own GB/s; on a busy one, where pairs ran at different paces, these (not
    the raw GB/s) compare with each other and with the roofline as the ratios do. For
    `phase="clip+step"` the same over clip+step's time, at torch-fused's clip+step pace (the
    step's bytes: the clip's read is counted as time, not as bytes)."""
    speedup_metric, anchor_metric = _PACE_METRICS[phase]
    speedup = table.get(config, provider, speedup_metric)
    row = table.row(config, provider, "GBps")
    anchor_ms = table.get(config, ANCHOR, anchor_metric)
    if speedup is None or row is None or not anchor_ms:
        return None
    return row["bytes_per_step"] * speedup / anchor_ms / 1e6


def pair_line(rows, name, n_pairs):
    """The console's line for `name` as its pair (or, for torch-fused, its config) finishes."""
    table = results.Table(rows)
    config = table.configs[0]
    median = table.get(config, name, "step_ms_median")
    line = (f"  {config:<11} {name:<36} {fmt_ms(median):>9} ms"
            f"  {table.get(config, name, 'GBps'):6.1f} GB/s")
    if name == ANCHOR:
        n = table.row(config, name, "step_ms_median")["samples"]
        line += f"  (its {n} rounds in all {n_pairs} pairs)"
    elif table.kinds[name] != "copy":
        pair_ms = table.row(config, name, "torch_fused_step_ms_in_pair")
        line += (f"  {table.get(config, name, 'speedup_vs_torch_fused'):5.2f}x {ANCHOR} "
                 f"({fmt_ms(pair_ms['value'])} ms in the same {pair_ms['samples']} rounds)")
    clip_ms = table.get(config, name, "clip_step_ms_median")
    if clip_ms is not None:
        line += f"; clip+step {fmt_ms(clip_ms)} ms"
        if name != ANCHOR:
            speed = table.get(config, name, CLIP_SPEEDUP)
            pair_ms = table.get(config, name, "torch_fused_clip_step_ms_in_pair")
            line += f" {speed:.2f}x {ANCHOR}'s ({fmt_ms(pair_ms)} ms)"
        cost = table.get(config, name, "clip_cost_fraction")
        line += f", the clip {100 * cost:+.0f}% of the step"
    peak = table.get(config, name, "peak_memory_GB")
    return line + (f"  peak {peak:.1f} GB" if peak else "")


def _label(ax, bars, labels, fontsize):
    for text in ax.bar_label(bars, labels=labels, padding=3, fontsize=fontsize):
        # A roofline line through a label must not strike it out.
        text.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))
        text.set_zorder(5)


def plot(rows, path):
    """One panel per config: a horizontal bar per optimizer (GB/s, the bytes its mode moves over
    its median step), labelled with its speedup over torch-fused; the roofline and copy_ as
    vertical lines. Horizontal bars keep every label on its own line, whatever the count."""
    table = results.Table(rows)
    configs = [c for c in table.configs if table.get(c, ANCHOR, "GBps") is not None]
    first = table.first()
    optimizers = [p for p in _ordered(table) if table.kinds[p] == "optimizer"
                  and any(table.get(c, p, "GBps") is not None for c in configs)]
    if not configs:
        return None
    colors = {p: ("#8C8C8C" if p.startswith("torch") else "#4C72B0") for p in optimizers}
    for p in optimizers:
        if ":bf16" in p:
            colors[p] = "#55A868" if p.startswith("fused_adam") else "#BBBBBB"
        if p == "fused_adam-torch":
            colors[p] = "#9DB4D8"
    clip = has_clip(table)
    height = 0.9 + (0.5 if clip else 0.32) * len(optimizers)
    fig, axes = pyplot().subplots(1, len(configs), sharey=True, squeeze=False,
                                  figsize=(max(4.3 * len(configs) + 2.2, 10.5), height + 1.6))
    ys = list(range(len(optimizers)))
    for ax, config in zip(axes[0], configs):
        values = [paced_gbps(table, config, p) for p in optimizers]
        # With clip+step: two bars an optimizer that timed it, the step's above (solid),
        # clip+step's below (hatched, paler), each labelled with its own ratio to torch-fused's;
        # one bar, as without, for the others.
        clip_values = [paced_gbps(table, config, p, phase="clip+step") if clip else None
                       for p in optimizers]
        offset = [0.21 if v is not None else 0.0 for v in clip_values]
        bars = ax.barh([y - o for y, o in zip(ys, offset)], [v or 0 for v in values],
                       height=[0.4 if o else 0.7 for o in offset],
                       color=[colors[p] for p in optimizers], edgecolor="black", linewidth=0.4)
        labels = []
        for p, v in zip(optimizers, values):
            speed = table.get(config, p, "speedup_vs_torch_fused")
            labels.append("" if v is None else "ref." if p == ANCHOR else
                          "" if speed is None else _speed(table, config, p))
        if any(v is not None for v in clip_values):
            clip_bars = ax.barh([y + o for y, o in zip(ys, offset)],
                                [v or 0 for v in clip_values], height=0.4,
                                color=[colors[p] for p in optimizers],
                                alpha=0.55, hatch="////", edgecolor="black", linewidth=0.4)
            clip_labels = [("" if v is None else "clip+step ref." if p == ANCHOR else
                            f"clip+step {_speed(table, config, p, CLIP_SPEEDUP)}")
                           for p, v in zip(optimizers, clip_values)]
            _label(ax, clip_bars, clip_labels, fontsize=7)
        for y, p in zip(ys, optimizers):
            if table.row(config, p, "skipped") is not None:
                ax.text(0, y, " not run (see results.md)", va="center", fontsize=7,
                        color="#666666")
        _label(ax, bars, labels, fontsize=8)
        top = max([v or 0 for v in values + clip_values] + [0])
        for name, style in ((ROOFLINE, "-"), (COPY, ":")):
            line = paced_gbps(table, config, name)
            if line is not None:
                ax.axvline(line, color="black", linestyle=style, linewidth=1.3)
                top = max(top, line)
        ax.set_xlim(0, top * (1.45 if clip else 1.25))
        ax.set_title(config_label(table, config, short=True), fontsize=9)
        ax.set_xlabel("GB/s: the step's bytes / (clip+)step time, at torch-fused's pace" if clip
                      else "GB/s: bytes moved / step time, at torch-fused's pace", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_yticks(ys, optimizers, fontsize=8)
    axes[0][0].invert_yaxis()
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color="black", linestyle="-", label="roofline: no-math kernel, "
                      "28 B/element"),
               Line2D([], [], color="black", linestyle=":", label="copy_, 8 B/element")]
    if clip:
        from matplotlib.patches import Patch
        handles.append(Patch(facecolor="#BBBBBB", alpha=0.55, hatch="////", edgecolor="black",
                             linewidth=0.4, label=f"clip+step: norm clipped to "
                             f"{first.get('settings', {}).get('clip_max_norm') or 1:g}, then "
                             "the step (step's bytes / its time)"))
    title = f"Adam step bandwidth on {first['device_name']} ({first['device']})"
    if first.get("quick"):
        title += ": QUICK MODE, scaled-down configs"
    fig.suptitle(title + "\nbar labels: speedup of the step over torch-fused (same rounds)"
                 + ("\nhatched: clip+step, its speedup over torch-fused's clip+step" if clip
                    else ""),
                 fontsize=10)
    if any(noisy(table, c, p) for c in configs for p in optimizers):
        handles.append(Line2D([], [], linestyle="none", label=f"* noisy pair: torch-fused's "
                              f"time in it strayed over {NOISY_PAIR:g}x (see results.md)"))
    fig.legend(handles=handles, loc="lower center",
               ncol=len(handles) if len(handles) < 4 else 2, fontsize=8,
               frameon=False)
    return save(fig, path, rect=(0, 0.11 if len(handles) > 3 else 0.07, 1, 1))
