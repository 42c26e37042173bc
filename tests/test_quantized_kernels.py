"""The Triton launcher with 8-bit moments (`_adam_q8_kernel`) on bare `ArenaRecord` records,
against the reference backend's quantized step on identical copies: segments starting on
multiples of QUANT_BLOCK with lengths that are not, whole and tail chunks, a zero-length
segment, one without a gradient every other step, two groups (AdamW; Adam with maximize), a
GradScaler scale and a clipping factor. Then the block map itself (`_encode`, `_decode`,
`_rint`) against the reference's `encode` and `decode` on edge values.

Skipped without Triton's interpreter (`kernel_helpers.require_triton_interpreter`)."""
import math

import pytest
import torch

from helpers import TOLERANCES, assert_close, make_params

from kernel_helpers import require_triton_interpreter

triton = require_triton_interpreter()
import triton.language as tl  # noqa: E402  (after the skip: triton is optional)

from fused_adam.kernels import contract  # noqa: E402
from fused_adam.kernels.contract import QUANT_BLOCK, ArenaRecord  # noqa: E402
from fused_adam.kernels import codecs, reference, triton_adam  # noqa: E402
from kernel_helpers import (  # noqa: E402
    ADAM, ADAMW, LENGTHS, N_BLOCKS, NO_L2, SIZE, STARTS, ZERO_BETAS, addresses, group_table,
    in_segments, quantize_segments, record_and_twin, scaled_on_odd_steps, step_grads,
)

# numpy's floating-point warnings from the interpreter on purposeful IEEE arithmetic: log2(0) of
# a zero beta (a bias correction of exactly 1), 1 / subnormal = inf, inf * 0 = NaN.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# Values the padding holds before the steps and must hold after them.
PAD_PARAM, PAD_EXP_AVG, PAD_EXP_AVG_SQ, PAD_ABSMAX = 7.0, 55, 200, 123.0

CONFIGS = {"fp32": (torch.float32, False), "bf16-master": (torch.bfloat16, True),
           "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}


def _arenas(dtype, master, seed=0):
    """Two identical records (for the Triton launcher and the reference): random params and
    moments already quantized segment by segment, sentinels in all padding."""
    params, m, v = make_params([(SIZE,)] * 3, torch.float32, seed=seed)
    m, v = m * 0.1, v.square() * 0.01
    elements, blocks = in_segments()
    exp_avg = torch.full((SIZE,), PAD_EXP_AVG, dtype=torch.int8)
    exp_avg_sq = torch.full((SIZE,), PAD_EXP_AVG_SQ, dtype=torch.uint8)
    absmax = [torch.full((N_BLOCKS,), PAD_ABSMAX) for _ in range(2)]
    quantize_segments(m, exp_avg, absmax[0], signed=True)
    quantize_segments(v, exp_avg_sq, absmax[1], signed=False)
    params = torch.where(elements, params, PAD_PARAM)
    return record_and_twin(
        params=params.to(dtype), master_params=params.clone() if master else None,
        exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_absmax=absmax[0],
        exp_avg_sq_absmax=absmax[1])


def _step_both(arena, twin, table, step, dtype, grads=None):
    """One step of each launcher from the same gradients (`step_grads` unless given), odd
    steps scaled and clipped (`scaled_on_odd_steps`)."""
    grads, options = scaled_on_odd_steps(step_grads(step, dtype) if grads is None else grads,
                                         step)
    triton_adam.adam_step(arena, grads=addresses(grads), group_table=table, **options)
    reference.adam_step(twin, grads=grads, group_table=table, **options)


def _assert_padding_untouched(arena, dtype):
    elements, blocks = in_segments()
    assert (arena.exp_avg[~elements] == PAD_EXP_AVG).all(), "exp_avg codes written in padding"
    assert (arena.exp_avg_sq[~elements] == PAD_EXP_AVG_SQ).all(), \
        "exp_avg_sq codes written in padding"
    for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert (getattr(arena, name)[~blocks] == PAD_ABSMAX).all(), f"{name} written in padding"
    assert (arena.params[~elements] == torch.tensor(PAD_PARAM).to(dtype)).all(), \
        "params written in padding"
    if arena.master_params is not None:
        assert (arena.master_params[~elements] == PAD_PARAM).all()


def _assert_bitwise_equal(actual, expected, what):
    """Equal bit for bit, NaN where NaN (payloads aside)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = expected.isnan() if expected.is_floating_point() else torch.zeros_like(expected).bool()
    if nan.any():
        assert torch.equal(actual.isnan(), nan), f"{what}: NaN in other places"
    differ = torch.nonzero(actual[~nan] != expected[~nan])
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {int((~nan).sum())} differ; first at "
        f"{int(torch.nonzero(~nan)[differ[0, 0]])}: {actual[~nan][differ[0, 0]].item()!r} vs "
        f"{expected[~nan][differ[0, 0]].item()!r}")


BUFFERS = ("params", "master_params", "exp_avg", "exp_avg_sq", "exp_avg_absmax",
           "exp_avg_sq_absmax", "steps")


@pytest.mark.parametrize("config", ["fp32", "bf16-master", "fp16"])
def test_zero_betas_match_the_reference_bit_for_bit(config):
    """beta1 = beta2 = 0: the new moments are g and g * g exactly, so the absmax, every code,
    the master copy, the params and the steps equal the reference's bit for bit, 20 steps."""
    dtype, master = CONFIGS[config]
    arena, twin = _arenas(dtype, master)
    table = group_table({**ADAMW, **ZERO_BETAS}, {**ADAM, **ZERO_BETAS, **NO_L2})
    for step in range(20):
        _step_both(arena, twin, table, step, dtype)
    assert arena.steps.tolist() == [20, 20, 20, 10, 20]
    for name in BUFFERS:
        if getattr(twin, name) is not None:
            _assert_bitwise_equal(getattr(arena, name), getattr(twin, name), name)
    _assert_padding_untouched(arena, dtype)


@pytest.mark.parametrize("config", ["fp32", "bf16-master", "bf16"])
def test_ordinary_betas_follow_the_reference(config):
    """Betas 0.9/0.999 (AdamW) and 0.8/0.99 (Adam with L2 decay and maximize), 20 steps.

    The reference's moments round once where the kernel rounds twice (torch's lerp, addcmul and
    add-with-alpha are fused multiply-adds on CPU), so they part by an ulp; observed here: the
    params (fp32, or the master copy) within 3e-7 of the reference's, the absmax within 2 ulp,
    every code equal and the bf16 params equal. Asserted: params within TOLERANCES[fp32], bf16
    params within one bf16 ulp, absmax within 1e-6 relative, codes at most 1 apart in at most
    2 of the 5214 elements."""
    dtype, master = CONFIGS[config]
    arena, twin = _arenas(dtype, master, seed=1)
    table = group_table(ADAMW, ADAM)
    for step in range(20):
        _step_both(arena, twin, table, step, dtype)
    assert torch.equal(arena.steps, twin.steps)
    elements, blocks = in_segments()
    stepped = arena.master_params if master else arena.params
    expected = twin.master_params if master else twin.params
    if stepped.dtype == torch.float32:
        assert_close(stepped[elements], expected[elements], what="params",
                     **TOLERANCES[torch.float32])
    if dtype != torch.float32:
        assert_close(arena.params[elements], twin.params[elements], what=f"{config} params",
                     rtol=2.0 ** -7, atol=0)
    for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert_close(getattr(arena, name)[blocks], getattr(twin, name)[blocks], what=name,
                     rtol=1e-6, atol=0)
    for name in ("exp_avg", "exp_avg_sq"):
        apart = (getattr(arena, name).int() - getattr(twin, name).int()).abs()
        assert apart.max() <= 1 and (apart > 0).sum() <= 2, \
            f"{name}: {int((apart > 0).sum())} codes differ, by up to {int(apart.max())}"
    _assert_padding_untouched(arena, dtype)


def test_nan_gradient_poisons_only_its_block():
    """A NaN gradient element (one in a whole block of a whole chunk, one the last element of a
    segment's partial last block) makes its block's absmax NaN, both moments, and every code
    of the block 0; the next step decodes the block as NaN, so all its params go NaN, while
    every other block stays finite. As the reference, bit for bit (zero betas)."""
    arena, twin = _arenas(torch.float32, False, seed=2)
    table = group_table({**ADAMW, **ZERO_BETAS}, {**ADAM, **ZERO_BETAS, **NO_L2})
    _step_both(arena, twin, table, 0, torch.float32)
    grads = make_params([(n,) for n in LENGTHS], torch.float64, seed=7)
    grads = [g.float() for g in grads]
    grads[0][700] = float("nan")  # block 2
    grads[2][299] = float("nan")  # segment 2's last element: block 20, 44 elements
    _step_both(arena, twin, table, 2, torch.float32, grads=grads)
    poisoned = torch.zeros(N_BLOCKS, dtype=torch.bool)
    poisoned[[2, 20]] = True
    _, blocks = in_segments()
    for name in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        scales = getattr(arena, name)
        assert scales[poisoned].isnan().all(), f"{name}: a NaN gradient left its block finite"
        assert scales[blocks & ~poisoned].isfinite().all(), f"{name}: NaN beyond its block"
    for name in ("exp_avg", "exp_avg_sq"):
        codes = getattr(arena, name)
        assert not codes[2 * QUANT_BLOCK:3 * QUANT_BLOCK].any(), f"{name}: nonzero codes"
        assert not codes[STARTS[2] + QUANT_BLOCK:STARTS[2] + LENGTHS[2]].any()
    params = arena.params
    assert params[700].isnan() and params[STARTS[2] + 299].isnan()
    assert params[:700].isfinite().all() and params[701:STARTS[2] + 299].isfinite().all()

    _step_both(arena, twin, table, 4, torch.float32)
    in_poisoned = poisoned.repeat_interleave(QUANT_BLOCK)
    elements, _ = in_segments()
    assert params[in_poisoned & elements].isnan().all(), "a NaN block decoded as numbers"
    assert params[~in_poisoned & elements].isfinite().all()
    for name in BUFFERS:
        if getattr(twin, name) is not None:
            _assert_bitwise_equal(getattr(arena, name), getattr(twin, name), name)
    _assert_padding_untouched(arena, torch.float32)


def test_found_inf_skips_everything():
    arena, _ = _arenas(torch.float32, False)
    before = {name: getattr(arena, name).clone() for name in BUFFERS
              if getattr(arena, name) is not None}
    grads = [torch.ones(n) for n in LENGTHS]
    triton_adam.adam_step(arena, grads=addresses(grads), group_table=group_table(ADAMW, ADAM),
                          found_inf=torch.ones(1))
    for name, value in before.items():
        assert torch.equal(getattr(arena, name), value), name


def test_no_amsgrad_with_8_bit_moments():
    arena, _ = _arenas(torch.float32, False)
    grads = addresses([torch.ones(n) for n in LENGTHS])
    with pytest.raises(AssertionError, match="amsgrad"):
        triton_adam.adam_step(arena, grads=grads,
                              group_table=group_table(ADAMW, {**ADAM, contract.AMSGRAD: 1.0}))
    with_max = ArenaRecord(**{**vars(arena), "max_exp_avg_sq": torch.zeros(SIZE)})
    with pytest.raises(AssertionError, match="amsgrad"):
        triton_adam.adam_step(with_max, grads=grads, group_table=group_table(ADAMW, ADAM))


# ------------------------------------------------------------------------------------------------
# The block map, on one tile shaped as the kernel's ([SPLIT, BLOCKS, WIDTH], a block per row of
# SPLIT * WIDTH = QUANT_BLOCK), against the reference's encode and decode (the oracle: its
# square roots are correctly rounded, as the kernel's).

SPLIT, BLOCKS, WIDTH = 2, 8, QUANT_BLOCK // 2
_encode, _decode, _rint = triton_adam._encode, triton_adam._decode, triton_adam._rint


@triton.jit
def _tile_offsets(SPLIT: tl.constexpr, BLOCKS: tl.constexpr, WIDTH: tl.constexpr):
    return (tl.arange(0, BLOCKS)[None, :, None] * (SPLIT * WIDTH)
            + tl.arange(0, SPLIT)[:, None, None] * WIDTH + tl.arange(0, WIDTH)[None, None, :])


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, absmax_ptr, length, SIGNED: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCKS: tl.constexpr, WIDTH: tl.constexpr):
    offsets = _tile_offsets(SPLIT, BLOCKS, WIDTH)
    mask = offsets < length
    # What lies past `length` is loaded as NaN: it must count in no absmax.
    x = tl.load(x_ptr + offsets, mask=mask, other=float("nan"))
    # The unsigned map codes sqrt(x), which the kernel hands in as the step has taken it.
    if SIGNED:
        root = None
    else:
        root = tl.sqrt_rn(x)
    codes, absmax = _encode(x, root, mask, SIGNED)
    tl.store(codes_ptr + offsets, codes.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(absmax_ptr + tl.arange(0, BLOCKS), absmax)


@triton.jit
def _decode_kernel(codes_ptr, absmax_ptr, out_ptr, SIGNED: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCKS: tl.constexpr, WIDTH: tl.constexpr):
    offsets = _tile_offsets(SPLIT, BLOCKS, WIDTH)
    absmax = tl.load(absmax_ptr + tl.arange(0, BLOCKS))
    tl.store(out_ptr + offsets, _decode(tl.load(codes_ptr + offsets), absmax, SIGNED))


@triton.jit
def _rint_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, _rint(tl.load(x_ptr + offsets)))


def _edge_blocks(signed, seed):
    """BLOCKS blocks of fp32 values, each a case of the map, and the valid length (the last
    block partial)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randn(BLOCKS, QUANT_BLOCK, generator=generator)
    blocks[1] = 0.0  # absmax 0: reciprocal 0, codes 0
    blocks[1, ::2] = -0.0
    blocks[2, 17] = float("nan")  # absmax NaN: codes 0
    blocks[3, 5] = float("inf")  # absmax inf: reciprocal 0, inf * 0 = NaN -> 0, others 0
    # Subnormal absmax: signed, 1 / s = inf and y = +-inf (top code) or NaN (0); unsigned,
    # 1 / sqrt(s) is finite.
    blocks[4] *= 1e-40
    blocks[4, :8] = 0.0
    blocks[5] = torch.exp(torch.randn(QUANT_BLOCK, generator=generator) * 8)  # wide range
    blocks[5, ::3] *= -1
    blocks[6, 0] = 1.0  # values at the code boundaries of an absmax of 1
    levels = 127 if signed else 255
    boundaries = ((torch.arange(1, 128, dtype=torch.float64) - 0.5) / levels)
    boundaries = boundaries.square() if signed else boundaries ** 4
    blocks[6, 1:128] = boundaries.float()
    blocks[6, 128:255] = boundaries.float().nextafter(torch.tensor(2.0))
    if not signed:
        blocks = blocks.abs()  # exp_avg_sq is never negative
    length = 7 * QUANT_BLOCK + 100  # block 7 holds 100 values; the rest must not count
    return blocks.reshape(-1), length


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_encode_matches_the_reference(signed):
    """Absmax and codes bit for bit `codecs.quantize`'s (whose square roots are correctly
    rounded, as the kernel's sqrt_rn: `_edge_blocks` puts values within an ulp of the code
    boundaries, where a square root one ulp off moves a code)."""
    values, length = _edge_blocks(signed, seed=5)
    values[length:] = 1e30  # never read: loaded as NaN, and must not count either way
    codes = torch.full((values.numel(),), 99,
                       dtype=contract.EXP_AVG_CODES if signed else contract.EXP_AVG_SQ_CODES)
    absmax = torch.empty(BLOCKS)
    _encode_kernel[(1,)](values, codes, absmax, length, SIGNED=signed, SPLIT=SPLIT,
                         BLOCKS=BLOCKS, WIDTH=WIDTH)
    expected_codes, expected_absmax = codecs.quantize(values[:length], signed=signed)
    _assert_bitwise_equal(absmax, expected_absmax, "absmax")
    _assert_bitwise_equal(codes[:length], expected_codes, "codes")
    assert (codes[length:] == 99).all(), "codes stored past the length"
    # The cases were reached: NaN and zero blocks, and codes at both ends of the map.
    assert absmax[2].isnan() and absmax[1] == 0 and absmax[3] == float("inf")
    top = 127 if signed else 255
    assert (codes[:length].int().abs() == top).any() and (codes[:length] == 0).any()


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_decode_matches_the_reference(signed):
    generator = torch.Generator().manual_seed(6)
    if signed:
        codes = torch.arange(-128, 128, dtype=torch.int8).repeat(BLOCKS)
    else:
        codes = torch.arange(256).to(torch.uint8).repeat(BLOCKS)
    codes = codes[torch.randperm(codes.numel(), generator=generator)]
    absmax = torch.rand(BLOCKS, generator=generator) * 10
    absmax[1:5] = torch.tensor([0.0, float("nan"), float("inf"), 1e-40])
    out = torch.empty(codes.numel())
    _decode_kernel[(1,)](codes, absmax, out, SIGNED=signed, SPLIT=SPLIT, BLOCKS=BLOCKS,
                         WIDTH=WIDTH)
    _assert_bitwise_equal(out, codecs.decode(codes, absmax, signed=signed), "decoded")


def test_rint_rounds_to_nearest_even():
    ties = torch.arange(0, 256, dtype=torch.float32) + 0.5
    near = [0.49999997, 0.50000006, 1.4999999, 2 ** 22 + 0.5, 2 ** 23 - 0.5, 2 ** 23 - 1.5]
    large = [2.0 ** 23, 2.0 ** 23 + 1, 2.0 ** 24 + 2, 1e30, float("inf")]
    x = torch.cat([ties, torch.tensor(near + large + [0.0, -0.0, float("nan")]),
                   torch.rand(512 - 256 - len(near) - len(large) - 3) * 300])
    out = torch.empty_like(x)
    _rint_kernel[(1,)](x, out, N=x.numel())
    small = x < 2 ** 23
    _assert_bitwise_equal(out[small].abs(), torch.round(x[small]).abs(), "rint below 2^23")
    assert (out[x >= 2 ** 23] >= 2 ** 23).all(), "rint of a large value fell under 2^23"
    assert math.isnan(out[x.isnan()].item())
