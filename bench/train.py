"""`python -m bench train`: the optimizer in a real (small) training run: the char GPT of
`bench.model` trained twice from one seed on the same batches, once with `fused_adam.FusedAdamW`
and once with `torch.optim.AdamW` (fused where torch supports it, else foreach; the run says
which), the two interleaved iteration by iteration so that machine noise falls on both alike.
It reports each phase's median time and both loss curves, which should differ only by rounding.

Both clip the gradients' total norm to `--max-grad-norm` (0: off) the way their users would
(`providers.clip_grad_norm`); clip + step is what a user who clips pays, since FusedAdamW's clip
moves its scaling into the step. `--dtype bf16 --master-weights` trains fused_adam's run in bf16
with an fp32 master, the torch run staying fp32. With `--ddp`, under `torchrun`, both models are
DistributedDataParallel, each rank on batches of its own; rank 0 writes `train_ddp.*`, with how
many gradients FusedAdamW had to copy.
"""
import os
from pathlib import Path

import numpy as np
import torch

from bench import report, report_training, results, system
from bench.model import GPT, HYPER, MODEL, PHASES, CharData, iteration, torch_adamw
from bench.providers import clip_grad_norm
from bench.timing import Subject, interleave

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# `--state-dtype`: the moments' dtype FusedAdamW keeps (None: torch's choice, the params').
STATE_DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


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
        # numba's OpenMP pool raises torch's count again: pin it back.
        import numba
        threads = torch.get_num_threads()
        numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, threads))
        torch.set_num_threads(threads)
    return dist.get_rank(), dist.get_world_size(), device


def _optimizer(name, model, args):
    """(optimizer, label) of run `name`."""
    if name == "torch":
        optimizer, label = torch_adamw(model.parameters(), args.lr)
        return optimizer, label + ", fp32"
    import fused_adam
    optimizer = fused_adam.FusedAdamW(model.parameters(), lr=args.lr,
                                      master_weights=args.master_weights,
                                      state_dtype=STATE_DTYPES[args.state_dtype], **HYPER)
    kernels = ", ".join(sorted(set(optimizer.backends.values())))
    master = ", fp32 master weights" if args.master_weights else ""
    moments = f", {args.state_dtype} moments" if args.state_dtype else ""
    return optimizer, f"fused_adam.FusedAdamW ({kernels}, {args.dtype}{master}{moments})"


def run(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rank, world_size = 0, 1
    if args.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        rank, world_size, device = _init_ddp(device)
    log = print if rank == 0 else (lambda *_, **__: None)  # every rank trains, rank 0 reports
    data = CharData(args.iters, args.batch_size, args.seed + rank)  # each rank its own batches
    log(data.describe(args) + f", {args.dtype} on {system.device_name(device)}"
        + (f", DDP over {world_size} ranks, each on its own batches" if args.ddp else ""))

    runs = {}
    for name in ("fused_adam", "torch"):
        torch.manual_seed(args.seed)
        # The torch run is the fp32 reference whatever dtype fused_adam trains in.
        model = GPT(vocab_size=len(data.chars), **MODEL).to(
            device=device, dtype=dtype if name == "fused_adam" else torch.float32)
        optimizer, label = _optimizer(name, model, args)
        if args.ddp:
            model = DDP(model, gradient_as_bucket_view=args.bucket_view)
        runs[name] = dict(model=model, optimizer=optimizer, label=label)
    params = list(runs["torch"]["model"].parameters())
    n_params = sum(p.numel() for p in params)
    log(f"{n_params:,} parameters; " + "; ".join(r["label"] for r in runs.values()))

    max_norm = args.max_grad_norm
    last_loss = {}  # for the log line, as the run goes
    grad_norms = {name: [] for name in runs}

    def subject(name):
        model, optimizer = runs[name]["model"], runs[name]["optimizer"]
        model_params = list(model.parameters())
        clip = ((lambda: clip_grad_norm(optimizer, model_params, max_norm)) if max_norm
                else (lambda: None))

        def measure(i):
            seconds, norm = iteration(model, optimizer, clip, data.batch(i, device), device)
            last_loss[name] = seconds["loss"]
            if norm is not None:
                grad_norms[name].append(float(norm))
            return seconds
        return Subject(name, measure)

    def on_round(i):
        if i % max(1, args.iters // 10) == 0 or i == args.iters - 1:
            log(f"iter {i:4d}  loss fused_adam {last_loss['fused_adam']:.4f}  "
                f"torch {last_loss['torch']:.4f}")

    samples = interleave([subject(name) for name in runs], warmup=0, iters=args.iters,
                         on_round=on_round)

    # The first iterations load kernels (numba's cache, torch's fused kernels): not timed.
    skip = min(5, args.iters // 5)
    losses = {name: samples[name]["loss"] for name in runs}
    diff = np.abs(np.subtract(losses["fused_adam"], losses["torch"]))
    grad_copies = runs["fused_adam"]["optimizer"].grad_copies
    meta = system.run_metadata(
        device, "train-ddp" if args.ddp else "train", model=MODEL,
        hyperparameters=dict(lr=args.lr, **HYPER), batch_size=args.batch_size, iters=args.iters,
        untimed_first_iters=skip, dtype=args.dtype, master_weights=args.master_weights,
        state_dtype=args.state_dtype, max_grad_norm=max_norm or None, seed=args.seed,
        world_size=world_size, gradient_as_bucket_view=args.bucket_view if args.ddp else None,
        grad_copies=grad_copies, vocab_size=len(data.chars), text_bytes=len(data.text))
    where = results.config_fields("char-gpt", f"char GPT {MODEL}", n_params, len(params))
    rows = []
    phases = [p for p in PHASES if max_norm or p != "clip"]
    for name, r in runs.items():
        def time_rows(metric, seconds):
            return results.time_rows(meta, where, name, metric, seconds, label=r["label"])
        for phase in phases:
            rows += time_rows(phase, samples[name][phase][skip:])
        if max_norm:
            # What a user who clips pays, iteration by iteration: FusedAdamW scales in its step.
            rows += time_rows("clip_step", np.add(samples[name]["clip"][skip:],
                                                  samples[name]["step"][skip:]))
            norms = grad_norms[name]
            rows += [results.row(meta, where, name, "grad_norm_median", float(np.median(norms)),
                                 None, label=r["label"], max_norm=max_norm),
                     results.row(meta, where, name, "clipped_fraction",
                                 float(np.mean(np.asarray(norms) > max_norm)), "fraction",
                                 label=r["label"], max_norm=max_norm)]
        rows += time_rows("iter", np.sum([samples[name][p][skip:] for p in phases], axis=0))
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
    print(report_training.markdown(rows))
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
