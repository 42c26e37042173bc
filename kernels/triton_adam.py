"""Triton Adam/AdamW step over a flat arena: one launch updates every segment of every param
group, in place, reading each gradient where autograd left it. The one trade-off that shaped it:
the grid runs over *chunks* of segments (a chunk table built once per layout maps program ->
segment, offset) instead of over the flat buffer, so every program pays about a dozen L2-resident
scalar loads of segment and group metadata and each segment ends in one masked, narrow chunk; in
exchange no program ever touches padding, gradients need no flat copy (their int64 addresses are
turned into pointers in the kernel), and hyperparameters, steps and amsgrad/maximize/decoupled
flags stay per segment and per group without one compile per combination.
"""

import contextlib

import torch
import triton
import triton.language as tl

from . import GROUP_COLUMNS, LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MAXIMIZE, AMSGRAD, DECOUPLED_WD

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Gradients are read with 128-bit loads: the arena copies (and counts) any gradient whose
# address is not a multiple of this.
GRAD_ADDRESS_ALIGNMENT = 16

# Globals a @triton.jit function reads must be constexpr.
_LR, _BETA1, _BETA2 = tl.constexpr(LR), tl.constexpr(BETA1), tl.constexpr(BETA2)
_EPS, _WEIGHT_DECAY = tl.constexpr(EPS), tl.constexpr(WEIGHT_DECAY)
_MAXIMIZE, _AMSGRAD = tl.constexpr(MAXIMIZE), tl.constexpr(AMSGRAD)
_DECOUPLED_WD, _GROUP_COLUMNS = tl.constexpr(DECOUPLED_WD), tl.constexpr(GROUP_COLUMNS)


@triton.jit
def _to_compute(x):
    # fp64 params keep fp64 math; fp32, bf16 and fp16 compute in fp32.
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _div(x, y):
    # Triton's fp32 `/` compiles to div.full.f32 (approximate); torch's division is IEEE.
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sqrt(x):
    # tl.sqrt on fp32 compiles to sqrt.approx.ftz.f32; torch's sqrt is IEEE.
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _adam_chunk(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs, mask,
                grad_scale, maximize, l2_weight_decay, decoupled_wd, param_decay,
                one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                amsgrad, HAS_MAX_EXP_AVG_SQ: tl.constexpr):
    p = _to_compute(tl.load(param_ptrs, mask=mask))
    g = _to_compute(tl.load(grad_ptrs, mask=mask))
    m = _to_compute(tl.load(exp_avg_ptrs, mask=mask))
    v = _to_compute(tl.load(exp_avg_sq_ptrs, mask=mask))

    # Without a GradScaler scale grad_scale is exactly 1.0: no rounding, no extra launch.
    g = g * grad_scale.to(g.dtype)
    if maximize:
        g = -g
    if l2_weight_decay != 0:
        g = g + l2_weight_decay.to(g.dtype) * p
    if decoupled_wd:
        p = p * param_decay.to(p.dtype)

    m = m + one_minus_beta1.to(m.dtype) * (g - m)
    v = v * beta2.to(v.dtype) + one_minus_beta2.to(v.dtype) * g * g
    v_hat = v
    if HAS_MAX_EXP_AVG_SQ:
        if amsgrad:
            v_max = _to_compute(tl.load(max_exp_avg_sq_ptrs, mask=mask))
            # torch.maximum propagates NaN; tl.maximum does not unless asked.
            v_hat = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(max_exp_avg_sq_ptrs, v_hat.to(max_exp_avg_sq_ptrs.dtype.element_ty), mask=mask)
    denom = _div(_sqrt(v_hat), bias_correction2_sqrt.to(v.dtype)) + eps.to(v.dtype)
    p = p - _div(step_size.to(p.dtype) * m, denom)

    tl.store(param_ptrs, p.to(param_ptrs.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptrs, m.to(exp_avg_ptrs.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptrs, v.to(exp_avg_sq_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _adam_kernel(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                 chunk_table_ptr, segment_starts_ptr, segment_lengths_ptr, segment_groups_ptr,
                 steps_ptr, grad_addresses_ptr, group_table_ptr,
                 inv_grad_scale_ptr, inv_grad_scale, found_inf_ptr,
                 HAS_MAX_EXP_AVG_SQ: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """For each element of this program's chunk, with t = steps[segment] (already advanced):

    g = grad * inv_grad_scale;  g = -g if maximize
    g = g + wd * p                      (Adam, L2)      p = p * (1 - lr * wd)   (AdamW)
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    v_hat = max(v_max, v)  (amsgrad, v_max := v_hat)   else v_hat = v
    p = p - (lr / (1 - b1^t)) * m / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)
    """
    found_inf = tl.load(found_inf_ptr)
    pid = tl.program_id(0).to(tl.int64)
    segment = tl.load(chunk_table_ptr + 2 * pid)
    chunk_offset = tl.load(chunk_table_ptr + 2 * pid + 1)
    grad_address = tl.load(grad_addresses_ptr + segment)
    if (found_inf != 0) | (grad_address == 0):
        return

    start = tl.load(segment_starts_ptr + segment)
    length = tl.load(segment_lengths_ptr + segment)
    group_row = group_table_ptr + tl.load(segment_groups_ptr + segment) * _GROUP_COLUMNS
    lr = tl.load(group_row + _LR)
    beta1 = tl.load(group_row + _BETA1)
    beta2 = tl.load(group_row + _BETA2)
    eps = tl.load(group_row + _EPS)
    weight_decay = tl.load(group_row + _WEIGHT_DECAY)
    maximize = tl.load(group_row + _MAXIMIZE) != 0
    amsgrad = tl.load(group_row + _AMSGRAD) != 0
    decoupled_wd = tl.load(group_row + _DECOUPLED_WD) != 0

    # Scalars in fp64 like torch's Python floats, cast to the compute dtype at their use.
    step = tl.load(steps_ptr + segment).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bias_correction2 = 1.0 - tl.exp2(step * tl.log2(beta2))
    step_size = lr / bias_correction1
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    l2_weight_decay = tl.where(decoupled_wd, 0.0, weight_decay)
    param_decay = 1.0 - lr * weight_decay
    grad_scale = tl.load(inv_grad_scale_ptr) * inv_grad_scale

    grad_ptr = grad_address.to(tl.pointer_type(param_ptr.dtype.element_ty), bitcast=True)
    # Chunk offsets are multiples of BLOCK_SIZE and segment starts of SEGMENT_ALIGNMENT (16)
    # elements. Hints on the loaded scalars change nothing in the PTX; on the vectors they
    # are what makes the accesses 128-bit.
    in_segment = chunk_offset + tl.arange(0, BLOCK_SIZE)
    in_segment = tl.max_contiguous(tl.multiple_of(in_segment, BLOCK_SIZE), BLOCK_SIZE)
    offsets = tl.max_contiguous(tl.multiple_of(start + in_segment, 16), BLOCK_SIZE)
    # Contract, not a check (a check would cost a host sync per step): the optimizer only
    # hands in 16-byte aligned grads. A hint on the loaded int64 does not survive int_to_ptr;
    # on a pointer divisibility counts bytes, so this says "16-byte aligned, contiguous".
    grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptr + in_segment, 16), BLOCK_SIZE)
    if chunk_offset + BLOCK_SIZE <= length:
        # Whole chunk: no mask, so nothing stops 128-bit accesses (a mask against a runtime
        # length has constancy 1 and would force scalar ones).
        _adam_chunk(param_ptr + offsets, grad_ptrs, exp_avg_ptr + offsets,
                    exp_avg_sq_ptr + offsets, max_exp_avg_sq_ptr + offsets, None,
                    grad_scale, maximize, l2_weight_decay, decoupled_wd, param_decay,
                    1.0 - beta1, beta2, 1.0 - beta2, step_size, bias_correction2_sqrt, eps,
                    amsgrad, HAS_MAX_EXP_AVG_SQ)
    else:
        _adam_chunk(param_ptr + offsets, grad_ptrs, exp_avg_ptr + offsets,
                    exp_avg_sq_ptr + offsets, max_exp_avg_sq_ptr + offsets, in_segment < length,
                    grad_scale, maximize, l2_weight_decay, decoupled_wd, param_decay,
                    1.0 - beta1, beta2, 1.0 - beta2, step_size, bias_correction2_sqrt, eps,
                    amsgrad, HAS_MAX_EXP_AVG_SQ)


def _launch_config(dtype):
    """(BLOCK_SIZE, compile options). 8 warps, each thread moving 32 B of every tensor (two
    128-bit accesses): 2048 fp32, 4096 bf16/fp16 or 1024 fp64 elements per program. FMA
    contraction off: the kernel then rounds exactly as the interpreter (and torch's separate
    ops) do, whatever a Triton version's default; the extra FLOPs hide under the memory traffic."""
    return 8192 // dtype.itemsize, dict(num_warps=8, enable_fp_fusion=False)


def _chunk_table(arena, block_size):
    """int64 [n_chunks, 2] (segment, offset within segment), cached until the layout changes."""
    key = ("triton_chunk_table", block_size)
    table = arena.kernel_cache.get(key)
    if table is None:
        lengths = arena.segment_lengths
        chunks_per_segment = (lengths + (block_size - 1)) // block_size
        # One host read per layout (the grid size), never per step.
        n_chunks = int(chunks_per_segment.sum())
        segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), chunks_per_segment,
            output_size=n_chunks)
        first_chunk = torch.cumsum(chunks_per_segment, 0) - chunks_per_segment
        chunk = torch.arange(n_chunks, device=lengths.device) - first_chunk[segment]
        table = torch.stack([segment, chunk * block_size], dim=1).contiguous()
        arena.kernel_cache[key] = table
    return table


def _scratch(arena):
    """Per-layout scratch: defaults for absent scale/found_inf and the step-increment mask."""
    scratch = arena.kernel_cache.get("triton_scratch")
    if scratch is None or scratch["advance"].shape != arena.steps.shape:
        device = arena.params.device
        scratch = {
            "one": torch.ones((), dtype=torch.float32, device=device),
            "zero": torch.zeros((), dtype=torch.float32, device=device),
            "advance": torch.empty(arena.steps.shape, dtype=torch.bool, device=device),
            "no_inf": torch.empty((), dtype=torch.bool, device=device),
        }
        arena.kernel_cache["triton_scratch"] = scratch
    return scratch


def _check_table(name, tensor, dtype, device, n=None):
    assert tensor.dtype == dtype, f"{name}: expected {dtype}, got {tensor.dtype}"
    assert tensor.device == device, f"{name}: expected device {device}, got {tensor.device}"
    assert tensor.is_contiguous(), f"{name} must be contiguous"
    if n is not None:
        assert tensor.numel() == n, f"{name}: expected {n} entries, got {tensor.numel()}"


def adam_step(arena, grad_addresses, group_table, *, inv_grad_scale=None, found_inf=None):
    """One Adam/AdamW step over every segment of `arena` (see kernels/__init__.py): advances
    `arena.steps` where a grad is present (and found_inf is zero), then launches the kernel once.
    Nothing is read back to the host."""
    params = arena.params
    device, dtype = params.device, params.dtype
    assert dtype in SUPPORTED_DTYPES, f"unsupported dtype {dtype}"
    assert params.dim() == 1, "arena buffers are 1-D"
    has_max = arena.max_exp_avg_sq is not None
    buffers = [("params", params), ("exp_avg", arena.exp_avg), ("exp_avg_sq", arena.exp_avg_sq)]
    if has_max:
        buffers.append(("max_exp_avg_sq", arena.max_exp_avg_sq))
    for name, buffer in buffers:
        _check_table(name, buffer, dtype, device, params.numel())
        # Host metadata, no sync: 128-bit accesses need 16-byte aligned bases.
        assert buffer.data_ptr() % 16 == 0, f"{name} must be 16-byte aligned"
    n_segments = arena.segment_starts.numel()
    _check_table("segment_starts", arena.segment_starts, torch.int64, device, n_segments)
    _check_table("segment_lengths", arena.segment_lengths, torch.int64, device, n_segments)
    _check_table("segment_groups", arena.segment_groups, torch.int64, device, n_segments)
    _check_table("steps", arena.steps, torch.float32, device, n_segments)
    _check_table("grad_addresses", grad_addresses, torch.int64, device, n_segments)
    _check_table("group_table", group_table, torch.float64, device)
    assert group_table.dim() == 2 and group_table.shape[1] == GROUP_COLUMNS, \
        f"group_table must be [n_groups, {GROUP_COLUMNS}], got {tuple(group_table.shape)}"

    scratch = _scratch(arena)
    advance = scratch["advance"]
    torch.ne(grad_addresses, 0, out=advance)
    if found_inf is None:
        found_inf = scratch["zero"]
    else:
        # GradScaler's is float32 already (then .to is free); the kernel reads float32.
        found_inf = found_inf.to(torch.float32)
        _check_table("found_inf", found_inf, torch.float32, device, 1)
        torch.eq(found_inf.reshape(()), 0, out=scratch["no_inf"])
        torch.logical_and(advance, scratch["no_inf"], out=advance)
    arena.steps.add_(advance)

    if isinstance(inv_grad_scale, torch.Tensor):
        # float32 like GradScaler's own unscale; a float64 scale costs one tiny cast.
        inv_grad_scale = inv_grad_scale.to(torch.float32)
        _check_table("inv_grad_scale", inv_grad_scale, torch.float32, device, 1)
        inv_grad_scale_ptr, inv_grad_scale = inv_grad_scale, 1.0
    else:
        inv_grad_scale_ptr = scratch["one"]
        inv_grad_scale = 1.0 if inv_grad_scale is None else float(inv_grad_scale)

    block_size, options = _launch_config(dtype)
    chunk_table = _chunk_table(arena, block_size)
    n_chunks = chunk_table.shape[0]
    if n_chunks == 0:
        return
    max_exp_avg_sq = arena.max_exp_avg_sq if has_max else params  # never touched without it
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _adam_kernel[(n_chunks,)](
            params, arena.exp_avg, arena.exp_avg_sq, max_exp_avg_sq,
            chunk_table, arena.segment_starts, arena.segment_lengths, arena.segment_groups,
            arena.steps, grad_addresses, group_table,
            inv_grad_scale_ptr, inv_grad_scale, found_inf,
            HAS_MAX_EXP_AVG_SQ=has_max, BLOCK_SIZE=block_size, **options)

