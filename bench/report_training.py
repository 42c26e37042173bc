"""The training comparison's report (`python -m bench train`), from its rows alone: train.md
(each phase's median time and the final losses) and train_loss.png (both loss curves and their
difference).
"""
import numpy as np

from bench import results
from bench.report import header, losses, pyplot, save

TRAIN_PHASES = ("zero_grad", "forward", "backward", "clip", "step")


def markdown(rows):
    table = results.Table(rows)
    first = table.first()
    s = first["settings"]
    config = table.configs[0]
    runs = [p for p in table.providers if table.get(config, p, "step_ms_median") is not None]
    # Runs without clipping (--max-grad-norm 0, or rows from before it existed) have no clip.
    phases = [p for p in TRAIN_PHASES
              if any(table.get(config, run, f"{p}_ms_median") is not None for run in runs)]
    clip = "clip" in phases
    lines = header(first, "Training comparison")
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
                     f"{losses(rows, run)[-1]:.4f} |")
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


def plot(rows, path):
    table = results.Table(rows)
    first = table.first()
    config = table.configs[0]
    fig, (ax, ax_diff) = pyplot().subplots(2, 1, figsize=(8, 6.5), sharex=True,
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
        ax.plot(losses(rows, run), label=f"{label}: {timing} (median)", **styles[run])
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Char GPT ({first['n_params'] / 1e6:.2f} M params) on Python's stdlib, "
                 f"{first['settings']['dtype']}, {first['device_name']} ({first['device']})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    diff = np.abs(np.subtract(losses(rows, "fused_adam"), losses(rows, "torch")))
    ax_diff.semilogy(np.maximum(diff, 1e-12), color="black", linewidth=1)
    ax_diff.set_ylabel("|loss difference|")
    ax_diff.set_xlabel("iteration")
    ax_diff.set_title(f"max {diff.max():.2g} (values below 1e-12 drawn at 1e-12)", fontsize=9)
    ax_diff.grid(alpha=0.3)
    return save(fig, path)
