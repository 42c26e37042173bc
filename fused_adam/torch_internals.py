"""Every private torch internal fused_adam reads or writes, in one place, each behind a name that
says what it does.

They are not public API and may change between torch versions: each is used in one way, and
where one is missing its caller falls back (or refuses, saying why) rather than risk stale values.
"""
import operator
from collections import Counter

import torch

# ------------------------------------------------------------------------------------------------
# Tensors and storages

# A tensor's autograd version counter, which every in-place op advances.
version_of = operator.attrgetter("_version")


def bump_versions(params):
    """What an in-place op does to autograd's version counters, for the params a step wrote:
    a backward through a graph that saved one of them before the step then raises, as it does
    after torch's Adam."""
    try:
        torch._C._increment_version(params)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for p in params:
            torch._C._increment_version(p)


def has_internal_overlap(tensor):
    """Whether two elements of `tensor` share memory by torch's quick test: True, False, or None
    where it cannot tell (an as_strided layout it does not analyse)."""
    verdict = torch._debug_has_internal_overlap(tensor)  # 0: no, 1: yes, 2: too hard to tell
    return None if verdict == 2 else verdict == 1


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def held_by_others(tensors):
    """For each of `tensors`, whether something other than `tensors` also holds its storage
    (a ZeRO bucket, a module's own Parameter over the same memory, a user's reference): memory
    a torch optimizer would have updated in place, so its owner reads it after a step.
    Without torch's storage use count (older torch) nobody is assumed to."""
    if _storage_use_count is None:
        return [False] * len(tensors)
    storages = [t.untyped_storage() for t in tensors]
    tensors_over = Counter(storage._cdata for storage in storages)
    # The storage objects made here hold a reference each (one per distinct object: torch
    # hands out one Python object per storage while one is alive).
    objects_over = Counter(storage._cdata for storage in {id(s): s for s in storages}.values())
    return [_storage_use_count(storage._cdata)
            > tensors_over[storage._cdata] + objects_over[storage._cdata]
            for storage in storages]


# ------------------------------------------------------------------------------------------------
# torch.distributed: DTensor and FSDP2 (`fully_shard`)

# A DTensor's local shard, the plain tensor this rank stores.
local_tensor = operator.attrgetter("_local_tensor")


def set_local_tensor(dtensor, local):
    """Make plain tensor `local` the local shard of DTensor `dtensor`."""
    dtensor._local_tensor = local


def fsdp_padded_shard(fsdp_param):
    """FSDP2's own 1-D copy of a parameter's shard, padded to the largest rank's: the input of
    its all-gather, of which the DTensor's local tensor is a view."""
    return fsdp_param._sharded_param_data


def set_fsdp_padded_shard(fsdp_param, padded):
    """Make `padded` the buffer FSDP2's all-gather reads for `fsdp_param`."""
    fsdp_param._sharded_param_data = padded


def live_fsdp_params():
    """Every FSDPParam of every live FSDP2 module, or None where this torch's FSDP2 internals
    are not the ones read here."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return None
    found = []
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older torch: one group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            found.extend(group.fsdp_params)
    return found


def shard_shape_at_origin(p):
    """The local shape of DTensor `p`'s shard at mesh coordinate 0, computed without
    communication; raises NotImplementedError where this torch lacks the helper."""
    try:
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    except ImportError:
        raise NotImplementedError(
            "FusedAdam: 8-bit moments of a DTensor parameter that FSDP2 does not manage need "
            "torch.distributed.tensor._utils._compute_local_shape_and_global_offset, which "
            "this torch version lacks") from None
    shape, _ = _compute_local_shape_and_global_offset(
        p.shape, p.device_mesh.shape, [0] * p.device_mesh.ndim, p.placements, skip_offset=True)
    return shape
