"""What the arena needs to know about torch.distributed's tensors: DTensor parameters (FSDP2's
`fully_shard`, tensor parallelism) are packed by their local shard, FSDP2's own padded copy of
each shard is found so that the arena can re-point it, and memory that another owner (a ZeRO
bucket) also holds is recognised so that updates can be written back to it.

Two of these read torch internals that are not public API (FSDP2's module-state registry and
`FSDPParam._sharded_param_data`, `torch._C._storage_Use_Count`); where they are missing the
callers refuse DTensor parameters with a clear error rather than risk stale values.
"""
import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: no parameter is a DTensor
    DTensor = ()


def local_shard(tensor):
    """A DTensor's local shard (what this rank stores and steps); any other tensor as it is."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def local_grad_of(p):
    grad = p.grad
    return grad._local_tensor if isinstance(grad, DTensor) else grad


def local_data_ptr(p):
    return local_shard(p).data_ptr()


def same_start(a, b):
    """Whether `a` and `b` start at one place in one storage (data_ptr() is 0 when empty)."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() * a.element_size() == b.storage_offset() * b.element_size())


storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def held_elsewhere(tensor):
    """Whether another tensor than `tensor` holds its memory (someone's flat buffer): `tensor`
    is a slice of a larger buffer still in use, or is contiguous and shares its storage (a
    flat buffer of exactly one parameter). A same-size tensor laid out differently is taken for
    a new value."""
    storage = tensor.untyped_storage()
    # Held by `tensor` and by `storage` here: 2 when nobody else holds it.
    shared = storage_use_count is None or storage_use_count(storage._cdata) > 2
    if storage.nbytes() > tensor.numel() * tensor.element_size():
        return shared
    return storage_use_count is not None and tensor.is_contiguous() and shared


def fsdp_params_by_id():
    """{id(sharded parameter): FSDPParam} over every live FSDP2 (`fully_shard`) module, or None
    where this torch's FSDP2 internals are not the ones read here.

    FSDP2 keeps each parameter's shard twice over: the DTensor's local tensor and, as a 1-D
    buffer padded to the largest rank's shard, `FSDPParam._sharded_param_data`, which its
    all-gather reads. The local tensor is a view of that buffer; the arena must re-point both,
    or the next forward would gather the values from before the step."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return None
    found = {}
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older torch: one group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


def copy_into(view, value):
    """`view.copy_(value)` for a state or parameter view of the arena (a DTensor over one for a
    DTensor parameter) from a checkpoint's value: a DTensor value is brought to the view's
    placements and its local shard copied."""
    if isinstance(value, DTensor):
        value = (value.redistribute(view.device_mesh, view.placements).to_local()
                 if isinstance(view, DTensor) else value.full_tensor())
    target = local_shard(view)
    target.copy_(value.reshape(target.shape))
