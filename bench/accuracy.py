"""`python -m bench accuracy`: does compressed optimizer state still train as fp32 AdamW does?

The char GPT of `bench.model` (the data, model, hyperparameters, batches and clipping of `bench
train`) is trained once per optimizer variant, one after another, each from the same seed on the
same batches. Per variant the report gives the final loss (the mean of the last FINAL_WINDOW
iterations', which takes batch-to-batch noise out), its relative difference from fp32
`torch.optim.AdamW`'s (the reference, always run), PASS/FAIL against a tolerance, the optimizer
state's bytes per parameter (measured from the tensors it holds) and the median step and clip +
step times. Variants (`VARIANTS`): FusedAdamW's modes, and bitsandbytes' and torchao's 8-bit
AdamW where those packages are installed and run here (else a row says why).
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import report, report_accuracy, results, system
from bench.model import GPT, HYPER, MODEL, CharData, iteration, torch_adamw
from bench.providers import clip_grad_norm

REFERENCE = "torch-fp32"
FINAL_WINDOW = 10  # the final loss is the mean of this many last iterations' losses
TOLERANCE = 0.01  # PASS: |final loss / reference's - 1| <= this


@dataclass(frozen=True)
class Variant:
    name: str  # what --variants takes
    label: str  # what the report says
    param_dtype: torch.dtype
    fused: bool  # FusedAdamW (its own clip) or another optimizer (torch's clip_grad_norm_)
    options: tuple = ()  # FusedAdamW's keyword arguments beyond HYPER
    package: str = None  # the third-party package it needs


VARIANTS = (
    Variant(REFERENCE, "torch AdamW fp32", torch.float32, False),
    Variant("fused-fp32", "FusedAdamW fp32", torch.float32, True),
    Variant("fused-int8", "FusedAdamW int8 moments", torch.float32, True,
            (("state_dtype", torch.int8),)),
    Variant("fused-bf16-moments", "FusedAdamW bf16 moments", torch.float32, True,
            (("state_dtype", torch.bfloat16),)),
    Variant("fused-bf16+16", "FusedAdamW bf16+16", torch.bfloat16, True,
            (("master_weights", "bf16+16"),)),
    Variant("fused-bf16+8-int8", "FusedAdamW bf16+8, int8 moments", torch.bfloat16, True,
            (("master_weights", "bf16+8"), ("state_dtype", torch.int8))),
    Variant("fused-bf16+16-int8", "FusedAdamW bf16+16, int8 moments", torch.bfloat16, True,
            (("master_weights", "bf16+16"), ("state_dtype", torch.int8))),
    Variant("bnb-adamw8bit", "bitsandbytes AdamW8bit", torch.float32, False,
            package="bitsandbytes"),
    Variant("torchao-adamw8bit", "torchao AdamW8bit", torch.float32, False, package="torchao"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
_BY_NAME = {v.name: v for v in VARIANTS}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class Unavailable(Exception):
    """A third-party variant that cannot run here; its message is the report's reason."""


def _optimizer(variant, params, lr):
    """(optimizer, implementation in words) for `variant`."""
    if variant.fused:
        import fused_adam
        options = dict(variant.options)
        optimizer = fused_adam.FusedAdamW(params, lr=lr, **options, **HYPER)
        words = ", ".join(f"{k}={v!r}" for k, v in options.items())
        return optimizer, f"fused_adam.FusedAdamW({words})" if words else "fused_adam.FusedAdamW"
    if variant.name == REFERENCE:
        return torch_adamw(params, lr)
    if variant.package == "bitsandbytes":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise Unavailable(f"bitsandbytes is not installed ({error}; pip install "
                              "bitsandbytes)") from error
        # AdamW8bit: decoupled weight decay (p *= 1 - lr * wd), as torch's AdamW. Its defaults
        # kept: tensors under min_8bit_size=4096 elements keep fp32 moments.
        return (bnb.optim.AdamW8bit(params, lr=lr, **HYPER),
                f"bitsandbytes {bnb.__version__} bnb.optim.AdamW8bit (min_8bit_size=4096)")
    if variant.package == "torchao":
        try:
            import torchao
            from torchao.optim import AdamW8bit
        except ImportError as error:
            raise Unavailable(f"torchao (with torchao.optim.AdamW8bit) is not installed "
                              f"({error}; pip install torchao)") from error
        # Its defaults kept: tensors under 4096 elements, or of a size that is not a multiple
        # of block_size=256, keep fp32 moments.
        return (AdamW8bit(params, lr=lr, **HYPER),
                f"torchao {torchao.__version__} torchao.optim.AdamW8bit (block_size=256)")
    raise AssertionError(variant)


def _storage_tensors(tensor):
    """The plain tensors that hold `tensor`'s data: itself, or the inner tensors of a tensor
    subclass that has them (torchao's 8-bit state: uint8 codes, fp32 scales and qmap)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in _storage_tensors(getattr(tensor, name))]


def state_bytes(optimizer):
    """Bytes of every tensor in `optimizer.state` (moments, their scales and code maps, step
    counters held as tensors, master copies or remainders where the optimizer keeps them there),
    each memory region counted once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if not torch.is_tensor(value):
                continue
            for t in _storage_tensors(value):
                nbytes = t.numel() * t.element_size()
                key = (t.data_ptr(), nbytes)
                if t.data_ptr() and key in seen:
                    continue
                seen.add(key)
                total += nbytes
    return total


def _train(variant, args, device, data):
    """Train `variant` for args.iters iterations; returns what it measured."""
    torch.manual_seed(args.seed)
    model = GPT(vocab_size=len(data.chars), **MODEL).to(device=device, dtype=variant.param_dtype)
    params = list(model.parameters())
    optimizer, implementation = _optimizer(variant, params, args.lr)
    max_norm = args.max_grad_norm
    clip = (lambda: clip_grad_norm(optimizer, params, max_norm)) if max_norm else (lambda: None)
    losses, step_s, clip_s = [], [], []
    every = max(1, args.iters // 10)
    start = time.perf_counter()
    for i in range(args.iters):
        seconds, _ = iteration(model, optimizer, clip, data.batch(i, device), device)
        losses.append(seconds["loss"])
        step_s.append(seconds["step"])
        clip_s.append(seconds["clip"])
        if i % every == 0 or i == args.iters - 1:
            print(f"  {variant.name}: iter {i + 1:4d}/{args.iters}  loss {losses[-1]:.4f}",
                  flush=True)
    return dict(implementation=implementation, losses=losses, step_s=step_s, clip_s=clip_s,
                seconds=time.perf_counter() - start, n_params=sum(p.numel() for p in params),
                n_tensors=len(params), state_bytes=state_bytes(optimizer),
                param_bytes=sum(p.numel() * p.element_size() for p in params))


def final_loss(losses, window=FINAL_WINDOW):
    return float(np.mean(losses[-window:]))


def run(args):
    device = torch.device(args.device)
    names = list(dict.fromkeys(args.variants or VARIANT_NAMES))
    if REFERENCE not in names:  # every variant is compared with it
        names.insert(0, REFERENCE)
    variants = [_BY_NAME[name] for name in names]
    data = CharData(args.iters, args.batch_size, args.seed)
    print(data.describe(args) + f", clip {args.max_grad_norm:g}, on "
          f"{system.device_name(device)}; variants: " + ", ".join(names), flush=True)

    meta = system.run_metadata(
        device, "accuracy", model=MODEL, hyperparameters=dict(lr=args.lr, **HYPER),
        batch_size=args.batch_size, iters=args.iters, max_grad_norm=args.max_grad_norm or None,
        seed=args.seed, variants=names, reference=REFERENCE, final_window=FINAL_WINDOW,
        tolerance=args.tolerance, untimed_first_iters=min(5, args.iters // 5),
        vocab_size=len(data.chars), text_bytes=len(data.text))
    skip = meta["settings"]["untimed_first_iters"]
    where, measured, reasons = None, {}, {}
    for number, variant in enumerate(variants, 1):
        print(f"[{number}/{len(variants)}] {variant.label} ({variant.name})", flush=True)
        load = system.load_average()
        try:
            m = _train(variant, args, device, data)
        except Exception as error:  # noqa: BLE001
            if variant.package is None:  # ours or torch's: a failure is a bug, not a row
                raise
            reason = (str(error) if isinstance(error, Unavailable) else
                      f"failed here: {type(error).__name__}: "
                      + (str(error).strip().splitlines() or [""])[0][:300])
            reasons[variant.name] = reason
            print(f"  {variant.name}: skipped: {reason}", flush=True)
            continue
        m["load_average_at_start"] = load
        measured[variant.name] = m
        if where is None:
            where = results.config_fields("char-gpt", f"char GPT {MODEL}", m["n_params"],
                                          m["n_tensors"])
        print(f"  {variant.name}: final loss {final_loss(m['losses']):.4f} (mean of the last "
              f"{min(FINAL_WINDOW, args.iters)}), {m['seconds']:.1f} s", flush=True)

    reference = final_loss(measured[REFERENCE]["losses"])
    rows = []
    for variant in variants:
        common = dict(label=variant.label, param_dtype=DTYPE_NAMES[variant.param_dtype],
                      package=variant.package)

        def row(metric, value, unit, **fields):
            return results.row(meta, where, variant.name, metric, value, unit, **fields, **common)

        if variant.name in reasons:
            rows.append(row("skipped", None, None, reason=reasons[variant.name]))
            continue
        m = measured[variant.name]
        common.update(implementation=m["implementation"],
                      load_average_at_variant_start=m["load_average_at_start"])
        final = final_loss(m["losses"])
        relative = final / reference - 1
        ok = math.isfinite(relative) and abs(relative) <= args.tolerance
        n = m["n_params"]
        rows += [row("final_loss", final, None, samples=min(FINAL_WINDOW, len(m["losses"]))),
                 row("final_loss_rel_diff", relative, "fraction"),
                 row("within_tolerance", float(ok), "bool", tolerance=args.tolerance),
                 row("state_bytes_per_param", m["state_bytes"] / n, "B",
                     state_bytes=m["state_bytes"]),
                 row("param_bytes_per_param", m["param_bytes"] / n, "B"),
                 row("train_s", m["seconds"], "s")]
        rows += results.time_rows(meta, where, variant.name, "step", m["step_s"][skip:],
                                  **common)
        if args.max_grad_norm:
            rows += results.time_rows(meta, where, variant.name, "clip_step",
                                      np.add(m["clip_s"], m["step_s"])[skip:], **common)
        rows += [row("loss", value, None, iteration=i) for i, value in enumerate(m["losses"])]
    paths = report.write(rows, Path(args.out), "accuracy")
    print(report_accuracy.markdown(rows))
    for path in paths:
        print(f"wrote {path}")
    return rows
