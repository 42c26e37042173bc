"""The flat arena: the parameters of one (device, dtype), packed into one padded 1-D buffer, with
their Adam states in buffers of the same layout beside it.

Each parameter is a *segment*: its values are copied in once and `p.data` becomes a view into the
arena (the Megatron-LM / DeepSpeed ZeRO approach), so a kernel can update every parameter in one
pass and no second copy of the parameters exists. Gradients are *not* packed: autograd writes a
fresh tensor per parameter after `zero_grad(set_to_none=True)` and packing them would cost a copy
(or a zeroing pass plus an accumulating backward, measured in the README), so each step the arena
collects the address of every gradient wherever it lives and the kernel reads it in place.
"""
import itertools
import operator

import numpy as np
import torch

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

    def __init__(self, device, dtype, grad_alignment=16, *, state_dtype=None,
                 master_weights=False):
        """`grad_alignment`: the byte alignment the kernel needs of a gradient's address
        (Triton's 128-bit loads need 16; autograd's allocations have 64, a user's slice of a
        bigger tensor or a DDP bucket view may not). `master_weights`: keep an fp32 copy of
        bf16/fp16 params, which the kernel updates and rounds into them. `state_dtype`: the
        dtype of the moments (default: fp32 with master weights, else the params' dtype, as
        torch); fp64 params keep fp64 moments."""
        self.device, self.dtype = torch.device(device), dtype
        self.grad_alignment = grad_alignment
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
        self.grads_by_segment = []
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

    def __len__(self):
        return len(self.params_in_order)


    # ----------------------------------------------------------------------------------------
    # Layout

    def add(self, params, group_index):
        """Append `params` as new segments of group `group_index`; they become arena views."""
        lengths = [p.numel() for p in params]
        starts, end = [], _aligned(int(self._host_starts[-1] + self._host_lengths[-1])) if len(self) else 0
        for n in lengths:
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
        for p, start, n in zip(params, starts, lengths):
            self.params[start:start + n].copy_(p.detach().reshape(-1))
            if self.has_master:
                self.master_params[start:start + n].copy_(p.detach().reshape(-1))

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

    def _grown(self, buffer, size, old_size):
        grown = _zeros(size, buffer.dtype, self.device)
        grown[:old_size].copy_(buffer)
        return grown

    def _relayout(self):
        """Point every parameter at its segment of the current buffers."""
        for index, p in enumerate(self.params_in_order):
            p.data = self.segment_view(self.params, index)
        self._expected_param_addresses = np.fromiter(
            map(_data_ptr, self.params_in_order), np.int64, len(self))
        self.kernel_cache.clear()

    def segment_view(self, buffer, index):
        """Segment `index` of `buffer`, shaped like its parameter."""
        start, n = int(self._host_starts[index]), int(self._host_lengths[index])
        return buffer[start:start + n].view(self.params_in_order[index].shape)

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
        """`state[p]` for segment `index`: torch's keys, views into the arena."""
        state = {
            "step": self.steps[index],
            "exp_avg": self.segment_view(self.exp_avg, index),
            "exp_avg_sq": self.segment_view(self.exp_avg_sq, index),
        }
        if amsgrad:
            self.ensure_max_exp_avg_sq()
            state["max_exp_avg_sq"] = self.segment_view(self.max_exp_avg_sq, index)
        if self.has_master:
            state["master_param"] = self.segment_view(self.master_params, index)
        return state

    # ----------------------------------------------------------------------------------------
    # Per step

    def check_params_in_place(self):
        """Re-adopt parameters whose storage was replaced (`p.data = ...`, `model.to(...)`).

        A parameter that left the arena would otherwise silently stop being updated.
        """
        addresses = np.fromiter(map(_data_ptr, self.params_in_order), np.int64, len(self))
        if np.array_equal(addresses, self._expected_param_addresses):
            return
        for index in np.flatnonzero(addresses != self._expected_param_addresses):
            p = self.params_in_order[index]
            if p.device != self.device or p.dtype != self.dtype or p.numel() != self._host_lengths[index]:
                raise RuntimeError(
                    f"FusedAdam: parameter {index} of the {self.dtype} arena on {self.device} was "
                    f"replaced by a tensor of {p.dtype}, shape {tuple(p.shape)} on {p.device}; "
                    "create the optimizer after moving or converting the model")
            view = self.segment_view(self.params, index)
            view.copy_(p.detach().reshape(view.shape))
            if self.has_master:
                self.segment_view(self.master_params, index).copy_(view)
            p.data = view.view(p.shape)
        self._relayout()

    def gather_grads(self):
        """Addresses of the current gradients (0 where there is none), on the arena's device.

        The ordinary loop takes the fast path: every gradient present or absent as autograd left
        it, contiguous and aligned, read in place. Anything else is copied once and counted.
        """
        grads = list(map(_grad_of, self.params_in_order))
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
        self.grads_by_segment = grads
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
