"""Gradient-norm clipping folded into the step.

torch's `clip_grad_norm_` reads every gradient for the norm (4 B a parameter in fp32), then reads
and writes every gradient again to scale it (8 B), tensor by tensor. Here the norm is one read
of the gradients where they live (each backend's `grad_power_sum`, one per arena), and the
scaling is a factor the next step's kernel multiplies into each gradient as it reads it: the
clip costs one read, and `p.grad` keeps its unclipped value.

The numbers are torch's: the total norm from the same p-th powers (accumulated in float64, so
closer to the exact norm than torch's own per-tensor fp32 norms), rounded to the dtype torch
would return, and the factor computed from it by torch's own expression in that dtype.
"""
import functools
import operator

import torch

from fused_adam import distributed
from fused_adam.arena import table_device
from fused_adam.clock import NO_CLOCK
from fused_adam.kernels.contract import supported_norm_type
from fused_adam.torch_internals import version_of

# torch's wording (torch/nn/utils/clip_grad.py), so that code matching on it keeps working.
NONFINITE_NORM = ("The total norm of order {norm_type} for gradients from `parameters` is "
                  "non-finite, so it cannot be clipped. To disable this error and scale the "
                  "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")


def norm_dtype(dtypes):
    """The dtype torch's `clip_grad_norm_` returns its norm in: the per-gradient norms' (real)
    dtypes, promoted as `torch.stack` promotes them."""
    return functools.reduce(torch.promote_types, dtypes)


def total_norm(power_sums, norm_type, *, dtype, device, process_groups=()):
    """The norm of order `norm_type` from per-arena `grad_power_sum`s (0-d float64 tensors):
    combined on `device`, over each of `process_groups` (one all-reduce of a scalar each: ranks
    that hold different shards of the parameters), then the p-th root, in `dtype`."""
    inf = norm_type == float("inf")
    if power_sums:
        stacked = torch.stack([power.to(device) for power in power_sums])
        combined = stacked.max() if inf else stacked.sum()  # torch's max propagates NaN
    else:
        combined = torch.zeros((), dtype=torch.float64, device=device)
    for group in process_groups:
        if inf:
            # all_reduce's MAX is not torch.max: it may drop a rank's NaN (gloo's drops rank
            # 1's), so each rank's NaN flag travels beside its max, in the same all-reduce.
            both = torch.stack([combined, torch.isnan(combined).to(torch.float64)])
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
            combined = torch.where(both[1] > 0, torch.nan, both[0])
        else:
            torch.distributed.all_reduce(combined, group=group)
    if inf:
        norm = combined
    elif norm_type == 2.0:
        norm = combined.sqrt()
    else:
        norm = combined.pow(1.0 / norm_type)
    return norm.to(dtype)


def fused_clip(arenas, pending, max_norm, norm_type, error_if_nonfinite, *, process_group,
               torch_grads):
    """`FusedAdam.clip_grad_norm` once `arenas` (the optimizer's `Arenas`) follow its groups
    and state: the total norm (torch's `clip_grad_norm_` result) of every gradient, read once,
    and the factor armed in `pending` (a `PendingClip`) for the next step's kernel."""
    # A factor whose gradients are gone (a step skipped, then a zero_grad that never reached
    # the optimizer: ZeRO's, the model's) applies to nothing; those it still applies to are
    # scaled now, as torch's clip left them. One edited since is measured as it stands.
    pending.resolve(arenas, refuse_edited=False)
    readings = []
    for key, arena in arenas.items():
        arena.adopt_moved_params()
        readings.append((key, arena, arenas.reader(key).read(NO_CLOCK)))
    norm = gradient_norm([(arena, read, arenas.backend(key)) for key, arena, read in readings],
                         norm_type, process_group=process_group, torch_grads=torch_grads)
    if pending.armed:  # clipped twice: the gradients count as scaled once
        norm = (norm.double() * pending.factor(norm.device)).to(norm.dtype)
    coefficient = clip_coefficient(norm, max_norm, error_if_nonfinite, norm_type)
    pending.set(coefficient,
                {table_device(arena.device) for _, arena, _ in readings} | {norm.device})
    pending.watch({key: (arena, read) for key, arena, read in readings},
                  grad_of=(distributed.local_grad_of
                           if any(arena.is_distributed for _, arena, _ in readings)
                           else operator.attrgetter("grad")))
    return norm


def gradient_norm(readings, norm_type, *, process_group=None, torch_grads):
    """torch's `clip_grad_norm_` total norm of the gradients `readings` found, [(arena, its
    Gradients, its backend module)]: each backend's `grad_power_sum` per arena, combined over
    the arenas and the process groups the parameters are sharded over (and `process_group`,
    where the caller knows the parameters are a share), in the dtype torch would return.
    Norm types no kernel reduces (p <= 0; p != 2 over complex params) take torch's own norm of
    `torch_grads()`."""
    with_grads = [(arena, read, backend) for arena, read, backend in readings
                  if read.has_grad.any()]
    process_groups = shard_groups(p for arena, _, _ in with_grads if arena.is_distributed
                                  for p in arena.params_in_order)
    if process_group is not None:
        process_groups = (*process_groups, process_group)
    if not with_grads and not process_groups:
        return torch.tensor(0.0)  # torch's answer when no parameter has a gradient
    complex_p = norm_type != 2.0 and any(arena.is_complex.any() for arena, _, _ in with_grads)
    if supported_norm_type(norm_type) and not complex_p:
        if with_grads or readings:
            device = (with_grads[0] if with_grads else readings[0])[0].device
        else:  # no parameter here (an empty ZeRO partition): this rank still reduces
            device = distributed.collective_device(process_groups[0])
        return total_norm(
            [backend.grad_power_sum(arena.record, grads=read.for_backend, norm_type=norm_type)
             for arena, read, backend in with_grads],
            norm_type, process_groups=process_groups, device=device,
            dtype=norm_dtype([arena.dtype for arena, _, _ in with_grads] or [torch.float32]))
    if process_groups:
        raise NotImplementedError(
            f"FusedAdam.clip_grad_norm: norm_type={norm_type} over sharded parameters; use "
            "norm_type 2, 1, inf or another p > 0")
    return torch_total_norm(torch_grads(), norm_type)


def torch_total_norm(grads, norm_type):
    """torch's own total norm (per-gradient norms, then the norm of those), for the norm types
    the kernels do not reduce (p <= 0, -inf) and complex gradients under p != 2."""
    if not grads:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), norm_type)


def clip_coefficient(norm, max_norm, error_if_nonfinite, norm_type):
    """torch's `clip_grad_norm_` factor for `norm`, in its dtype: min(1, max_norm / (norm + 1e-6));
    raises torch's RuntimeError for a non-finite norm if asked to."""
    if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
        raise RuntimeError(NONFINITE_NORM.format(norm_type=norm_type))
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def shard_groups(params):
    """The process groups over which these params' local shards add up to the whole: the mesh
    dimensions a DTensor's gradient is sharded on (see `distributed.shard_groups`: FSDP2's
    Shard, HSDP's shard dimension); replicated dimensions hold copies and are not summed.
    Raises if params disagree (one all-reduce must serve them all)."""
    found = None
    for p in params:
        groups = distributed.shard_groups(p)
        if found is None:
            found = groups
        elif groups != found:
            raise NotImplementedError(
                "FusedAdam.clip_grad_norm: the parameters are sharded over different process "
                "groups; clip with torch.nn.utils.clip_grad_norm_ instead")
    return found or ()


class PendingClip:
    """The factor `clip_grad_norm` leaves for the next step: one float64 scalar per device,
    kept in buffers of its own (a step captured in a CUDA graph reads the same memory at every
    replay). Cleared by the step that applies it and by `zero_grad()`.

    torch's clip scales, in place, exactly the gradients it measured; the factor must reach
    exactly those too. So it remembers them (each one's tensor, version and address) and the
    arenas that read them, and before a step (or a second clip) `resolve` sorts what it finds:
    - all of them still there, unmodified, and no other gradient in arenas built since (the
      ordinary loop, one identity, version and address check per parameter): the factor stays
      for the kernel, and the step takes the clip's reading of the gradients (`reading`: the
      step visits and checks no gradient again);
    - a gradient replaced (a new tensor, or `.data` reassigned), set to None, or new since the
      clip (a parameter without one then, a param group added): it holds values the clip never
      saw, which torch would step unclipped. The gradients still as measured are scaled in
      place now, by torch's own multiply, as torch's clip left them, and the factor is dropped:
      every gradient then steps as it stands (a pass over those gradients, only in this case);
    - a gradient edited in place since (another backward added to it): torch would step
      clipped old plus unclipped new values, which no factor gives and the sum no longer tells
      apart; the step refuses it (a second clip drops the factor and measures the sum).
    """

    def __init__(self):
        self._buffers = {}
        self.armed = False
        self._forget()

    def _forget(self):
        self._params, self._grads, self._versions, self._addresses = [], [], [], []
        self._grad_of = None
        self._readings = {}  # arena key -> (arena, its `Gradients` at the clip)

    def set(self, coefficient, devices):
        """Arm `coefficient` (a 0-d tensor) for arenas on `devices`; a second clip before the
        step multiplies into the first (torch would scale the clipped gradients again)."""
        for device in devices:
            buffer = self._buffers.get(device)
            if buffer is None:
                buffer = self._buffers[device] = torch.ones((), dtype=torch.float64,
                                                            device=device)
            value = coefficient.to(device, torch.float64)
            if self.armed:
                buffer.mul_(value)
            else:
                buffer.copy_(value)
        self.armed = True

    def watch(self, readings, grad_of):
        """Remember `readings`, {arena key: (arena, its Gradients)}, and the gradients they
        found (see the class docstring); `grad_of(p)` finds a parameter's gradient again."""
        self._grad_of = grad_of
        self._params = [p for arena, _ in readings.values() for p in arena.params_in_order]
        self._grads = [grad for _, read in readings.values() for grad in read.visited]
        present = [grad for grad in self._grads if grad is not None]
        self._versions = list(map(version_of, present))
        self._addresses = list(map(torch.Tensor.data_ptr, present))
        self._readings = dict(readings)

    def unchanged(self):
        """Whether every gradient the factor was computed from is still there, unmodified and
        in the same memory (`.data` reassigned keeps tensor and version, not the address)."""
        grads = list(map(self._grad_of, self._params))
        if not all(map(operator.is_, grads, self._grads)):  # a gradient replaced, set or gone
            return False
        present = [grad for grad in grads if grad is not None]
        return (list(map(version_of, present)) == self._versions
                and list(map(torch.Tensor.data_ptr, present)) == self._addresses)

    def resolve(self, arenas, *, refuse_edited):
        """Make the factor apply to exactly the gradients it measured that are still as it
        measured them (see the class docstring), before a step reads `arenas` (the `Arenas`,
        already following `param_groups`). Leaves it armed only where the kernel may apply it
        to every gradient it reads. An edited gradient raises RuntimeError (nothing changed
        yet) if `refuse_edited`, else is left as it stands."""
        if not self.armed or (self._same_arenas(arenas) and self.unchanged()):
            return
        as_measured, edited = [], False
        measured = iter(zip(self._versions, self._addresses))
        for then, now in zip(self._grads, map(self._grad_of, self._params)):
            if then is None:
                continue
            version, address = next(measured)
            if now is not then or now.data_ptr() != address:
                continue  # replaced, gone, or its memory reassigned: new values, unclipped
            if version_of(now) != version:
                edited = True
            else:
                as_measured.append(now)
        if edited and refuse_edited:
            raise RuntimeError(
                "FusedAdam: a gradient changed between clip_grad_norm() and step(), in place "
                "(another backward?); the clipping factor no longer applies to it. Call "
                "clip_grad_norm() after the last backward of the step, or zero_grad() to "
                "drop the factor.")
        for grad in as_measured:
            grad.mul_(self._factor_on(grad.device))  # torch's clip: g.mul_(coefficient)
        self.clear()

    def _same_arenas(self, arenas):
        """Whether `arenas` are the very arenas the clip read (so hold no other parameter)."""
        return len(arenas) == len(self._readings) and all(
            self._readings.get(key, (None, None))[0] is arena for key, arena in arenas.items())

    def _factor_on(self, device):
        buffer = self._buffers.get(device)
        if buffer is None:  # every buffer holds the same value
            buffer = next(iter(self._buffers.values())).to(device)
        return buffer

    def reading(self, key, arena):
        """The clip's reading of `arena`'s gradients if the step may use it (armed after
        `resolve`, which the step calls first, and the same arena), else None."""
        if not self.armed:
            return None
        cached_arena, gradients = self._readings.get(key, (None, None))
        return gradients if cached_arena is arena else None

    def factor(self, device):
        """The armed factor for arenas on `device`, or None."""
        return self._buffers[device] if self.armed else None

    def clear(self):
        self.armed = False
        self._forget()
