"""Every table and plot of bench/, made from result rows alone (`bench.results`): the step
benchmark's results.md/.png and its headline table, the breakdown's, the gradient layouts' and
the training run's and the accuracy run's. `python -m bench report DIR` redraws all of them from the JSON in DIR.
"""
from pathlib import Path

from bench import results

ANCHOR = "torch-fused"
ROOFLINE, COPY = "roofline (no-math)", "copy_ (reference)"
COMPILED = {"cpu": "fused_adam-numba", "cuda": "fused_adam-triton"}


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _spread(table, config, provider, name):
    med, lo, hi = (table.get(config, provider, f"{name}_ms_{q}") for q in results.QUANTILES)
    if med is None:
        return "—"
    return f"{fmt_ms(med)} [{fmt_ms(lo)}–{fmt_ms(hi)}]"


def _tensors(n):
    return f"{n} tensor" + ("" if n == 1 else "s")


def _config_label(table, config, short=False):
    first = table.first(config)
    if short:
        return f"{config} ({first['n_params'] / 1e6:.1f} M params, {_tensors(first['n_tensors'])})"
    return f"{config} ({first['n_params']:,} params, {_tensors(first['n_tensors'])})"


def _header(first, title):
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


# ------------------------------------------------------------------------------------------------
# The step benchmark

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


def _clip_speed(table, config, provider):
    """`1.52x` for clip+step, marked as `_speed` marks the pair."""
    speed = table.get(config, provider, "clip_step_speedup_vs_torch_fused")
    if speed is None:
        return "—"
    return f"{speed:.2f}x" + ("*" if noisy(table, config, provider) else "")


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
        label = _config_label(table, config, short=True)
        if table.get(config, ANCHOR, "step_ms_median") is None:
            reason = (table.row(config, ANCHOR, "skipped") or {}).get("reason", "not measured")
            lines.append(f"| {label} | {reason} | | | |" + " |" * len(modes)
                         + (" | |" if clip else ""))
            continue
        fraction = table.get(config, ours, "roofline_fraction")
        gbps = table.get(config, ours, "GBps")
        speed = table.get(config, ours, "speedup_vs_torch_fused")
        mode_cells = ""
        for provider, _ in modes:
            mode_ms = table.get(config, provider, "step_ms_median")
            mode_cells += (" —" if mode_ms is None else
                           f" {fmt_ms(mode_ms)} ms ({_speed(table, config, provider)})") + " |"
        lines.append(
            f"| {label} | {fmt_ms(table.get(config, ours, 'torch_fused_step_ms_in_pair'))} ms | "
            f"{fmt_ms(table.get(config, ours, 'step_ms_median'))} ms | "
            + ("—" if speed is None else _speed(table, config, ours)) + " | "
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
               f"{fmt_ms(ours_ms)} ms ({_clip_speed(table, config, ours)})") + " |")


def step_markdown(rows):
    table = results.Table(rows)
    first = table.first()
    settings = first.get("settings", {})
    clip = has_clip(table)
    lines = _header(first, "Adam step benchmark")
    lines += ["## Headline", "", f"FusedAdam = `{_ours(table, first['device'])}`; torch-fused "
              "and FusedAdam step = medians over the rounds the two shared, speedup = their "
              "ratio; each compressed mode's speedup is from its own pair."
              + (" Clip+step = the gradients' norm clipped, then the step, timed as the step is "
                 "and in the same rounds: torch-fused's is `torch.nn.utils.clip_grad_norm_("
                 "params, max_norm, foreach=True)` then its fused step, FusedAdam's is "
                 "`optimizer.clip_grad_norm(max_norm)` (the norm; the step's kernel scales) then "
                 "`step()`." if has_clip(table) else ""), "",
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
        label = _config_label(table, config)
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
                f"| {label} | {provider} | {_spread(table, config, provider, 'step')} | "
                f"{speed_cell} | {rounds} | {table.get(config, provider, 'GBps'):.1f} | "
                f"{'—' if fraction is None else f'{100 * fraction:.0f}%'} | "
                f"{_spread(table, config, provider, 'iter')} | "
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
    speed = "reference" if provider == ANCHOR else _clip_speed(table, config, provider)
    cost = table.get(config, provider, "clip_cost_fraction")
    return (f" {_spread(table, config, provider, 'clip_step')} ({speed}) | "
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


def _speed(table, config, provider):
    """`1.13x`, with a mark when the pair was noisy (see `noisy`)."""
    speed = table.get(config, provider, "speedup_vs_torch_fused")
    if speed is None:
        return "—"
    return f"{speed:.2f}x" + ("*" if noisy(table, config, provider) else "")


# (its ratio to torch-fused, torch-fused's median) per timed phase.
_PACE_METRICS = {"step": ("speedup_vs_torch_fused", "step_ms_median"),
                 "clip+step": ("clip_step_speedup_vs_torch_fused", "clip_step_ms_median")}


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


def step_plot(rows, path):
    """One panel per config: a horizontal bar per optimizer (GB/s, the bytes its mode moves over
    its median step), labelled with its speedup over torch-fused; the roofline and copy_ as
    vertical lines. Horizontal bars keep every label on its own line, whatever the count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results.Table(rows)
    configs = [c for c in table.configs if table.get(c, ANCHOR, "GBps") is not None]

    def gbps(config, provider):
        return paced_gbps(table, config, provider)

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
    fig, axes = plt.subplots(1, len(configs),
                             figsize=(max(4.3 * len(configs) + 2.2, 10.5), height + 1.6),
                             sharey=True, squeeze=False)
    ys = list(range(len(optimizers)))
    for ax, config in zip(axes[0], configs):
        values = [gbps(config, p) for p in optimizers]
        # With clip+step: two bars an optimizer, the step's above (solid), clip+step's below
        # (hatched, paler), each labelled with its own ratio to torch-fused's.
        # With clip+step: two bars an optimizer that timed it, the step's above (solid),
        # clip+step's below (hatched, paler), each labelled with its own ratio to torch-fused's;
        # one bar, as without, for the others.
        clip_values = ([paced_gbps(table, config, p, phase="clip+step") for p in optimizers] if clip
                       else [None] * len(optimizers))
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
                            f"clip+step {_clip_speed(table, config, p)}")
                           for p, v in zip(optimizers, clip_values)]
            for text in ax.bar_label(clip_bars, labels=clip_labels, padding=3, fontsize=7):
                text.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))
                text.set_zorder(5)
        for y, p in zip(ys, optimizers):
            if table.row(config, p, "skipped") is not None:
                ax.text(0, y, " not run (see results.md)", va="center", fontsize=7,
                        color="#666666")
        texts = ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
        for text in texts:  # a roofline line through a label must not strike it out
            text.set_bbox(dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))
            text.set_zorder(5)
        top = max([v or 0 for v in values + clip_values] + [0])
        for name, style in ((ROOFLINE, "-"), (COPY, ":")):
            line = gbps(config, name)
            if line is not None:
                ax.axvline(line, color="black", linestyle=style, linewidth=1.3)
                top = max(top, line)
        ax.set_xlim(0, top * (1.45 if clip else 1.25))
        ax.set_title(_config_label(table, config, short=True), fontsize=9)
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
    fig.tight_layout(rect=(0, 0.11 if len(handles) > 3 else 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The step breakdown (`python -m bench breakdown`)

# Phases whose only job is to keep the step torch's (following edits of `param_groups` and
# `state`, checking gradients, bumping autograd's version counters): what being a drop-in costs.
DROP_IN_CHECKS = ("follow param_groups", "follow state edits", "check gradients",
                  "version counters")
PHASE = "phase:"  # prefix of a phase's metric (see bench.breakdown.metric_of)


def _breakdown_values(rows):
    """(table, config, [(label, stats, kind)]): torch-fused's step, FusedAdam's step, each of
    its phases in the order the step runs them, the roofline."""
    table = results.Table(rows)
    config = table.configs[0]
    phases = []
    for r in rows:
        metric = r["metric"]
        if r["provider"] == "FusedAdam" and metric.startswith(PHASE) and \
                metric.endswith("_ms_median"):
            phase = metric[len(PHASE):-len("_ms_median")]
            if phase not in phases:
                phases.append(phase)
    parts = [(ANCHOR, "step", "torch-fused step", "anchor"),
             ("FusedAdam", "step", "FusedAdam step", "step")]
    parts += [("FusedAdam", PHASE + phase, phase,
               "check" if phase in DROP_IN_CHECKS else "phase") for phase in phases]
    parts.append((ROOFLINE, "step", "no-math roofline", "roofline"))
    out = []
    for provider, metric, label, kind in parts:
        stats = {q: table.get(config, provider, f"{metric}_ms_{q}") for q in results.QUANTILES}
        out.append((label, stats, kind))
    return table, config, out


def breakdown_markdown(rows):
    table, config, parts = _breakdown_values(rows)
    first = table.first()
    settings = first.get("settings", {})
    torch_ms, step_ms, roof_ms = parts[0][1]["median"], parts[1][1]["median"], \
        parts[-1][1]["median"]
    phases = [(label, s, kind) for label, s, kind in parts if kind in ("phase", "check")]
    checks = [(label, s["median"]) for label, s, kind in phases if kind == "check"]
    visit = sum(s["median"] for label, s, _ in phases if "visit" in label)
    lines = _header(first, f"Where the step's time goes, {config} ({first['config_detail']})")
    n = table.row(config, ANCHOR, "step_ms_median")["samples"]
    pooled = (f", pooled over {settings['allocations']} allocations"
              if settings.get("allocations", 1) > 1 else "")
    lines += [f"{settings.get('ours')}; medians of {n} rounds{pooled}, the phases timed "
              "through `FusedAdam._step`'s clock in rounds of their own, right after a backward, "
              "the subjects interleaved. Phases marked ✓ exist to keep the step a drop-in for "
              "torch's Adam.", "",
              "| what | ms median [p20–p80] | share of FusedAdam's step |", "|---|---:|---:|"]
    for label, s, kind in parts:
        mark = " ✓" if kind == "check" else ""
        lines.append(f"| {label}{mark} | {s['median']:.3f} [{s['p20']:.3f}–{s['p80']:.3f}] | "
                     f"{100 * s['median'] / step_ms:.1f}% |")
    phase_sum = sum(s["median"] for _, s, _ in phases)
    check_sum = sum(ms for _, ms in checks)
    lines += ["",
              f"- Step: {torch_ms / step_ms:.2f}x torch-fused. Its phases add up to "
              f"{phase_sum:.3f} ms (each median alone); the other {step_ms - phase_sum:.3f} ms "
              "are torch's `Optimizer.step` wrapper and `no_grad` around them, and rounding.",
              f"- Being a drop-in ({', '.join(label for label, _ in checks)}) costs "
              f"{check_sum:.3f} ms a step, {100 * check_sum / step_ms:.1f}% of it: "
              + ", ".join(f"{label} {ms * 1e3:.0f} us" for label, ms in checks) + ".",
              f"- 10x torch-fused would be a {torch_ms / 10:.3f} ms step. Visit + roofline = "
              f"{visit + roof_ms:.3f} ms ({torch_ms / (visit + roof_ms):.1f}x torch-fused): "
              f"what an optimizer that reads {first['n_tensors']} gradients this way and moves "
              "28 B/param with no math would take."]
    return "\n".join(lines) + "\n"


def breakdown_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table, config, parts = _breakdown_values(rows)
    first = table.first()
    labels = [label + (" ✓" if kind == "check" else "") for label, _, kind in parts]
    medians = [s["median"] for _, s, _ in parts]
    errors = np.array([[s["median"] - s["p20"] for _, s, _ in parts],
                       [s["p80"] - s["median"] for _, s, _ in parts]])
    colors = {"anchor": "#888888", "step": "#1f77b4", "phase": "#9ecae1", "check": "#fdae6b",
              "roofline": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(8.5, 0.8 + 0.32 * len(parts)))
    ax.barh(range(len(labels)), medians, xerr=errors,
            color=[colors[kind] for _, _, kind in parts], edgecolor="#555555", capsize=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    target = medians[0] / 10
    ax.axvline(target, color="#d62728", linestyle="--",
               label=f"10x torch-fused ({target:.2f} ms)")
    ax.set_xlabel("ms (median, p20–p80); ✓ keeps the step a drop-in for torch's Adam")
    ax.set_title(f"{config}: {first['config_detail']}, {first['device_name']}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Gradient layouts (`python -m bench grad-layout`)

GRAD_LAYOUT_PHASES = ("zero", "forward", "backward", "step")
GRAD_LAYOUT_BYTES = {
    "torch-fused": "backward writes a fresh grad (4 B), step reads it (4 B)",
    "fused_adam grads-in-place": "backward writes a fresh grad (4 B), step reads it in place (4 B)",
    "fused_adam flat-grads": "zero_() writes 4 B, backward adds into the view (read 4 B, write "
                             "4 B; plus the fresh product it adds), step reads 4 B",
}


def grad_layout_markdown(rows):
    table = results.Table(rows)
    first = table.first()
    lines = _header(first, "Gradient layout: whole iteration")
    n = next(r["samples"] for r in rows if r["metric"] == "iter_ms_median")
    lines += [f"Medians of {n} rounds, the variants interleaved; ms.", "",
              "| config | variant | zero | forward | backward | step | iteration [p20–p80] |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for config in table.configs:
        detail = table.first(config)["config_detail"]
        for variant in table.providers:
            if not table.has(config, variant):
                continue
            cells = [f"{table.get(config, variant, f'{p}_ms_median'):.2f}"
                     for p in GRAD_LAYOUT_PHASES]
            lines.append(f"| {config} ({detail}) | {variant} | {' | '.join(cells)} | "
                         f"{_spread(table, config, variant, 'iter')} |")
    lines += ["", "Gradient bytes per fp32 parameter per iteration:"]
    lines += [f"- {name}: {note}." for name, note in GRAD_LAYOUT_BYTES.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Training (`python -m bench train`)

TRAIN_PHASES = ("zero_grad", "forward", "backward", "clip", "step")


def _losses(rows, provider):
    points = sorted((r["iteration"], r["value"]) for r in rows
                    if r["metric"] == "loss" and r["provider"] == provider)
    return [v for _, v in points]


def train_markdown(rows):
    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    runs = [p for p in table.providers if table.get(config, p, "step_ms_median") is not None]
    # Runs without clipping (--max-grad-norm 0, or rows from before it existed) have no clip.
    phases = [p for p in TRAIN_PHASES
              if any(table.get(config, run, f"{p}_ms_median") is not None for run in runs)]
    clip = "clip" in phases
    lines = _header(first, "Training comparison")
    lines += [
        f"Char GPT {s['model']}, {first['n_params']:,} params, batch {s['batch_size']}, "
        f"{s['dtype']}, {s['iters']} iterations on {s['text_bytes'] / 2**20:.1f} MiB of Python's "
        f"standard library; medians over iterations {s['untimed_first_iters']}+."
        + (f" DDP over {s['world_size']} ranks, each on its own batches (rank 0's times and "
           f"losses); gradient_as_bucket_view={s['gradient_as_bucket_view']}; gradients "
           f"FusedAdamW copied: {s['grad_copies']}." if s.get("world_size", 1) > 1 else "")
        + (f" Gradients clipped to total norm {s['max_grad_norm']:g} before every step: "
           "FusedAdamW by `optimizer.clip_grad_norm` (the norm; its step's kernel scales), "
           "torch's AdamW by `torch.nn.utils.clip_grad_norm_(foreach=True)` (the norm, then "
           "every gradient scaled); clip + step is what a user who clips pays."
           if clip and s.get("max_grad_norm") else " No gradient clipping."), "",
        "| optimizer | " + " | ".join(f"{p} ms" for p in phases) + " | "
        + ("clip + step ms | " if clip else "") + "iteration ms | final loss |",
        "|---|" + "---:|" * (len(phases) + clip + 2)]
    for run in runs:
        label = table.row(config, run, "step_ms_median")["label"]
        cells = [f"{table.get(config, run, f'{p}_ms_median'):.2f}" for p in phases]
        if clip:
            cells.append(f"{table.get(config, run, 'clip_step_ms_median'):.2f}")
        lines.append(f"| {label} | {' | '.join(cells)} | "
                     f"{table.get(config, run, 'iter_ms_median'):.2f} | "
                     f"{_losses(rows, run)[-1]:.4f} |")
    lines += ["", f"Max |loss difference| between the runs: "
              f"{table.get(config, 'both', 'max_abs_loss_diff'):.3g} (final iteration: "
              f"{table.get(config, 'both', 'final_loss_diff'):.3g})."]
    if clip:
        lines += ["", "Gradient norm before the clip, median over iterations (share of "
                  "iterations clipped): " + "; ".join(
                      f"{run} {table.get(config, run, 'grad_norm_median'):.3g} "
                      f"({100 * table.get(config, run, 'clipped_fraction'):.0f}%)"
                      for run in runs if table.get(config, run, 'grad_norm_median') is not None)
                  + "."]
    return "\n".join(lines) + "\n"


def train_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = results.Table(rows)
    first = table.first()
    config = table.configs[0]
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=(3, 1)))
    # A wide pale line under a thin dashed one: where the curves coincide, both stay visible.
    styles = {"fused_adam": dict(color="#B3A6DA", linewidth=4.0),
              "torch": dict(color="#7A1F22", linewidth=1.2, linestyle="--")}
    for run in ("fused_adam", "torch"):
        label = table.row(config, run, "step_ms_median")["label"]
        step_ms = table.get(config, run, "step_ms_median")
        clip_ms = table.get(config, run, "clip_step_ms_median")
        timing = (f"clip + step {clip_ms:.2f} ms" if clip_ms is not None
                  else f"step {step_ms:.2f} ms")
        ax.plot(_losses(rows, run), label=f"{label}: {timing} (median)",
                **styles[run])
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Char GPT ({first['n_params'] / 1e6:.2f} M params) on Python's stdlib, "
                 f"{first['settings']['dtype']}, {first['device_name']} ({first['device']})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    diff = np.abs(np.subtract(_losses(rows, "fused_adam"), _losses(rows, "torch")))
    ax_diff.semilogy(np.maximum(diff, 1e-12), color="black", linewidth=1)
    ax_diff.set_ylabel("|loss difference|")
    ax_diff.set_xlabel("iteration")
    ax_diff.set_title(f"max {diff.max():.2g} (values below 1e-12 drawn at 1e-12)", fontsize=9)
    ax_diff.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Accuracy of compressed optimizer state (`python -m bench accuracy`)

def _accuracy_runs(table, config):
    """Every variant in the run's order, ran or skipped."""
    return [p for p in table.providers if table.has(config, p)]


def smoothed(values, window):
    """Trailing moving average over `window` values (fewer at the start), as long as `values`."""
    import numpy as np
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def accuracy_markdown(rows):
    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    reference = s["reference"]
    ref_label = table.row(config, reference, "final_loss")["label"]
    window = min(s["final_window"], s["iters"])
    clip = bool(s.get("max_grad_norm"))
    lines = _header(first, "Accuracy of compressed optimizer state")
    lines += [
        f"Char GPT {s['model']}, {first['n_params']:,} params, batch {s['batch_size']}, "
        f"{s['iters']} iterations on {s['text_bytes'] / 2**20:.1f} MiB of Python's standard "
        f"library, lr {s['hyperparameters']['lr']:g}, betas {tuple(s['hyperparameters']['betas'])}, "
        f"eps {s['hyperparameters']['eps']:g}, decoupled weight decay "
        f"{s['hyperparameters']['weight_decay']:g}"
        + (f", gradients clipped to total norm {s['max_grad_norm']:g} (FusedAdamW: "
           "`optimizer.clip_grad_norm`; the others: `torch.nn.utils.clip_grad_norm_`)"
           if clip else ", no gradient clipping")
        + f". Every variant trains from seed {s['seed']} on the same batches, one after the "
        "other. Final loss = mean of the last "
        f"{window} iterations' training losses; vs reference = its relative difference from "
        f"{ref_label}'s; PASS within {100 * s['tolerance']:g}%.", "",
        "| variant | params | final loss | vs reference | "
        f"within {100 * s['tolerance']:g}% | state B/param¹ | params + state B/param | "
        "step ms² |" + (" clip + step ms² |" if clip else ""),
        "|---|---|---:|---:|:---:|---:|---:|---:|" + ("---:|" if clip else "")]
    for run in _accuracy_runs(table, config):
        skipped = table.row(config, run, "skipped")
        if skipped:
            lines.append(f"| {skipped['label']} | {skipped['param_dtype']} | skipped: "
                         f"{skipped['reason']} | | | | | |" + (" |" if clip else ""))
            continue
        r = table.row(config, run, "final_loss")
        rel = table.get(config, run, "final_loss_rel_diff")
        state = table.get(config, run, "state_bytes_per_param")
        params = table.get(config, run, "param_bytes_per_param")
        verdict = ("reference" if run == reference
                   else "PASS" if table.get(config, run, "within_tolerance") else "**FAIL**")
        lines.append(
            f"| {r['label']} | {r['param_dtype']} | {r['value']:.4f} | "
            + ("—" if run == reference else f"{100 * rel:+.2f}%") + f" | {verdict} | "
            f"{state:.3f} | {state + params:.3f} | "
            f"{fmt_ms(table.get(config, run, 'step_ms_median'))} |"
            + (f" {fmt_ms(table.get(config, run, 'clip_step_ms_median'))} |" if clip else ""))
    lines += ["", "Implementations: " + "; ".join(
        f"{table.row(config, run, 'final_loss')['label']} = "
        f"`{table.row(config, run, 'final_loss')['implementation']}`"
        for run in _accuracy_runs(table, config)
        if table.row(config, run, "final_loss") is not None) + ".", "",
        "¹ State bytes per parameter: the sum of `numel * element_size` over every tensor in "
        "`optimizer.state` (each memory region once; a tensor subclass such as torchao's 8-bit "
        "state by its inner tensors), divided by the model's parameter count. That is the "
        "moments (fp32: 4 + 4 B; bf16: 2 + 2 B; 8-bit: 1 + 1 B of codes plus an fp32 absmax per "
        "256 values each, 8/256 B), their code maps (bitsandbytes, torchao), step counters held "
        "as tensors, and a master where the variant has one: FusedAdamW keeps it in its state, "
        "an fp32 copy (`master_param`, 4 B) or a compact one's remainder (`master_remainder`: "
        "bf16+16 int16, 2 B; bf16+8 int8, 1 B). Not counted: the parameters (in the next "
        "column: + 4 B fp32, + 2 B bf16), gradients, and the padding FusedAdamW's flat buffers "
        "put between parameters (8-bit moments start every parameter on a 256-value block). "
        "bitsandbytes and torchao keep fp32 moments, by their defaults, for tensors under 4096 "
        "elements (biases, LayerNorms), and torchao also for tensors whose size is not a "
        "multiple of its 256-value block (here the token embedding, vocabulary x n_embd).",
        "",
        "² Medians over "
        + (f"iterations {s['untimed_first_iters'] + 1}–{s['iters']} (the first ones load kernels "
           "and compile)" if s["untimed_first_iters"] else
           f"all {s['iters']} iterations (too few to leave out the first ones, which load "
           "kernels and compile: read them as rough)")
        + "; the variants ran one after another, so a change of load on "
        "the machine falls on some and not others (load average at each variant's start: "
        + ", ".join(f"{run} {table.row(config, run, 'final_loss')['load_average_at_variant_start']:.1f}"
                    for run in _accuracy_runs(table, config)
                    if table.row(config, run, "final_loss") is not None
                    and table.row(config, run, "final_loss").get("load_average_at_variant_start")
                    is not None)
        + ")." + (" Clip + step: FusedAdamW's clip computes the norm and its step scales, so "
                  "its step alone is not comparable with the others'; clip + step is what a "
                  "user who clips pays." if clip else "")]
    return "\n".join(lines) + "\n"


# One colour per variant, the reference black.
_ACCURACY_COLORS = {"torch-fp32": "#000000", "fused-fp32": "#1f77b4", "fused-int8": "#ff7f0e",
                    "fused-bf16-moments": "#2ca02c", "fused-bf16+16": "#9467bd",
                    "fused-bf16+8-int8": "#d62728", "fused-bf16+16-int8": "#8c564b",
                    "bnb-adamw8bit": "#e377c2", "torchao-adamw8bit": "#17becf"}


def accuracy_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    reference = s["reference"]
    runs = [run for run in _accuracy_runs(table, config) if table.row(config, run, "final_loss")]
    window = max(1, min(10, s["iters"] // 10))
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=(3, 2)))
    ref_raw = np.asarray(_losses(rows, reference))
    ref_smooth = smoothed(ref_raw, window)
    x = np.arange(1, ref_raw.size + 1)
    ax.plot(x, ref_raw, color="#000000", alpha=0.15, linewidth=0.8,
            label=f"{table.row(config, reference, 'final_loss')['label']}, raw")
    palette = iter(plt.cm.tab10.colors)
    for run in runs:
        r = table.row(config, run, "final_loss")
        color = _ACCURACY_COLORS.get(run) or next(palette)
        curve = smoothed(_losses(rows, run), window)
        rel = table.get(config, run, "final_loss_rel_diff")
        is_ref = run == reference
        label = (f"{r['label']}: {r['value']:.4f}"
                 + ("" if is_ref else f" ({100 * rel:+.2f}%)")
                 + f", {table.get(config, run, 'state_bytes_per_param'):.2f} B/param")
        style = dict(color=color, linewidth=2.2 if is_ref else 1.2,
                     linestyle="-" if is_ref or run.startswith("fused") else "--")
        ax.plot(x, curve, label=label, **style)
        if not is_ref:
            ax_diff.plot(x, 100 * (curve / ref_smooth - 1), **style)
    tol = 100 * s["tolerance"]
    ax_diff.axhspan(-tol, tol, color="#2ca02c", alpha=0.08, label=f"±{tol:g}%")
    ax_diff.axhline(0, color="#000000", linewidth=1)
    ax.set_ylabel(f"training loss ({window}-iteration moving average)")
    ax.set_title(f"Char GPT ({first['n_params'] / 1e6:.2f} M params) on Python's stdlib, "
                 f"{s['iters']} iterations, {first['device_name']} ({first['device']})\n"
                 f"legend: final loss (mean of last {min(s['final_window'], s['iters'])}), vs "
                 "torch AdamW fp32, optimizer state bytes/param", fontsize=9)
    ax.legend(fontsize=7.5, loc="upper right")
    ax.grid(alpha=0.3)
    ax_diff.set_ylabel("smoothed loss vs torch\nAdamW fp32 (%)")
    ax_diff.set_xlabel("iteration")
    ax_diff.legend(fontsize=7.5, loc="upper right")
    ax_diff.grid(alpha=0.3)
    # The first iterations' differences are large and uninformative (all start at ln(vocab)).
    tail = [100 * (smoothed(_losses(rows, run), window) / ref_smooth - 1)[ref_raw.size // 5:]
            for run in runs if run != reference]
    if tail:
        span = max(3 * tol, max(np.nanmax(np.abs(t)) for t in tail if t.size) * 1.2
                   if any(t.size for t in tail) else 0)
        if np.isfinite(span):
            ax_diff.set_ylim(-span, span)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Writing

# command -> (markdown, plot or None, plot file name suffix)
_MAKERS = {
    "step": (step_markdown, step_plot, ".png"),
    "breakdown": (breakdown_markdown, breakdown_plot, ".png"),
    "grad-layout": (grad_layout_markdown, None, None),
    "train": (train_markdown, train_plot, "_loss.png"),
    "train-ddp": (train_markdown, train_plot, "_loss.png"),
    "accuracy": (accuracy_markdown, accuracy_plot, "_loss.png"),
}


def write(rows, out_dir, command, *, plot=True):
    """`<stem>.json` and `<stem>.md` (and the plot, unless `plot=False`) in `out_dir`; returns
    the paths written."""
    out_dir = Path(out_dir)
    stem = results.STEMS[command]
    markdown, plotter, suffix = _MAKERS[command]
    paths = [results.write(rows, out_dir, command)]
    md = out_dir / f"{stem}.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(rows))
    tmp.replace(md)
    paths.append(md)
    if plot and plotter is not None:
        png = out_dir / f"{stem}{suffix}"
        tmp = out_dir / f".{stem}{suffix}"
        if plotter(rows, tmp) is not None:
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
