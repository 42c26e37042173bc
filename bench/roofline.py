"""The roofline of an Adam step, timed in the providers' round robin (the same cache and clock
state): a kernel that moves exactly Adam's bytes (read param, grad, exp_avg, exp_avg_sq; write
param, exp_avg, exp_avg_sq: 28 B per fp32 element) and does no math, and a plain `copy_` (8 B
per element) for reference. On CPU the kernel is Numba, built like fused_adam's own (parallel
chunks, a contiguous inner loop LLVM vectorizes) so that the two differ only in the arithmetic,
over numpy arrays (huge pages, as the arena's); on CUDA it is Triton (`bench/_triton_roofline.py`,
imported only there).
"""
import importlib

import numpy as np
import torch
from numba import njit, prange

from bench.memory import Footprint


def _library_constant(name):
    """A constant the library owns, wherever it keeps it (the shared constants module, or the
    numba kernel's), so that it is written down once."""
    for module in ("fused_adam.kernels.contract", "fused_adam.kernels.numba_adam"):
        value = getattr(importlib.import_module(module), name, None)
        if value is not None:
            return value
    raise ImportError(f"fused_adam defines no {name}")


# fused_adam's Numba chunk (16K fp32: four 64 KiB streams stay in L2), so that the roofline and
# the kernel split the work alike.
CHUNK_ELEMENTS = _library_constant("CHUNK_ELEMENTS")
# Beyond a few times the last-level cache, bandwidth no longer depends on size; capping the
# roofline's arrays keeps its memory small next to the providers' (2^26 fp32 is 256 MiB a
# buffer, 8x a 32 MiB L3; 2^30 on a GPU would add 16 GiB).
MAX_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 28}
ADAM_BYTES_PER_ELEMENT = 28
COPY_BYTES_PER_ELEMENT = 8


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _move_chunk(param, grad, exp_avg, exp_avg_sq):
    """p, m, v <- m, v, p + g  (one add so that no load can be dropped; no Adam math)."""
    for i in range(param.shape[0]):
        p = param[i]
        param[i] = exp_avg[i]
        exp_avg[i] = exp_avg_sq[i]
        exp_avg_sq[i] = p + grad[i]


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _no_math_kernel(param, grad, exp_avg, exp_avg_sq):
    n = param.shape[0]
    for chunk in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        start = chunk * CHUNK_ELEMENTS
        end = min(start + CHUNK_ELEMENTS, n)
        _move_chunk(param[start:end], grad[start:end], exp_avg[start:end], exp_avg_sq[start:end])


def _filled(n, values, device):
    """One fp32 buffer of `n` elements per value, filled rather than zeroed: calloc'd zero pages
    all map one physical page until written, and reading them would measure the cache, not
    memory. On CPU numpy allocates them (huge pages, as the arena's)."""
    if device.type == "cpu":
        return [torch.from_numpy(np.full(n, value, dtype=np.float32)) for value in values]
    return [torch.full((n,), value, device=device) for value in values]


class _PseudoProvider:
    """A subject with no parameters, over buffers of `n` fp32 elements filled with `values`:
    only `step()` (a subclass may give itself a stand-in backward)."""

    def __init__(self, n, device, bytes_per_element, values):
        self.n = n
        self.bytes_per_step = bytes_per_element * n
        self.buffers = _filled(n, values, device)

    def forward_backward(self):
        pass

    def zero_grad(self):
        pass

    def state_tensors(self):
        return self.buffers


class NoMathRoofline(_PseudoProvider):
    """`step()` runs the no-math kernel over four buffers of `n` elements."""

    name = "roofline (no-math)"
    kind = "roofline"
    footprint = Footprint(16, 0)  # four fp32 buffers

    def __init__(self, n, device):
        super().__init__(n, device, ADAM_BYTES_PER_ELEMENT, (0.01, 1e-6, 0.02, 0.03))
        param, grad = self.buffers[:2]
        # A stand-in backward, so that the kernel starts about where the optimizers' steps start:
        # the params just read and the gradients just written. Without it a config that fits in
        # the last-level cache (small-800) would time the roofline with everything evicted by
        # the other subjects, and the optimizers with half their bytes still cached. It streams
        # less through the cache than autograd's backward, so on such a config the roofline keeps
        # more of its moments cached than an optimizer does: a bound, not a target. Gradients of
        # 0 keep the kernel's rotation of values from growing round after round.
        self.forward_backward = lambda: torch.mul(param, 0.0, out=grad)
        if device.type == "cpu":
            arrays = [buffer.numpy() for buffer in self.buffers]
            self.step = lambda: _no_math_kernel(*arrays)
        else:
            from bench._triton_roofline import no_math_step
            self.step = lambda: no_math_step(*self.buffers)


class CopyBandwidth(_PseudoProvider):
    """`step()` is `dst.copy_(src)` over `n` fp32 elements (8 B each)."""

    name = "copy_ (reference)"
    kind = "copy"
    footprint = Footprint(8, 0)  # two fp32 buffers

    def __init__(self, n, device):
        super().__init__(n, device, COPY_BYTES_PER_ELEMENT, (1.0, 2.0))

    def step(self):
        self.buffers[1].copy_(self.buffers[0])


SUBJECTS = {NoMathRoofline.name: NoMathRoofline, CopyBandwidth.name: CopyBandwidth}


def elements(n_params, device_type):
    """How many elements the roofline subjects of a config of `n_params` hold (capped)."""
    return min(n_params, MAX_ELEMENTS.get(device_type, MAX_ELEMENTS["cpu"]))


def footprint(name, device_type):
    """SUBJECTS[name]'s memory per element (see `bench.memory`), capped like its buffers."""
    f = SUBJECTS[name].footprint
    return Footprint(f.resident, f.transient, max_elements=MAX_ELEMENTS.get(device_type))


def build(name, n_params, device):
    """The roofline subject `name`, sized like a config of `n_params` (capped: MAX_ELEMENTS)."""
    return SUBJECTS[name](elements(n_params, device.type), device)
