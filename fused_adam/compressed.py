"""Checkpoints of compressed optimizer state in torch's format.

With `state_dtype=torch.int8`, `FusedAdam.state_dict()` carries each moment as 8-bit codes
(`exp_avg` int8, `exp_avg_sq` uint8, shaped like the parameter) with an fp32 absmax per block of
256 values (`exp_avg_absmax`, `exp_avg_sq_absmax`): about a quarter of the bytes of torch's fp32
moments. `torch.optim.Adam` would cast those codes to floats as if they were values, so a
checkpoint for torch goes through `dequantized_state_dict` first. (The other way needs nothing:
a FusedAdam with 8-bit moments quantizes the float moments of a torch checkpoint as it loads it,
and takes the master of bf16 params from the params.) torch's Adam has nowhere to keep a master
copy, so the conversion leaves it out; `master_params` gives it as fp32 values.

Blocks start at each local shard's start (FSDP2), so a sharded parameter's absmax is a DTensor of
every shard's blocks, each padded to the largest shard's count (`distributed.blocks_like_param`):
torch.distributed.checkpoint saves and loads it shard by shard, into the same sharding only.
"""
import copy

import torch

from fused_adam.distributed import DTensor, is_dtensor, local_shard
from fused_adam.arena import ABSMAX_KEYS, MAX_KEY, MOMENT_KEYS
from fused_adam.kernels.contract import QUANT_BLOCK
from fused_adam.kernels import codecs

# What torch.optim.Adam keeps per parameter, and all it loads (it would carry anything else).
_TORCH_KEYS = ("step", *MOMENT_KEYS, MAX_KEY)


def dequantized_state_dict(state_dict):
    """A copy of a FusedAdam `state_dict()` in torch's format, what `torch.optim.Adam` and
    `AdamW` load and resume from: each entry keeps only the keys torch's Adam uses (`step`,
    `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`), 8-bit moments decoded to fp32 tensors of their
    parameter's shape. The master a FusedAdam keeps beside bf16/fp16 params (`master_param`,
    `master_remainder`) is dropped: torch would cast it to the params' dtype and carry it
    unused, stale after its first step; `master_params(optimizer)` gives it as fp32 values.
    DTensor codes (a sharded state, from `get_optimizer_state_dict`) are decoded into DTensors
    placed alike."""
    converted = {key: value for key, value in state_dict.items() if key != "state"}
    converted["param_groups"] = copy.deepcopy(state_dict["param_groups"])
    converted["state"] = {}
    for param_id, entry in state_dict["state"].items():
        if not isinstance(entry, dict):  # not a parameter's (torch keeps such entries as is)
            converted["state"][param_id] = entry
            continue
        entry = dict(entry)
        for moment, absmax_name in ABSMAX_KEYS.items():
            if absmax_name not in entry:
                continue
            codes, absmax = entry[moment], entry.pop(absmax_name)
            if not torch.is_tensor(codes) or codes.is_floating_point():
                raise ValueError(f"state {param_id}: {absmax_name!r} beside a {moment!r} that "
                                 "is not 8-bit codes")
            entry[moment] = _decoded(codes, absmax, signed=moment == "exp_avg")
        converted["state"][param_id] = {key: value for key, value in entry.items()
                                        if key in _TORCH_KEYS}
    return converted


def master_params(optimizer):
    """{param: its master value}, copies, for every parameter of a FusedAdam: what a step
    updates, which bf16/fp16 params only round. float32 for bf16, fp16 and fp32 params (wider
    dtypes keep theirs), shaped as the param (a DTensor placed as a DTensor param):

    - `master_weights=True`: the fp32 master copy, bit for bit;
    - `"bf16+16"`: the bf16 param joined with its int16 remainder, the fp32 master bit for bit;
    - `"bf16+8"`: the param joined with its int8 remainder, the master to 16 significant bits;
    - no master: the param's values.

    For a model in fp32 (export, evaluation): `{name: masters[p] for name, p in
    model.named_parameters()}`. The state_dict of `dequantized_state_dict` leaves these bits
    out, as torch's Adam has nowhere to keep them."""
    optimizer._follow_groups()
    optimizer._follow_state()
    masters = {}
    for arena in optimizer._arenas.values():
        arena.adopt_moved_params()
        for index, p in enumerate(arena.params_in_order):
            value = arena.master_value(index)
            masters[p] = value.to(torch.promote_types(value.dtype, torch.float32))
    return masters


def _decoded(codes, absmax, *, signed):
    """fp32 values of `codes` shaped as they are. A DTensor (a sharded parameter's state, as
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` gives it) is decoded
    shard by shard, each shard's blocks the first of its absmax's local blocks, and comes back
    a DTensor placed as the codes are."""
    local_codes = local_shard(codes).detach()
    local_absmax = local_shard(absmax).detach().reshape(-1)
    if is_dtensor(codes):
        local_absmax = local_absmax[:-(-local_codes.numel() // QUANT_BLOCK)]
    values = codecs.decode(local_codes.reshape(-1), local_absmax, signed=signed)
    values = values.view(local_codes.shape)
    if not is_dtensor(codes):
        return values
    return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False,
                              shape=codes.shape, stride=codes.stride())
