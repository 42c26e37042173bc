"""The flat arena: the parameters of one (device, dtype), packed into one padded 1-D buffer, with
their Adam states in buffers of the same layout beside it.

Each parameter is a *segment*: its values are copied in once and `p.data` becomes a tensor over
its segment (the Megatron-LM / DeepSpeed ZeRO approach), so a kernel updates every parameter in
one pass and no second copy of the parameters exists. Every parameter and state tensor handed out
owns a storage of just its segment (see `fused_adam.storage`), so that libraries that reason
about storages (safetensors, accelerate, `torch.save`) see separate tensors.

An arena's membership is fixed: when the optimizer's param groups change, it builds a new arena
and imports the state into it. Complex parameters are stepped as their real view (as torch's
Adam does): a complex64 parameter is a segment of twice its numel in the float32 arena.
Gradients are not packed: see `fused_adam.grads`.
"""
import numpy as np
import torch

from fused_adam.aliasing import first_shared
from fused_adam.distributed import (
    as_local_value, blocks_like_param, fsdp_params_of, held_by_others, is_dtensor, is_sharded,
    largest_shard_length, like_param, local_data_ptr, local_shard, padded_shard_length,
    point_param_at,
)
from fused_adam.kernels.contract import (
    COMPACT_MASTERS, EXP_AVG_CODES, EXP_AVG_SQ_CODES, MASTER_DTYPES, QUANT_BLOCK,
    QUANTIZED_STATE_DTYPE, SEGMENT_ALIGNMENT, ArenaRecord,
)
from fused_adam.kernels import codecs
from fused_adam.storage import FlatBuffer

# The state keys torch's Adam keeps per parameter, in its order.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
MAX_KEY = "max_exp_avg_sq"
MASTER_KEY = "master_param"  # ours: the fp32 master copy of a bf16/fp16 parameter
REMAINDER_KEY = "master_remainder"  # ours: a bf16 parameter's compact master (bf16+8, bf16+16)
# Ours, with 8-bit moments: each moment's per-block absmax (see `kernels/contract.py`).
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
# What a parameter's state must hold once it has any (torch's Adam raises KeyError without it).
_REQUIRED_KEYS = ("step", *MOMENT_KEYS)


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
    verdict = torch._debug_has_internal_overlap(tensor)  # 0: no, 1: yes, 2: too hard to tell
    if verdict != 2:
        return verdict == 1
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


def _carried_by_torch(name, value):
    """Whether `value`, a checkpoint's `master_param` or `master_remainder`, came through
    torch's Adam, which casts every state tensor to its param's dtype and carries what it does
    not use unchanged through its steps: a bf16/fp16 `master_param` or a floating-point
    `master_remainder` (ours are fp32, and int16 or int8), stale since torch stepped."""
    if not torch.is_tensor(value):
        return False
    return value.dtype in MASTER_DTYPES if name == MASTER_KEY else value.is_floating_point()


def table_device(device):
    """Where segment tables and step counts live: beside the buffers on CPU and CUDA (the
    kernels read them there), on the host elsewhere (the torch backend reads them)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _flat_real(tensor):
    """A tensor's values as a 1-D real tensor (complex as interleaved real and imaginary)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.reshape(-1)


class Arena:
    """Params of one (device, real dtype) as segments of flat buffers, their states beside them.

    `members` is [(param, group index, position in that group)], each param once. The arena
    owns its buffers and tables; `record` is what a kernel reads of them.
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
        # An FSDP2 shard's segment has room for FSDP's padding (zeros the kernel never touches).
        self._reserved = self.lengths
        if self.is_distributed:
            self._reserved = np.array([padded_shard_length(f, n) for f, n in
                                       zip(self.fsdp_params, self.lengths)], dtype=np.int64)
            if self.quantized:
                # ... and, with 8-bit moments, for the largest rank's blocks: a DTensor
                # parameter's absmax is padded to as many blocks on every rank (see
                # `blocks_like_param`).
                self._reserved = np.array(
                    [largest_shard_length(p, f, n) for p, f, n in
                     zip(self.params_in_order, self.fsdp_params, self.lengths)], dtype=np.int64)
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
        self.has_state = np.zeros(len(self), dtype=bool)  # torch's `state[p]` exists
        self.has_max = np.zeros(len(self), dtype=bool)  # ... and has max_exp_avg_sq
        self._views = {}
        self.record = self._make_record()
        # Segment index -> memory that another owner also holds, which the parameter had
        # before the arena took it (see `_remember_homes`).
        self._homes = {}
        self._remember_homes(range(len(self)), locals_)
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

    def _segment(self, name, index, *, padded=False):
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

    def _view(self, name, index):
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
                    padded = self._segment(name, index, padded=True)
                    view = blocks_like_param(p, padded, padded.numel())
                else:
                    view = self._segment(name, index)
            else:
                view = self._shaped(index, self._segment(name, index))
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
                point_param_at(p, self._view("param", index))
            else:
                # FSDP's padded shard, the all-gather's input: the segment plus its padding,
                # with the local shard a view of it, as FSDP2 keeps them.
                padded = self._segment("param", index, padded=True)
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
        self._remember_homes(moved, locals_)
        self.point_params(moved)

    def _copy_in(self, index, local):
        """A parameter's values (and its master copy) into segment `index`. No temporary
        outlives this call: `_remember_homes` counts who holds the parameter's memory."""
        values = _flat_real(local.detach())
        self._segment("param", index).copy_(values)
        self._master_from_params(index)

    def _master_from_params(self, index):
        """Segment `index`'s master (where there is one) as its params hold it."""
        if self.remainder_dtype is not None:
            self._segment(REMAINDER_KEY, index).zero_()
        elif self.has_master:
            self._segment(MASTER_KEY, index).copy_(self._segment("param", index))

    def _remember_homes(self, indices, locals_):
        """Keep, for write-back, the memory of each parameter in `indices` (as `locals_` has it,
        before the arena takes it over) that something else also holds: torch's in-place step
        would leave the new values there for it to read. Examples: ZeroRedundancyOptimizer(
        parameters_as_bucket_view=True), which moves params into its buckets and broadcasts
        those; a module whose own Parameter shares the memory of a tensor given to the
        optimizer. FSDP2's shard buffer needs none: the arena re-points it."""
        for index, local, held in zip(indices, locals_, held_by_others(locals_)):
            fsdp_managed = self.is_distributed and self.fsdp_params[index] is not None
            if held and not fsdp_managed:
                self._homes[index] = local.detach()
            else:
                self._homes.pop(index, None)

    def write_back(self):
        """After a step, copy each parameter whose memory another owner also holds back there
        (8 bytes per fp32 element: read the arena, write the owner's copy); one whose other
        owner let go is dropped."""
        if not self._homes:
            return
        homes = list(self._homes.items())
        for (index, home), held in zip(homes, held_by_others([home for _, home in homes])):
            if held:
                home.copy_(self._view("param", index))
            else:
                del self._homes[index]

    def former_memory(self):
        """[(param, tensor)]: memory a parameter had before the arena took it, that another
        owner still holds (see `_remember_homes`)."""
        return [(self.params_in_order[index], home) for index, home in self._homes.items()]

    def homes(self):
        """How many parameters are also written back to another owner's memory each step."""
        return len(self._homes)

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

    # ----------------------------------------------------------------------------------------
    # State: torch's per-parameter entries as views of the arena

    def state_entry(self, index, amsgrad):
        """`state[p]` for segment `index`, with torch's keys (and `master_param` when there is a
        master copy): tensors over the arena, DTensors over it for a DTensor parameter."""
        names = ["step", *MOMENT_KEYS]
        if self.quantized:
            names.extend(ABSMAX_KEYS.values())
        if amsgrad:
            self.ensure_max_buffer()
            names.append(MAX_KEY)
        if self.has_master:
            names.append(MASTER_KEY if self.remainder_dtype is None else REMAINDER_KEY)
        return {name: self._view(name, index) for name in names}

    def lacks_master(self, entry):
        """Whether a state entry leaves this arena's master to be taken from the params
        (torch's, one of a FusedAdam without this kind of master, or one whose master torch
        carried: see `_carried_by_torch`)."""
        def holds(name):
            return name in entry and not _carried_by_torch(name, entry[name])

        return self.has_master and not holds(MASTER_KEY) and not (
            self.remainder_dtype is not None and holds(REMAINDER_KEY))

    def master_value(self, index):
        """A copy of segment `index`'s master, shaped as its parameter: the fp32 copy, the
        params joined with a compact master's remainder, or (no master) the params."""
        params = self._segment("param", index)
        if self.remainder_dtype is not None:
            flat = codecs.join_master(params, self._segment(REMAINDER_KEY, index))
        elif self.has_master:
            flat = self._segment(MASTER_KEY, index).clone()
        else:
            flat = params.clone()
        return like_param(self.params_in_order[index], self._shaped(index, flat))

    def owns(self, index, name, value):
        """Whether `value` is this arena's own tensor for `name` of segment `index`."""
        return self._views.get((name, index)) is value

    def plan_import(self, index, entry):
        """[(name, value)] to write into segment `index` for torch's state entry `entry` (a
        checkpoint's, or one a user edited), or None for no state (torch's empty entry
        included); raises, naming the parameter, for an entry torch's Adam could not step
        from or that does not fit."""
        if not entry:
            return None
        missing = [name for name in _REQUIRED_KEYS if name not in entry]
        if missing:
            raise KeyError(f"FusedAdam: the state of {self.describe(index)} has no "
                           f"{missing[0]!r} (torch's Adam needs it to step)")
        planned = []
        for name in (*_REQUIRED_KEYS, MAX_KEY, MASTER_KEY, REMAINDER_KEY,
                     *ABSMAX_KEYS.values()):
            if name not in entry or self.owns(index, name, entry[name]):
                continue
            if name == MASTER_KEY and not self.has_master:
                continue
            if name in (MASTER_KEY, REMAINDER_KEY) and _carried_by_torch(name, entry[name]):
                continue  # stale: the master comes from the params (`lacks_master`)
            if name == REMAINDER_KEY and self.remainder_dtype is None:
                continue  # a compact master's, for an optimizer that keeps another kind
            if name in ABSMAX_KEYS.values() and not self._takes_codes(entry, name):
                continue  # beside float moments (torch's), or in an arena of float moments
            problem = self._value_problem(index, name, entry[name])
            if problem is not None:
                raise ValueError(f"FusedAdam: the state of {self.describe(index)} does not "
                                 f"fit it: {problem}")
            planned.append((name, entry[name]))
        for moment, absmax in ABSMAX_KEYS.items():
            if self._takes_codes(entry, absmax) and absmax not in entry:
                raise ValueError(f"FusedAdam: the state of {self.describe(index)} holds 8-bit "
                                 f"codes in {moment!r} without their {absmax!r}")
        return planned

    def _takes_codes(self, entry, absmax_name):
        """Whether the moment of `absmax_name` in `entry` is 8-bit codes this arena copies
        as they are (else a float moment, which it quantizes, or which it holds as floats)."""
        moment = next(key for key, value in ABSMAX_KEYS.items() if value == absmax_name)
        value = entry.get(moment)
        return (self.quantized and torch.is_tensor(value)
                and not (value.is_floating_point() or value.is_complex()))

    def _value_problem(self, index, name, value):
        """Why `value` cannot be segment `index`'s `name`, or None."""
        if name == "step":
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                return None
            return f"state['step'] is {value!r}, not a number"
        if not torch.is_tensor(value):
            return f"state[{name!r}] is a {type(value).__name__}, not a tensor"
        if name == REMAINDER_KEY and value.dtype != self.remainder_dtype:
            return f"state[{name!r}] is {value.dtype}, not {self.remainder_dtype}"
        if name in ABSMAX_KEYS.values():
            return self._blocks_problem(index, name, value)
        if name in ABSMAX_KEYS and not (value.is_floating_point() or value.is_complex()):
            if not self.quantized:
                return (f"state[{name!r}] holds 8-bit codes ({value.dtype}); this optimizer "
                        "keeps float moments (convert the checkpoint with "
                        "fused_adam.dequantized_state_dict)")
            if value.dtype != self._buffers[name].dtype:
                return f"state[{name!r}] is {value.dtype}, not {self._buffers[name].dtype} codes"
        p = self.params_in_order[index]
        # A DTensor value is redistributed to the parameter's placements; a plain one is this
        # rank's shard (the whole tensor for a plain parameter).
        expected = p if is_dtensor(value) else local_shard(p)
        if value.numel() != expected.numel():
            return (f"state[{name!r}] has shape {tuple(value.shape)}, but the parameter has "
                    f"shape {tuple(expected.shape)}")
        return None

    def _blocks_problem(self, index, name, value):
        """Why `value` cannot be segment `index`'s per-block absmax `name`, or None. Blocks
        start at each shard's start, so a sharded checkpoint's absmax fits only the sharding it
        was saved from: a DTensor value must have our DTensor's shape (as many shards, as many
        blocks each), a plain one this shard's blocks (padded or not)."""
        blocks = -(-int(self.lengths[index]) // QUANT_BLOCK)
        ours = self._view(name, index)
        if is_sharded(value) and not is_dtensor(ours):
            return (f"state[{name!r}] holds the per-shard blocks of a sharded parameter "
                    f"({value.placements}); this parameter is whole")
        if is_dtensor(value):
            if value.shape != ours.shape:
                return (f"state[{name!r}] has {value.numel()} blocks over its shards, this "
                        f"parameter's sharding {ours.numel()} ({ours.placements}): 8-bit "
                        "moments load only into the sharding they were saved from")
            return None
        if value.numel() not in (blocks, local_shard(ours).numel()):
            return f"state[{name!r}] has {value.numel()} blocks, the parameter {blocks}"
        return None

    def write_state(self, index, name, value):
        """Copy `value` (a checkpoint's or a user's) into segment `index`'s `name`."""
        if name == MAX_KEY:
            self.ensure_max_buffer()
        if name == MASTER_KEY and self.remainder_dtype is not None:
            # An fp32 master (ours, or the params): the params become its rounding.
            flat = as_local_value(value, self._view("param", index)).detach().reshape(-1)
            high, remainder = codecs.split_master(flat.to(self.device, torch.float32),
                                                     self.remainder_dtype)
            self._segment("param", index).copy_(high)
            self._segment(REMAINDER_KEY, index).copy_(remainder)
            return
        view = self._view(name, index)
        if name == "step":
            view.fill_(float(value))
            return
        if self.quantized and name in ABSMAX_KEYS and value.is_floating_point():
            # A float moment (torch's checkpoint, a user's edit): quantized on the way in.
            flat = _flat_real(as_local_value(value, view).detach()).to(self.device)
            codes, absmax = codecs.quantize(flat, signed=name == "exp_avg")
            self._segment(name, index).copy_(codes)
            self._segment(ABSMAX_KEYS[name], index).copy_(absmax)
            return
        target = local_shard(view)
        if name in ABSMAX_KEYS.values():  # this shard's blocks, or as many padded
            local = as_local_value(value, view).detach().reshape(-1)
            target[:local.numel()].copy_(local)
            target[local.numel():].zero_()
            return
        target.copy_(as_local_value(value, view).reshape(target.shape))

    def reset_state(self, index):
        """Segment `index` back to torch's state before its first step."""
        for name in (*MOMENT_KEYS, MAX_KEY):
            if name in self._buffers:
                self._segment(name, index).zero_()
        for name in ABSMAX_KEYS.values():
            if name in self._buffers:
                self._segment(name, index, padded=True).zero_()
        self._view("step", index).zero_()
        self._master_from_params(index)
        self.has_state[index] = False
        self.has_max[index] = False
