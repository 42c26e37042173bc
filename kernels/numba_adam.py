"""Adam for CPU tensors: one parallel Numba pass over a whole arena, every group and parameter.

Gradients are read where autograd left them, by address, so the pass runs over *chunks* (a slice
of one segment, at most `CHUNK_ELEMENTS` long) rather than straight over elements: `prange` hands
chunks to threads, and the loop inside a chunk is a plain contiguous loop that LLVM vectorizes.
One table lookup per chunk is the price of never copying a gradient.
"""
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from fused_adam.kernels import (
    AMSGRAD, BETA1, BETA2, DECOUPLED_WD, EPS, LR, MAXIMIZE, WEIGHT_DECAY,
)

# Elements are loaded one at a time (LLVM vectorizes with unaligned loads): any address will do.
GRAD_ADDRESS_ALIGNMENT = 1

# 16K fp32 elements: four 64 KiB streams per chunk stay inside one core's L2.
CHUNK_ELEMENTS = 1 << 14
SUPPORTED_DTYPES = ("float32", "float64")
# No nnan/ninf: NaN and Inf must propagate exactly as in torch.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _pointer_like(typingctx, address, like):
    """The int64 `address` as a pointer to `like`'s element type (an `inttoptr`)."""
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(types.int64, like), codegen


@njit(nogil=True, cache=True, error_model="numpy", fastmath=_FASTMATH, inline="always")
def _update_chunk(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad, grad_sign,
                  l2_decay, param_decay, lerp_weight, beta2, one_minus_beta2, step_size,
                  bias_correction2_sqrt, eps):
    """g = sign * grad (+ l2 * p);  p *= param_decay;  m = lerp(m, g, w);
    v = b2 * v + (1 - b2) * g * g;  p -= step_size * m / (sqrt(max(v_max, v)) / sqrt(bc2) + eps)
    """
    one = param.dtype.type(1.0)
    for i in range(param.shape[0]):
        p = param[i]
        g = grad[i] * grad_sign
        if l2_decay != 0:
            g = g + l2_decay * p
        p = p * param_decay
        m = exp_avg[i]
        # torch's lerp: the formula switches at weight 0.5 to stay exact near both ends.
        if lerp_weight < 0.5:
            m = m + lerp_weight * (g - m)
        else:
            m = g - (g - m) * (one - lerp_weight)
        v = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        if amsgrad:
            v = max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        param[i] = p - step_size * m / (np.sqrt(v) / bias_correction2_sqrt + eps)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy", fastmath=_FASTMATH)
def _adam_kernel(params, exp_avg, exp_avg_sq, max_exp_avg_sq, grad_addresses, steps,
                 segment_starts, segment_groups, chunk_segments, chunk_offsets, chunk_lengths,
                 group_table, inv_grad_scale):
    """For each chunk of a segment with a gradient, `_update_chunk` with its group's settings and
    its segment's step; every such segment's step advances by one first."""
    for segment in range(grad_addresses.shape[0]):
        if grad_addresses[segment] != 0:
            steps[segment] += 1
    scalar = params.dtype.type
    for chunk in prange(chunk_segments.shape[0]):
        segment = chunk_segments[chunk]
        address = grad_addresses[segment]
        if address == 0:
            continue
        offset, n = chunk_offsets[chunk], chunk_lengths[chunk]
        grad = numba.carray(_pointer_like(address + offset * params.itemsize, params), n)
        start = segment_starts[segment] + offset
        group = group_table[segment_groups[segment]]
        lr, beta1, beta2, weight_decay = group[LR], group[BETA1], group[BETA2], group[WEIGHT_DECAY]
        decoupled = group[DECOUPLED_WD] != 0
        amsgrad = group[AMSGRAD] != 0
        step = np.float64(steps[segment])
        # Bias corrections in float64, then cast, as torch computes them in Python floats.
        step_size = lr / (1.0 - beta1 ** step)
        bias_correction2_sqrt = np.sqrt(1.0 - beta2 ** step)
        grad_sign = -inv_grad_scale if group[MAXIMIZE] != 0 else inv_grad_scale
        end = start + n
        _update_chunk(
            params[start:end], grad, exp_avg[start:end], exp_avg_sq[start:end],
            max_exp_avg_sq[start:end], amsgrad,
            scalar(grad_sign), scalar(0.0 if decoupled else weight_decay),
            scalar(1.0 - lr * weight_decay if decoupled else 1.0), scalar(1.0 - beta1),
            scalar(beta2), scalar(1.0 - beta2), scalar(step_size), scalar(bias_correction2_sqrt),
            scalar(group[EPS]),
        )


def _chunk_table(arena):
    """(segment, offset in segment, length) of every chunk; rebuilt when the layout changes."""
    table = arena.kernel_cache.get("numba")
    if table is None:
        lengths = arena.segment_lengths.numpy()
        per_segment = -(-lengths // CHUNK_ELEMENTS)
        segments = np.repeat(np.arange(len(lengths), dtype=np.int64), per_segment)
        first_chunk = np.cumsum(per_segment) - per_segment
        offsets = (np.arange(len(segments), dtype=np.int64) - first_chunk[segments]) * CHUNK_ELEMENTS
        chunk_lengths = np.minimum(lengths[segments] - offsets, CHUNK_ELEMENTS)
        empty = np.zeros(0, dtype=arena.params.numpy().dtype)
        max_exp_avg_sq = empty if arena.max_exp_avg_sq is None else arena.max_exp_avg_sq.numpy()
        table = (arena.params.numpy(), arena.exp_avg.numpy(), arena.exp_avg_sq.numpy(),
                 max_exp_avg_sq, arena.steps.numpy(), arena.segment_starts.numpy(),
                 arena.segment_groups.numpy(), segments, offsets, chunk_lengths)
        arena.kernel_cache["numba"] = table
    return table


def adam_step(arena, grad_addresses, group_table, *, inv_grad_scale=None, found_inf=None):
    """Launch `_adam_kernel` over `arena` (see `fused_adam.kernels` for the contract)."""
    assert arena.device.type == "cpu" and str(arena.dtype).removeprefix("torch.") in SUPPORTED_DTYPES
    assert grad_addresses.dtype == np.int64 or str(grad_addresses.dtype) == "torch.int64"
    if found_inf is not None and float(found_inf) != 0:
        return
    (params, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, starts, groups,
     chunk_segments, chunk_offsets, chunk_lengths) = _chunk_table(arena)
    _adam_kernel(params, exp_avg, exp_avg_sq, max_exp_avg_sq, grad_addresses.numpy(), steps,
                 starts, groups, chunk_segments, chunk_offsets, chunk_lengths,
                 group_table.numpy(), 1.0 if inv_grad_scale is None else float(inv_grad_scale))
