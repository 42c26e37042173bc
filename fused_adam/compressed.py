"""Checkpoints of compressed optimizer state in torch's format.

With `state_dtype=torch.int8`, `FusedAdam.state_dict()` carries each moment as 8-bit codes
(`exp_avg` int8, `exp_avg_sq` uint8, shaped like the parameter) with an fp32 absmax per block of
256 values (`exp_avg_absmax`, `exp_avg_sq_absmax`): about a quarter of the bytes of torch's fp32
moments. `torch.optim.Adam` would cast those codes to floats as if they were values, so a
checkpoint for torch goes through `dequantized_state_dict` first. (The other way needs nothing:
a FusedAdam with 8-bit moments quantizes the float moments of a torch checkpoint as it loads it.)

Blocks start at each local shard's start (FSDP2), so a sharded parameter's absmax is a DTensor of
every shard's blocks, each padded to the largest shard's count (`distributed.blocks_like_param`):
torch.distributed.checkpoint saves and loads it shard by shard, into the same sharding only.
"""
import copy

import torch

from fused_adam.distributed import DTensor, is_dtensor, local_shard
from fused_adam.flat import ABSMAX_KEYS
from fused_adam.kernels.contract import QUANT_BLOCK
from fused_adam.kernels import reference


def dequantized_state_dict(state_dict):
    """A copy of a FusedAdam `state_dict()` whose 8-bit moments are decoded to fp32 tensors of
    their parameter's shape, the absmax entries dropped: what `torch.optim.Adam.load_state_dict`
    loads and resumes from. Entries without codes are copied as they are. DTensor codes (a
    sharded state, from `get_optimizer_state_dict`) are decoded into DTensors placed alike."""
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
        converted["state"][param_id] = entry
    return converted


def _decoded(codes, absmax, *, signed):
    """fp32 values of `codes` shaped as they are. A DTensor (a sharded parameter's state, as
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` gives it) is decoded
    shard by shard, each shard's blocks the first of its absmax's local blocks, and comes back
    a DTensor placed as the codes are."""
    local_codes = local_shard(codes).detach()
    local_absmax = local_shard(absmax).detach().reshape(-1)
    if is_dtensor(codes):
        local_absmax = local_absmax[:-(-local_codes.numel() // QUANT_BLOCK)]
    values = reference.decode(local_codes.reshape(-1), local_absmax, signed=signed)
    values = values.view(local_codes.shape)
    if not is_dtensor(codes):
        return values
    return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False,
                              shape=codes.shape, stride=codes.stride())
