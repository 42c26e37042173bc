"""The flat arena: the parameters of one (device, dtype), packed into one padded 1-D buffer, with
their Adam states in buffers of the same layout beside it.

Each parameter is a *segment*: its values are copied in once and `p.data` becomes a view into the
arena (the Megatron-LM / DeepSpeed ZeRO approach), so a kernel can update every parameter in one
pass and no second copy of the parameters exists. Gradients are *not* packed: autograd writes a
fresh tensor per parameter after `zero_grad(set_to_none=True)` and packing them would cost a copy
(or a zeroing pass plus an accumulating backward, measured in the README), so each step the arena
collects the address of every gradient wherever it lives and the kernel reads it in place.

Distributed parameters that are DTensors (FSDP2's `fully_shard`, tensor parallelism) are packed
by their local shard: the shard, not the DTensor, becomes the arena view, and FSDP2's padded shard
buffer (what its all-gather reads) is re-pointed at the same segment, so the next forward
gathers the updated values with no copy.
"""
import itertools
import operator

import numpy as np
import torch

from fused_adam.distributed import (
    DTensor, fsdp_params_by_id, held_elsewhere, local_data_ptr, local_grad_of, local_shard,
    same_start, storage_use_count,
)
from fused_adam.kernels import SEGMENT_ALIGNMENT

_grad_of = operator.attrgetter("grad")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous


def _aligned(n):
    return -(-n // SEGMENT_ALIGNMENT) * SEGMENT_ALIGNMENT


def _zeros(size, dtype, device):
    """A zeroed flat buffer. On CPU numpy allocates it: numpy asks Linux for transparent huge
    pages on large arrays and torch's allocator does not, and with 4 KiB pages the TLB misses
    of an Adam pass cost 15-25% of its bandwidth on this project's CPU."""
    if device.type != "cpu" or size == 0:
        return torch.zeros(size, dtype=dtype, device=device)
    element = torch.empty(0, dtype=dtype).element_size()
    raw = np.zeros(size * element, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype)


class Arena:
    """Params of one (device, dtype) as segments of flat buffers, plus per-segment tables.

    The buffer and table attributes are the kernel contract of `fused_adam.kernels`.
    """

    def __init__(self, device, dtype, grad_alignment=16, *, keep_grad_tensors=False,
                 state_dtype=None, master_weights=False):
        """`grad_alignment`: the byte alignment the kernel needs of a gradient's address
        (Triton's 128-bit loads need 16; autograd's allocations have 64, a user's slice of a
        bigger tensor or a DDP bucket view may not). `keep_grad_tensors`: the kernel reads
        gradients as tensors from `grads_by_segment` rather than by address (the torch
        reference backend). `master_weights`: keep an fp32 copy of
        bf16/fp16 params, which the kernel updates and rounds into them. `state_dtype`: the
        dtype of the moments (default: fp32 with master weights, else the params' dtype, as
        torch); fp64 params keep fp64 moments."""
        self.device, self.dtype = torch.device(device), dtype
        self.grad_alignment = grad_alignment
        self.keep_grad_tensors = keep_grad_tensors
        low_precision = dtype in (torch.bfloat16, torch.float16)
        self.has_master = master_weights and low_precision
        if dtype == torch.float64 or state_dtype is None:
            state_dtype = torch.float32 if self.has_master else dtype
        self.state_dtype = state_dtype
        self.params_in_order = []
        self.segment_starts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.segment_lengths = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.segment_groups = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.steps = torch.zeros(0, dtype=torch.float32, device=self.device)
        self.params = _zeros(0, dtype, self.device)
        self.master_params = _zeros(0, torch.float32, self.device) if self.has_master else None
        self.exp_avg = _zeros(0, state_dtype, self.device)
        self.exp_avg_sq = _zeros(0, state_dtype, self.device)
        self.max_exp_avg_sq = None
        self.kernel_cache = {}
        # How many gradients this arena had to copy because they were not readable in place.
        self.grad_copies = 0
        # This step's gradient tensors, by segment (see `gather_grads`), or None.
        self.grads_by_segment = None
        # Host mirrors of per-segment facts the optimizer reads every step.
        self.host_groups = np.zeros(0, dtype=np.int64)
        self.groups = []
        self.has_grad = np.zeros(0, dtype=bool)  # in the last step
        self.has_state = np.zeros(0, dtype=bool)  # torch's `state[p]` exists
        # Device copy of the gradient address table, what it holds, and the pinned buffer a
        # captured CUDA graph copies it from.
        self._device_addresses = self._uploaded_addresses = self._capture_addresses = None
        self._captured = False
        self._host_starts = np.zeros(0, dtype=np.int64)
        self._host_lengths = np.zeros(0, dtype=np.int64)
        self._expected_param_addresses = np.zeros(0, dtype=np.int64)
        # DTensor parameters (set on the first one): their FSDPParam or None, per segment.
        self._fsdp_params = []
        self._grad_of, self._param_address = _grad_of, _data_ptr
        # Segment index -> memory another owner also holds that its parameter was re-pointed
        # into before the arena took it back (see `check_params_in_place`).
        self._homes = {}

    def __len__(self):
        return len(self.params_in_order)


    # ----------------------------------------------------------------------------------------
    # Layout

    def add(self, params, group_index):
        """Append `params` as new segments of group `group_index`; they become arena views."""
        locals_ = [local_shard(p) for p in params]
        lengths = [local.numel() for local in locals_]
        # An FSDP2 shard's segment has room for FSDP's padding (zeros the kernel never touches).
        reserved = lengths
        fsdp_params = self._distributed(params, locals_)
        if fsdp_params is not None:
            reserved = [n if f is None else max(n, f._sharded_param_data.numel())
                        for n, f in zip(lengths, fsdp_params)]
        starts, end = [], self.params.numel()
        for n in reserved:
            starts.append(end)
            end += _aligned(n)
        old_size = self.params.numel()
        # Existing segments keep their offsets, so old buffers copy over as one prefix.
        self.params = self._grown(self.params, end, old_size)
        self.exp_avg = self._grown(self.exp_avg, end, old_size)
        self.exp_avg_sq = self._grown(self.exp_avg_sq, end, old_size)
        if self.max_exp_avg_sq is not None:
            self.max_exp_avg_sq = self._grown(self.max_exp_avg_sq, end, old_size)
        if self.has_master:
            self.master_params = self._grown(self.master_params, end, old_size)
        for local, start, n in zip(locals_, starts, lengths):
            self.params[start:start + n].copy_(local.detach().reshape(-1))
            if self.has_master:
                self.master_params[start:start + n].copy_(local.detach().reshape(-1))

        self.params_in_order += list(params)
        self._host_starts = np.concatenate([self._host_starts, np.asarray(starts, dtype=np.int64)])
        self._host_lengths = np.concatenate([self._host_lengths, np.asarray(lengths, dtype=np.int64)])
        new = dict(dtype=torch.int64, device=self.device)
        self.segment_starts = torch.as_tensor(self._host_starts).to(**new)
        self.segment_lengths = torch.as_tensor(self._host_lengths).to(**new)
        self.host_groups = np.concatenate([self.host_groups, np.full(len(params), group_index)])
        self.groups = sorted(set(self.host_groups.tolist()))  # param groups with segments here
        self.segment_groups = torch.as_tensor(self.host_groups).to(**new)
        self.has_grad = np.concatenate([self.has_grad, np.zeros(len(params), dtype=bool)])
        self.has_state = np.concatenate([self.has_state, np.zeros(len(params), dtype=bool)])
        self.steps = torch.cat([self.steps, self.steps.new_zeros(len(params))])
        self._relayout()

    def _distributed(self, params, locals_):
        """For DTensor parameters: check they can be packed, switch this arena to reading local
        shards, and return each one's FSDPParam (None for a DTensor FSDP2 does not manage).
        None when no parameter is a DTensor."""
        if not any(isinstance(p, DTensor) for p in params) and not self._fsdp_params:
            return None
        self._grad_of, self._param_address = local_grad_of, local_data_ptr
        self._fsdp_params += [None] * (len(self) - len(self._fsdp_params))
        by_id = fsdp_params_by_id() if any(isinstance(p, DTensor) for p in params) else {}
        if by_id is None:
            raise NotImplementedError(
                "FusedAdam: DTensor parameters need FSDP2's FSDPParam, which this torch version "
                "does not expose where FusedAdam looks for it")
        found = [by_id.get(id(p)) for p in params]
        for index, (p, local, fsdp_param) in enumerate(zip(params, locals_, found)):
            if isinstance(p, DTensor) and type(local) is not torch.Tensor:
                raise NotImplementedError(
                    f"FusedAdam: DTensor parameter {index} has a local tensor of type "
                    f"{type(local).__name__}; only plain local shards can be packed")
            if fsdp_param is not None and (
                    getattr(fsdp_param, "offload_to_cpu", False)
                    or not same_start(fsdp_param._sharded_param_data, local)):
                # CPU offload and all-gather extensions keep the shard elsewhere; packing only
                # the local tensor would leave FSDP gathering stale values.
                raise NotImplementedError(
                    f"FusedAdam: FSDP2 parameter {index} keeps its shard apart from its local "
                    "tensor (CPU offload or an all-gather extension), which FusedAdam cannot "
                    "pack")
        self._fsdp_params += found
        return found

    def _grown(self, buffer, size, old_size):
        grown = _zeros(size, buffer.dtype, self.device)
        grown[:old_size].copy_(buffer)
        return grown

    def _relayout(self):
        """Point every parameter at its segment of the current buffers."""
        for index, p in enumerate(self.params_in_order):
            if not isinstance(p, DTensor):
                p.data = self.segment_view(self.params, index)
                continue
            p._local_tensor = self.segment_view(self.params, index)
            fsdp_param = self._fsdp_params[index]
            if fsdp_param is not None:
                # FSDP's padded shard, the all-gather's input: the segment plus its padding.
                start = int(self._host_starts[index])
                padded = fsdp_param._sharded_param_data.numel()
                fsdp_param._sharded_param_data = self.params[start:start + padded]
        self._expected_param_addresses = np.fromiter(
            map(self._param_address, self.params_in_order), np.int64, len(self))
        self.kernel_cache.clear()

    def segment_view(self, buffer, index):
        """Segment `index` of `buffer`, shaped like its parameter."""
        start, n = int(self._host_starts[index]), int(self._host_lengths[index])
        return buffer[start:start + n].view(local_shard(self.params_in_order[index]).shape)

    def ensure_max_exp_avg_sq(self):
        if self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = _zeros(self.params.numel(), self.state_dtype, self.device)
            self.kernel_cache.clear()

    def reset_segment(self, index):
        """Segment `index` back to torch's state before its first step."""
        for buffer in (self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq):
            if buffer is not None:
                self.segment_view(buffer, index).zero_()
        self.steps[index] = 0
        if self.has_master:
            self.segment_view(self.master_params, index).copy_(self.segment_view(self.params, index))
        self.has_state[index] = False

    def state_views(self, index, amsgrad):
        """`state[p]` for segment `index`: torch's keys, views into the arena. For a DTensor
        parameter the views are DTensors like it, as torch's Adam keeps them, so that
        torch.distributed.checkpoint saves and loads them as shards."""
        state = {
            "exp_avg": self.segment_view(self.exp_avg, index),
            "exp_avg_sq": self.segment_view(self.exp_avg_sq, index),
        }
        if amsgrad:
            self.ensure_max_exp_avg_sq()
            state["max_exp_avg_sq"] = self.segment_view(self.max_exp_avg_sq, index)
        if self.has_master:
            state["master_param"] = self.segment_view(self.master_params, index)
        p = self.params_in_order[index]
        if isinstance(p, DTensor):
            state = {name: DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                              shape=p.shape, stride=p.stride())
                     for name, view in state.items()}
        return {"step": self.steps[index], **state}

    # ----------------------------------------------------------------------------------------
    # Per step

    def check_params_in_place(self):
        """Re-adopt parameters whose storage was replaced (`p.data = ...`, `model.to(...)`).

        A parameter that left the arena would otherwise silently stop being updated.
        """
        addresses = np.fromiter(map(self._param_address, self.params_in_order), np.int64, len(self))
        if np.array_equal(addresses, self._expected_param_addresses):
            return
        moved = np.flatnonzero(addresses != self._expected_param_addresses)
        for index in moved:
            p = self.params_in_order[index]
            local = local_shard(p)
            if (p.device != self.device or p.dtype != self.dtype
                    or local.numel() != self._host_lengths[index]):
                raise RuntimeError(
                    f"FusedAdam: parameter {index} of the {self.dtype} arena on {self.device} was "
                    f"replaced by a tensor of {p.dtype}, shape {tuple(p.shape)} on {p.device}; "
                    "create the optimizer after moving or converting the model")
        for index in moved:
            p = self.params_in_order[index]
            local = local_shard(p)
            view = self.segment_view(self.params, index)
            view.copy_(local.detach().reshape(view.shape))
            if self.has_master:
                self.segment_view(self.master_params, index).copy_(view)
            # Memory another owner also holds is that owner's to read after the step, as torch's
            # in-place update would leave it: ZeroRedundancyOptimizer(parameters_as_bucket_view=
            # True) moves params into its buckets and broadcasts those. `write_back` keeps it
            # current. FSDP2's shard buffer needs none: the arena re-points it.
            fsdp_managed = isinstance(p, DTensor) and self._fsdp_params[index] is not None
            if not fsdp_managed and held_elsewhere(local):
                self._homes[index] = local.detach()
            else:
                self._homes.pop(index, None)
        self._relayout()

    def write_back(self):
        """After a step, copy each parameter that was re-pointed into memory another owner also
        holds back there (8 bytes per fp32 element: read the arena, write the owner's copy);
        one whose other owner let go is dropped."""
        for index, home in list(self._homes.items()):
            if storage_use_count is not None and not held_elsewhere(home):
                del self._homes[index]
                continue
            home.copy_(self.segment_view(self.params, index))

    def gather_grads(self):
        """Addresses of the current gradients (0 where there is none), on the arena's device.

        The ordinary loop takes the fast path: every gradient present or absent as autograd left
        it, contiguous and aligned, read in place. Anything else is copied once and counted.
        """
        grads = list(map(self._grad_of, self.params_in_order))
        present = grads
        if any(map(operator.is_, grads, itertools.repeat(None))):
            present = [g for g in grads if g is not None]
        try:
            in_place = all(map(_is_contiguous, present))
        except RuntimeError:  # sparse layouts have no strides
            in_place = False
        if in_place:
            addresses = np.fromiter(map(_data_ptr, present), np.int64, len(present))
            in_place = not np.any(addresses % self.grad_alignment)
        if not in_place:
            grads = [self._readable_in_place(index, g) for index, g in enumerate(grads)]
            present = [g for g in grads if g is not None]
            addresses = np.fromiter(map(_data_ptr, present), np.int64, len(present))
        # An empty tensor may have address 0, which means "no gradient" to a kernel; it reads
        # nothing from an empty gradient, so any other aligned address will do.
        addresses[addresses == 0] = 64
        if len(present) != len(grads):
            self.has_grad = np.fromiter(map(operator.is_not, grads, itertools.repeat(None)), bool,
                                        len(grads))
            all_addresses = np.zeros(len(grads), dtype=np.int64)
            all_addresses[self.has_grad] = addresses
            addresses = all_addresses
        elif not self.has_grad.all():
            self.has_grad = np.ones(len(grads), dtype=bool)
        # Autograd keeps gradients read in place alive through the kernel; the arena holds only
        # what it made (copies), or every gradient for a backend that reads tensors. Holding
        # all of them means dropping as many references after the kernel, when the kernel has
        # pushed those objects out of cache: 0.1-0.5 ms a step on 800 small tensors.
        self.grads_by_segment = grads if self.keep_grad_tensors or not in_place else None
        return self._addresses_on_device(addresses)

    def _addresses_on_device(self, addresses):
        """The address table where the kernel reads it. On a GPU it is uploaded only when an
        address changed (the caching allocator hands backward the same blocks step after step),
        and under CUDA graph capture from a pinned buffer that stays put, which a replay reads."""
        if self.device.type == "cpu":
            return torch.from_numpy(addresses)
        # A replay of a captured graph rewrites the device table behind our back: after a
        # capture, upload every time.
        if (self._uploaded_addresses is not None and not self._captured
                and np.array_equal(addresses, self._uploaded_addresses)):
            return self._device_addresses
        if self._device_addresses is None or self._device_addresses.numel() != len(addresses):
            self._device_addresses = torch.empty(len(addresses), dtype=torch.int64,
                                                 device=self.device)
        if torch.cuda.is_current_stream_capturing():
            if self._capture_addresses is None or self._capture_addresses.numel() != len(addresses):
                raise RuntimeError(
                    "FusedAdam: run one step before capturing a CUDA graph (the optimizer sets up "
                    "its device tables then)")
            self._capture_addresses.numpy()[:] = addresses
            self._device_addresses.copy_(self._capture_addresses, non_blocking=True)
            self._captured = True
        else:
            self._device_addresses.copy_(torch.from_numpy(addresses))
            if self._capture_addresses is None or self._capture_addresses.numel() != len(addresses):
                self._capture_addresses = torch.empty(len(addresses), dtype=torch.int64,
                                                      pin_memory=True)
        self._uploaded_addresses = addresses.copy()
        return self._device_addresses

    def _readable_in_place(self, index, grad):
        if grad is None:
            return None
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(
                "FusedAdam does not support sparse gradients (parameter "
                f"{index} of shape {tuple(grad.shape)}), please consider SparseAdam instead")
        if grad.is_contiguous() and grad.data_ptr() % self.grad_alignment == 0:
            return grad
        self.grad_copies += 1
        return torch.empty_like(grad, memory_format=torch.contiguous_format).copy_(grad)
