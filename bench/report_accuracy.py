"""The accuracy run's report (`python -m bench accuracy`), from its rows alone: accuracy.md (each
variant's final loss against fp32 torch AdamW's, its state bytes and step time) and
accuracy_loss.png (the smoothed loss curves and their difference from the reference's).
"""
import numpy as np

from bench import results
from bench.report import fmt_ms, header, losses, pyplot, save


def _accuracy_runs(table, config):
    """Every variant in the run's order, ran or skipped."""
    return [p for p in table.providers if table.has(config, p)]


def smoothed(values, window):
    """Trailing moving average over `window` values (fewer at the start), as long as `values`."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def markdown(rows):
    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    reference = s["reference"]
    ref_label = table.row(config, reference, "final_loss")["label"]
    window = min(s["final_window"], s["iters"])
    clip = bool(s.get("max_grad_norm"))
    lines = header(first, "Accuracy of compressed optimizer state")
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


def plot(rows, path):
    plt = pyplot()
    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    reference = s["reference"]
    runs = [run for run in _accuracy_runs(table, config) if table.row(config, run, "final_loss")]
    window = max(1, min(10, s["iters"] // 10))
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=(3, 2)))
    ref_raw = np.asarray(losses(rows, reference))
    ref_smooth = smoothed(ref_raw, window)
    x = np.arange(1, ref_raw.size + 1)
    ax.plot(x, ref_raw, color="#000000", alpha=0.15, linewidth=0.8,
            label=f"{table.row(config, reference, 'final_loss')['label']}, raw")
    palette = iter(plt.cm.tab10.colors)
    for run in runs:
        r = table.row(config, run, "final_loss")
        color = _ACCURACY_COLORS.get(run) or next(palette)
        curve = smoothed(losses(rows, run), window)
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
    tail = [100 * (smoothed(losses(rows, run), window) / ref_smooth - 1)[ref_raw.size // 5:]
            for run in runs if run != reference]
    if tail:
        span = max(3 * tol, max(np.nanmax(np.abs(t)) for t in tail if t.size) * 1.2
                   if any(t.size for t in tail) else 0)
        if np.isfinite(span):
            ax_diff.set_ylim(-span, span)
    return save(fig, path)
