"""Flat buffers, and tensors over their segments that each own a storage of just that segment.

Libraries reason about storages, not about the bytes a tensor covers: safetensors and accelerate
take tensors that share a storage for tied weights (and save one of them), `torch.save` of a
view writes its whole storage. So a parameter or state tensor handed out over an arena must own
a storage that covers exactly itself, while its memory stays the arena's (one pass, no copy):

- CPU: the buffer is a numpy allocation (numpy asks Linux for transparent huge pages on large
  arrays and torch's allocator does not; with 4 KiB pages the TLB misses of an Adam pass cost a
  share of its bandwidth: bench/RESULTS.md, "Huge pages"), and a tensor made from a numpy slice
  has a storage of exactly that slice, which keeps the allocation alive.
- CUDA: a non-owning tensor over a pointer, made through `__cuda_array_interface__` by an object
  that keeps the buffer alive.
- Any other device (meta, mps, xpu, ...): plain views, which share the buffer's storage.
"""
import numpy as np
import torch


class _CudaMemory:
    """`nbytes` bytes at `address`, inside `owner`, as `__cuda_array_interface__` presents them;
    torch keeps this object, and so `owner`, alive as long as the tensor made from it."""

    def __init__(self, owner, address, nbytes):
        self._owner = owner
        self.__cuda_array_interface__ = dict(shape=(nbytes,), typestr="|u1", data=(address, False),
                                             strides=None, version=3, stream=None)


class FlatBuffer:
    """A zeroed 1-D buffer of `size` elements, and tensors over its segments."""

    def __init__(self, size, dtype, device):
        self.dtype, self.device = dtype, torch.device(device)
        self.element_size = torch.empty(0, dtype=dtype).element_size()
        if self.device.type == "cpu" and size > 0:
            self._bytes = np.zeros(size * self.element_size, dtype=np.uint8)
            self.tensor = torch.from_numpy(self._bytes).view(dtype)
        else:
            self.tensor = torch.zeros(size, dtype=dtype, device=self.device)

    def segment(self, start, n):
        """Elements `start` .. `start + n` as a 1-D tensor whose storage covers exactly them
        (on CPU and CUDA; a view of the buffer elsewhere)."""
        if n == 0:
            # Nothing to share: an empty tensor of its own.
            return torch.empty(0, dtype=self.dtype, device=self.device)
        first, last = start * self.element_size, (start + n) * self.element_size
        if self.device.type == "cpu":
            return torch.from_numpy(self._bytes[first:last]).view(self.dtype)
        if self.device.type == "cuda":
            memory = _CudaMemory(self.tensor, self.tensor.data_ptr() + first, last - first)
            return torch.as_tensor(memory, device=self.device).view(self.dtype)
        return self.tensor[start:start + n]
