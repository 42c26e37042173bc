"""The flat arena: the parameters of one (device, dtype), packed into one padded 1-D buffer, with
their Adam states in buffers of the same layout beside it.

Each parameter is a *segment*: its values are copied in once and `p.data` becomes a tensor over
its segment (the Megatron-LM / DeepSpeed ZeRO approach), so a kernel updates every parameter in
one pass and no second copy of the parameters exists. Every parameter and state tensor handed out
owns a storage of just its segment (see `fused_adam.flat_buffer`), so that libraries that
reason about storages (safetensors, accelerate, `torch.save`) see separate tensors.

An arena's membership is fixed: when the optimizer's param groups change, it builds a new arena
and imports the state into it. Complex parameters are stepped as their real view (as torch's
Adam does): a complex64 parameter is a segment of twice its numel in the float32 arena.
Gradients are not packed: see `fused_adam.grads`. Beside the arena, `fused_adam.state_entries`
keeps torch's state entries over it (which segments have one; import, checks, writing) and
`fused_adam.former_memory` the memory a parameter had before the arena took it.
"""
import numpy as np
import torch

from fused_adam.aliasing import first_shared
from fused_adam.distributed import (
    blocks_like_param, fsdp_params_of, is_dtensor, largest_shard_length, like_param,
    local_data_ptr, local_shard, padded_shard_length, point_param_at,
)
from fused_adam.flat_buffer import FlatBuffer
from fused_adam.former_memory import FormerMemory
from fused_adam.kernels import codecs
from fused_adam.kernels.contract import (
    COMPACT_MASTERS, EXP_AVG_CODES, EXP_AVG_SQ_CODES, MASTER_DTYPES, QUANT_BLOCK,
    QUANTIZED_STATE_DTYPE, SEGMENT_ALIGNMENT, ArenaRecord,
)
from fused_adam.torch_internals import has_internal_overlap

# The state keys torch's Adam keeps per parameter, in its order.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
MAX_KEY = "max_exp_avg_sq"
MASTER_KEY = "master_param"  # ours: the fp32 master copy of a bf16/fp16 parameter
REMAINDER_KEY = "master_remainder"  # ours: a bf16 parameter's compact master (bf16+8, bf16+16)
# Ours, with 8-bit moments: each moment's per-block absmax (see `kernels/contract.py`).
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}


def real_dtype(dtype):
    """The dtype an arena steps a parameter of `dtype` in (complex params as their real view)."""
    return dtype.to_real() if dtype.is_complex else dtype


def check_steppable(p):
    """Refuse, before anything changes, a parameter an arena cannot step as torch would."""
    if p.dtype == torch.complex32:
        raise ValueError("FusedAdam does not support complex32 parameters")
    if not (p.is_floating_point() or p.is_complex()):
        raise ValueError(f"FusedAdam can only optimize floating point parameters, not {p.dtype}")
    if _overlaps_itself(p):
        raise RuntimeError(
            "FusedAdam: unsupported parameter: more than one element of it refers to a single "
            "memory location (an expanded or overlapping tensor, which torch's Adam cannot "
            "step in place either); please clone() it")


def _overlaps_itself(tensor):
    """Whether two elements of `tensor` share memory (expanded, or an overlapping as_strided):
    torch's Adam either refuses to step it in place or updates the shared memory twice. Packed
    into a segment, it would silently become a tensor of distinct elements."""
    verdict = has_internal_overlap(tensor)
    if verdict is not None:
        return verdict
    # Strides sorted ascending, each step past everything the smaller ones reach: no overlap.
    reach = 0
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    span = sum((n - 1) * s for s, n in zip(tensor.stride(), tensor.shape)) + 1
    offsets = torch.arange(span).as_strided(tensor.shape, tensor.stride())
    return offsets.unique().numel() < tensor.numel()


def table_device(device):
    """Where segment tables and step counts live: beside the buffers on CPU and CUDA (the
    kernels read them there), on the host elsewhere (the torch backend reads them)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def flat_real(tensor):
    """A tensor's values as a 1-D real tensor (complex as interleaved real and imaginary)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.reshape(-1)


def _reserved_lengths(params, fsdp_params, lengths, quantized):
    """Elements each parameter's segment reserves: its `lengths`, and for an FSDP2 shard room
    for FSDP's padding (zeros the kernel never touches) and, with 8-bit moments, for the largest
    rank's blocks (a DTensor parameter's absmax is padded to as many blocks on every rank: see
    `blocks_like_param`)."""
    if fsdp_params is None:
        return lengths
    if quantized:
        return np.array([largest_shard_length(p, f, n) for p, f, n in
                         zip(params, fsdp_params, lengths)], dtype=np.int64)
    return np.array([padded_shard_length(f, n) for f, n in zip(fsdp_params, lengths)],
                    dtype=np.int64)


class Arena:
    """Params of one (device, real dtype) as segments of flat buffers, their states beside them.

    `members` is [(param, group index, position in that group)], each param once. The arena
    owns its buffers and tables; `record` is what a kernel reads of them, `view(name, index)`
    a tensor over one segment shaped as its parameter.
    """

    def __init__(self, device, dtype, members, *, state_dtype=None, master_weights=False):
        self.device, self.dtype = torch.device(device), dtype
        self.has_master = bool(master_weights) and dtype in MASTER_DTYPES
        # A compact master's remainder dtype (bf16 params only; the optimizer refuses others).
        self.remainder_dtype = (COMPACT_MASTERS.get(master_weights)
                                if self.has_master and isinstance(master_weights, str) else None)
        if dtype == torch.float64 or state_dtype is None:
            state_dtype = torch.float32 if self.has_master else dtype
        self.state_dtype = state_dtype
        # 8-bit moments: blocks of QUANT_BLOCK start at every segment's start.
        self.quantized = state_dtype == QUANTIZED_STATE_DTYPE
        alignment = QUANT_BLOCK if self.quantized else SEGMENT_ALIGNMENT
        self.members = list(members)
        self.params_in_order = [p for p, _, _ in members]
        self.host_groups = np.array([group for _, group, _ in members], dtype=np.int64)
        self.groups = sorted(set(self.host_groups.tolist()))  # param groups with segments here
        self._positions = [position for _, _, position in members]
        locals_ = [local_shard(p) for p in self.params_in_order]
        self.shapes = [local.shape for local in locals_]
        self.is_complex = np.array([local.is_complex() for local in locals_], dtype=bool)
        self.lengths = np.array([local.numel() for local in locals_], dtype=np.int64)
        self.lengths[self.is_complex] *= 2
        self.fsdp_params = fsdp_params_of(self.params_in_order)
        self.is_distributed = self.fsdp_params is not None
        self._reserved = _reserved_lengths(self.params_in_order, self.fsdp_params,
                                           self.lengths, self.quantized)
        aligned = -(-self._reserved // alignment) * alignment
        self.starts = np.cumsum(aligned) - aligned
        size = int(aligned.sum())

        if self.quantized:
            self._buffers = {"exp_avg": FlatBuffer(size, EXP_AVG_CODES, self.device),
                             "exp_avg_sq": FlatBuffer(size, EXP_AVG_SQ_CODES, self.device)}
            for name in ABSMAX_KEYS.values():
                self._buffers[name] = FlatBuffer(size // QUANT_BLOCK, torch.float32, self.device)
        else:
            self._buffers = {name: FlatBuffer(size, state_dtype, self.device)
                             for name in MOMENT_KEYS}
        self._buffers["param"] = FlatBuffer(size, dtype, self.device)
        if self.remainder_dtype is not None:  # zeros: the params are exact masters
            self._buffers[REMAINDER_KEY] = FlatBuffer(size, self.remainder_dtype, self.device)
        elif self.has_master:
            self._buffers[MASTER_KEY] = FlatBuffer(size, torch.float32, self.device)
        tables = table_device(self.device)
        self._steps = FlatBuffer(len(self), torch.float32, tables)
        as_table = dict(dtype=torch.int64, device=tables)
        self._tables = dict(
            segment_starts=torch.as_tensor(self.starts).to(**as_table),
            segment_lengths=torch.as_tensor(self.lengths).to(**as_table),
            segment_groups=torch.as_tensor(self.host_groups).to(**as_table))
        for index, local in enumerate(locals_):
            self._copy_in(index, local)
        self._views = {}
        self.record = self._make_record()
        self.former_memory = FormerMemory(self)
        self.former_memory.remember(range(len(self)), locals_)
        self._param_address = local_data_ptr if self.is_distributed else torch.Tensor.data_ptr
        self.point_params(range(len(self)))

    def __len__(self):
        return len(self.params_in_order)

    def describe(self, index):
        """Parameter `index` as a user knows it."""
        return (f"parameter {self._positions[index]} of param group {self.host_groups[index]} "
                f"(shape {tuple(self.shapes[index])})")

    # ----------------------------------------------------------------------------------------
    # Buffers and views

    def _make_record(self):
        maximum = self._buffers.get(MAX_KEY)
        master = self._buffers.get(MASTER_KEY)
        remainder = self._buffers.get(REMAINDER_KEY)
        return ArenaRecord(
            params=self._buffers["param"].tensor, exp_avg=self._buffers["exp_avg"].tensor,
            exp_avg_sq=self._buffers["exp_avg_sq"].tensor, steps=self._steps.tensor,
            master_params=None if master is None else master.tensor,
            master_remainder=None if remainder is None else remainder.tensor,
            max_exp_avg_sq=None if maximum is None else maximum.tensor,
            **{name: self._buffers[name].tensor if self.quantized else None
               for name in ABSMAX_KEYS.values()},
            **self._tables)

    def holds(self, name):
        """Whether the arena keeps buffer `name` (a state key, or "param")."""
        return name in self._buffers

    def segment(self, name, index, *, padded=False):
        """1-D tensor over segment `index` of buffer `name`, owning a storage of just that (of
        its blocks, for a per-block buffer)."""
        length = self._reserved[index] if padded else self.lengths[index]
        if name in ABSMAX_KEYS.values():
            return self._buffers[name].segment(int(self.starts[index]) // QUANT_BLOCK,
                                               -(-int(length) // QUANT_BLOCK))
        return self._buffers[name].segment(int(self.starts[index]), int(length))

    def _shaped(self, index, flat):
        shape = self.shapes[index]
        if self.is_complex[index]:
            return torch.view_as_complex(flat.view(*shape, 2))
        return flat.view(shape)

    def view(self, name, index):
        """Segment `index` of buffer `name` shaped like its parameter, made once per layout (the
        same tensor each time: the optimizer recognises its own state by identity)."""
        key = (name, index)
        view = self._views.get(key)
        if view is None:
            if name == "step":
                view = self._steps.segment(index, 1).view(())
            elif name in ABSMAX_KEYS.values():
                # One per block, flat whatever the shape; a DTensor's padded to the largest
                # shard's blocks (zeros past this shard's, which no step touches).
                p = self.params_in_order[index]
                if is_dtensor(p):
                    padded = self.segment(name, index, padded=True)
                    view = blocks_like_param(p, padded, padded.numel())
                else:
                    view = self.segment(name, index)
            else:
                view = self._shaped(index, self.segment(name, index))
                if name != "param":
                    view = like_param(self.params_in_order[index], view)
            self._views[key] = view
        return view

    def ensure_max_buffer(self):
        """Allocate max_exp_avg_sq (zeros) for the whole arena, once some group asks for it.
        The record is checked as well as the buffers: a call interrupted between the two
        statements is completed by the next."""
        if self.record.max_exp_avg_sq is None:
            if MAX_KEY not in self._buffers:
                size = self._buffers["param"].tensor.numel()
                self._buffers[MAX_KEY] = FlatBuffer(size, self.state_dtype, self.device)
            self.record = self._make_record()

    # ----------------------------------------------------------------------------------------
    # Parameters

    def point_params(self, indices):
        """Make each parameter in `indices` (its local shard) a tensor over its segment."""
        for index in indices:
            p = self.params_in_order[index]
            fsdp_param = self.fsdp_params[index] if self.is_distributed else None
            if fsdp_param is None:
                point_param_at(p, self.view("param", index))
            else:
                # FSDP's padded shard, the all-gather's input: the segment plus its padding,
                # with the local shard a view of it, as FSDP2 keeps them.
                padded = self.segment("param", index, padded=True)
                local = self._shaped(index, padded[:int(self.lengths[index])])
                point_param_at(p, local, fsdp_param, padded)
        self.expected_param_addresses = self._param_addresses()

    def _param_addresses(self):
        return np.fromiter(map(self._param_address, self.params_in_order), np.int64, len(self))

    def adopt_moved_params(self):
        """Take back parameters whose storage was replaced (`p.data = ...`,
        `model.load_state_dict(assign=True)`): copy their new values into their segments.

        A parameter that left the arena would otherwise silently stop being updated. One of
        another device, dtype or size is refused: the caller built the optimizer too early.
        """
        addresses = self._param_addresses()
        if np.array_equal(addresses, self.expected_param_addresses):
            return
        moved = np.flatnonzero(addresses != self.expected_param_addresses)
        for index in moved:
            p = self.params_in_order[index]
            local = local_shard(p)
            if (p.device != self.device or real_dtype(p.dtype) != self.dtype
                    or local.shape != self.shapes[index]):
                raise RuntimeError(
                    f"FusedAdam: {self.describe(index)} of the {self.dtype} arena on "
                    f"{self.device} was replaced by a tensor of {p.dtype}, shape "
                    f"{tuple(p.shape)} on {p.device}; create the optimizer after moving or "
                    "converting the model")
        shared = first_shared([local_shard(p) for p in self.params_in_order])
        if shared is not None:
            # `b.data = a.data`: torch would step the memory once for each; a segment each
            # would untie them.
            index, other = shared[::-1] if shared[1] in moved else shared
            raise RuntimeError(
                f"FusedAdam: {self.describe(index)} of the {self.dtype} arena on {self.device} "
                f"was replaced by a tensor that shares memory with {self.describe(other)}; tie "
                "weights by using one Parameter in both places")
        locals_ = [local_shard(self.params_in_order[index]) for index in moved]
        for index, local in zip(moved, locals_):
            self._copy_in(index, local)
        self.former_memory.remember(moved, locals_)
        self.point_params(moved)

    def _copy_in(self, index, local):
        """A parameter's values (and its master copy) into segment `index`. No temporary
        outlives this call: `FormerMemory.remember` counts who holds the parameter's memory."""
        values = flat_real(local.detach())
        self.segment("param", index).copy_(values)
        self.master_from_params(index)

    def master_from_params(self, index):
        """Segment `index`'s master (where there is one) as its params hold it."""
        if self.remainder_dtype is not None:
            self.segment(REMAINDER_KEY, index).zero_()
        elif self.has_master:
            self.segment(MASTER_KEY, index).copy_(self.segment("param", index))

    def forget_views(self):
        """Drop the tensors this arena handed out and keeps for recognising them (before a new
        arena takes its params: they would count as other holders of the params' memory)."""
        self._views.clear()

    def release(self, index):
        """Give parameter `index` memory of its own (it leaves the optimizer): it keeps its
        values, and the arena's buffers are not kept alive by it."""
        p = self.params_in_order[index]
        if not is_dtensor(p):
            p.data = p.data.clone()

    def master_value(self, index):
        """A copy of segment `index`'s master, shaped as its parameter: the fp32 copy, the
        params joined with a compact master's remainder, or (no master) the params."""
        params = self.segment("param", index)
        if self.remainder_dtype is not None:
            flat = codecs.join_master(params, self.segment(REMAINDER_KEY, index))
        elif self.has_master:
            flat = self.segment(MASTER_KEY, index).clone()
        else:
            flat = params.clone()
        return like_param(self.params_in_order[index], self._shaped(index, flat))

    def owns(self, index, name, value):
        """Whether `value` is this arena's own tensor for `name` of segment `index`."""
        return self._views.get((name, index)) is value
