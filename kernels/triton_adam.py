"""Triton Adam/AdamW step over a flat arena: one launch updates every segment of every param
group, in place, reading each gradient where autograd left it. The one trade-off that shaped it:
the grid runs over *chunks* of segments (a chunk table built once per layout maps program ->
segment, offset) instead of over the flat buffer, so every program pays about a dozen L2-resident
scalar loads of segment and group metadata and each segment ends in one masked, narrow chunk; in
exchange no program ever touches padding, gradients need no flat copy (their int64 addresses are
turned into pointers in the kernel), and hyperparameters, steps and amsgrad/maximize/decoupled
flags stay per segment and per group without one compile per combination.

Mixed precision follows the contract (`contract.py`): bf16/fp16 params may have an fp32 master
copy (stepped in their place, then rounded into them) and moments of their own dtype, fp32 or
bf16; the math is fp32 (fp64 for fp64 params) and every narrower store rounds to nearest even.
bf16 params may keep a compact master instead (an int16 or int8 remainder beside them, see
`contract.py`): both kernels join it with the params into the fp32 value they step and
split that back with the contract's integer arithmetic (the params then round ties away from
zero); which master a kernel has, fp32 or compact, it tells by `master_param_ptr`'s dtype.

8-bit moments (int8/uint8 codes and an fp32 absmax per block of QUANT_BLOCK elements, see
`contract.py`) have a kernel of their own, `_adam_q8_kernel`, over the same chunk table:
it decodes a chunk's blocks, steps as `_adam_kernel` does in fp32 and encodes the new moments.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from fused_adam.kernels.contract import (
    AMSGRAD, BETA1, BETA2, COMPACT_MASTERS, DECOUPLED_WD, EPS, EXP_AVG_CODES, EXP_AVG_SQ_CODES,
    GROUP_COLUMNS, LR, MASTER_DTYPES, MAXIMIZE, PARAM_DTYPES, QUANT_BLOCK, SIGNED_LEVELS,
    STATE_DTYPES, UNSIGNED_LEVELS, WEIGHT_DECAY, PerLayout,
)

GRADS = "addresses"
# Gradients are read with 128-bit loads: the optimizer copies (and counts) any gradient whose
# address is not a multiple of this.
GRAD_ADDRESS_ALIGNMENT = 16

# Globals a @triton.jit function reads must be constexpr.
# Whether kernels run through Triton's interpreter (Triton also reads this once, at import).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
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
def _store_rounded(ptrs, x, mask):
    """Store `x` (fp32 or fp64 math) in the dtype `ptrs` points to, rounded to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        if _INTERPRETED:
            # Triton's interpreter truncates fp32 -> bf16 (the `.to` rounding argument
            # included), so round here as cvt.rn.bf16x2.f32 and torch do; NaN stays NaN
            # (torch's 0x7FC0: the rounding bias would carry the GPU's all-ones NaN into -0.0).
            bits = x.to(tl.uint32, bitcast=True)
            rounded = tl.where(x != x, 0x7FC00000, bits + (0x7FFF + ((bits >> 16) & 1)))
            tl.store(ptrs, (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
                     mask=mask)
        else:
            # Compiled: cvt.rn.bf16x2.f32, half an instruction per value, where the integer
            # rounding above takes about 6.5 (SHF, SGXT, IADD3, FSETP, SEL, PRMT on sm_90) in
            # a kernel that should be bound by memory, not by issue (bench/RESULTS.md).
            tl.store(ptrs, x.to(tl.bfloat16), mask=mask)
    else:
        # fp16: cvt.rn.f16.f32 compiled, numpy's astype (also nearest even) interpreted.
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _join_master(param, remainder):
    """The fp32 master of bf16 params and their compact remainder (int16: the low 16 bits; int8:
    the top 8 of them): (param_bits << 16) + r, or + (r << 8), in 32-bit integers."""
    high = param.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    low = remainder.to(tl.int32)  # sign-extended
    if remainder.dtype == tl.int8:
        low = low << 8
    return (high + low.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _split_master(p, REMAINDER: tl.constexpr):
    """(bf16 params, remainder of dtype REMAINDER) of the fp32 master `p`: param_bits = (bits +
    0x8000) >> 16 (nearest, ties away from zero), r = bits - (param_bits << 16) (int16), or
    min((that + 0x80) >> 8, 127) (int8, arithmetic shift); NaN stores 0x7FC0 and r = 0. Integer
    arithmetic on the bits, compiled and interpreted alike (no float rounding mode involved)."""
    bits = p.to(tl.uint32, bitcast=True)
    nan = p != p
    high = tl.where(nan, 0x7FC0, (bits + 0x8000) >> 16)
    low = (bits - (high << 16)).to(tl.int32, bitcast=True)  # in -0x8000..0x7FFF
    if REMAINDER == tl.int8:
        low = tl.minimum((low + 0x80) >> 8, 127)
    low = tl.where(nan, 0, low)
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True), low.to(REMAINDER)


@triton.jit
def _load_stepped(param_ptrs, master_param_ptrs, mask, HAS_MASTER: tl.constexpr):
    """The value a chunk steps, in the compute dtype: the master where there is one (HAS_MASTER:
    fp32, or a compact one joined from the params and their remainder, by `master_param_ptrs`'
    dtype), else the params."""
    if HAS_MASTER:
        if master_param_ptrs.dtype.element_ty == tl.float32:
            # The params are only written: the fp32 master is the value stepped.
            p = tl.load(master_param_ptrs, mask=mask)
        else:
            p = _join_master(tl.load(param_ptrs, mask=mask), tl.load(master_param_ptrs, mask=mask))
    else:
        p = _to_compute(tl.load(param_ptrs, mask=mask))
    return p


@triton.jit
def _store_stepped(param_ptrs, master_param_ptrs, p, mask, HAS_MASTER: tl.constexpr):
    """Store the stepped `p` as `_load_stepped` found it: the fp32 master and the params rounded
    to nearest even, or split into the bf16 params and their remainder, or the params alone."""
    if HAS_MASTER:
        if master_param_ptrs.dtype.element_ty == tl.float32:
            tl.store(master_param_ptrs, p, mask=mask)
            _store_rounded(param_ptrs, p, mask)
        else:
            high, remainder = _split_master(p, master_param_ptrs.dtype.element_ty)
            tl.store(param_ptrs, high, mask=mask)
            tl.store(master_param_ptrs, remainder, mask=mask)
    else:
        _store_rounded(param_ptrs, p, mask)


@triton.jit
def _update_moments(p, g, m, v, moment_scalars):
    """(p, m, v) after the contract's gradient, weight decay and moment lines (`contract.py`),
    on tiles of any shape; `moment_scalars` as `_segment_scalars` makes them."""
    (grad_scale, clip_factor, l2_weight_decay, decoupled_wd, param_decay, lerp_weight, beta2,
     one_minus_beta2) = moment_scalars
    # grad_scale is GradScaler's inverse scale, negated for maximize: exactly +-1.0 without a
    # scaler, so no rounding. Then the clipping factor (1.0 without clipping), rounded apart
    # as torch's unscale_ then clip_grad_norm_ round.
    g = g * grad_scale.to(g.dtype)
    g = g * clip_factor.to(g.dtype)
    # The FMAs are torch's own (its CPU kernels for add with alpha, lerp and addcmul are
    # contracted by GCC, its CUDA ones by nvcc); every other product and sum rounds on its own
    # (enable_fp_fusion=False, see `launch_config`).
    if l2_weight_decay != 0:
        g = tl.fma(p, l2_weight_decay.to(g.dtype), g)  # grad.add(param, alpha=wd)
    if decoupled_wd:
        p = p * param_decay.to(p.dtype)

    # torch's lerp: the formula switches at weight 0.5 to stay exact near both ends (with
    # beta1 = 0, m + 1 * (g - m) loses g under a large old m; fma(0, g - m, g) is g).
    w = lerp_weight.to(m.dtype)
    if lerp_weight < 0.5:
        m = tl.fma(w, g - m, m)
    else:
        m = tl.fma(w - 1.0, g - m, g)
    # exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2): fma((1 - b2) * g, g, v * b2)
    v = tl.fma(one_minus_beta2.to(v.dtype) * g, g, v * beta2.to(v.dtype))
    return p, m, v


@triton.jit
def _stepped_param(p, m, root, step_scalars):
    """The contract's last line from root = sqrt(v_hat), IEEE-rounded."""
    step_size, bias_correction2_sqrt, eps = step_scalars
    denom = _div(root, bias_correction2_sqrt.to(root.dtype)) + eps.to(root.dtype)
    return p - _div(step_size.to(p.dtype) * m, denom)


@triton.jit
def _chunk_scalars(scalars):
    """`_segment_scalars`' scalars as a chunk's math takes them: (`_update_moments`' scalars,
    `_stepped_param`'s, amsgrad). The moments' weights 1 - b1 and 1 - b2 are taken here, where
    the chunk's math starts: taken with the other scalars, the two fp64 values stay live across
    the pointer math, and ptxas spills registers in three sm_80 kernels past the bound of
    tests/test_triton_compile.py."""
    segment_moment_scalars, step_scalars, amsgrad = scalars
    grad_scale, clip_factor, l2_weight_decay, decoupled_wd, param_decay, beta1, beta2 = \
        segment_moment_scalars
    moment_scalars = (grad_scale, clip_factor, l2_weight_decay, decoupled_wd, param_decay,
                      1.0 - beta1, beta2, 1.0 - beta2)
    return moment_scalars, step_scalars, amsgrad


@triton.jit
def _adam_chunk(param_ptrs, master_param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                max_exp_avg_sq_ptrs, mask, scalars, HAS_MASTER: tl.constexpr,
                HAS_MAX_EXP_AVG_SQ: tl.constexpr):
    moment_scalars, step_scalars, amsgrad = _chunk_scalars(scalars)
    p = _load_stepped(param_ptrs, master_param_ptrs, mask, HAS_MASTER)
    g = _to_compute(tl.load(grad_ptrs, mask=mask))
    m = _to_compute(tl.load(exp_avg_ptrs, mask=mask))
    v = _to_compute(tl.load(exp_avg_sq_ptrs, mask=mask))

    p, m, v = _update_moments(p, g, m, v, moment_scalars)
    v_hat = v
    if HAS_MAX_EXP_AVG_SQ:
        if amsgrad:
            v_max = _to_compute(tl.load(max_exp_avg_sq_ptrs, mask=mask))
            # torch.maximum propagates NaN; tl.maximum does not unless asked.
            v_hat = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
            _store_rounded(max_exp_avg_sq_ptrs, v_hat, mask)
    p = _stepped_param(p, m, _sqrt(v_hat), step_scalars)

    _store_stepped(param_ptrs, master_param_ptrs, p, mask, HAS_MASTER)
    _store_rounded(exp_avg_ptrs, m, mask)
    _store_rounded(exp_avg_sq_ptrs, v, mask)


@triton.jit
def _two_product(ah, al, bh, bl):
    """(ah + al) * (bh + bl) in double-double: the high product's error exactly (an FMA), the
    cross terms' roughly, renormalized (fast two-sum: FMA contraction is off)."""
    high = ah * bh
    low = tl.fma(ah, bh, -high) + (ah * bl + al * bh)
    total = high + low
    return total, low - (total - high)


@triton.jit
def _power(base, exponent):
    """base ** exponent for an fp64 scalar base and an integer exponent >= 0, correctly rounded
    (but for a result within 2^-90 or so of a rounding boundary): Python's `beta ** step`, the
    bias corrections' power, which glibc's pow rounds correctly too. By squaring in
    double-double, at most 2 * 25 products for a step below 2^25 (a float32 step stops counting
    at 2^24). exp2(step * log2(beta)) misses by an ulp or more in fp64: 169 of 2145 fp64
    params part from torch's loop within 7 steps."""
    result_high = base * 0.0 + 1.0
    result_low = base * 0.0
    power_high = base
    power_low = base * 0.0
    while exponent > 0:
        if (exponent & 1) != 0:
            result_high, result_low = _two_product(result_high, result_low, power_high,
                                                   power_low)
        power_high, power_low = _two_product(power_high, power_low, power_high, power_low)
        exponent = exponent >> 1
    return result_high + result_low


@triton.jit
def _locate_chunk(chunk_table_ptr, grad_addresses_ptr, found_inf_ptr):
    """Both kernels' opening: where this program's chunk is, (segment, chunk offset in it,
    gradient address), and whether it has nothing to do (the step is skipped, or the segment
    has no gradient): then the kernel returns at once."""
    found_inf = tl.load(found_inf_ptr)
    pid = tl.program_id(0).to(tl.int64)
    segment = tl.load(chunk_table_ptr + 2 * pid)
    chunk_offset = tl.load(chunk_table_ptr + 2 * pid + 1)
    grad_address = tl.load(grad_addresses_ptr + segment)
    return (segment, chunk_offset, grad_address), (found_inf != 0) | (grad_address == 0)


@triton.jit
def _open_segment(located, param_ptr, segment_starts_ptr, segment_lengths_ptr,
                  segment_groups_ptr, steps_ptr, group_table_ptr, inv_grad_scale_ptr,
                  inv_grad_scale, clip_factor_ptr):
    """Both kernels' next step, for a chunk with work (`located` by `_locate_chunk`): (its offset
    in its segment, the segment's start and length, the gradient as a pointer of the params'
    type, the scalars of `_segment_scalars`)."""
    segment, chunk_offset, grad_address = located
    start = tl.load(segment_starts_ptr + segment)
    length = tl.load(segment_lengths_ptr + segment)
    scalars = _segment_scalars(segment, segment_groups_ptr, steps_ptr, group_table_ptr,
                               inv_grad_scale_ptr, inv_grad_scale, clip_factor_ptr)
    grad_ptr = grad_address.to(tl.pointer_type(param_ptr.dtype.element_ty), bitcast=True)
    return chunk_offset, start, length, grad_ptr, scalars


@triton.jit
def _segment_scalars(segment, segment_groups_ptr, steps_ptr, group_table_ptr,
                     inv_grad_scale_ptr, inv_grad_scale, clip_factor_ptr):
    """The scalars both kernels step a segment with, from its group row and step count (see
    `_chunk_scalars`)."""
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
    step = tl.load(steps_ptr + segment).to(tl.int64)
    bias_correction1 = 1.0 - _power(beta1, step)
    bias_correction2 = 1.0 - _power(beta2, step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = tl.sqrt(bias_correction2)
    l2_weight_decay = tl.where(decoupled_wd, 0.0, weight_decay)
    param_decay = 1.0 - lr * weight_decay
    grad_scale = tl.load(inv_grad_scale_ptr) * inv_grad_scale
    grad_scale = tl.where(maximize, -grad_scale, grad_scale)
    clip_factor = tl.load(clip_factor_ptr)
    return ((grad_scale, clip_factor, l2_weight_decay, decoupled_wd, param_decay, beta1, beta2),
            (step_size, bias_correction2_sqrt, eps), amsgrad)


@triton.jit
def _adam_kernel(param_ptr, master_param_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                 chunk_table_ptr, segment_starts_ptr, segment_lengths_ptr, segment_groups_ptr,
                 steps_ptr, grad_addresses_ptr, group_table_ptr,
                 inv_grad_scale_ptr, inv_grad_scale, found_inf_ptr, clip_factor_ptr,
                 HAS_MASTER: tl.constexpr, HAS_MAX_EXP_AVG_SQ: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr):
    """The update of `contract.py` on every element of this program's chunk, t = steps[segment]
    (already advanced), p the master when HAS_MASTER: an fp32 copy, or a compact one (int16 or
    int8 `master_param_ptr`, joined with the params and split back into them)."""
    located, idle = _locate_chunk(chunk_table_ptr, grad_addresses_ptr, found_inf_ptr)
    if idle:
        return
    chunk_offset, start, length, grad_ptr, scalars = _open_segment(
        located, param_ptr, segment_starts_ptr, segment_lengths_ptr, segment_groups_ptr,
        steps_ptr, group_table_ptr, inv_grad_scale_ptr, inv_grad_scale, clip_factor_ptr)
    # Chunk offsets are multiples of BLOCK_SIZE and segment starts of SEGMENT_ALIGNMENT (16)
    # elements. Hints on the loaded scalars change nothing in the PTX; on the vectors they
    # are what makes the accesses 128-bit.
    # The contiguity hint is one 128-bit access of the *widest* stream, not BLOCK_SIZE: with
    # 2-byte and 4-byte streams in one kernel, Triton gives loads the widest vector any access
    # allows (8 elements for bf16) but caps each store at 128 bits (4 fp32), and moves every
    # fp32 result between the two layouts through shared memory (a bar.sync per fp32 store:
    # 14 in the bf16-master-fp32-states amsgrad kernel). Capped at 4 elements, all streams
    # share one layout: fp32 stays v4, 2-byte streams beside it take v2.b32 (64-bit) accesses.
    # A compact master's remainder (int16 or int8) is never the widest: beside bf16 moments
    # (8 elements) it moves in 128-bit (int16) or 64-bit (int8) accesses, beside fp32 moments
    # (4) in 64-bit or 32-bit ones.
    WIDEST_BITS: tl.constexpr = max(param_ptr.dtype.element_ty.primitive_bitwidth,
                                    exp_avg_ptr.dtype.element_ty.primitive_bitwidth,
                                    master_param_ptr.dtype.element_ty.primitive_bitwidth
                                    if HAS_MASTER else 0)
    ACCESS: tl.constexpr = 128 // WIDEST_BITS
    in_segment = chunk_offset + tl.arange(0, BLOCK_SIZE)
    in_segment = tl.max_contiguous(tl.multiple_of(in_segment, BLOCK_SIZE), ACCESS)
    offsets = tl.max_contiguous(tl.multiple_of(start + in_segment, 16), ACCESS)
    # Contract, not a check (a check would cost a host sync per step): the optimizer only
    # hands in 16-byte aligned grads. A hint on the loaded int64 does not survive int_to_ptr;
    # on a pointer divisibility counts bytes, so this says "16-byte aligned, contiguous".
    grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptr + in_segment, 16), ACCESS)
    if HAS_MASTER:
        master_param_ptrs = master_param_ptr + offsets
    else:
        master_param_ptrs = None
    param_ptrs, exp_avg_ptrs = param_ptr + offsets, exp_avg_ptr + offsets
    exp_avg_sq_ptrs, max_exp_avg_sq_ptrs = exp_avg_sq_ptr + offsets, max_exp_avg_sq_ptr + offsets
    # Two calls, because the mask is a compile-time None on whole chunks: no mask, so nothing
    # stops 128-bit accesses (a mask against a runtime length has constancy 1 and would force
    # scalar ones). Triton cannot merge a None and a tensor into one variable across branches.
    if chunk_offset + BLOCK_SIZE <= length:
        _adam_chunk(param_ptrs, master_param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                    max_exp_avg_sq_ptrs, None, scalars, HAS_MASTER, HAS_MAX_EXP_AVG_SQ)
    else:
        _adam_chunk(param_ptrs, master_param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                    max_exp_avg_sq_ptrs, in_segment < length, scalars, HAS_MASTER,
                    HAS_MAX_EXP_AVG_SQ)


# ---------------------------------------------------------------------------------------------
# 8-bit moments: the block map of `contract.py`, in a kernel of its own. Its tile has a
# row per block of QUANT_BLOCK elements (each row reduces to its block's absmax), it has two more
# buffers and no amsgrad or fp64; as a constexpr branch of `_adam_kernel` it would have added
# parameters to that kernel's signature (and to its direct calls in tests) and a second tile
# shape to every branch of it, and each change to one would risk the other's code. The two
# share their opening (`_locate_chunk`, `_open_segment`) and the fp32 math (`_update_moments`,
# `_stepped_param`).

_QUANT_BLOCK = tl.constexpr(QUANT_BLOCK)
_SIGNED_LEVELS = tl.constexpr(float(SIGNED_LEVELS))
_UNSIGNED_LEVELS = tl.constexpr(float(UNSIGNED_LEVELS))
# The decoding steps float32(1 / levels): a Python float beside an fp32 tile is an fp32
# constant, rounded to nearest from the double (as the reference's torch.tensor(1 / levels)).
_SIGNED_STEP = tl.constexpr(1 / SIGNED_LEVELS)
_UNSIGNED_STEP = tl.constexpr(1 / UNSIGNED_LEVELS)
_TWO_TO_THE_23 = tl.constexpr(float(2 ** 23))


@triton.jit
def _rint(x):
    """x >= 0 (or NaN) rounded to an integer, to nearest even, for x < 2^23: adding 2^23 leaves
    no fraction bits, so the sum rounds as every IEEE addition does (to nearest even) and the
    subtraction is exact; from 2^23 up (inf included) the result stays >= 2^23, which the
    encoders clamp to their top code as they would rint(x). libdevice.rint (cvt.rni.f32.f32)
    is one instruction compiled, but Triton's interpreter (3.9) runs no extern calls; this
    spelling is the same two IEEE additions compiled and interpreted."""
    return (x + _TWO_TO_THE_23) - _TWO_TO_THE_23


@triton.jit
def _decode(codes, absmax, SIGNED: tl.constexpr):
    """fp32 values of a tile of codes (see `_adam_q8_kernel`: [split, blocks, width]) under
    their blocks' absmax ([blocks]):
    t = q * float32(1 / levels);  m = (t * |t|) * s (signed),  v = ((t * t) * (t * t)) * s."""
    if SIGNED:
        t = codes.to(tl.float32) * _SIGNED_STEP
        return (t * tl.abs(t)) * absmax[None, :, None]
    else:
        t = codes.to(tl.float32) * _UNSIGNED_STEP
        squared = t * t
        return (squared * squared) * absmax[None, :, None]


@triton.jit
def _encode(x, root, mask, SIGNED: tl.constexpr):
    """(codes as fp32 integers, absmax [blocks]) of the fp32 tile `x` ([split, blocks, width]),
    the elements outside `mask` left out of the absmax; `root` is sqrt(x) for the unsigned map
    (which the step has taken already), None for the signed one:

    s = max |x| (NaN if any is NaN)
    signed:    r = 1 / s if s > 0 else 0;         y = x * r;     q = sign(y) * L(sqrt(|y|), 127)
    unsigned:  r = 1 / sqrt(s) if s > 0 else 0;   w = root * r;  q = L(sqrt(w), 255)
    L(z, top) = min(rint(z * top), top), 0 where z is NaN; all rounded as IEEE fp32 (div_rn,
    sqrt_rn)."""
    # The absmax as an integer max over |x|'s bits: without the sign bit, fp32 bit patterns
    # order as their values (+0 < subnormals < normals < inf), and every NaN's lie above
    # inf's, so a block with a NaN gets a NaN, as the contract wants. tl.max on the floats
    # drops NaN compiled (max.f32), and a NaN-propagating tl.reduce runs its combine function
    # per element under the interpreter (minutes a test).
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0)
    absmax = tl.max(tl.max(magnitude, axis=2), axis=0).to(tl.float32, bitcast=True)
    positive = absmax > 0
    # The reciprocal only where s > 0: no division by zero or NaN to warn about under the
    # interpreter. One division (and square root) a block, not an element.
    scale = tl.where(positive, absmax, 1.0)
    if not SIGNED:
        scale = tl.sqrt_rn(scale)
    reciprocal = tl.where(positive, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), scale),
                          0.0)
    if SIGNED:
        y = x * reciprocal[None, :, None]
        q = _rint(tl.sqrt_rn(tl.abs(y)) * _SIGNED_LEVELS)
        # NaN first: tl.minimum keeps the number compiled (min.f32) and the NaN interpreted.
        q = tl.where(q != q, 0.0, tl.minimum(q, _SIGNED_LEVELS))
        q = tl.where(y < 0, -q, q)
    else:
        w = root * reciprocal[None, :, None]
        q = _rint(tl.sqrt_rn(w) * _UNSIGNED_LEVELS)
        q = tl.where(q != q, 0.0, tl.minimum(q, _UNSIGNED_LEVELS))
    return q, absmax


@triton.jit
def _store_quantized(code_ptrs, absmax_ptrs, x, root, mask, block_mask, SIGNED: tl.constexpr):
    codes, absmax = _encode(x, root, mask, SIGNED)
    tl.store(code_ptrs, codes.to(code_ptrs.dtype.element_ty), mask=mask)
    tl.store(absmax_ptrs, absmax, mask=block_mask)


@triton.jit
def _adam_q8_chunk(param_ptrs, master_param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs,
                   exp_avg_absmax_ptrs, exp_avg_sq_absmax_ptrs, mask, block_mask, scalars,
                   HAS_MASTER: tl.constexpr):
    moment_scalars, step_scalars, _ = _chunk_scalars(scalars)  # no amsgrad with 8-bit moments
    p = _load_stepped(param_ptrs, master_param_ptrs, mask, HAS_MASTER)
    g = tl.load(grad_ptrs, mask=mask).to(tl.float32)
    m = _decode(tl.load(exp_avg_ptrs, mask=mask), tl.load(exp_avg_absmax_ptrs, mask=block_mask),
                SIGNED=True)
    v = _decode(tl.load(exp_avg_sq_ptrs, mask=mask),
                tl.load(exp_avg_sq_absmax_ptrs, mask=block_mask), SIGNED=False)
    p, m, v = _update_moments(p, g, m, v, moment_scalars)
    # The parameter steps with the unrounded new moments; v's code is taken from the same
    # sqrt(v).
    root = tl.sqrt_rn(v)
    p = _stepped_param(p, m, root, step_scalars)
    _store_stepped(param_ptrs, master_param_ptrs, p, mask, HAS_MASTER)
    _store_quantized(exp_avg_ptrs, exp_avg_absmax_ptrs, m, None, mask, block_mask, SIGNED=True)
    _store_quantized(exp_avg_sq_ptrs, exp_avg_sq_absmax_ptrs, v, root, mask, block_mask,
                     SIGNED=False)


@triton.jit
def _adam_q8_kernel(param_ptr, master_param_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                    exp_avg_absmax_ptr, exp_avg_sq_absmax_ptr,
                    chunk_table_ptr, segment_starts_ptr, segment_lengths_ptr, segment_groups_ptr,
                    steps_ptr, grad_addresses_ptr, group_table_ptr,
                    inv_grad_scale_ptr, inv_grad_scale, found_inf_ptr, clip_factor_ptr,
                    HAS_MASTER: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """`_adam_kernel`'s step (no amsgrad) with 8-bit moments: this program's chunk as a tile of
    blocks (chunk offsets are multiples of BLOCK_SIZE, itself a multiple of QUANT_BLOCK, and
    segment starts multiples of QUANT_BLOCK), the old moments decoded with their block's
    absmax, the fp32 step of `_adam_kernel` (the parameter stepped with the unrounded new
    moments), then each block's new absmax and codes stored (see `_encode`). Blocks and
    elements past the segment's length are neither read nor written.

    The tile is [BLOCK_SIZE // QUANT_BLOCK, QUANT_BLOCK] held as [SPLIT, BLOCKS, WIDTH]:
    element (h, b, c) is element h * WIDTH + c of block b. Triton lays a tile out lanes first
    along its contiguous dimension, then warps: with 4 elements a thread, a [8, 256] tile puts
    two warps on each block, and each absmax is then reduced across warps through shared
    memory. A row of WIDTH = 32 * ACCESS elements is one warp's width, so [2, 8, 128] gives
    each block one warp (its two halves in the same threads) and the absmax is a reduction
    within the thread and then across lanes (redux.sync.max.s32 on sm_80 and later); with 8
    elements a thread, SPLIT is 1. What still goes through shared memory is each new absmax,
    from its warp to the layout Triton gives the store of a [BLOCKS] vector (a few bytes)."""
    located, idle = _locate_chunk(chunk_table_ptr, grad_addresses_ptr, found_inf_ptr)
    if idle:
        return
    # One contiguity for every stream, as in `_adam_kernel`: 128 bits of the widest (fp32
    # params or master: 4 elements, so 32-bit accesses of the codes; bf16/fp16 params alone or
    # with a compact master: 8, 64-bit code accesses, and 128-bit (int16) or 64-bit (int8) ones
    # of the remainder). Hints as there, per dimension: along a row, ACCESS contiguous
    # elements starting on a multiple of 16 (chunk offsets and segment starts are multiples
    # of QUANT_BLOCK).
    WIDEST_BITS: tl.constexpr = max(param_ptr.dtype.element_ty.primitive_bitwidth,
                                    master_param_ptr.dtype.element_ty.primitive_bitwidth
                                    if HAS_MASTER else 0)
    ACCESS: tl.constexpr = 128 // WIDEST_BITS
    BLOCKS: tl.constexpr = BLOCK_SIZE // _QUANT_BLOCK
    SPLIT: tl.constexpr = max(1, _QUANT_BLOCK // (32 * ACCESS))
    WIDTH: tl.constexpr = _QUANT_BLOCK // SPLIT
    chunk_offset, start, length, grad_ptr, scalars = _open_segment(
        located, param_ptr, segment_starts_ptr, segment_lengths_ptr, segment_groups_ptr,
        steps_ptr, group_table_ptr, inv_grad_scale_ptr, inv_grad_scale, clip_factor_ptr)
    block = tl.arange(0, BLOCKS)
    block_offset = chunk_offset + block * _QUANT_BLOCK  # in the segment
    in_block = tl.arange(0, SPLIT)[:, None, None] * WIDTH + tl.arange(0, WIDTH)[None, None, :]
    in_segment = block_offset[None, :, None] + in_block
    in_segment = tl.max_contiguous(tl.multiple_of(in_segment, [16, 16, 16]), [1, 1, ACCESS])
    offsets = tl.max_contiguous(tl.multiple_of(start + in_segment, [16, 16, 16]), [1, 1, ACCESS])
    grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptr + in_segment, [16, 16, 16]),
                                  [1, 1, ACCESS])
    if HAS_MASTER:
        master_param_ptrs = master_param_ptr + offsets
    else:
        master_param_ptrs = None
    # Element i's block is i // QUANT_BLOCK; unsigned, so that it compiles to one shift (a
    # signed division would round toward zero through a sign fix-up).
    blocks = (start + block_offset).to(tl.uint64, bitcast=True) // _QUANT_BLOCK
    # Whole chunks unmasked (vector accesses), the segment's last one masked: see _adam_kernel.
    if chunk_offset + BLOCK_SIZE <= length:
        _adam_q8_chunk(param_ptr + offsets, master_param_ptrs, grad_ptrs, exp_avg_ptr + offsets,
                       exp_avg_sq_ptr + offsets, exp_avg_absmax_ptr + blocks,
                       exp_avg_sq_absmax_ptr + blocks, mask=None, block_mask=None,
                       scalars=scalars, HAS_MASTER=HAS_MASTER)
    else:
        _adam_q8_chunk(param_ptr + offsets, master_param_ptrs, grad_ptrs, exp_avg_ptr + offsets,
                       exp_avg_sq_ptr + offsets, exp_avg_absmax_ptr + blocks,
                       exp_avg_sq_absmax_ptr + blocks, mask=in_segment < length,
                       block_mask=block_offset < length, scalars=scalars, HAS_MASTER=HAS_MASTER)


def launch_config(record):
    """(BLOCK_SIZE, compile options) for `record`'s buffer dtypes. 8 warps, each thread moving
    32 B of the widest stream (two 128-bit accesses): 2048 elements per program when any stream
    is 4 bytes wide, 4096 when all are bf16/fp16, 1024 for fp64. Sized by the widest stream, a
    thread holds as many values as in the fp32 kernel (registers, the tail chunk and the
    per-program overhead stay where they were), and a 2-byte stream beside 4-byte ones still
    moves 16 B per thread, in two 64-bit accesses (why not one 128-bit access: see the
    contiguity note in the kernel). Sized by the narrowest stream instead, the 4-byte streams
    would double their registers. FMA contraction off: the kernel then rounds exactly as the
    interpreter (and torch's separate ops) do, whatever a Triton version's default; the extra
    FLOPs hide under the memory traffic. With 8-bit moments the codes are never the widest
    stream: 2048 elements (8 blocks of QUANT_BLOCK) beside fp32 params or master, 4096 (16)
    for bf16/fp16 params alone; both multiples of QUANT_BLOCK, as `_adam_q8_kernel` needs. A
    compact master's remainder (2 or 1 bytes) is a stream like the others: 4096 elements for
    bf16 params with bf16 or 8-bit moments, 2048 with fp32 moments."""
    widest = max(record.params.element_size(), record.exp_avg.element_size(),
                 4 if record.master_params is not None else 0,
                 0 if record.master_remainder is None else record.master_remainder.element_size())
    block_size = 8192 // widest
    assert not record.quantized or block_size % QUANT_BLOCK == 0
    return block_size, dict(num_warps=8, enable_fp_fusion=False)


def _check(name, tensor, dtype, device, n=None):
    assert tensor.dtype == dtype, f"{name}: expected {dtype}, got {tensor.dtype}"
    assert tensor.device == device, f"{name}: expected device {device}, got {tensor.device}"
    assert tensor.is_contiguous(), f"{name} must be contiguous"
    if n is not None:
        assert tensor.numel() == n, f"{name}: expected {n} entries, got {tensor.numel()}"


def _check_record(record):
    """The contract's shapes and dtypes (host metadata only: no device read, so that segment
    starts are multiples of QUANT_BLOCK in an arena of 8-bit moments is the contract's word)."""
    params = record.params
    device, dtype, state_dtype = params.device, params.dtype, record.exp_avg.dtype
    assert dtype in PARAM_DTYPES, f"unsupported dtype {dtype}"
    assert params.dim() == 1, "arena buffers are 1-D"
    if record.quantized:
        # fp32 math: the reference's quantized step is fp32, and the optimizer never gives
        # fp64 params 8-bit moments.
        assert dtype != torch.float64, "8-bit moments are for fp32, bf16 and fp16 params"
        assert record.max_exp_avg_sq is None, "8-bit moments do not offer amsgrad"
        assert params.numel() % QUANT_BLOCK == 0, \
            f"an arena of 8-bit moments is whole blocks of {QUANT_BLOCK} elements"
        moments = [("exp_avg", record.exp_avg, EXP_AVG_CODES),
                   ("exp_avg_sq", record.exp_avg_sq, EXP_AVG_SQ_CODES)]
        for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            assert getattr(record, name) is not None, f"8-bit moments without {name}"
            _check(name, getattr(record, name), torch.float32, device,
                   params.numel() // QUANT_BLOCK)
    else:
        assert state_dtype == dtype or (dtype != torch.float64 and state_dtype in STATE_DTYPES), \
            f"{dtype} params cannot have {state_dtype} moments"
        assert record.exp_avg_sq_absmax is None, "exp_avg_sq_absmax without exp_avg_absmax"
        moments = [("exp_avg", record.exp_avg, state_dtype),
                   ("exp_avg_sq", record.exp_avg_sq, state_dtype),
                   ("max_exp_avg_sq", record.max_exp_avg_sq, state_dtype)]
    assert record.master_params is None or dtype in MASTER_DTYPES, \
        f"a master copy is for bf16/fp16 params, not {dtype}"
    remainder = record.master_remainder
    if remainder is not None:
        assert dtype == torch.bfloat16, f"a compact master is for bf16 params, not {dtype}"
        assert record.master_params is None, "both an fp32 master and a compact one"
        assert remainder.dtype in COMPACT_MASTERS.values(), \
            f"master_remainder: expected one of {sorted(map(str, COMPACT_MASTERS.values()))}, " \
            f"got {remainder.dtype}"
    buffers = [("params", params, dtype), *moments,
               ("master_params", record.master_params, torch.float32),
               ("master_remainder", remainder, None if remainder is None else remainder.dtype)]
    for name, buffer, buffer_dtype in buffers:
        if buffer is not None:
            _check(name, buffer, buffer_dtype, device, params.numel())
            # 128-bit accesses need 16-byte aligned bases.
            assert buffer.data_ptr() % 16 == 0, f"{name} must be 16-byte aligned"
    for name in ("segment_starts", "segment_lengths", "segment_groups"):
        _check(name, getattr(record, name), torch.int64, device, record.n_segments)
    _check("steps", record.steps, torch.float32, device, record.n_segments)


class _Derived:
    """What the launcher derives from one layout: the chunk table (program -> segment, offset),
    the launch configuration, and scratch scalars, made once and kept with the record."""

    def __init__(self, record):
        _check_record(record)
        self.block_size, self.options = launch_config(record)
        lengths = record.segment_lengths
        chunks_per_segment = (lengths + (self.block_size - 1)) // self.block_size
        # One host read per layout (the grid size), never per step.
        self.n_chunks = int(chunks_per_segment.sum())
        segment = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), chunks_per_segment,
            output_size=self.n_chunks)
        first_chunk = torch.cumsum(chunks_per_segment, 0) - chunks_per_segment
        chunk = torch.arange(self.n_chunks, device=lengths.device) - first_chunk[segment]
        self.chunk_table = torch.stack([segment, chunk * self.block_size], dim=1).contiguous()
        device = record.params.device
        self.one = torch.ones((), dtype=torch.float32, device=device)
        self.no_clipping = torch.ones((), dtype=torch.float64, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.advance = torch.empty(record.steps.shape, dtype=torch.bool, device=device)
        self.no_inf = torch.empty((), dtype=torch.bool, device=device)


_derived_for = PerLayout(_Derived)


def kernel_for(record):
    """The step kernel for `record`: `_adam_q8_kernel` for 8-bit moments, else `_adam_kernel`."""
    return _adam_q8_kernel if record.quantized else _adam_kernel


def kernel_arguments(record, *, grads, group_table, inv_grad_scale_ptr, inv_grad_scale,
                     found_inf_ptr, clip_factor_ptr):
    """`kernel_for(record)`'s arguments by name for `record`, and (grid size, compile options):
    what the launcher launches and what tests/test_triton_compile.py compiles ahead of time.
    `master_param_ptr` is the master in whichever form the record keeps it (the kernels tell an
    fp32 one from a compact one's remainder by its dtype), HAS_MASTER whether there is one."""
    derived = _derived_for(record)
    master = record.master_params if record.master_remainder is None else record.master_remainder
    arguments = dict(
        param_ptr=record.params, master_param_ptr=master,
        exp_avg_ptr=record.exp_avg, exp_avg_sq_ptr=record.exp_avg_sq,
        chunk_table_ptr=derived.chunk_table, segment_starts_ptr=record.segment_starts,
        segment_lengths_ptr=record.segment_lengths, segment_groups_ptr=record.segment_groups,
        steps_ptr=record.steps, grad_addresses_ptr=grads, group_table_ptr=group_table,
        inv_grad_scale_ptr=inv_grad_scale_ptr, inv_grad_scale=inv_grad_scale,
        found_inf_ptr=found_inf_ptr, clip_factor_ptr=clip_factor_ptr,
        HAS_MASTER=master is not None, BLOCK_SIZE=derived.block_size)
    if record.quantized:
        arguments.update(exp_avg_absmax_ptr=record.exp_avg_absmax,
                         exp_avg_sq_absmax_ptr=record.exp_avg_sq_absmax)
    else:
        has_max = record.max_exp_avg_sq is not None
        # Never touched without amsgrad; a moment buffer keeps the pointer's type the moments'.
        arguments.update(max_exp_avg_sq_ptr=record.max_exp_avg_sq if has_max else record.exp_avg,
                         HAS_MAX_EXP_AVG_SQ=has_max)
    return arguments, derived.n_chunks, derived.options


def adam_step(record, *, grads, group_table, inv_grad_scale=None, found_inf=None,
              clip_factor=None):
    """One Adam/AdamW step over every segment of `record` (see `contract.py`): advances
    `steps` where a grad is present (and found_inf is zero), then launches the kernel once.
    Nothing is read back to the host."""
    derived = _derived_for(record)
    device = record.params.device
    _check("grads", grads, torch.int64, device, record.n_segments)
    _check("group_table", group_table, torch.float64, device)
    assert group_table.dim() == 2 and group_table.shape[1] == GROUP_COLUMNS, \
        f"group_table must be [n_groups, {GROUP_COLUMNS}], got {tuple(group_table.shape)}"
    # The record has no max_exp_avg_sq (_check_record); a group asking for amsgrad is refused
    # by the optimizer, and here where that costs no device read (a table on the host).
    assert not (record.quantized and group_table.device.type == "cpu"
                and group_table[:, AMSGRAD].any()), "8-bit moments do not offer amsgrad"

    advance = derived.advance
    torch.ne(grads, 0, out=advance)
    if found_inf is None:
        found_inf = derived.zero
    else:
        # GradScaler's is float32 already (then .to is free); the kernel reads float32.
        found_inf = found_inf.to(torch.float32)
        _check("found_inf", found_inf, torch.float32, device, 1)
        torch.eq(found_inf.reshape(()), 0, out=derived.no_inf)
        torch.logical_and(advance, derived.no_inf, out=advance)
    record.steps.add_(advance)

    if isinstance(inv_grad_scale, torch.Tensor):
        # float32 like GradScaler's own unscale; a float64 scale costs one tiny cast.
        inv_grad_scale_ptr = inv_grad_scale.to(torch.float32)
        _check("inv_grad_scale", inv_grad_scale_ptr, torch.float32, device, 1)
        inv_grad_scale = 1.0
    else:
        inv_grad_scale_ptr = derived.one
        inv_grad_scale = 1.0 if inv_grad_scale is None else float(inv_grad_scale)

    if clip_factor is None:
        clip_factor = derived.no_clipping
    else:
        _check("clip_factor", clip_factor, torch.float64, device, 1)

    if derived.n_chunks == 0:
        return
    arguments, n_chunks, options = kernel_arguments(
        record, grads=grads, group_table=group_table, inv_grad_scale_ptr=inv_grad_scale_ptr,
        inv_grad_scale=inv_grad_scale, found_inf_ptr=found_inf, clip_factor_ptr=clip_factor)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel_for(record)[(n_chunks,)](**arguments, **options)


# ---------------------------------------------------------------------------------------------
# The gradient norm: one read of every gradient over the same chunk table, a float64 partial per
# program, summed (or maxed) on the device by torch: no host read, so clipping can be captured
# in a CUDA graph with the step.

# NORM (constexpr) per norm_type: the common ones get a loop of their own.
_NORM_INF, _NORM_ONE, _NORM_TWO, _NORM_P = 0, 1, 2, 3


@triton.jit
def _power_sum(g, norm_type, NORM: tl.constexpr):
    g = g.to(tl.float64)
    a = tl.abs(g)
    if NORM == 2:
        partial = tl.sum(a * a, axis=0)
    elif NORM == 1:
        partial = tl.sum(a, axis=0)
    elif NORM == 0:
        # tl.max drops NaN; torch's norms propagate it.
        has_nan = tl.sum((g != g).to(tl.int32), axis=0) > 0
        partial = tl.where(has_nan, float("nan"), tl.max(a, axis=0))
    else:
        # |g|^p as exp2(p * log2 |g|): inf -> inf, NaN -> NaN, and 0 -> 0 apart (no log of 0).
        zero = a == 0
        powers = tl.exp2(norm_type * tl.log2(tl.where(zero, 1.0, a)))
        partial = tl.sum(tl.where(zero, 0.0, powers), axis=0)
    return partial


@triton.jit
def _power_sum_kernel(param_ptr, chunk_table_ptr, segment_lengths_ptr, grad_addresses_ptr,
                      partials_ptr, norm_type, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """partials[program] = sum(|g|^p) (max |g| for NORM 0) over this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    segment = tl.load(chunk_table_ptr + 2 * pid)
    chunk_offset = tl.load(chunk_table_ptr + 2 * pid + 1)
    grad_address = tl.load(grad_addresses_ptr + segment)
    if grad_address == 0:
        tl.store(partials_ptr + pid, 0.0)
        return
    length = tl.load(segment_lengths_ptr + segment)
    grad_ptr = grad_address.to(tl.pointer_type(param_ptr.dtype.element_ty), bitcast=True)
    ACCESS: tl.constexpr = 128 // param_ptr.dtype.element_ty.primitive_bitwidth
    in_segment = chunk_offset + tl.arange(0, BLOCK_SIZE)
    in_segment = tl.max_contiguous(tl.multiple_of(in_segment, BLOCK_SIZE), ACCESS)
    grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptr + in_segment, 16), ACCESS)
    # Whole chunks unmasked (128-bit loads), the segment's last one masked: see _adam_kernel.
    if chunk_offset + BLOCK_SIZE <= length:
        partial = _power_sum(tl.load(grad_ptrs), norm_type, NORM)
    else:
        partial = _power_sum(tl.load(grad_ptrs, mask=in_segment < length, other=0.0),
                                   norm_type, NORM)
    tl.store(partials_ptr + pid, partial)


def power_sum_arguments(record, *, grads, norm_type, partials):
    """`_power_sum_kernel`'s arguments by name, and (grid size, compile options)."""
    derived = _derived_for(record)
    norm = {float("inf"): _NORM_INF, 1.0: _NORM_ONE, 2.0: _NORM_TWO}.get(norm_type, _NORM_P)
    arguments = dict(
        param_ptr=record.params, chunk_table_ptr=derived.chunk_table,
        segment_lengths_ptr=record.segment_lengths, grad_addresses_ptr=grads,
        partials_ptr=partials, norm_type=float(norm_type), NORM=norm,
        BLOCK_SIZE=derived.block_size)
    return arguments, derived.n_chunks, derived.options


def grad_power_sum(record, *, grads, norm_type):
    """sum(|g|^p) over every gradient of `record` (max |g| for p = inf) as a 0-d float64 tensor
    on its device (see `contract.py`); nothing is read back to the host."""
    derived = _derived_for(record)
    device = record.params.device
    _check("grads", grads, torch.int64, device, record.n_segments)
    partials = torch.empty(derived.n_chunks, dtype=torch.float64, device=device)
    if derived.n_chunks == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    arguments, n_chunks, options = power_sum_arguments(
        record, grads=grads, norm_type=norm_type, partials=partials)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _power_sum_kernel[(n_chunks,)](**arguments, **options)
    # torch's max propagates NaN, as the norms it stands for do.
    return partials.max() if norm_type == float("inf") else partials.sum()
