"""The gradient address table where a kernel reads it, and what CUDA graph capture needs of it.

On the CPU the host table is the kernel's. On a GPU it is uploaded, only when an address changed
(the caching allocator hands backward the same blocks step after step), and under CUDA graph
capture from a pinned buffer that stays put, which each replay copies from.
"""
import numpy as np
import torch


class AddressTable:
    """One arena's int64 gradient addresses on its device."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._on_device = None  # the table the kernel reads
        self._uploaded = None  # what it holds
        self._pinned = None  # the capture's source
        self._captured = False

    def upload(self, addresses):
        """`addresses` (numpy int64) as a tensor on the device, without a sync."""
        if self.device.type == "cpu":
            return torch.from_numpy(addresses)
        # A replay of a captured graph rewrites the device table behind our back: after a
        # capture, upload every time.
        if (self._uploaded is not None and not self._captured
                and np.array_equal(addresses, self._uploaded)):
            return self._on_device
        if self._on_device is None or self._on_device.numel() != len(addresses):
            self._on_device = torch.empty(len(addresses), dtype=torch.int64, device=self.device)
        if torch.cuda.is_current_stream_capturing():
            if self._pinned is None or self._pinned.numel() != len(addresses):
                raise RuntimeError(
                    "FusedAdam: run one step before capturing a CUDA graph (the optimizer sets up "
                    "its device tables then)")
            self._pinned.numpy()[:] = addresses
            self._on_device.copy_(self._pinned, non_blocking=True)
            self._captured = True
        else:
            self._on_device.copy_(torch.from_numpy(addresses))
            if self._pinned is None or self._pinned.numel() != len(addresses):
                self._pinned = torch.empty(len(addresses), dtype=torch.int64, pin_memory=True)
        self._uploaded = addresses.copy()
        return self._on_device
