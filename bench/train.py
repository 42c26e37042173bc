"""`python -m bench train`: the optimizer in a real (small) training run.

A character-level GPT (4 layers, 4 heads, 128 dims, context 64) learns to write Python from the
standard library's own source, which ships with every Python, so the run needs no download.
It trains twice from one seed on the same batches, once with `fused_adam.FusedAdamW` and once
with `torch.optim.AdamW` (fused=True where torch supports it, else foreach; the run says which),
the two interleaved iteration by iteration so that machine noise falls on both alike. It reports
the median time of each phase (zero_grad, forward, backward, step) and draws both loss curves:
they should lie on top of each other, differing only by float rounding.

With `--dtype bf16 --master-weights` the fused_adam run trains bf16 parameters with an fp32
master copy, while the torch run stays fp32: the bf16 curve should track the fp32 one.

With `--ddp`, under `torchrun --nproc_per_node=N`, both models are DistributedDataParallel
(gloo on CPU, nccl on CUDA) and each rank trains on batches of its own; rank 0 reports and
writes `train_ddp.*`, with how many gradients FusedAdamW had to copy (0: it reads DDP's
all-reduced gradients in place, bucket views included with `--bucket-view`).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench import system
from bench.model import GPT
from bench.timing import summarize, timed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL = dict(n_layer=4, n_head=4, n_embd=128, n_ctx=64)
HYPER = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TEXT_BYTES = 4 << 20
PHASES = ("zero_grad", "forward", "backward", "step")


def stdlib_text(max_bytes=TEXT_BYTES):
    """The first `max_bytes` of the standard library's own `*.py` files, in a fixed order
    (top-level modules first, then packages), third-party site-packages excluded."""
    root = Path(os.path.dirname(os.__file__))
    files = sorted(root.glob("*.py")) + sorted(
        p for p in root.glob("*/**/*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    chunks, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunks.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(chunks)[:max_bytes]




def _torch_adamw(params, lr):
    """torch's fastest AdamW here: fused where this torch supports it for these params."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **HYPER), "torch.optim.AdamW(fused=True)"
    except (RuntimeError, ValueError):
        return (torch.optim.AdamW(params, lr=lr, foreach=True, **HYPER),
                "torch.optim.AdamW(foreach=True) (fused unsupported here)")


def _init_ddp(device):
    """This process's rank and the world size, from torchrun's environment; its device."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise SystemExit("--ddp: launch with torchrun, e.g. "
                         "torchrun --nproc_per_node=2 -m bench train --ddp")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        # torchrun gives each rank OMP_NUM_THREADS=1; numba would otherwise start a thread per
        # core in every rank, and the ranks would fight over the cores in the step. Starting
        # numba's OpenMP pool raised torch's count from 1 to 2 here: pin it again.
        import numba
        threads = torch.get_num_threads()
        numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, threads))
        torch.set_num_threads(threads)
    return dist.get_rank(), dist.get_world_size(), device


def run(args):
    import fused_adam

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rank, world_size = 0, 1
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        rank, world_size, device = _init_ddp(device)
    log = print if rank == 0 else (lambda *_, **__: None)  # every rank trains, rank 0 reports
    text = stdlib_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    block = MODEL["n_ctx"]
    log(f"data: {len(text) / 2**20:.1f} MiB of the standard library's *.py, "
        f"vocab {len(chars)} chars; model {MODEL}, batch {args.batch_size}, {args.iters} iters, "
        f"{args.dtype} on {system.device_name(device)}"
        + (f", DDP over {world_size} ranks, each on its own batches" if args.ddp else ""))

    # The same batches for both runs: drawn once, up front (each rank its own under DDP).
    generator = torch.Generator().manual_seed(args.seed + rank)
    starts = torch.randint(len(data) - block - 1, (args.iters, args.batch_size), generator=generator)

    def batch(i):
        rows = starts[i].unsqueeze(1) + torch.arange(block + 1)
        chunk = data[rows].to(device)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    runs = {}
    for name in ("fused_adam", "torch"):
        torch.manual_seed(args.seed)
        # The torch run is the fp32 reference whatever dtype fused_adam trains in.
        model_dtype = dtype if name == "fused_adam" else torch.float32
        model = GPT(vocab_size=len(chars), **MODEL).to(device=device, dtype=model_dtype)
        if name == "fused_adam":
            optimizer = fused_adam.FusedAdamW(model.parameters(), lr=args.lr,
                                              master_weights=args.master_weights, **HYPER)
            kernels = ", ".join(sorted(set(optimizer.backends.values())))
            master = ", fp32 master weights" if args.master_weights else ""
            label = f"fused_adam.FusedAdamW ({kernels}, {args.dtype}{master})"
        else:
            optimizer, label = _torch_adamw(model.parameters(), args.lr)
            label += ", fp32"
        if args.ddp:
            model = DDP(model, gradient_as_bucket_view=args.bucket_view)
        runs[name] = dict(model=model, optimizer=optimizer, label=label, losses=[],
                          times={phase: [] for phase in PHASES})
    n_params = sum(p.numel() for p in runs["torch"]["model"].parameters())
    log(f"{n_params:,} parameters; " + "; ".join(r["label"] for r in runs.values()))

    order = list(runs)
    for i in range(args.iters):
        idx, targets = batch(i)
        for name in (order if i % 2 == 0 else order[::-1]):
            r = runs[name]
            _, t_zero = timed(lambda: r["optimizer"].zero_grad(set_to_none=True), device)
            loss, t_forward = timed(lambda: r["model"](idx, targets), device)
            _, t_backward = timed(loss.backward, device)
            _, t_step = timed(r["optimizer"].step, device)
            for phase, t in zip(PHASES, (t_zero, t_forward, t_backward, t_step)):
                r["times"][phase].append(t)
            r["losses"].append(loss.float().item())
        if i % max(1, args.iters // 10) == 0 or i == args.iters - 1:
            log(f"iter {i:4d}  loss fused_adam {runs['fused_adam']['losses'][-1]:.4f}  "
                f"torch {runs['torch']['losses'][-1]:.4f}")

    # The first iterations load kernels (numba's cache, torch's fused kernels): not timed.
    skip = min(5, args.iters // 5)
    summary = {}
    for name, r in runs.items():
        phases = {phase: summarize(r["times"][phase][skip:]) for phase in PHASES}
        total = summarize(np.sum([r["times"][p][skip:] for p in PHASES], axis=0))
        summary[name] = dict(optimizer=r["label"], phase_ms=phases, iteration_ms=total,
                             losses=r["losses"])
    diff = np.abs(np.subtract(runs["fused_adam"]["losses"], runs["torch"]["losses"]))
    result = dict(
        model=MODEL, hyperparameters=dict(lr=args.lr, **HYPER), batch_size=args.batch_size,
        iters=args.iters, untimed_first_iters=skip, dtype=args.dtype,
        master_weights=args.master_weights, seed=args.seed, world_size=world_size,
        gradient_as_bucket_view=args.bucket_view if args.ddp else None,
        grad_copies=runs["fused_adam"]["optimizer"].grad_copies,
        vocab_size=len(chars), text_bytes=len(text), n_params=n_params,
        device=device.type, device_name=system.device_name(device),
        hardware=system.hardware_sentence(device), git_sha=system.git_sha(), **system.versions(),
        max_abs_loss_diff=float(diff.max()), final_loss_diff=float(diff[-1]), runs=summary)

    if args.ddp:
        import torch.distributed as dist
        dist.destroy_process_group()
        if rank != 0:
            return result
    stem = "train_ddp" if args.ddp else "train"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = _markdown(result)
    (out / f"{stem}.md").write_text(md)
    _plot(result, out / f"{stem}_loss.png")
    print(md)
    print(f"max |loss difference| over {args.iters} iterations: {diff.max():.3g} "
          f"(final {diff[-1]:.3g}); gradients FusedAdamW copied: {result['grad_copies']}")
    for name in (f"{stem}.json", f"{stem}.md", f"{stem}_loss.png"):
        print(f"wrote {out / name}")
    return result


def _markdown(result):
    lines = [
        f"# Training comparison: {result['device_name']} ({result['device']})", "",
        f"Char GPT {result['model']}, {result['n_params']:,} params, batch "
        f"{result['batch_size']}, {result['dtype']}, {result['iters']} iterations on "
        f"{result['text_bytes'] / 2**20:.1f} MiB of Python's standard library; medians over "
        f"iterations {result['untimed_first_iters']}+."
        + (f" DDP over {result['world_size']} ranks, each on its own batches (rank 0's "
           "times and losses); gradient_as_bucket_view="
           f"{result['gradient_as_bucket_view']}; gradients FusedAdamW copied: "
           f"{result['grad_copies']}." if result.get("world_size", 1) > 1 else "")
        + f" Hardware: {result['hardware']}", "",
        "| optimizer | zero_grad ms | forward ms | backward ms | step ms | iteration ms | "
        "final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"].values():
        cells = [f"{run['phase_ms'][p]['median']:.2f}" for p in PHASES]
        lines.append(f"| {run['optimizer']} | {' | '.join(cells)} | "
                     f"{run['iteration_ms']['median']:.2f} | {run['losses'][-1]:.4f} |")
    lines += ["", f"Max |loss difference| between the runs: {result['max_abs_loss_diff']:.3g} "
              f"(final iteration: {result['final_loss_diff']:.3g})."]
    return "\n".join(lines) + "\n"


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw=dict(height_ratios=(3, 1)))
    # A wide pale line under a thin dashed one: where the curves coincide, both stay visible.
    styles = {"fused_adam": dict(color="#B3A6DA", linewidth=4.0),
              "torch": dict(color="#7A1F22", linewidth=1.2, linestyle="--")}
    for name, run in result["runs"].items():
        step_ms = run["phase_ms"]["step"]["median"]
        ax.plot(run["losses"], label=f"{run['optimizer']}: step {step_ms:.2f} ms (median)",
                **styles[name])
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Char GPT ({result['n_params'] / 1e6:.2f} M params) on Python's stdlib, "
                 f"{result['dtype']}, {result['device_name']} ({result['device']})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    diff = np.abs(np.subtract(result["runs"]["fused_adam"]["losses"],
                              result["runs"]["torch"]["losses"]))
    ax_diff.semilogy(np.maximum(diff, 1e-12), color="black", linewidth=1)
    ax_diff.set_ylabel("|loss difference|")
    ax_diff.set_xlabel("iteration")
    ax_diff.set_title(f"max {diff.max():.2g} (values below 1e-12 drawn at 1e-12)", fontsize=9)
    ax_diff.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
