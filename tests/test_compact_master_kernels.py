"""The Triton launcher with a compact master (bf16 params plus an int16 or int8
`master_remainder`, see `kernels/contract.py`) on bare `ArenaRecord` records, against the
reference backend on identical copies, with fp32, bf16 and 8-bit moments: both kernels
(`_adam_kernel`, `_adam_q8_kernel`), whole and tail chunks, a zero-length segment, one without
a gradient every other step, two groups (AdamW; Adam with maximize, and amsgrad where the
moments are floats), a GradScaler scale and a clipping factor. Then the join and the split
themselves (`_join_master`, `_split_master`) against the reference's on edge values.

Skipped without Triton's interpreter (`kernel_helpers.require_triton_interpreter`)."""
import pytest
import torch

from helpers import TOLERANCES, assert_close, make_params

from kernel_helpers import require_triton_interpreter

triton = require_triton_interpreter()
import triton.language as tl  # noqa: E402  (after the skip: triton is optional)

from fused_adam.kernels import contract  # noqa: E402
from fused_adam.kernels.contract import ArenaRecord  # noqa: E402
from fused_adam.kernels import codecs, reference, triton_adam  # noqa: E402
from kernel_helpers import (  # noqa: E402
    ADAM, ADAMW, N_BLOCKS, NO_L2, SIZE, STARTS, ZERO_BETAS, addresses, group_table, in_segments,
    quantize_segments, record_and_twin, scaled_on_odd_steps, step_grads,
)

# numpy's floating-point warnings from the interpreter on purposeful IEEE arithmetic (log2(0) of
# a zero beta: a bias correction of exactly 1; NaN compared in the NaN test).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

REMAINDERS = {"bf16+16": torch.int16, "bf16+8": torch.int8}
MOMENTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.int8}
CONFIGS = [(master, moments) for master in REMAINDERS for moments in MOMENTS]
IDS = [f"{master}-{moments}" for master, moments in CONFIGS]

# Values the padding holds before the steps and must hold after them.
PAD_PARAM, PAD_REMAINDER = 7.0, 77


def _quantized(values, codes_dtype, signed):
    """Codes and per-block absmax of `values`, quantized segment by segment (padding: codes 0,
    absmax 1)."""
    codes = torch.zeros(SIZE, dtype=codes_dtype)
    absmax = torch.ones(N_BLOCKS)
    quantize_segments(values, codes, absmax, signed=signed)
    return codes, absmax


def _arenas(master, moments, seed=0, *, amsgrad=False, fp32_master=False):
    """Two identical records (for the Triton launcher and the reference): a random fp32 master
    split into bf16 params and a `master` remainder (or, fp32_master, those params joined
    back into an fp32 `master_params`), random moments, sentinels in the padding."""
    values, m, v = make_params([(SIZE,)] * 3, torch.float32, seed=seed)
    m, v = m * 0.1, v.square() * 0.01
    elements, _ = in_segments()
    remainder_dtype = REMAINDERS[master]
    params, remainder = codecs.split_master(values, remainder_dtype)
    params = torch.where(elements, params, torch.tensor(PAD_PARAM, dtype=torch.bfloat16))
    remainder = torch.where(elements, remainder,
                            torch.tensor(PAD_REMAINDER, dtype=remainder_dtype))
    if MOMENTS[moments] == torch.int8:
        exp_avg, exp_avg_absmax = _quantized(m, contract.EXP_AVG_CODES, signed=True)
        exp_avg_sq, exp_avg_sq_absmax = _quantized(v, contract.EXP_AVG_SQ_CODES, signed=False)
        moment_buffers = dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                              exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax)
    else:
        dtype = MOMENTS[moments]
        moment_buffers = dict(exp_avg=m.to(dtype), exp_avg_sq=v.to(dtype),
                              max_exp_avg_sq=(v * 1.5).to(dtype) if amsgrad else None)
    if fp32_master:
        masters = dict(master_params=codecs.join_master(params, remainder).clone())
    else:
        masters = dict(master_remainder=remainder)
    return record_and_twin(params=params, **masters, **moment_buffers)


def _grads(step):
    return step_grads(step, torch.bfloat16)


def _step(arena, table, step, grads, backend):
    """One step of `backend`'s launcher, odd steps scaled and clipped (`scaled_on_odd_steps`)."""
    grads, options = scaled_on_odd_steps(grads, step)
    # The Triton launcher reads the gradients by address: `grads` keeps them alive meanwhile.
    handed = addresses(grads) if backend is triton_adam else grads
    backend.adam_step(arena, grads=handed, group_table=table, **options)


def _step_both(arena, twin, table, step, grads=None):
    grads = _grads(step) if grads is None else grads
    _step(arena, table, step, grads, triton_adam)
    _step(twin, table, step, grads, reference)


def _tables(moments, zero_betas):
    second = {**ADAM}
    if MOMENTS[moments] != torch.int8:
        second[contract.AMSGRAD] = 1.0
    if zero_betas:
        return group_table({**ADAMW, **ZERO_BETAS}, {**second, **ZERO_BETAS, **NO_L2})
    return group_table(ADAMW, second)


def _assert_bitwise_equal(actual, expected, what, *, any_nan=False):
    """Equal bit for bit (floats compared as their bits: signed zeros, and NaNs' sign and payload
    too unless `any_nan`, where a NaN only needs a NaN)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.is_floating_point():
        if any_nan:
            nan = expected.isnan()
            assert torch.equal(actual.isnan(), nan), f"{what}: NaN in other places"
            actual, expected = actual[~nan], expected[~nan]
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        actual, expected = actual.view(bits), expected.view(bits)
    differ = torch.nonzero(actual != expected)
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {actual.numel()} differ; first at {int(differ[0, 0])}: "
        f"bits {int(actual[differ[0, 0]]):#x} vs {int(expected[differ[0, 0]]):#x}")


def _assert_padding_untouched(arena):
    elements, _ = in_segments()
    assert (arena.params[~elements] == PAD_PARAM).all(), "params written in padding"
    assert (arena.master_remainder[~elements] == PAD_REMAINDER).all(), \
        "master_remainder written in padding"


BUFFERS = ("params", "master_remainder", "exp_avg", "exp_avg_sq", "max_exp_avg_sq",
           "exp_avg_absmax", "exp_avg_sq_absmax", "steps")


@pytest.mark.parametrize("master, moments", CONFIGS, ids=IDS)
def test_zero_betas_match_the_reference_bit_for_bit(master, moments):
    """beta1 = beta2 = 0: the new moments are g and g * g exactly, so params, remainders,
    moments (codes and absmax) and steps equal the reference's bit for bit, 20 steps."""
    arena, twin = _arenas(master, moments, amsgrad=True)
    table = _tables(moments, zero_betas=True)
    for step in range(20):
        _step_both(arena, twin, table, step)
    assert arena.steps.tolist() == [20, 20, 20, 10, 20]
    for name in BUFFERS:
        if getattr(twin, name) is not None:
            _assert_bitwise_equal(getattr(arena, name), getattr(twin, name), name)
    _assert_padding_untouched(arena)


@pytest.mark.parametrize("master, moments", CONFIGS, ids=IDS)
def test_ordinary_betas_follow_the_reference(master, moments):
    """Betas 0.9/0.999 (AdamW) and 0.8/0.99 (Adam with L2 decay, maximize, and amsgrad with
    float moments), 20 steps: the joined master within TOLERANCES[fp32] of the reference's.
    (The reference's moments round once where the kernel rounds twice: torch's lerp, addcmul
    and add-with-alpha are fused multiply-adds on CPU.)

    bf16+8 keeps the master to 16 significant bits, a unit of 2^8 fp32 ulps (2^-16 to 2^-15
    relative: coarser than TOLERANCES' rtol of 2e-5 in most of a binade). Where the two
    unrounded masters, an ulp or so apart, fall on two sides of a rounding boundary of that
    grid, they are stored a unit apart: observed in 2 of the 5214 elements (fp32 and 8-bit
    moments; 1 of them beyond the tolerance), none with bf16 moments. So for bf16+8, at most 2
    elements may instead be exactly one unit apart; all others within the tolerance. Observed
    for bf16+16: 39 to 128 fp32 ulps apart at most, relative 1.3e-5 at most."""
    arena, twin = _arenas(master, moments, seed=1, amsgrad=True)
    table = _tables(moments, zero_betas=False)
    for step in range(20):
        _step_both(arena, twin, table, step)
    assert torch.equal(arena.steps, twin.steps)
    elements, _ = in_segments()
    ours = codecs.join_master(arena.params, arena.master_remainder)[elements]
    theirs = codecs.join_master(twin.params, twin.master_remainder)[elements]
    within = torch.ones_like(ours, dtype=torch.bool)
    if master == "bf16+8":
        ulps_apart = (ours.view(torch.int32).long() - theirs.view(torch.int32).long()).abs()
        one_unit = ulps_apart == 2 ** 8
        assert one_unit.sum() <= 2, f"{int(one_unit.sum())} elements a 16-bit unit apart"
        within = ~one_unit
    assert_close(ours[within], theirs[within], what="joined master", **TOLERANCES[torch.float32])
    _assert_padding_untouched(arena)


@pytest.mark.parametrize("master, moments", CONFIGS, ids=IDS)
def test_nan_gradient_gives_nan_param_and_zero_remainder(master, moments):
    """A NaN gradient element (one in a whole chunk, one the last of a segment's tail chunk):
    its param is the bf16 NaN 0x7FC0 and its remainder 0, every other element stays finite, and
    all buffers are the reference's bit for bit (zero betas)."""
    arena, twin = _arenas(master, moments, seed=2, amsgrad=True)
    table = _tables(moments, zero_betas=True)
    _step_both(arena, twin, table, 0)
    grads = _grads(2)
    grads[0][700] = float("nan")
    grads[2][299] = float("nan")  # segment 2's last element
    _step_both(arena, twin, table, 2, grads=grads)
    poisoned = torch.zeros(SIZE, dtype=torch.bool)
    poisoned[[700, STARTS[2] + 299]] = True
    elements, _ = in_segments()
    assert (arena.params.view(torch.int16)[poisoned] == 0x7FC0).all(), "param is not 0x7FC0"
    assert (arena.master_remainder[poisoned] == 0).all(), "a NaN master left a remainder"
    assert arena.params[elements & ~poisoned].isfinite().all(), "NaN beyond its element"
    for name in BUFFERS:
        if getattr(twin, name) is not None:
            # The contract says which NaN a param holds (0x7FC0), not which a moment does.
            _assert_bitwise_equal(getattr(arena, name), getattr(twin, name), name,
                                  any_nan=name not in ("params", "master_remainder"))
    _assert_padding_untouched(arena)


@pytest.mark.parametrize("moments", MOMENTS)
def test_bf16_plus_16_is_the_fp32_master(moments):
    """bf16+16 holds the fp32 master exactly: 20 ordinary steps of the Triton launcher with a
    compact master and with an fp32 `master_params` (the same master joined) give the same
    master bit for bit, and the same moments; the params are each master's rounding (ties away
    from zero for the compact one, to even for the fp32 one's)."""
    compact, _ = _arenas("bf16+16", moments, seed=3, amsgrad=True)
    full, _ = _arenas("bf16+16", moments, seed=3, amsgrad=True, fp32_master=True)
    table = _tables(moments, zero_betas=False)
    for step in range(20):
        grads = _grads(step)
        _step(compact, table, step, grads, triton_adam)
        _step(full, table, step, grads, triton_adam)
    elements, _ = in_segments()
    joined = codecs.join_master(compact.params, compact.master_remainder)
    _assert_bitwise_equal(joined[elements], full.master_params[elements], "master")
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_absmax",
                 "exp_avg_sq_absmax", "steps"):
        if getattr(full, name) is not None:
            _assert_bitwise_equal(getattr(compact, name), getattr(full, name), name)
    _assert_bitwise_equal(compact.params[elements],
                          codecs.split_master(full.master_params, torch.int16)[0][elements],
                          "compact params")
    _assert_bitwise_equal(full.params[elements], full.master_params[elements].bfloat16(),
                          "fp32 master's params")


def test_check_record_refuses_malformed_compact_masters():
    arena, _ = _arenas("bf16+16", "fp32")
    for change, message in [
            (dict(params=arena.params.half(), exp_avg=arena.exp_avg), "compact master"),
            (dict(master_params=torch.zeros(SIZE)), "both"),
            (dict(master_remainder=torch.zeros(SIZE, dtype=torch.int32)), "master_remainder"),
            (dict(master_remainder=torch.zeros(SIZE - 16, dtype=torch.int16)),
             "master_remainder")]:
        with pytest.raises(AssertionError, match=message):
            triton_adam._check_record(ArenaRecord(**{**vars(arena), **change}))


# ------------------------------------------------------------------------------------------------
# The join and the split on one tile, against the reference's join_master and split_master.

_join, _split = triton_adam._join_master, triton_adam._split_master


@triton.jit
def _round_trip_kernel(x_ptr, params_ptr, remainder_ptr, joined_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    params, remainder = _split(tl.load(x_ptr + offsets), remainder_ptr.dtype.element_ty)
    tl.store(params_ptr + offsets, params)
    tl.store(remainder_ptr + offsets, remainder)
    tl.store(joined_ptr + offsets, _join(params, remainder))


# Ties between two bf16 values (both signs, even and odd high halves), one ulp beside them,
# the largest finite values (which round to inf), infinities, signed zeros, subnormals, NaNs
# (0x7FFFFFFF and 0xFFFFFFFF carry when rounded), and int8 remainders at their clamp (a low
# half of 0x7F80 and up rounds to 128, which is stored as 127; ties of the low byte, and a
# negative remainder, for the arithmetic shift).
_EDGE_BITS = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F808001, 0x3F807FFF,
              0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
              0x00000000, 0x80000000, 0x00000001, 0x80007FFF, 0x00008000, 0x807FFFFF,
              0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x3F807F80,
              0x3F807F7F, 0x3F807FBF, 0xBF807F80, 0x3F80FF80, 0x3F80FF7F, 0x3F800080,
              0x3F80007F]


@pytest.mark.parametrize("master", REMAINDERS)
def test_split_and_join_match_the_reference(master):
    generator = torch.Generator().manual_seed(4)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (1024 - len(_EDGE_BITS),),
                                generator=generator)
    bits = torch.cat([torch.tensor(_EDGE_BITS, dtype=torch.int64), random_bits])
    x = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits
    remainder_dtype = REMAINDERS[master]
    params = torch.empty(x.numel(), dtype=torch.bfloat16)
    remainder = torch.empty(x.numel(), dtype=remainder_dtype)
    joined = torch.empty(x.numel())
    _round_trip_kernel[(1,)](x, params, remainder, joined, N=x.numel())
    expected_params, expected_remainder = codecs.split_master(x, remainder_dtype)
    _assert_bitwise_equal(params, expected_params, "params")
    _assert_bitwise_equal(remainder, expected_remainder, "remainder")
    _assert_bitwise_equal(joined, codecs.join_master(expected_params, expected_remainder),
                          "joined")
    if remainder_dtype == torch.int16:  # exact, NaN aside (stored as 0x7FC00000)
        nan = x.isnan()
        _assert_bitwise_equal(joined[~nan], x[~nan], "joined bf16+16")
    else:
        assert (remainder[:len(_EDGE_BITS)] == 127).any(), "the int8 clamp was not reached"
