"""Checkpoints of compressed optimizer state in torch's format.

With `state_dtype=torch.int8`, `FusedAdam.state_dict()` carries each moment as 8-bit codes
(`exp_avg` int8, `exp_avg_sq` uint8, shaped like the parameter) with an fp32 absmax per block of
256 values (`exp_avg_absmax`, `exp_avg_sq_absmax`): about a quarter of the bytes of torch's fp32
moments. `torch.optim.Adam` would cast those codes to floats as if they were values, so a
checkpoint for torch goes through `dequantized_state_dict` first. (The other way needs nothing:
a FusedAdam with 8-bit moments quantizes the float moments of a torch checkpoint as it loads it.)
"""
import copy

import torch

from fused_adam.flat import ABSMAX_KEYS
from fused_adam.kernels import reference


def dequantized_state_dict(state_dict):
    """A copy of a FusedAdam `state_dict()` whose 8-bit moments are decoded to fp32 tensors of
    their parameter's shape, the absmax entries dropped: what `torch.optim.Adam.load_state_dict`
    loads and resumes from. Entries without codes are copied as they are."""
    converted = {key: value for key, value in state_dict.items() if key != "state"}
    converted["param_groups"] = copy.deepcopy(state_dict["param_groups"])
    converted["state"] = {}
    for param_id, entry in state_dict["state"].items():
        entry = dict(entry)
        for moment, absmax_name in ABSMAX_KEYS.items():
            if absmax_name not in entry:
                continue
            codes, absmax = entry[moment], entry.pop(absmax_name)
            if not torch.is_tensor(codes) or codes.is_floating_point():
                raise ValueError(f"state {param_id}: {absmax_name!r} beside a {moment!r} that "
                                 "is not 8-bit codes")
            values = reference.decode(codes.detach().reshape(-1), absmax.detach().reshape(-1),
                                      signed=moment == "exp_avg")
            entry[moment] = values.view(codes.shape)
        converted["state"][param_id] = entry
    return converted
