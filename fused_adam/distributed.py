"""Everything fused_adam reads or writes of torch.distributed's tensors, in one place.

DTensor parameters (FSDP2's `fully_shard`, tensor parallelism) are packed by their local shard;
FSDP2's own padded copy of each shard (its all-gather input) is found and re-pointed at the same
segment.

The torch internals this needs that are not public API (FSDP2's module-state registry and padded
shard, a DTensor's local tensor) are read and written through `fused_adam.torch_internals`;
where they are missing the callers refuse DTensor parameters with a clear error rather than
risk stale values.
"""
import torch

from fused_adam.torch_internals import (
    fsdp_padded_shard, live_fsdp_params, local_tensor, set_fsdp_padded_shard, set_local_tensor,
    shard_shape_at_origin,
)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: no parameter is a DTensor
    DTensor = ()


def is_dtensor(tensor):
    return isinstance(tensor, DTensor)


def local_shard(tensor):
    """A DTensor's local shard (what this rank stores and steps); any other tensor as it is."""
    return local_tensor(tensor) if isinstance(tensor, DTensor) else tensor


def local_grad_of(p):
    grad = p.grad
    return local_tensor(grad) if isinstance(grad, DTensor) else grad


def shard_groups(p):
    """The process groups of the mesh dimensions DTensor `p`'s gradient (`p`, without one) is
    sharded on, in mesh order (the same on every rank: collectives over them must be issued in
    one order); () for a tensor. The local shards' p-th powers add up over these groups.

    Placements, as torch 2.13's FSDP2 makes them (`FSDPParam._init_sharding_spec`; the
    gradient gets the parameter's spec, `to_sharded_dtensor`): FSDP `(Shard(d),)` (d = 0 unless
    `shard_placement_fn` says otherwise), HSDP `(Replicate(), Shard(d))` on a (replicate,
    shard) mesh, whose replicate dim holds copies and is rightly left out, and FSDP over tensor
    parallelism on the same dim `(_StridedShard(d), Shard(d))`. `_StridedShard` is not
    `is_shard()` in torch 2.13, hence "not replicated". A Partial gradient's local values are
    not its shard: their powers do not add up to the norm, so it is refused."""
    if not isinstance(p, DTensor):
        return ()
    placed = p.grad if isinstance(p.grad, DTensor) else p
    if any(placement.is_partial() for placement in placed.placements):
        raise NotImplementedError(
            f"FusedAdam.clip_grad_norm: a gradient placed {placed.placements} (Partial); "
            "clip with torch.nn.utils.clip_grad_norm_ instead")
    mesh = placed.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(placed.placements)
                 if not placement.is_replicate())


def collective_device(group):
    """A device `group`'s collectives take tensors on: the host where its backend includes
    gloo, else the current accelerator (NCCL and its kin take device tensors only). For a rank
    that has nothing to reduce (a ZeRO rank whose partition is empty) but must still join."""
    backend = str(torch.distributed.get_backend(group))
    accelerator = getattr(torch, "accelerator", None)
    if "gloo" in backend or accelerator is None or not accelerator.is_available():
        return torch.device("cpu")
    return torch.device(accelerator.current_accelerator().type,
                        accelerator.current_device_index())


def local_data_ptr(p):
    return local_shard(p).data_ptr()


def same_start(a, b):
    """Whether `a` and `b` start at one place in one storage (data_ptr() is 0 when empty)."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() * a.element_size() == b.storage_offset() * b.element_size())


def _fsdp_params_by_id():
    """{id(sharded parameter): FSDPParam} over every live FSDP2 (`fully_shard`) module, or None
    where this torch's FSDP2 internals are not the ones read here.

    FSDP2 keeps each parameter's shard twice over: the DTensor's local tensor and, as a 1-D
    buffer padded to the largest rank's shard, `FSDPParam._sharded_param_data`, which its
    all-gather reads. The local tensor is a view of that buffer; the arena must re-point both,
    or the next forward would gather the values from before the step."""
    fsdp_params = live_fsdp_params()
    if fsdp_params is None:
        return None
    return {id(fsdp_param.sharded_param): fsdp_param for fsdp_param in fsdp_params}


def fsdp_params_of(params):
    """Each parameter's FSDPParam (None for one FSDP2 does not manage), after checking every
    DTensor among them can be packed by its local shard; None when no parameter is a DTensor."""
    if not any(isinstance(p, DTensor) for p in params):
        return None
    by_id = _fsdp_params_by_id()
    if by_id is None:
        raise NotImplementedError(
            "FusedAdam: DTensor parameters need FSDP2's FSDPParam, which this torch version "
            "does not expose where FusedAdam looks for it")
    found = [by_id.get(id(p)) if isinstance(p, DTensor) else None for p in params]
    for index, (p, fsdp_param) in enumerate(zip(params, found)):
        if not isinstance(p, DTensor):
            continue
        local = local_shard(p)
        if type(local) is not torch.Tensor:
            raise NotImplementedError(
                f"FusedAdam: DTensor parameter {index} has a local tensor of type "
                f"{type(local).__name__}; only plain local shards can be packed")
        if fsdp_param is not None and (
                getattr(fsdp_param, "offload_to_cpu", False)
                or not same_start(fsdp_padded_shard(fsdp_param), local)):
            # CPU offload and all-gather extensions keep the shard elsewhere; packing only
            # the local tensor would leave FSDP gathering stale values.
            raise NotImplementedError(
                f"FusedAdam: FSDP2 parameter {index} keeps its shard apart from its local "
                "tensor (CPU offload or an all-gather extension), which FusedAdam cannot pack")
    return found


def padded_shard_length(fsdp_param, length):
    """Elements a segment reserves for a parameter: FSDP2's padded shard, or its own length."""
    return length if fsdp_param is None else max(length, fsdp_padded_shard(fsdp_param).numel())


def largest_shard_length(p, fsdp_param, length):
    """The most elements any rank's local shard of parameter `p` holds, computed alike on every
    rank without communication (`length`, this rank's, for a tensor): FSDP2's padded shard, the
    size every rank's all-gather input has; else the shard of mesh coordinate 0, the largest
    where shards are cut as torch.chunk cuts them (Shard placements)."""
    if not isinstance(p, DTensor):
        return length
    if fsdp_param is not None:
        return padded_shard_length(fsdp_param, length)
    shape = shard_shape_at_origin(p)
    numel = 1
    for size in shape:
        numel *= size
    return max(length, numel * (2 if p.is_complex() else 1))


def point_param_at(p, local, fsdp_param=None, padded=None):
    """Make parameter `p` (its local shard, for a DTensor) the arena tensor `local`; FSDP2's
    padded shard becomes `padded`, the 1-D arena tensor `local` is a prefix of."""
    if isinstance(p, DTensor):
        set_local_tensor(p, local)
        if fsdp_param is not None:
            set_fsdp_padded_shard(fsdp_param, padded)
    else:
        p.data = local


def like_param(p, local):
    """A state tensor for parameter `p` over the arena tensor `local`: a DTensor placed as `p`
    for a DTensor parameter (as torch's Adam keeps its state, and as
    torch.distributed.checkpoint saves and loads it in shards), else `local` itself."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def blocks_like_param(p, local, blocks_per_shard):
    """A per-block state tensor (8-bit moments' absmax) for parameter `p` over the arena tensor
    `local`: `local` itself for a plain parameter; for a DTensor parameter, whose blocks start
    at its local shard's start, a 1-D DTensor of every shard's blocks, each shard's padded with
    zeros to `blocks_per_shard` (the largest shard's count, the same on every rank) and sharded
    with Shard(0) over every mesh dim the parameter is sharded on (Replicate over the others).

    Evenly sharded so that torch.distributed.checkpoint, which places a shard where torch.chunk
    would cut it, saves each rank's blocks at their own offset and loads them back there (a
    plain tensor would be taken as replicated: one rank's values saved, loaded on all)."""
    if not isinstance(p, DTensor):
        return local
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    placements = [Replicate() if placement.is_replicate() else Shard(0)
                  for placement in p.placements]
    shards = 1
    for dim, placement in enumerate(placements):
        if not placement.is_replicate():
            shards *= mesh.size(dim)
    return DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=(shards * blocks_per_shard,), stride=(1,))


def is_sharded(tensor):
    """Whether DTensor `tensor` is split over some mesh dim (not merely replicated)."""
    return isinstance(tensor, DTensor) and not all(
        placement.is_replicate() for placement in tensor.placements)


def as_local_value(value, like):
    """A checkpoint's value for the local tensor of `like` (a state tensor of ours): a DTensor
    value is brought to `like`'s placements (or gathered whole for a plain tensor)."""
    if isinstance(value, DTensor):
        if isinstance(like, DTensor):
            return value.redistribute(like.device_mesh, like.placements).to_local()
        return value.full_tensor()
    return value
