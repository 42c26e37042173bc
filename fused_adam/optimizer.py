"""FusedAdam and FusedAdamW: drop-in `torch.optim.Adam` / `AdamW` whose step is one kernel launch
per arena (one arena per device and dtype), covering every parameter of every group.

The class reads like `torch/optim/adam.py`: `__init__` validates and builds `defaults`,
`add_param_group` checks a group as torch does, `step()` gathers what the kernels need and calls
one launcher per arena. Moments and step counts live in the arenas; `self.state[p]` holds
torch-named tensors over them, created at a parameter's first gradient as torch creates its
state, so `state_dict()` loads into `torch.optim.Adam` and back.

`param_groups` and `state` stay what they are in torch, containers users and libraries edit: a
step first follows them (`_follow_groups`, `_follow_state`), at the cost of one identity check
per parameter when nothing changed. What lies beyond torch's Optimizer surface and the step's
phases is elsewhere: the arenas and their state entries (`arena`, `state_entries`), the clip
(`clipping`), checkpoint loading (`checkpoint`).
"""
import itertools
import warnings

import numpy as np
import torch
from torch.optim import Optimizer

from fused_adam import aliasing, checkpoint, dispatch
from fused_adam.arena import check_steppable, real_dtype, table_device
from fused_adam.arenas import Arenas
from fused_adam.clipping import PendingClip, fused_clip
from fused_adam.clock import NO_CLOCK
from fused_adam.groups import (
    TORCH_GROUP_DEFAULTS, GroupTables, fill_group_defaults, group_row, normalized_group,
    validate_hyperparameters,
)
from fused_adam.kernels.contract import COMPACT_MASTERS, QUANTIZED_STATE_DTYPE
from fused_adam.state_entries import follow_edits
from fused_adam.torch_internals import bump_versions
from fused_adam.tracked_state import TrackedState, plain

_STATE_DTYPES = (None, torch.float32, torch.bfloat16, QUANTIZED_STATE_DTYPE)
_DEFAULT_SETTINGS = dict(backend=None, master_weights=False, state_dtype=None)

# The options, one entry each (Google style), shared by both classes' docstrings as torch shares
# its argument docs between Adam and AdamW (`_document_arguments`, at the end of this file).
_ARGUMENTS = dict(
    params="""params (iterable): tensors to optimize, (name, tensor) pairs, or dicts defining
    param groups (`params` and any of lr, betas, eps, weight_decay, amsgrad, maximize), as
    torch's.""",
    lr="""lr (float or Tensor, optional): learning rate (default: 1e-3). A tensor on a GPU is
    read there, with no host sync. LR schedulers write `group["lr"]`; the next step uses it.""",
    betas="""betas (Tuple[float, float], optional): coefficients of the running averages of the
    gradient and of its square (default: (0.9, 0.999)).""",
    eps="""eps (float, optional): term added to the denominator for numerical stability
    (default: 1e-8).""",
    weight_decay="""weight_decay (float, optional): weight decay coefficient, added to the
    gradient (L2) or decoupled (see `decoupled_weight_decay`) (default: 0).""",
    amsgrad="""amsgrad (bool, optional): AMSGrad: step with the largest second moment so far,
    kept as `max_exp_avg_sq` (default: False; not offered with 8-bit moments).""",
    maximize="""maximize (bool, optional): maximize the objective instead of minimizing it
    (default: False).""",
    decoupled_weight_decay="""decoupled_weight_decay (bool, optional): AdamW's weight decay:
    the params are scaled by (1 - lr * weight_decay) instead of the decay being added to the
    gradient (default: False).""",
    backend="""backend (str, optional): "numba", "triton" or "torch"; None picks by device
    (triton on CUDA, numba on CPU, the torch reference elsewhere), after the
    `FUSED_ADAM_BACKEND` environment variable. One that cannot run is refused here, saying why
    (default: None).""",
    master_weights="""master_weights (bool or str, optional): True keeps an fp32 copy of
    bf16/fp16 params, which the step updates and rounds into them (a no-op, with a warning,
    when no param is bf16/fp16); "bf16+16" or "bf16+8" (bf16 params) keep it compact, as an
    int16 (exact) or int8 remainder beside the param. `fused_adam.master_params` gives it as
    fp32 values (default: False).""",
    state_dtype="""state_dtype (torch.dtype, optional): dtype of the moments: None (fp32 with a
    master, else the params', as torch), torch.float32, torch.bfloat16, or torch.int8 for 8-bit
    moments (codes with an fp32 absmax per 256 values, no amsgrad;
    `fused_adam.dequantized_state_dict` turns their `state_dict()` into torch's format).
    `kernels/contract.py` gives the exact maps (default: None).""",
    foreach="""foreach (bool, optional): torch's, accepted for drop-in use and ignored: the step
    is always fused (default: None).""",
    fused="""fused (bool, optional): torch's, accepted and ignored as `foreach` is
    (default: None).""",
    capturable="""capturable (bool, optional): CUDA only: step counts, bias corrections and a
    tensor `lr` stay on the device and nothing is read back to the host, so the step can be
    captured in a CUDA graph after one eager step (default: False).""",
    differentiable="""differentiable (bool, optional): torch's; True is refused (the step is
    not traced by autograd) (default: False).""",
)


def _disable_dynamo(function):
    """torch.compile graph-breaks at the step and runs it eagerly: the kernels are not
    traceable (Dynamo would step into numba's dispatcher)."""
    disable = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
    return disable(function)


def _check_settings(state_dtype, backend, differentiable, master_weights):
    """Refuse, with torch's ValueError, options no group of this optimizer could step with."""
    if state_dtype not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype}; use torch.float32, "
                         "torch.bfloat16 or torch.int8 (8-bit moments)")
    if backend is not None and backend not in dispatch.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {dispatch.BACKENDS}")
    if differentiable:
        raise ValueError("FusedAdam does not support differentiable=True")
    if not (isinstance(master_weights, bool) or master_weights in COMPACT_MASTERS):
        raise ValueError(f"Invalid master_weights: {master_weights!r}; use True (an fp32 "
                         f"copy), False, or one of {sorted(COMPACT_MASTERS)} (bf16 params)")


def _check_group(group, settings):
    """Refuse, before anything changes, a param group (normalized) these settings cannot step."""
    quantized = settings["state_dtype"] == QUANTIZED_STATE_DTYPE
    if group["amsgrad"] and quantized:
        raise ValueError("FusedAdam: amsgrad is not offered with 8-bit moments "
                         "(state_dtype=torch.int8)")
    for p in group["params"]:
        check_steppable(p)
        if settings["master_weights"] in COMPACT_MASTERS and p.dtype == torch.float16:
            raise ValueError(f"FusedAdam: master_weights={settings['master_weights']!r}"
                             " is for bfloat16 parameters, not float16 ones (use True)")
        if p.is_complex() and quantized:
            raise ValueError("FusedAdam: 8-bit moments (state_dtype=torch.int8) are not "
                             "offered for complex parameters")
        if group["capturable"] and p.device.type != "cuda":
            raise ValueError(
                f"FusedAdam: capturable=True needs CUDA parameters, got {p.device.type} ones")
        dispatch.backend_name(settings["backend"], p.device, real_dtype(p.dtype))


class FusedAdam(Optimizer):
    """Adam (Kingma & Ba) with torch.optim.Adam's options and numbers, one fused pass per step."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, backend=None,
                 master_weights=False, state_dtype=None, foreach=None, fused=None,
                 capturable=False, differentiable=False):
        validate_hyperparameters(lr, betas, eps, weight_decay)
        _check_settings(state_dtype, backend, differentiable, master_weights)
        self._settings = dict(backend=backend, master_weights=master_weights,
                              state_dtype=state_dtype)
        self._start_machinery()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        capturable=capturable, **TORCH_GROUP_DEFAULTS)
        super().__init__(params, defaults)
        self._constructed = True
        self.state = TrackedState(self.state)
        self._follow_groups()
        if master_weights and not any(arena.has_master for arena in self._arenas.values()):
            warnings.warn(f"FusedAdam: master_weights={master_weights!r} does nothing here: no "
                          "parameter is bfloat16 or float16", stacklevel=2)

    def _start_machinery(self):
        """The optimizer's own parts, none of which torch's Optimizer knows about."""
        self._arenas = Arenas(**self._settings)
        self._group_tables = GroupTables()
        self._pending_clip = PendingClip()
        self._params_seen = set()  # every param of every group (for add_param_group's check)
        self._constructed = False
        self._loading = None  # the `checkpoint.Loading` of a load_state_dict, while it runs

    # ----------------------------------------------------------------------------------------
    # Param groups

    @torch._disable_dynamo
    def add_param_group(self, param_group):
        """torch's `add_param_group`, with every check made before the group is appended (a
        group that is refused leaves the optimizer as it was), and linear in the number of
        groups. The arenas take the group at the next step."""
        group = normalized_group(param_group, self.defaults, self.param_groups)
        params = group["params"]
        _check_group(group, self._settings)
        # torch warns and steps such a parameter once per listing; an arena steps it once.
        aliasing.check_listed_once(aliasing.labelled_group(group, len(self.param_groups)))
        seen = self._params_seen
        if self._constructed:  # groups may have been edited since: look at them afresh
            seen = {p for existing in self.param_groups for p in existing["params"]}
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        if self._constructed:  # at construction, `_follow_groups` checks every group at once
            self._arenas.check_no_shared_memory([*self.param_groups, group])
        param_group.update(group)  # torch fills the caller's dict in, and appends it
        self.param_groups.append(param_group)
        seen.update(params)
        self._params_seen = seen

    def _follow_groups(self):
        """Rebuild the arenas if `param_groups` changed (a group added, a parameter appended to
        or removed from a group's list), carrying every state over through `self.state`."""
        if self._arenas.unchanged(self.param_groups):
            return
        removed = self._arenas.follow(self.param_groups)
        if removed is None:
            return
        for p in removed:  # its state stops being arena views
            if p in self.state:
                self.state.put(p, {name: value.clone() if torch.is_tensor(value) else value
                                   for name, value in self.state[p].items()})
        self._params_seen = self._arenas.params()
        self._follow_state(everything=True)

    @property
    def backends(self):
        """{(device, dtype): backend name ("numba", "triton" or "torch")} of every arena."""
        self._follow_groups()
        return self._arenas.backend_names

    @property
    def grad_copies(self):
        """How many gradients were copied because they could not be read in place (the ordinary
        `zero_grad(); backward(); step()` loop copies none)."""
        return self._arenas.grad_copies

    def _follow_state(self, everything=False):
        """Import what was edited in `self.state` since the last step into the arenas (see
        `state_entries.follow_edits`)."""
        if not isinstance(self.state, TrackedState):  # replaced wholesale (`opt.state = {}`)
            self.state = TrackedState(self.state)
            everything = True
        follow_edits(self.state, self._arenas, everything=everything)

    # ----------------------------------------------------------------------------------------
    # Step

    @_disable_dynamo
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One Adam step for every parameter that has a gradient.

        `grad_scale` and `found_inf` come from `torch.amp.GradScaler` (as arguments, or as the
        attributes the scaler sets on an optimizer with `_step_supports_amp_scaling`):
        gradients are unscaled inside the kernel, and a step with `found_inf` set changes
        nothing, step counts included.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf):
            self._pending_clip.clear()
            return loss  # skipped, as torch skips it: no state is created either
        self._step(grad_scale, found_inf, NO_CLOCK)
        self._pending_clip.clear()
        return loss

    def _step(self, grad_scale, found_inf, clock):
        """A step's phases, each under `clock(phase)`, a context manager: `step` passes one that
        does nothing, `bench breakdown` one that times each phase (a phase met in several
        arenas adds up). Every gradient is read and checked before any arena is stepped, so
        that an error (a sparse gradient, a wrong dtype) leaves everything as it was."""
        with clock("follow param_groups"):
            self._follow_groups()
        with clock("follow state edits"):
            self._follow_state()
        with clock("follow the clip"):  # the factor reaches exactly the gradients it measured
            self._pending_clip.resolve(self._arenas, refuse_edited=True)
        gradients = {}
        for key, arena in self._arenas.items():
            with clock("adopt replaced params"):
                arena.adopt_moved_params()
            # Unchanged since clip_grad_norm read them (`resolve` checked): read once, not twice.
            gradients[key] = (self._pending_clip.reading(key, arena)
                              or self._arenas.reader(key).read(clock))
        rows = [group_row(group) for group in self.param_groups]
        amsgrad = np.array([group["amsgrad"] for group in self.param_groups], dtype=bool)
        for key, gradients_of_arena in gradients.items():  # before any arena changes
            self._arenas.entries_of(key).check_amsgrad(gradients_of_arena.has_grad, amsgrad)
        for key, arena in self._arenas.items():
            has_grad = gradients[key].has_grad
            with clock("create state"):
                self._arenas.entries_of(key).create(has_grad, amsgrad, self.state.put)
            with clock("version counters"):
                # Before the kernel: a step interrupted between the two must not leave a
                # changed parameter looking unchanged to autograd.
                bump_versions(arena.params_in_order if has_grad.all()
                              else list(itertools.compress(arena.params_in_order, has_grad)))
            with clock("kernel"):
                device = table_device(arena.device)
                self._arenas.backend(key).adam_step(
                    arena.record, grads=gradients[key].for_backend,
                    group_table=self._group_tables.table(device, rows, self.param_groups),
                    inv_grad_scale=(None if grad_scale is None
                                    else grad_scale.to(device, torch.float64).reciprocal()),
                    found_inf=None if found_inf is None else found_inf.to(device),
                    clip_factor=self._pending_clip.factor(device))
            with clock("write back"):
                arena.former_memory.write_back()

    def zero_grad(self, set_to_none=True):
        """torch's `zero_grad`; it also drops a clipping factor no step has applied."""
        self._pending_clip.clear()
        super().zero_grad(set_to_none)

    @_disable_dynamo
    @torch.no_grad()
    def clip_grad_norm(self, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                       process_group=None):
        """`torch.nn.utils.clip_grad_norm_` over every parameter of this optimizer that has a
        gradient, folded into the next step: returns the total norm (a tensor, as torch's),
        reading each gradient once, and leaves p.grad unclipped; the next `step()` multiplies
        each gradient by min(1, max_norm / (norm + 1e-6)) inside its kernel, those it measured
        only (see `PendingClip`). `zero_grad()` or a step drops the factor. Call it where
        torch's would be called (after `GradScaler.unscale_`, before `step`). `foreach` is
        torch's, accepted and ignored (the clip is fused either way).

        `process_group`: where this optimizer holds only this rank's share of the parameters
        and nothing tells it so (ZeroRedundancyOptimizer's local optimizer), the group whose
        norms add up to the whole. DTensor (FSDP2) parameters need none: their mesh says.
        """
        self._follow_groups()
        self._follow_state()
        return fused_clip(
            self._arenas, self._pending_clip, float(max_norm), float(norm_type),
            error_if_nonfinite, process_group=process_group,
            torch_grads=lambda: [p.grad for group in self.param_groups
                                 for p in group["params"] if p.grad is not None])

    clip_grad_norm_ = clip_grad_norm

    # ----------------------------------------------------------------------------------------
    # Checkpoints and copies

    def state_dict(self):
        state_dict = super().state_dict()
        # Plain dicts, as torch's: a checkpoint loads with weights_only=True anywhere.
        state_dict["state"] = {key: plain(value) for key, value in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        """torch's `load_state_dict`, hooks included, plus: values go into the arenas at their
        own precision (torch's loader would first cast them to the params' dtype, rounding an
        fp32 master copy to bf16), a checkpoint whose tensors do not fit the params is refused
        before anything changes, and one without `master_param` (torch's) takes the master copy
        from the params (see `fused_adam.checkpoint`)."""
        self._follow_groups()
        loading = checkpoint.Loading(self._arenas)
        handle = self.register_load_state_dict_pre_hook(loading.check_and_keep)
        self._loading = loading
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_fused_adam_settings"] = self._settings
        return state

    def __setstate__(self, state):
        settings = state.pop("_fused_adam_settings", None)
        super().__setstate__(state)
        self._fill_group_defaults()
        if "_arenas" not in self.__dict__:
            # A copy (pickle, deepcopy, torch.load of the optimizer): its params and state are
            # copies too; build its arenas from them.
            self._settings = settings or dict(_DEFAULT_SETTINGS)
            self._start_machinery()
            self._constructed = True
            self.state = TrackedState(self.state)
            self._follow_groups()
            return
        # From load_state_dict: torch's loader has cast every value to its param's dtype;
        # take the checkpoint's own values instead, then import them all.
        self.state = checkpoint.with_own_values(self.state, self._loading, self.param_groups)
        self._follow_groups()
        self._follow_state(everything=True)

    def _fill_group_defaults(self):
        """Keys a checkpoint of an older torch (or ours) may lack, with torch's defaults."""
        fill_group_defaults(self.param_groups, self.defaults["decoupled_weight_decay"])


class FusedAdamW(FusedAdam):
    """AdamW (Loshchilov & Hutter): FusedAdam with decoupled weight decay, default 1e-2."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, backend=None, master_weights=False,
                 state_dtype=None, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, backend=backend,
                         master_weights=master_weights, state_dtype=state_dtype,
                         foreach=foreach, fused=fused, capturable=capturable,
                         differentiable=differentiable)

    def _fill_group_defaults(self):
        # torch's AdamW: a checkpoint of Adam (L2 weight decay) loads as AdamW all the same.
        super()._fill_group_defaults()
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _document_arguments(cls, names, **own):
    """Append to `cls`'s docstring (where there is one: not under `python -OO`) an "Args:"
    section: the `_ARGUMENTS` entries of `names`, or the text in `own`."""
    if cls.__doc__ is not None:
        cls.__doc__ += "\n\n    Args:\n" + "".join(
            "        " + own.get(name, _ARGUMENTS.get(name)).replace("\n", "\n        ") + "\n"
            for name in names)


_document_arguments(FusedAdam, _ARGUMENTS)
_document_arguments(
    FusedAdamW, [name for name in _ARGUMENTS if name != "decoupled_weight_decay"],
    weight_decay="""weight_decay (float, optional): decoupled weight decay coefficient: each step
    scales the params by (1 - lr * weight_decay) before the Adam update, always (a param group
    or an Adam checkpoint saying otherwise included), as torch's AdamW (default: 1e-2).""")
