"""The Adam step in plain torch, one parameter at a time: the oracle every fast path is tested
against, and the backend for devices that have no compiled kernel (meta, mps, xpu, ...).

It follows `torch.optim.Adam`'s single-tensor path op for op (lerp for the first moment, the
bias corrections in Python floats), so in float64 it is the reference and in float32 it agrees
with torch to rounding. Slow on purpose: obviously correct beats fast here.
"""
import torch

from fused_adam.kernels.codecs import decode, join_master, quantize, split_master
from fused_adam.kernels.contract import (
    AMSGRAD, BETA1, BETA2, DECOUPLED_WD, EPS, LR, MAXIMIZE, QUANT_BLOCK, WEIGHT_DECAY, PerLayout,
)

GRADS = "tensors"
GRAD_ADDRESS_ALIGNMENT = 1  # gradients are never read by address here


def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step, lr, beta1, beta2,
                eps, weight_decay, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                inv_grad_scale=None, clip_factor=None):
    """Update `param` and its moments in place by the formula of `contract.py`, in torch's own
    ops (its lerp, addcmul and add with alpha); `step` is the count after this update (>= 1)."""
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


def _host_tables(record):
    """The segment tables as Python lists (one device read per layout)."""
    return list(zip(record.segment_starts.tolist(), record.segment_lengths.tolist(),
                    record.segment_groups.tolist()))


_segments = PerLayout(_host_tables)


def _stepped_value(record, start, end, compute_dtype):
    """A working copy of what segment start..end steps: the master (fp32, or joined from a
    compact one) where there is one, else the params, in the compute dtype."""
    if record.master_remainder is not None:
        return join_master(record.params[start:end], record.master_remainder[start:end])
    source = record.params if record.master_params is None else record.master_params
    return source[start:end].to(compute_dtype, copy=True)


def _stepped_writes(record, start, end, value):
    """[(target, value)] storing the stepped `value` of segment start..end: the params (its
    rounding, where a master is kept) and the master (fp32, or split into a compact one)."""
    params = record.params[start:end]
    if record.master_remainder is not None:
        high, remainder = split_master(value, record.master_remainder.dtype)
        return [(params, high), (record.master_remainder[start:end], remainder)]
    writes = [(params, value)]
    if record.master_params is not None:
        writes.append((record.master_params[start:end], value))
    return writes


def _write_together(writes):
    """One call for every write of a segment (params, moments, step): a step interrupted
    (KeyboardInterrupt) between two segments leaves each segment stepped or not, never
    half-stepped."""
    targets, values = zip(*writes)
    torch._foreach_copy_(list(targets), list(values))


def adam_step(record, *, grads, group_table, inv_grad_scale=None, found_inf=None,
              clip_factor=None):
    """The launcher contract of `contract.py`, one segment at a time. Math is fp32 for
    16-bit buffers (the kernels' contract), on the master where there is one."""
    if found_inf is not None and bool(found_inf.item()):
        return
    groups = group_table.tolist()
    inv_scale = None if inv_grad_scale is None else float(inv_grad_scale)
    clip_factor = None if clip_factor is None else float(clip_factor)
    compute_dtype = torch.float64 if record.params.dtype == torch.float64 else torch.float32
    for segment, ((start, length, group_index), grad) in enumerate(zip(_segments(record), grads)):
        if grad is None:
            continue
        group = groups[group_index]
        amsgrad = bool(group[AMSGRAD])
        end = start + length
        value = _stepped_value(record, start, end, compute_dtype)
        if record.quantized:
            assert not amsgrad, "8-bit moments do not offer amsgrad"
            blocks = slice(start // QUANT_BLOCK, -(-end // QUANT_BLOCK))
            moments = [decode(record.exp_avg[start:end], record.exp_avg_absmax[blocks],
                              signed=True),
                       decode(record.exp_avg_sq[start:end], record.exp_avg_sq_absmax[blocks],
                              signed=False)]
        else:
            stored = [record.exp_avg[start:end], record.exp_avg_sq[start:end]]
            if amsgrad:
                stored.append(record.max_exp_avg_sq[start:end])
            moments = [buffer.to(compute_dtype, copy=True) for buffer in stored]
        new_step = record.steps[segment] + 1
        adam_update(
            value, grad.to(compute_dtype), moments[0], moments[1],
            moments[2] if amsgrad else None,
            step=float(new_step), lr=group[LR], beta1=group[BETA1],
            beta2=group[BETA2], eps=group[EPS], weight_decay=group[WEIGHT_DECAY],
            amsgrad=amsgrad, maximize=bool(group[MAXIMIZE]),
            decoupled_weight_decay=bool(group[DECOUPLED_WD]), inv_grad_scale=inv_scale,
            clip_factor=clip_factor,
        )
        writes = [*_stepped_writes(record, start, end, value),
                  (record.steps[segment], new_step)]
        if record.quantized:
            # The params stepped with the unrounded moments; now their codes.
            exp_avg_codes, exp_avg_absmax = quantize(moments[0], signed=True)
            exp_avg_sq_codes, exp_avg_sq_absmax = quantize(moments[1], signed=False)
            writes += [(record.exp_avg[start:end], exp_avg_codes),
                       (record.exp_avg_sq[start:end], exp_avg_sq_codes),
                       (record.exp_avg_absmax[blocks], exp_avg_absmax),
                       (record.exp_avg_sq_absmax[blocks], exp_avg_sq_absmax)]
        else:
            writes += list(zip(stored, moments))
        _write_together(writes)


def grad_power_sum(record, *, grads, norm_type):
    """sum(|g|^p) over every gradient (max |g| for p = inf), in float64, segment by segment."""
    present = [grad.to(torch.float64).abs() for grad in grads
               if grad is not None and grad.numel() > 0]
    if not present:
        return torch.zeros((), dtype=torch.float64, device=record.params.device)
    if norm_type == float("inf"):
        return torch.stack([grad.max() for grad in present]).max()  # NaN propagates
    return torch.stack([grad.pow(norm_type).sum() for grad in present]).sum()
