"""The stored formats' codecs, in plain torch: the 8-bit moments' block map and the compact
master's split and join, exactly as `contract.py` states them. The reference backend steps with
them; the arenas and the checkpoint code read and write stored state with them; the compiled
kernels implement the same maps and are tested against these."""
import torch

from fused_adam.kernels.contract import (
    EXP_AVG_CODES, EXP_AVG_SQ_CODES, QUANT_BLOCK, SIGNED_LEVELS, UNSIGNED_LEVELS,
)


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
