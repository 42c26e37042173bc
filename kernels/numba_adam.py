"""Adam for CPU tensors: one Numba pass over a whole arena, every group and parameter.

Gradients are read where autograd left them, by address, so the pass runs over *chunks* (a slice
of one segment, at most `CHUNK_ELEMENTS` long) rather than straight over elements: threads take
chunks, and the loop inside a chunk is a plain contiguous loop that LLVM vectorizes. One table
lookup per chunk is the price of never copying a gradient. Which threads: see `adam_step`.

16-bit buffers arrive as integer views (numpy has no bfloat16): bf16 as uint16, fp16 as int16.
They widen to fp32 on load and round to nearest even on store, with bit operations for bf16 and
LLVM's half conversions for fp16; math is fp32 for them and for fp32, fp64 for fp64 params.
"""
import inspect
from collections import namedtuple

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fused_adam.kernels import cpu_threads
from fused_adam.kernels.contract import (
    AMSGRAD, BETA1, BETA2, DECOUPLED_WD, EPS, LR, MAXIMIZE, PARAM_DTYPES, QUANT_BLOCK,
    SIGNED_LEVELS, UNSIGNED_LEVELS, WEIGHT_DECAY, PerLayout,
)

GRADS = "addresses"
# Elements are loaded one at a time (LLVM vectorizes with unaligned loads): any address will do.
GRAD_ADDRESS_ALIGNMENT = 1

# 16K fp32 elements: four 64 KiB streams per chunk stay inside one core's L2.
CHUNK_ELEMENTS = 1 << 14
# How each torch dtype is handed to the kernel: numpy has no bfloat16.
NUMPY_VIEWS = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.uint16,
               torch.float16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8}
# Only nsz in the step: every operation rounds as IEEE says, once, in the order written, as
# torch's CPU ops do. `contract` would let LLVM fuse a product into the next addition where torch
# rounds twice (AdamW's `p * (1 - lr * wd)` into the update; tests/test_bitwise.py catches it);
# torch's own FMAs (lerp, addcmul, add with alpha) are written out as `_fma`. nsz can change only
# the sign of a zero result, and without it the fp32 step is slower (bench/RESULTS.md, "Kernel
# notes moved from code comments"). No nnan/ninf (NaN and Inf propagate as in torch), no reassoc
# (it let `(1 - b2) * g * g` become `g * g * (1 - b2)`, which overflows fp32 at |g| = 1e20), no
# afn/arcp (approximate sqrt and division).
_FASTMATH = {"nsz"}
_JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=_FASTMATH)
# The gradient norm's sums may be reordered (that is what lets LLVM vectorize a reduction):
# they accumulate in float64, where any order is within 1e-15 of any other.
_REDUCTION_JIT = dict(_JIT, fastmath={"nsz", "contract", "reassoc"})


@intrinsic
def _pointer_like(typingctx, address, like):
    """The int64 `address` as a pointer to `like`'s element type (an `inttoptr`)."""
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(types.int64, like), codegen


@intrinsic
def _bits_as_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _float32_as_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _select(typingctx, condition, if_true, if_false):
    """LLVM's `select`: `if_true` where `condition`, else `if_false`, with no branch."""
    def codegen(context, builder, signature, args):
        return builder.select(*args)
    return if_true(types.boolean, if_true, if_false), codegen


@intrinsic
def _nan_max(typingctx, a, b):
    """LLVM's `llvm.maximum`: the larger, NaN if either is NaN (torch.max's rule), and a
    reduction over it vectorizes (a compare-and-select that keeps NaN does not)."""
    def codegen(context, builder, signature, args):
        double = ir.DoubleType()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(double, [double, double]), "llvm.maximum.f64")
        return builder.call(function, args)
    return types.float64(types.float64, types.float64), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (`llvm.fma`: one vfmadd where the CPU has FMA), where torch's
    CPU kernels have one: `torch.lerp`, `addcmul`, `add(alpha=)` (GCC contracts their vector
    bodies and scalar tails alike). In the widest float type of the three: only a branch that
    is never taken (8-bit codes typed through the float moments' loop) mixes types."""
    floats = [t for t in (a, b, c) if isinstance(t, types.Float)]
    if not floats or not all(isinstance(t, types.Number) for t in (a, b, c)):
        return None
    result = max(floats, key=lambda t: t.bitwidth)

    def codegen(context, builder, signature, args):
        args = [context.cast(builder, value, type_, result)
                for value, type_ in zip(args, signature.args)]
        value_type = context.get_value_type(result)
        name = "llvm.fma.f64" if result == types.float64 else "llvm.fma.f32"
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(value_type, [value_type] * 3), name)
        return builder.call(function, args)
    return result(a, b, c), codegen


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    """fptrunc rounds to nearest even, as torch's .to(torch.float16) does."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(types.float32), codegen


def _widen(element):
    """An element of a buffer in the compute dtype."""


@overload(_widen, inline="always")
def _widen_overload(element):
    if element == types.uint16:  # bf16: the top half of an fp32
        return lambda element: _bits_as_float32(np.uint32(element) << np.uint32(16))
    if element == types.int16:
        return lambda element: _half_bits_to_float32(element)
    return lambda element: element


def _narrow(value, buffer):
    """`value` in `buffer`'s storage dtype, rounded to nearest even."""


@overload(_narrow, inline="always")
def _narrow_overload(value, buffer):
    if buffer.dtype == types.uint16:
        # Round to nearest even on the bits, and NaN as a select of the 32-bit result, so
        # that one shift and one narrowing (vpmovdw) serve both: a branch on the bits
        # vectorizes as a second shift, narrowing and blend per store (bench/RESULTS.md).
        def to_bf16(value, buffer):
            value = np.float32(value)
            bits = _float32_as_bits(value)
            rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
            # NaN stays NaN, quieted: (bits | 0x400000) >> 16 is (bits >> 16) | 0x40.
            return np.uint16(_select(value != value, bits | np.uint32(0x400000), rounded)
                             >> np.uint32(16))
        return to_bf16
    if buffer.dtype == types.int16:
        return lambda value, buffer: _float32_to_half_bits(np.float32(value))
    dtype = buffer.dtype
    return lambda value, buffer: dtype(value)


def _slice(array, first, last):
    """array[first:last], or None for None (decided by type, at compile time)."""


@overload(_slice, inline="always")
def _slice_overload(array, first, last):
    if isinstance(array, types.NoneType):
        return lambda array, first, last: None
    return lambda array, first, last: array[first:last]


@intrinsic
def _join_master(typingctx, high, remainder):
    """The fp32 master of a bf16 param's bits (uint16) and its compact remainder (int16, or
    int8 for the top 8 of the low 16 bits), in 32-bit integer operations."""
    shift = 8 if remainder == types.int8 else 0

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        low = builder.shl(builder.sext(args[1], i32), ir.Constant(i32, shift))
        return builder.bitcast(builder.add(bits, low), ir.FloatType())
    return types.float32(types.uint16, remainder), codegen


@intrinsic
def _rounded_high(typingctx, value):
    """The bf16 bits of the fp32 `value`, rounded to nearest with ties away from zero (the
    compact master's rule, under which the remainder fits its dtype); NaN as 0x7FC0."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        high = builder.lshr(builder.add(bits, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        high = builder.select(nan, ir.Constant(i32, 0x7FC0), high)
        return builder.trunc(high, ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _remainder_of(typingctx, value, high, like):
    """What the bf16 bits `high` lack of the fp32 `value`, as `like`'s dtype (int16: all of
    it; int8: rounded to its top 8 bits, ties up, at most 127); 0 for NaN."""
    narrow = like.dtype

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        low = builder.sub(bits, builder.shl(builder.zext(args[1], i32), ir.Constant(i32, 16)))
        if narrow == types.int8:
            low = builder.ashr(builder.add(low, ir.Constant(i32, 0x80)), ir.Constant(i32, 8))
            too_large = builder.icmp_signed(">", low, ir.Constant(i32, 127))
            low = builder.select(too_large, ir.Constant(i32, 127), low)
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        low = builder.select(nan, ir.Constant(i32, 0), low)
        return builder.trunc(low, ir.IntType(narrow.bitwidth))
    return narrow(types.float32, types.uint16, like), codegen


def _load_param(param, master_param, i):
    """Element i of the value stepped: the master's where there is one (fp32, or joined from
    a compact one), else the param's."""


@overload(_load_param, inline="always")
def _load_param_overload(param, master_param, i):
    if isinstance(master_param, types.NoneType):
        return lambda param, master_param, i: _widen(param[i])
    if master_param.dtype in (types.int16, types.int8):
        return lambda param, master_param, i: _join_master(param[i], master_param[i])
    return lambda param, master_param, i: master_param[i]


def _store_param(param, master_param, i, value):
    """Store the stepped value: into the param, and the master where there is one (fp32, or
    split into the bf16 param and its compact remainder)."""


@overload(_store_param, inline="always")
def _store_param_overload(param, master_param, i, value):
    if isinstance(master_param, types.NoneType):
        def store(param, master_param, i, value):
            param[i] = _narrow(value, param)
        return store
    if master_param.dtype in (types.int16, types.int8):
        def store_split(param, master_param, i, value):
            high = _rounded_high(np.float32(value))
            param[i] = high
            master_param[i] = _remainder_of(np.float32(value), high, master_param)
        return store_split

    def store_both(param, master_param, i, value):
        master_param[i] = value
        param[i] = _narrow(value, param)
    return store_both


def _compute(value, params):
    """`value` as a scalar of the compute dtype of `params`: fp64 for fp64, else fp32."""


@overload(_compute, inline="always")
def _compute_overload(value, params):
    if params.dtype == types.float64:
        return lambda value, params: np.float64(value)
    return lambda value, params: np.float32(value)


# Per-chunk scalars of the update, in the compute dtype.
Coefficients = namedtuple("Coefficients", [
    "grad_scale", "clip_factor", "l2_weight_decay", "param_decay", "lerp_weight",
    "lerp_weight_minus_one",
    "beta2", "one_minus_beta2", "step_size", "bias_correction2_sqrt", "eps"])
# The per-segment tables and the chunk table (derived once per layout, see `_Derived`).
Segments = namedtuple("Segments", ["starts", "groups", "steps"])
Chunks = namedtuple("Chunks", ["segments", "offsets", "lengths"])


@njit(inline="always", **_JIT)
def _gradient(grad, p, c):
    """The gradient as torch's loop sees it: scaled, then clipped (two roundings, as
    GradScaler's unscale_ then clip_grad_norm_; x * 1 is exact; maximize is grad_scale's sign),
    then `grad.add(param, alpha=wd)` (L2), which torch's CPU kernel rounds once, an FMA."""
    g = _widen(grad) * c.grad_scale * c.clip_factor
    if c.l2_weight_decay != 0:
        g = _fma(p, c.l2_weight_decay, g)
    return g


@njit(inline="always", **_JIT)
def _lerp(m, g, c):
    """torch's CPU lerp, one FMA: the formula switches at weight 0.5 to stay exact near both
    ends (with beta1 = 0, m + 1 * (g - m) loses g under a large old m; fma(0, g - m, g) is g)."""
    if c.lerp_weight < 0.5:
        return _fma(c.lerp_weight, g - m, m)
    return _fma(c.lerp_weight_minus_one, g - m, g)


@njit(inline="always", **_JIT)
def _update_moments(p, grad, m, v, c):
    """(p, m, v) of one element after the contract's gradient, weight decay and moment lines
    (`contract.py`), from its widened param and moments and its stored gradient."""
    g = _gradient(grad, p, c)
    p = p * c.param_decay
    m = _lerp(m, g, c)
    v = _fma(c.one_minus_beta2 * g, g, v * c.beta2)
    return p, m, v


@njit(inline="always", **_JIT)
def _stepped_param(p, m, root, c):
    """The contract's last line, from root = sqrt(v_hat)."""
    return p - c.step_size * m / (root / c.bias_correction2_sqrt + c.eps)


@njit(inline="always", **_JIT)
def _step_float_moments(param, master_param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                        amsgrad, c):
    """The contract's step over a slice with moments of a float dtype, p the master where there
    is one. `master_param` is None or an array and `amsgrad` a literal: numba compiles each
    case apart, with no branch in the loop."""
    for i in range(param.shape[0]):
        p, m, v = _update_moments(_load_param(param, master_param, i), grad[i],
                                  _widen(exp_avg[i]), _widen(exp_avg_sq[i]), c)
        exp_avg[i] = _narrow(m, exp_avg)
        exp_avg_sq[i] = _narrow(v, exp_avg_sq)
        if amsgrad:
            # torch.maximum: NaN on either side wins (Python's max would drop one).
            v_max = _widen(max_exp_avg_sq[i])
            if v_max > v or v_max != v_max:
                v = v_max
            max_exp_avg_sq[i] = _narrow(v, max_exp_avg_sq)
        _store_param(param, master_param, i, _stepped_param(p, m, np.sqrt(v), c))


# ---------------------------------------------------------------------------------------------
# 8-bit moments (the block map of `contract.py`): a block is decoded, updated and
# re-encoded in one visit. Its new absmax is needed before the first code can be stored, so the
# block is passed over twice: the first pass does all the fp32 math (the parameter steps with the
# unrounded moments) and keeps the new m and sqrt(v) in a block-sized scratch (in L1), the
# second encodes them.

_SIGNED_STEP, _UNSIGNED_STEP = np.float32(1 / SIGNED_LEVELS), np.float32(1 / UNSIGNED_LEVELS)
_SIGNED_TOP, _UNSIGNED_TOP = np.float32(SIGNED_LEVELS), np.float32(UNSIGNED_LEVELS)


@njit(inline="always", **_JIT)
def _decode_signed(code, absmax):
    t = np.float32(code) * _SIGNED_STEP
    return (t * abs(t)) * absmax


@njit(inline="always", **_JIT)
def _decode_unsigned(code, absmax):
    t = np.float32(code) * _UNSIGNED_STEP
    squared = t * t
    return (squared * squared) * absmax


@njit(inline="always", **_JIT)
def _level(root, top):
    """rint(root * top), at most top; 0 for NaN (its block's absmax is NaN too)."""
    level = np.rint(root * top)
    if level > top:
        level = top
    if level != level:
        level = np.float32(0)
    return level


@njit(inline="always", **_JIT)
def _encode_signed(value, reciprocal):
    y = value * reciprocal
    level = _level(np.sqrt(abs(y)), _SIGNED_TOP)
    return np.int8(-level if y < 0 else level)


@njit(inline="always", **_JIT)
def _encode_unsigned(root, reciprocal_root):
    """The code of v from sqrt(v) (which the step takes anyway) and 1 / sqrt(absmax)."""
    return np.uint8(_level(np.sqrt(root * reciprocal_root), _UNSIGNED_TOP))


@intrinsic
def _larger_magnitude_bits(typingctx, largest, value):
    """max(largest, |value|'s bits as an integer), in 32-bit lanes. Integers order the
    magnitudes as floats do, with NaN above inf, so this is a NaN-propagating absmax whose
    reduction vectorizes without reordering any float math."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.and_(builder.bitcast(args[1], i32), ir.Constant(i32, 0x7FFFFFFF))
        larger = builder.icmp_unsigned(">", bits, args[0])
        return builder.select(larger, bits, args[0])
    return types.uint32(types.uint32, types.float32), codegen


@njit(inline="always", **_JIT)
def _reciprocal(absmax):
    return np.float32(1) / absmax if absmax > 0 else np.float32(0)


@njit(inline="always", **_JIT)
def _step_8bit_block(param, master_param, grad, exp_avg, exp_avg_sq, exp_avg_absmax,
                     exp_avg_sq_absmax, block, c, new_exp_avg, new_root):
    """One block: the arrays are its elements (sliced by the caller: loops over a slice from 0
    vectorize, loops over a range inside a larger array did not), `block` its absmax's index,
    `new_exp_avg` and `new_root` scratch of at least its length."""
    exp_avg_scale, exp_avg_sq_scale = exp_avg_absmax[block], exp_avg_sq_absmax[block]
    largest_m = largest_v = np.uint32(0)
    for i in range(param.shape[0]):
        p, m, v = _update_moments(_load_param(param, master_param, i), grad[i],
                                  _decode_signed(exp_avg[i], exp_avg_scale),
                                  _decode_unsigned(exp_avg_sq[i], exp_avg_sq_scale), c)
        root = np.sqrt(v)
        _store_param(param, master_param, i, _stepped_param(p, m, root, c))
        largest_m = _larger_magnitude_bits(largest_m, m)
        largest_v = _larger_magnitude_bits(largest_v, v)
        new_exp_avg[i] = m
        new_root[i] = root
    new_exp_avg_scale = _bits_as_float32(largest_m)
    new_exp_avg_sq_scale = _bits_as_float32(largest_v)
    exp_avg_reciprocal = _reciprocal(new_exp_avg_scale)
    exp_avg_sq_reciprocal_root = _reciprocal(np.sqrt(new_exp_avg_sq_scale))
    for i in range(param.shape[0]):
        exp_avg[i] = _encode_signed(new_exp_avg[i], exp_avg_reciprocal)
        exp_avg_sq[i] = _encode_unsigned(new_root[i], exp_avg_sq_reciprocal_root)
    exp_avg_absmax[block] = new_exp_avg_scale
    exp_avg_sq_absmax[block] = new_exp_avg_sq_scale


@njit(inline="always", **_JIT)
def _step_8bit_moments(param, master_param, grad, exp_avg, exp_avg_sq, exp_avg_absmax,
                       exp_avg_sq_absmax, first_block, c):
    """The contract's step over a slice with 8-bit moments (whole blocks from a block's start,
    the last maybe partial), block by block."""
    n = param.shape[0]
    new_exp_avg = np.empty(QUANT_BLOCK, dtype=np.float32)
    new_root = np.empty(QUANT_BLOCK, dtype=np.float32)
    for first in range(0, n, QUANT_BLOCK):
        last = min(first + QUANT_BLOCK, n)
        _step_8bit_block(param[first:last], _slice(master_param, first, last),
                         grad[first:last], exp_avg[first:last], exp_avg_sq[first:last],
                         exp_avg_absmax, exp_avg_sq_absmax,
                         first_block + first // QUANT_BLOCK, c, new_exp_avg, new_root)


@njit(**_JIT)
def _advance_steps(grad_addresses, steps):
    """Every segment with a gradient advances its step (before any chunk reads it)."""
    for segment in range(grad_addresses.shape[0]):
        if grad_addresses[segment] != 0:
            steps[segment] += 1


@njit(inline="always", **_JIT)
def _step_chunk(chunk, params, master_params, exp_avg, exp_avg_sq, max_exp_avg_sq,
                exp_avg_absmax, exp_avg_sq_absmax, segments, chunks, grad_addresses, group_table,
                inv_grad_scale, clip_factor):
    """Chunk `chunk` of the chunk table, if its segment has a gradient, stepped with its
    group's settings and its segment's (already advanced) step."""
    segment = chunks.segments[chunk]
    address = grad_addresses[segment]
    if address == 0:
        return
    offset, n = chunks.offsets[chunk], chunks.lengths[chunk]
    grad = numba.carray(_pointer_like(address + offset * params.itemsize, params), n)
    start = segments.starts[segment] + offset
    end = start + n
    group = group_table[segments.groups[segment]]
    lr, beta1, beta2, weight_decay = group[LR], group[BETA1], group[BETA2], group[WEIGHT_DECAY]
    decoupled = group[DECOUPLED_WD] != 0
    step = np.float64(segments.steps[segment])
    # Bias corrections in float64, then cast, as torch computes them in Python floats.
    lerp_weight = _compute(1.0 - beta1, params)
    c = Coefficients(
        grad_scale=_compute(-inv_grad_scale if group[MAXIMIZE] != 0 else inv_grad_scale, params),
        clip_factor=_compute(clip_factor, params),
        l2_weight_decay=_compute(0.0 if decoupled else weight_decay, params),
        param_decay=_compute(1.0 - lr * weight_decay if decoupled else 1.0, params),
        lerp_weight=lerp_weight,
        lerp_weight_minus_one=lerp_weight - _compute(1.0, params),
        beta2=_compute(beta2, params),
        one_minus_beta2=_compute(1.0 - beta2, params),
        step_size=_compute(lr / (1.0 - beta1 ** step), params),
        bias_correction2_sqrt=_compute(np.sqrt(1.0 - beta2 ** step), params),
        eps=_compute(group[EPS], params))
    # Whether there is a master, and of which kind, is decided at compile time by its type:
    # one specialization each.
    master = _slice(master_params, start, end)
    if exp_avg_absmax is not None:  # 8-bit moments (no amsgrad); chunks start on a block
        _step_8bit_moments(params[start:end], master, grad, exp_avg[start:end],
                           exp_avg_sq[start:end], exp_avg_absmax, exp_avg_sq_absmax,
                           start // QUANT_BLOCK, c)
        return
    # amsgrad as a literal at each call: the loop is compiled once with and once without it. A
    # run-time flag leaves the branch inside the loop, which the vectorizer executes masked
    # for every element (bf16 moments: twice the time, bench/RESULTS.md).
    if group[AMSGRAD] != 0:
        _step_float_moments(params[start:end], master, grad, exp_avg[start:end],
                            exp_avg_sq[start:end], max_exp_avg_sq[start:end], True, c)
    else:
        _step_float_moments(params[start:end], master, grad, exp_avg[start:end],
                            exp_avg_sq[start:end], max_exp_avg_sq[start:end], False, c)


@njit(parallel=True, **_JIT)
def _step_on_numba_threads(params, master_params, exp_avg, exp_avg_sq, max_exp_avg_sq,
                           exp_avg_absmax, exp_avg_sq_absmax, segments, chunks, grad_addresses,
                           group_table, inv_grad_scale, clip_factor):
    """The whole pass in one call on numba's threading layer (see `adam_step`): steps first,
    then every chunk."""
    _advance_steps(grad_addresses, segments.steps)
    for chunk in prange(chunks.segments.shape[0]):
        _step_chunk(chunk, params, master_params, exp_avg, exp_avg_sq, max_exp_avg_sq,
                    exp_avg_absmax, exp_avg_sq_absmax, segments, chunks, grad_addresses,
                    group_table, inv_grad_scale, clip_factor)


@njit(**_JIT)
def _step_on_this_thread(params, master_params, exp_avg, exp_avg_sq, max_exp_avg_sq,
                         exp_avg_absmax, exp_avg_sq_absmax, segments, chunks, grad_addresses,
                         group_table, inv_grad_scale, clip_factor, advance, first, last):
    """Chunks `first` .. `last - 1` on this thread, the steps advanced first here if `advance`
    (a pass in one call) or before the call (a pass split across threads: every part reads
    the steps)."""
    if advance:
        _advance_steps(grad_addresses, segments.steps)
    for chunk in range(first, last):
        _step_chunk(chunk, params, master_params, exp_avg, exp_avg_sq, max_exp_avg_sq,
                    exp_avg_absmax, exp_avg_sq_absmax, segments, chunks, grad_addresses,
                    group_table, inv_grad_scale, clip_factor)


def _numpy(tensor):
    """A CPU tensor as the numpy array the kernel takes (16-bit floats as integer views)."""
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16).numpy().view(NUMPY_VIEWS[tensor.dtype])
    return tensor.numpy()


def chunk_table(segment_lengths):
    """(segment, offset in segment, length) of every chunk of at most CHUNK_ELEMENTS."""
    lengths = np.asarray(segment_lengths, dtype=np.int64)
    per_segment = -(-lengths // CHUNK_ELEMENTS)
    segments = np.repeat(np.arange(len(lengths), dtype=np.int64), per_segment)
    first_chunk = np.cumsum(per_segment) - per_segment
    offsets = (np.arange(len(segments), dtype=np.int64) - first_chunk[segments]) * CHUNK_ELEMENTS
    return Chunks(segments, offsets, np.minimum(lengths[segments] - offsets, CHUNK_ELEMENTS))


class _Derived:
    """What the launcher derives from one layout: the kernel's arguments (numpy views of the
    buffers, the segment and chunk tables) and the chunk boundaries that split the pass into
    parts of about equal elements, per thread count."""

    def __init__(self, record):
        exp_avg = _numpy(record.exp_avg)
        chunks = chunk_table(record.segment_lengths.numpy())
        by_name = dict(
            params=_numpy(record.params),
            # The master in whichever form there is one: fp32, a compact remainder, or None.
            master_params=(_numpy(record.master_params) if record.master_params is not None
                           else _numpy(record.master_remainder)
                           if record.master_remainder is not None else None),
            exp_avg=exp_avg, exp_avg_sq=_numpy(record.exp_avg_sq),
            # Never read without amsgrad; an empty array keeps the argument's type an array.
            max_exp_avg_sq=(exp_avg[:0] if record.max_exp_avg_sq is None
                            else _numpy(record.max_exp_avg_sq)),
            # None (float moments) or the per-block absmax: one specialization each.
            exp_avg_absmax=None if not record.quantized else _numpy(record.exp_avg_absmax),
            exp_avg_sq_absmax=None if not record.quantized else _numpy(record.exp_avg_sq_absmax),
            segments=Segments(record.segment_starts.numpy(), record.segment_groups.numpy(),
                              record.steps.numpy()),
            chunks=chunks)
        self.steps = by_name["segments"].steps
        self.params, self.chunks = by_name["params"], chunks
        self.arguments = tuple(by_name[name] for name in _LAYOUT_ARGUMENTS)
        self._elements_before = np.concatenate([[0], np.cumsum(chunks.lengths)])
        self.n_elements = int(self._elements_before[-1])
        self.n_chunks = len(chunks.lengths)
        self._bounds = {}

    def bounds(self, parts):
        """parts + 1 chunk indices splitting the chunks into parts of about equal elements."""
        bounds = self._bounds.get(parts)
        if bounds is None:
            targets = np.arange(parts + 1) * (self.n_elements / parts)
            bounds = np.searchsorted(self._elements_before, targets).tolist()
            bounds[0], bounds[-1] = 0, len(self._elements_before) - 1
            self._bounds[parts] = bounds
        return bounds


_derived_for = PerLayout(_Derived)
# The step kernels' leading arguments, which `_Derived` makes once per layout.
_LAYOUT_ARGUMENTS = tuple(inspect.signature(_step_on_this_thread.py_func).parameters)[:9]


def adam_step(record, *, grads, group_table, inv_grad_scale=None, found_inf=None,
              clip_factor=None):
    """One pass over every chunk of `record` (the launcher of `contract.py`), on the threads
    `cpu_threads` picks:

    - one thread (torch allowed one, or the arena is small): `_step_on_this_thread`, one call;
    - the process that imported fused_adam: `_step_on_numba_threads`, one call on numba's
      threading layer. Where that layer is OpenMP (Linux without TBB) and torch was imported
      first, numba's OpenMP is torch's own libgomp, so the pass runs on the very threads
      torch's backward just used, still spinning, and starts sooner than on threads of our
      own (bench/RESULTS.md);
    - a forked child: threads of our own (`cpu_threads.run_parts`). GNU OpenMP does not survive
      fork(): a child that runs a parallel region after its parent did hangs, torch's own ops
      included (which is why DataLoader workers run torch on one thread).
    """
    assert record.params.device.type == "cpu" and record.params.dtype in PARAM_DTYPES
    assert grads.dtype == torch.int64 and grads.numel() == record.n_segments
    if found_inf is not None and float(found_inf) != 0:
        return
    derived = _derived_for(record)
    grad_addresses = grads.numpy()
    arguments = (*derived.arguments, grad_addresses, group_table.numpy(),
                 1.0 if inv_grad_scale is None else float(inv_grad_scale),
                 1.0 if clip_factor is None else float(clip_factor))
    parts = cpu_threads.parts_for(derived.n_elements)
    if parts == 1:
        # One call, steps and updates together: nothing can stop it half-way.
        _step_on_this_thread(*arguments, True, 0, derived.n_chunks)
    elif not cpu_threads.forked():
        _step_on_numba_threads(*arguments)
    else:
        with cpu_threads.interrupts_deferred():
            _advance_steps(grad_addresses, derived.steps)
            cpu_threads.run_parts(_step_on_this_thread, (*arguments, False),
                                  derived.bounds(parts))


# ---------------------------------------------------------------------------------------------
# The gradient norm: one read of every gradient, chunk by chunk, partial sums in float64.

# How `_four_stream_reduction` folds each element in: a sum of squares, a sum of magnitudes, the
# largest magnitude.
_SQUARES, _MAGNITUDES, _LARGEST = 2, 1, 0


@njit(inline="always", **_REDUCTION_JIT)
def _fold(total, g, kind):
    if kind == _SQUARES:
        return total + g * g
    if kind == _MAGNITUDES:
        return total + abs(g)
    return _nan_max(total, abs(g))


@njit(inline="always", **_REDUCTION_JIT)
def _merge(a, b, kind):
    return _nan_max(a, b) if kind == _LARGEST else a + b


@njit(inline="always", **_REDUCTION_JIT)
def _four_stream_reduction(grad, kind):
    """`grad` folded (`_fold`) in float64, read as four quarters at once: one read stream per
    thread is held back by the prefetchers (bench/RESULTS.md). `kind` is a constant at every
    call, so each call compiles to its own branch-free loop."""
    q = grad.shape[0] // 4
    t0 = t1 = t2 = t3 = 0.0
    for i in range(q):
        t0 = _fold(t0, np.float64(_widen(grad[i])), kind)
        t1 = _fold(t1, np.float64(_widen(grad[q + i])), kind)
        t2 = _fold(t2, np.float64(_widen(grad[2 * q + i])), kind)
        t3 = _fold(t3, np.float64(_widen(grad[3 * q + i])), kind)
    for i in range(4 * q, grad.shape[0]):
        t0 = _fold(t0, np.float64(_widen(grad[i])), kind)
    return _merge(_merge(t0, t1, kind), _merge(t2, t3, kind), kind)


@njit(inline="always", **_REDUCTION_JIT)
def _power_sum(grad, norm_type):
    """sum(|g|^p) over `grad` in float64, or max(|g|) for p = inf (NaN if any g is NaN)."""
    if norm_type == 2.0:
        return _four_stream_reduction(grad, _SQUARES)
    if norm_type == 1.0:
        return _four_stream_reduction(grad, _MAGNITUDES)
    if norm_type == np.inf:
        return _four_stream_reduction(grad, _LARGEST)
    total = 0.0
    for i in range(grad.shape[0]):
        total += abs(np.float64(_widen(grad[i]))) ** norm_type
    return total


@njit(inline="always", **_REDUCTION_JIT)
def _write_partial(chunk, params, chunks, grad_addresses, norm_type, partials):
    """partials[chunk] = the power sum of chunk `chunk`'s gradient (0 without one)."""
    address = grad_addresses[chunks.segments[chunk]]
    if address == 0:
        partials[chunk] = 0.0
        return
    offset, n = chunks.offsets[chunk], chunks.lengths[chunk]
    grad = numba.carray(_pointer_like(address + offset * params.itemsize, params), n)
    partials[chunk] = _power_sum(grad, norm_type)


@njit(parallel=True, **_REDUCTION_JIT)
def _partials_on_numba_threads(params, chunks, grad_addresses, norm_type, partials):
    for chunk in prange(chunks.segments.shape[0]):
        _write_partial(chunk, params, chunks, grad_addresses, norm_type, partials)


@njit(**_REDUCTION_JIT)
def _partials_on_this_thread(params, chunks, grad_addresses, norm_type, partials, first, last):
    for chunk in range(first, last):
        _write_partial(chunk, params, chunks, grad_addresses, norm_type, partials)


def grad_power_sum(record, *, grads, norm_type):
    """sum(|g|^p) over every gradient of `record` (max |g| for p = inf), a 0-d float64 tensor
    (see `contract.py`): partial sums per chunk on the threads `adam_step` would use,
    added up here (numpy's pairwise sum)."""
    assert grads.dtype == torch.int64 and grads.numel() == record.n_segments
    derived = _derived_for(record)
    partials = np.empty(derived.n_chunks, dtype=np.float64)
    arguments = (derived.params, derived.chunks, grads.numpy(), float(norm_type), partials)
    parts = cpu_threads.parts_for(derived.n_elements)
    if parts == 1:
        _partials_on_this_thread(*arguments, 0, derived.n_chunks)
    elif not cpu_threads.forked():
        _partials_on_numba_threads(*arguments)
    else:
        cpu_threads.run_parts(_partials_on_this_thread, arguments, derived.bounds(parts))
    # numpy's max propagates NaN, as torch's norms do.
    total = partials.max(initial=0.0) if norm_type == np.inf else partials.sum()
    return torch.tensor(total, dtype=torch.float64)
