"""`python -m bench train`: the optimizer in a real (small) training run.

A character-level GPT (4 layers, 4 heads, 128 dims, context 64) learns to write Python from the
standard library's own source, which ships with every Python, so the run needs no download.
It trains twice from one seed on the same batches, once with `fused_adam.FusedAdamW` and once
with `torch.optim.AdamW` (fused=True where torch supports it, else foreach; the run says which),
the two interleaved iteration by iteration so that machine noise falls on both alike. It reports
the median time of each phase (zero_grad, forward, backward, clip, step) and draws both loss
curves: they should lie on top of each other, differing only by float rounding.

Both runs clip the gradients' total norm to `--max-grad-norm` (1.0 by default, as GPT training
recipes do; 0 turns clipping off), each the way its users would: FusedAdamW with its fused
clip (`optimizer.clip_grad_norm(max_norm)`: one read of the gradients, the scaling left to the
step's kernel), torch's AdamW with `torch.nn.utils.clip_grad_norm_(model.parameters(),
max_norm, foreach=True)`. The clip is a phase of its own, and clip + step is the phase a user
who clips pays for (FusedAdamW's clip moves part of its work into its step).

With `--dtype bf16 --master-weights` the fused_adam run trains bf16 parameters with an fp32
master copy, while the torch run stays fp32: the bf16 curve should track the fp32 one.

With `--ddp`, under `torchrun --nproc_per_node=N`, both models are DistributedDataParallel
(gloo on CPU, nccl on CUDA) and each rank trains on batches of its own; rank 0 reports and
writes `train_ddp.*`, with how many gradients FusedAdamW had to copy (0: it reads DDP's
all-reduced gradients in place, bucket views included with `--bucket-view`).
"""
import os
from pathlib import Path

import numpy as np
import torch

from bench import report, results, system
from bench.model import GPT
from bench.providers import backend_names
from bench.timing import Subject, interleave, timed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL = dict(n_layer=4, n_head=4, n_embd=128, n_ctx=64)
HYPER = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TEXT_BYTES = 4 << 20
PHASES = report.TRAIN_PHASES  # zero_grad, forward, backward, clip, step
MAX_GRAD_NORM = 1.0


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


# `--state-dtype`: the moments' dtype FusedAdamW keeps (None: torch's choice, the params').
STATE_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


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
            state_dtype = STATE_DTYPES[args.state_dtype]
            optimizer = fused_adam.FusedAdamW(model.parameters(), lr=args.lr,
                                              master_weights=args.master_weights,
                                              state_dtype=state_dtype, **HYPER)
            kernels = ", ".join(sorted(backend_names(optimizer)))
            master = ", fp32 master weights" if args.master_weights else ""
            moments = f", {args.state_dtype} moments" if args.state_dtype else ""
            label = f"fused_adam.FusedAdamW ({kernels}, {args.dtype}{master}{moments})"
        else:
            optimizer, label = _torch_adamw(model.parameters(), args.lr)
            label += ", fp32"
        if args.ddp:
            model = DDP(model, gradient_as_bucket_view=args.bucket_view)
        runs[name] = dict(model=model, optimizer=optimizer, label=label)
    n_params = sum(p.numel() for p in runs["torch"]["model"].parameters())
    log(f"{n_params:,} parameters; " + "; ".join(r["label"] for r in runs.values()))

    last_loss = {}  # for the log line, as the run goes

    max_norm = args.max_grad_norm

    def clipper(name):
        """The clip a user of this optimizer calls (nothing when clipping is off)."""
        r = runs[name]
        if not max_norm:
            return lambda: None
        if name == "fused_adam":
            return lambda: r["optimizer"].clip_grad_norm(max_norm)
        return lambda: torch.nn.utils.clip_grad_norm_(r["model"].parameters(), max_norm,
                                                      foreach=True)

    grad_norms = {name: [] for name in runs}

    def subject(name):
        r = runs[name]
        clip = clipper(name)

        def measure(i):
            idx, targets = batch(i)
            _, t_zero = timed(lambda: r["optimizer"].zero_grad(set_to_none=True), device)
            loss, t_forward = timed(lambda: r["model"](idx, targets), device)
            _, t_backward = timed(loss.backward, device)
            norm, t_clip = timed(clip, device)
            _, t_step = timed(r["optimizer"].step, device)
            last_loss[name] = loss.float().item()
            if norm is not None:
                grad_norms[name].append(float(norm))
            return dict(zip(PHASES, (t_zero, t_forward, t_backward, t_clip, t_step)),
                        loss=last_loss[name])
        return Subject(name, measure)

    def on_round(i, _seconds):
        if i % max(1, args.iters // 10) == 0 or i == args.iters - 1:
            log(f"iter {i:4d}  loss fused_adam {last_loss['fused_adam']:.4f}  "
                f"torch {last_loss['torch']:.4f}")

    subjects = [subject(name) for name in runs]
    samples = interleave(subjects, warmup=0, iters=args.iters, on_round=on_round)

    # The first iterations load kernels (numba's cache, torch's fused kernels): not timed.
    skip = min(5, args.iters // 5)
    losses = {name: samples[name]["loss"] for name in runs}
    diff = np.abs(np.subtract(losses["fused_adam"], losses["torch"]))
    grad_copies = runs["fused_adam"]["optimizer"].grad_copies
    meta = system.run_metadata(
        device, "train-ddp" if args.ddp else "train", model=MODEL,
        hyperparameters=dict(lr=args.lr, **HYPER), batch_size=args.batch_size, iters=args.iters,
        untimed_first_iters=skip, dtype=args.dtype, master_weights=args.master_weights,
        state_dtype=args.state_dtype,
        max_grad_norm=max_norm or None,
        seed=args.seed, world_size=world_size,
        gradient_as_bucket_view=args.bucket_view if args.ddp else None,
        grad_copies=grad_copies, vocab_size=len(chars), text_bytes=len(text))
    where = results.config_fields("char-gpt", f"char GPT {MODEL}", n_params,
                                  len(list(runs["torch"]["model"].parameters())))
    rows = []
    phases = [p for p in PHASES if max_norm or p != "clip"]
    for name, r in runs.items():
        for phase in phases:
            rows += results.time_rows(meta, where, name, phase, samples[name][phase][skip:],
                                      label=r["label"])
        if max_norm:
            # What a user who clips pays, iteration by iteration: FusedAdamW scales in its step.
            clip_step = np.add(samples[name]["clip"][skip:], samples[name]["step"][skip:])
            rows += results.time_rows(meta, where, name, "clip_step", clip_step,
                                      label=r["label"])
            norms = grad_norms[name]
            rows += [results.row(meta, where, name, "grad_norm_median", float(np.median(norms)),
                                 None, label=r["label"], max_norm=max_norm),
                     results.row(meta, where, name, "clipped_fraction",
                                 float(np.mean(np.asarray(norms) > max_norm)), "fraction",
                                 label=r["label"], max_norm=max_norm)]
        total = np.sum([samples[name][p][skip:] for p in phases], axis=0)
        rows += results.time_rows(meta, where, name, "iter", total, label=r["label"])
        rows += [results.row(meta, where, name, "loss", value, None, iteration=i,
                             label=r["label"]) for i, value in enumerate(losses[name])]
    rows += [results.row(meta, where, "both", "max_abs_loss_diff", float(diff.max()), None),
             results.row(meta, where, "both", "final_loss_diff", float(diff[-1]), None)]

    if args.ddp:
        import torch.distributed as dist
        dist.destroy_process_group()
        if rank != 0:
            return rows
    paths = report.write(rows, Path(args.out), "train-ddp" if args.ddp else "train")
    print(report.train_markdown(rows))
    if max_norm:
        print(f"gradients clipped to norm {max_norm:g}: "
              + "; ".join(f"{name} median norm {np.median(grad_norms[name]):.3g}, clipped in "
                          f"{100 * np.mean(np.asarray(grad_norms[name]) > max_norm):.0f}% of "
                          "iterations" for name in runs))
    print(f"max |loss difference| over {args.iters} iterations: {diff.max():.3g} "
          f"(final {diff[-1]:.3g}); gradients FusedAdamW copied: {grad_copies}")
    for path in paths:
        print(f"wrote {path}")
    return rows
