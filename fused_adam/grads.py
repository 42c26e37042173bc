"""Each step's gradients, found where they live and handed to a backend as it reads them.

Gradients are not packed into the arena: with arena gradient views autograd adds into an
existing gradient instead of handing over a fresh one, and zeroing is a pass of its own, which
costs the backward more than the step saves (bench/RESULTS.md, "Where gradients should live").
So each step visits every parameter, checks its gradient is one the kernel may read (dtype,
size and device of the parameter: a kernel that reads by address must never read past a
gradient's end), and collects its address. A gradient that cannot be read in place (not
contiguous, or misaligned for the backend's vector loads) is copied once and counted; the
ordinary loop copies none.
"""
import itertools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fused_adam.arena import flat_real
from fused_adam.device_tables import AddressTable
from fused_adam.distributed import local_grad_of, local_shard

_grad_of = operator.attrgetter("grad")
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous


@dataclass
class Gradients:
    """One arena's gradients for one step: `for_backend` as the backend's `GRADS` names it,
    `has_grad` per segment, the copies made (alive until the kernel has run), and `visited`,
    each parameter's (local) gradient tensor or None as found."""
    for_backend: Any
    has_grad: np.ndarray
    copies: list
    visited: list


class GradientReader:
    """Reads the gradients of one arena's parameters, in the form its backend reads them."""

    def __init__(self, arena, *, form, alignment):
        self._arena = arena
        self._params = arena.params_in_order
        self._form, self._alignment = form, alignment
        self._grad_of = local_grad_of if arena.is_distributed else _grad_of
        locals_ = [local_shard(p) for p in self._params]
        self._dtypes = [local.dtype for local in locals_]
        self._shapes = [local.shape for local in locals_]
        self._nbytes = np.array([local.numel() * local.element_size() for local in locals_],
                                dtype=np.int64)
        self._device = arena.device
        # A CPU arena in a process with no accelerator: a gradient can only be in host memory,
        # or on the meta device, whose address 0 the address check refuses. No device pass.
        self._host_only = arena.device.type == "cpu" and not _accelerator_present()
        self._addresses = AddressTable(arena.device) if form == "addresses" else None
        self.copies = 0  # gradients copied because they could not be read in place, all steps

    def read(self, clock):
        """This step's gradients, each phase under `clock(phase)` (see `FusedAdam._step`);
        raises RuntimeError, before anything changes, for one the kernel must not read."""
        with clock("visit gradients"):
            grads = list(map(self._grad_of, self._params))
            if any(map(operator.is_, grads, itertools.repeat(None))):
                has_grad = np.fromiter(map(operator.is_not, grads, itertools.repeat(None)),
                                       bool, len(grads))
                present = [g for g in grads if g is not None]
            else:
                has_grad, present = np.ones(len(grads), dtype=bool), grads
        with clock("check gradients"):
            self._check(present, has_grad)
        with clock("gradient addresses"):
            if self._form == "tensors":
                copies = []
                readable = [None if g is None
                            else flat_real(self._readable_in_place(i, g, copies))
                            for i, g in enumerate(grads)]
                return Gradients(readable, has_grad, copies, grads)
            return self._addresses_of(grads, present, has_grad)

    def _check(self, present, has_grad):
        """Every gradient has its parameter's dtype, size and device (torch's own Adam raises
        for one that does not: it cannot add or lerp it)."""
        expected_dtypes, expected_shapes = self._dtypes, self._shapes
        if len(present) != len(self._params):
            expected_dtypes = list(itertools.compress(self._dtypes, has_grad))
            expected_shapes = list(itertools.compress(self._shapes, has_grad))
        # Per gradient, the least a check can cost in Python (it runs every step): an identity
        # test per dtype (no list), one Size compare per shape, and the device only where a
        # gradient could be elsewhere than host memory (see `_host_only`).
        ok = (all(map(operator.is_, map(_dtype_of, present), expected_dtypes))
              and list(map(_shape_of, present)) == expected_shapes)
        if ok and not self._host_only:
            ok = all(g.device == self._device for g in present)
        if not ok:
            self._raise_for_the_first_bad_one(present, has_grad)

    def _raise_for_the_first_bad_one(self, present, has_grad, device_only=False):
        for index, grad in zip(np.flatnonzero(has_grad), present):
            _refuse_sparse(grad, self._arena.describe(index))
            local = local_shard(self._params[index])
            if (grad.device != local.device or not device_only and (
                    grad.dtype != local.dtype or grad.shape != local.shape)):
                raise RuntimeError(
                    f"FusedAdam: the gradient of {self._arena.describe(index)} does not match it: "
                    f"{grad.dtype} {tuple(grad.shape)} on {grad.device}, the parameter is "
                    f"{local.dtype} {tuple(local.shape)} on {local.device}")
        raise AssertionError("a gradient failed the check but none is wrong")  # unreachable

    def _addresses_of(self, grads, present, has_grad):
        copies = []
        try:
            in_place = all(map(_is_contiguous, present))
        except RuntimeError:  # sparse layouts have no strides
            in_place = False
        if in_place:
            addresses = np.fromiter(map(_data_ptr, present), np.int64, len(present))
            in_place = not np.any(addresses % self._alignment)
        if not in_place:
            present = [self._readable_in_place(index, g, copies)
                       for index, g in zip(np.flatnonzero(has_grad), present)]
            addresses = np.fromiter(map(_data_ptr, present), np.int64, len(present))
        without_memory = addresses == 0
        if without_memory.any():
            # An empty tensor may have address 0, which means "no gradient" to a kernel; it
            # reads nothing from an empty gradient, so any other aligned address will do. A
            # gradient with elements but no address has no memory here (meta).
            if self._host_only and (self._nbytes[has_grad][without_memory] > 0).any():
                self._raise_for_the_first_bad_one(present, has_grad, device_only=True)
            addresses[without_memory] = 64
        if len(present) != len(grads):
            all_addresses = np.zeros(len(grads), dtype=np.int64)
            all_addresses[has_grad] = addresses
            addresses = all_addresses
        return Gradients(self._addresses.upload(addresses), has_grad, copies, grads)

    def _readable_in_place(self, index, grad, copies):
        _refuse_sparse(grad, self._arena.describe(index))
        if grad.is_contiguous() and grad.data_ptr() % self._alignment == 0:
            return grad
        self.copies += 1
        copy = torch.empty_like(grad, memory_format=torch.contiguous_format).copy_(grad)
        copies.append(copy)
        return copy


def _accelerator_present():
    """Whether tensors of this process may live in memory other than the host's."""
    for name in ("cuda", "xpu", "mps", "mtia"):
        module = getattr(torch, name, None)
        if module is not None and hasattr(module, "is_available") and module.is_available():
            return True
    return False


def _refuse_sparse(grad, what):
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(f"FusedAdam does not support sparse gradients ({what}), please "
                           "consider SparseAdam instead")
