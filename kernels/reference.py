"""The Adam step in plain torch, one parameter at a time: the oracle every fast path is tested
against, and the backend for devices that have no compiled kernel (meta, mps, xpu, ...).

It follows `torch.optim.Adam`'s single-tensor path op for op (lerp for the first moment, the
bias corrections in Python floats), so in float64 it is the reference and in float32 it agrees
with torch to rounding. Slow on purpose: obviously correct beats fast here.
"""
import torch

from fused_adam.kernels.contract import (
    AMSGRAD, BETA1, BETA2, DECOUPLED_WD, EPS, EXP_AVG_CODES, EXP_AVG_SQ_CODES, LR, MAXIMIZE,
    QUANT_BLOCK, SIGNED_LEVELS, UNSIGNED_LEVELS, WEIGHT_DECAY, PerLayout,
)

GRADS = "tensors"
GRAD_ADDRESS_ALIGNMENT = 1  # gradients are never read by address here


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2,
                eps, weight_decay, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                inv_grad_scale=None, clip_factor=None):
    """Update `param` and its moments in place; `step` is the count after this update (>= 1).

        g = grad * inv_grad_scale;  g = g * clip_factor;  g = -g (maximize)
        g += wd * p (L2) or p *= 1 - lr * wd (AdamW)
        m = lerp(m, g, 1 - b1);  v = b2 * v + (1 - b2) * g * g;  v_max = max(v_max, v) (amsgrad)
        p -= lr / (1 - b1^t) * m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)
    """
    if inv_grad_scale is not None:
        grad = grad * inv_grad_scale
    if clip_factor is not None:
        grad = grad * clip_factor
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# ---------------------------------------------------------------------------------------------
# 8-bit moments: the block map of `contract.py`, op for op in fp32.

def _per_element(per_block, n):
    return per_block.repeat_interleave(QUANT_BLOCK)[:n]


def block_absmax(values):
    """The largest |value| of each block of QUANT_BLOCK values of the 1-D `values` (fp32; NaN
    where a block holds a NaN, as torch's amax)."""
    n = values.numel()
    n_blocks = -(-n // QUANT_BLOCK)
    padded = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.float32, device=values.device)
    padded[:n] = values.abs()
    return padded.view(n_blocks, QUANT_BLOCK).amax(dim=1)


def _sqrt(x):
    """fp32 square roots, correctly rounded (torch's fp32 sqrt on CPU is one ulp off for some
    inputs; a square root taken in fp64 and rounded once to fp32 is exact to fp32's rounding)."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def _level(x, top):
    """min(rint(x * top), top), 0 where x is NaN."""
    return torch.round(x * top).clamp_(max=top).nan_to_num_(nan=0.0)


def encode(values, absmax, *, signed):
    """The codes of the 1-D fp32 `values` against their blocks' `absmax` (int8 for exp_avg,
    uint8 for exp_avg_sq)."""
    values = values.to(torch.float32)
    zero = torch.zeros_like(absmax)
    if signed:
        reciprocal = torch.where(absmax > 0, 1 / absmax, zero)
        y = values * _per_element(reciprocal, values.numel())
        magnitude = _level(_sqrt(y.abs()), SIGNED_LEVELS)
        return torch.where(y < 0, -magnitude, magnitude).to(EXP_AVG_CODES)
    reciprocal_root = torch.where(absmax > 0, 1 / _sqrt(absmax), zero)
    w = _sqrt(values) * _per_element(reciprocal_root, values.numel())
    return _level(_sqrt(w), UNSIGNED_LEVELS).to(EXP_AVG_SQ_CODES)


def decode(codes, absmax, *, signed):
    """fp32 values of `codes` (1-D) under their blocks' `absmax`."""
    levels = SIGNED_LEVELS if signed else UNSIGNED_LEVELS
    step = torch.tensor(1 / levels, dtype=torch.float32, device=codes.device)
    t = codes.to(torch.float32) * step
    scale = _per_element(absmax.to(torch.float32), codes.numel())
    if signed:
        return (t * t.abs()) * scale
    squared = t * t
    return (squared * squared) * scale


def quantize(values, *, signed):
    """(codes, absmax) of the 1-D `values`."""
    values = values.to(torch.float32)
    absmax = block_absmax(values)
    return encode(values, absmax, signed=signed), absmax


# ---------------------------------------------------------------------------------------------
# Compact master weights (see `contract.py`): bf16 params plus a remainder.

def join_master(params, remainder):
    """The fp32 master of bf16 `params` and their int16 or int8 `remainder`."""
    high = params.view(torch.int16).to(torch.int32) << 16
    low = remainder.to(torch.int32)
    if remainder.dtype == torch.int8:
        low = low << 8
    return (high + low).view(torch.float32)


def split_master(values, remainder_dtype):
    """(bf16 params, remainder of `remainder_dtype`) of the fp32 master `values`."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    high = (bits + 0x8000) >> 16
    high = torch.where(values.isnan(), 0x7FC0, high)
    low = torch.where(values.isnan(), 0, bits - (high << 16))
    if remainder_dtype == torch.int8:
        low = ((low + 0x80) >> 8).clamp_(max=127)
    params = (high - ((high >= 0x8000).to(torch.int64) << 16)).to(torch.int16)
    return params.view(torch.bfloat16), low.to(remainder_dtype)


def _host_tables(arena):
    """The segment tables as Python lists (one device read per layout)."""
    return list(zip(arena.segment_starts.tolist(), arena.segment_lengths.tolist(),
                    arena.segment_groups.tolist()))


_segments = PerLayout(_host_tables)


def _stepped_value(arena, start, end, compute_dtype):
    """A working copy of what segment start..end steps: the master (fp32, or joined from a
    compact one) where there is one, else the params, in the compute dtype."""
    if arena.master_remainder is not None:
        return join_master(arena.params[start:end], arena.master_remainder[start:end])
    source = arena.params if arena.master_params is None else arena.master_params
    return source[start:end].to(compute_dtype, copy=True)


def _stepped_writes(arena, start, end, value):
    """[(target, value)] storing the stepped `value` of segment start..end: the params (its
    rounding, where a master is kept) and the master (fp32, or split into a compact one)."""
    params = arena.params[start:end]
    if arena.master_remainder is not None:
        high, remainder = split_master(value, arena.master_remainder.dtype)
        return [(params, high), (arena.master_remainder[start:end], remainder)]
    writes = [(params, value)]
    if arena.master_params is not None:
        writes.append((arena.master_params[start:end], value))
    return writes


def _write_together(writes):
    """One call for every write of a segment (params, moments, step): a step interrupted
    (KeyboardInterrupt) between two segments leaves each segment stepped or not, never
    half-stepped."""
    targets, values = zip(*writes)
    torch._foreach_copy_(list(targets), list(values))


def adam_step(arena, *, grads, group_table, inv_grad_scale=None, found_inf=None,
              clip_factor=None):
    """The launcher contract of `contract.py`, one segment at a time. Math is fp32 for
    16-bit buffers (the kernels' contract), on the master where there is one."""
    if found_inf is not None and bool(found_inf.item()):
        return
    groups = group_table.tolist()
    inv_scale = None if inv_grad_scale is None else float(inv_grad_scale)
    clip_factor = None if clip_factor is None else float(clip_factor)
    compute_dtype = torch.float64 if arena.params.dtype == torch.float64 else torch.float32
    for segment, ((start, length, group_index), grad) in enumerate(zip(_segments(arena), grads)):
        if grad is None:
            continue
        group = groups[group_index]
        amsgrad = bool(group[AMSGRAD])
        end = start + length
        value = _stepped_value(arena, start, end, compute_dtype)
        if arena.quantized:
            assert not amsgrad, "8-bit moments do not offer amsgrad"
            blocks = slice(start // QUANT_BLOCK, -(-end // QUANT_BLOCK))
            moments = [decode(arena.exp_avg[start:end], arena.exp_avg_absmax[blocks],
                              signed=True),
                       decode(arena.exp_avg_sq[start:end], arena.exp_avg_sq_absmax[blocks],
                              signed=False)]
        else:
            stored = [arena.exp_avg[start:end], arena.exp_avg_sq[start:end]]
            if amsgrad:
                stored.append(arena.max_exp_avg_sq[start:end])
            moments = [buffer.to(compute_dtype, copy=True) for buffer in stored]
        new_step = arena.steps[segment] + 1
        adam_update(
            value, grad.to(compute_dtype), moments[0], moments[1],
            moments[2] if amsgrad else None,
            step=float(new_step), lr=group[LR], beta1=group[BETA1],
            beta2=group[BETA2], eps=group[EPS], weight_decay=group[WEIGHT_DECAY],
            amsgrad=amsgrad, maximize=bool(group[MAXIMIZE]),
            decoupled_weight_decay=bool(group[DECOUPLED_WD]), inv_grad_scale=inv_scale,
            clip_factor=clip_factor,
        )
        writes = [*_stepped_writes(arena, start, end, value),
                  (arena.steps[segment], new_step)]
        if arena.quantized:
            # The params stepped with the unrounded moments; now their codes.
            exp_avg_codes, exp_avg_absmax = quantize(moments[0], signed=True)
            exp_avg_sq_codes, exp_avg_sq_absmax = quantize(moments[1], signed=False)
            writes += [(arena.exp_avg[start:end], exp_avg_codes),
                       (arena.exp_avg_sq[start:end], exp_avg_sq_codes),
                       (arena.exp_avg_absmax[blocks], exp_avg_absmax),
                       (arena.exp_avg_sq_absmax[blocks], exp_avg_sq_absmax)]
        else:
            writes += list(zip(stored, moments))
        _write_together(writes)


def grad_power_sum(arena, *, grads, norm_type):
    """sum(|g|^p) over every gradient (max |g| for p = inf), in float64, segment by segment."""
    present = [grad.to(torch.float64).abs() for grad in grads
               if grad is not None and grad.numel() > 0]
    if not present:
        return torch.zeros((), dtype=torch.float64, device=arena.params.device)
    if norm_type == float("inf"):
        return torch.stack([grad.max() for grad in present]).max()  # NaN propagates
    return torch.stack([grad.pow(norm_type).sum() for grad in present]).sum()
