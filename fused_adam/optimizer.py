"""FusedAdam and FusedAdamW: drop-in `torch.optim.Adam` / `AdamW` whose step is one kernel launch
per arena (one arena per device and dtype), covering every parameter of every group.

The class reads like `torch/optim/adam.py`: `__init__` validates and builds `defaults`,
`add_param_group` checks a group as torch does, `step()` gathers what the kernels need and calls
one launcher per arena. Moments and step counts live in the arenas; `self.state[p]` holds
torch-named tensors over them, created at a parameter's first gradient as torch creates its
state, so `state_dict()` loads into `torch.optim.Adam` and back.

`param_groups` and `state` stay what they are in torch, containers users and libraries edit: a
step first follows them (`_follow_groups`, `_follow_state`), at the cost of one identity check
per parameter when nothing changed.
"""
import itertools
import operator
import warnings

import numpy as np
import torch
from torch.optim import Optimizer

from fused_adam import aliasing, dispatch
from fused_adam.arenas import Arenas
from fused_adam.clipping import PendingClip, clip_coefficient, gradient_norm
from fused_adam.clock import NO_CLOCK
from fused_adam.distributed import local_grad_of
from fused_adam.kernels.contract import COMPACT_MASTERS, QUANTIZED_STATE_DTYPE
from fused_adam.flat import MASTER_KEY, MAX_KEY, check_steppable, real_dtype, table_device
from fused_adam.groups import (
    GroupTables,
    group_row,
    normalized_group,
    validate_hyperparameters,
)
from fused_adam.state import TrackedState, plain

# Group keys torch.optim.Adam keeps; carrying them all lets either optimizer load the other's
# state_dict with its meaning intact (decoupled_weight_decay above all).
_TORCH_GROUP_DEFAULTS = dict(foreach=None, differentiable=False, fused=None)
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, QUANTIZED_STATE_DTYPE)


def _disable_dynamo(function):
    """torch.compile graph-breaks at the step and runs it eagerly: the kernels are not
    traceable (Dynamo would step into numba's dispatcher)."""
    disable = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable
    return disable(function)


def bump_versions(params):
    """What an in-place op does to autograd's version counters, for the params a step wrote:
    a backward through a graph that saved one of them before the step then raises, as it does
    after torch's Adam."""
    try:
        torch._C._increment_version(params)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for p in params:
            torch._C._increment_version(p)


class FusedAdam(Optimizer):
    """Adam (Kingma & Ba) with torch.optim.Adam's options and numbers, one fused pass per step.

    Args beyond torch's: `backend` is "numba", "triton", "torch" or None (by device; the
    `FUSED_ADAM_BACKEND` environment variable does the same). `master_weights=True` keeps an
    fp32 copy of bf16/fp16 params, which the step updates and rounds into them (a no-op, with a
    warning, when no param is bf16/fp16); "bf16+16" or "bf16+8" (bf16 params) keep it compact,
    as an int16 (exact) or int8 remainder beside the param. `state_dtype` is the dtype of the
    moments: None (fp32 with a master, else the params', as torch), torch.float32,
    torch.bfloat16, or torch.int8 for 8-bit moments (codes with an fp32 absmax per 256 values,
    no amsgrad; `fused_adam.dequantized_state_dict` turns their `state_dict()` into torch's
    format, `fused_adam.master_params` gives a master as fp32 values). See
    `kernels/contract.py` for the exact maps. `foreach` and `fused` are accepted for drop-in
    use and ignored: the step is always fused. `capturable=True` (CUDA only): step
    counts, bias corrections and a tensor `lr` stay on the device and nothing is read back to
    the host, so the step can be captured in a CUDA graph after one eager step.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, backend=None,
                 master_weights=False, state_dtype=None, foreach=None, fused=None,
                 capturable=False, differentiable=False):
        validate_hyperparameters(lr, betas, eps, weight_decay)
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
        self._settings = dict(backend=backend, master_weights=master_weights,
                              state_dtype=state_dtype)
        self._start_machinery()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        capturable=capturable, **_TORCH_GROUP_DEFAULTS)
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
        self._loading = None  # the checkpoint load_state_dict is loading, while it runs

    # ----------------------------------------------------------------------------------------
    # Param groups

    @torch._disable_dynamo
    def add_param_group(self, param_group):
        """torch's `add_param_group`, with every check made before the group is appended (a
        group that is refused leaves the optimizer as it was), and linear in the number of
        groups. The arenas take the group at the next step."""
        group = normalized_group(param_group, self.defaults, self.param_groups)
        params = group["params"]
        if group["amsgrad"] and self._settings["state_dtype"] == QUANTIZED_STATE_DTYPE:
            raise ValueError("FusedAdam: amsgrad is not offered with 8-bit moments "
                             "(state_dtype=torch.int8)")
        for p in params:
            check_steppable(p)
            if (self._settings["master_weights"] in COMPACT_MASTERS
                    and p.dtype == torch.float16):
                raise ValueError(f"FusedAdam: master_weights={self._settings['master_weights']!r}"
                                 " is for bfloat16 parameters, not float16 ones (use True)")
            if p.is_complex() and self._settings["state_dtype"] == QUANTIZED_STATE_DTYPE:
                raise ValueError("FusedAdam: 8-bit moments (state_dtype=torch.int8) are not "
                                 "offered for complex parameters")
            if group["capturable"] and p.device.type != "cuda":
                raise ValueError(
                    f"FusedAdam: capturable=True needs CUDA parameters, got {p.device.type} ones")
            dispatch.backend_name(self._settings["backend"], p.device, real_dtype(p.dtype))
        # torch warns and steps such a parameter once per listing; an arena steps it once.
        aliasing.check_listed_once(aliasing.labelled_group(group, len(self.param_groups)))
        seen = self._params_seen
        if self._constructed:  # groups may have been edited since: look at them afresh
            seen = {p for existing in self.param_groups for p in existing["params"]}
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        if self._constructed:  # at construction, `_follow_groups` checks every group at once
            self._check_no_shared_memory([*self.param_groups, group])
        param_group.update(group)  # torch fills the caller's dict in, and appends it
        self.param_groups.append(param_group)
        seen.update(params)
        self._params_seen = seen

    def _follow_groups(self):
        """Rebuild the arenas if `param_groups` changed (a group added, a parameter appended to
        or removed from a group's list), carrying every state over through `self.state`."""
        if self._arenas.unchanged(self.param_groups):
            return
        aliasing.check_listed_once(aliasing.labelled_params(self.param_groups))
        self._check_no_shared_memory(self.param_groups)
        replaced = self._arenas.follow(self.param_groups)
        if replaced is None:
            return
        kept = {p for arena in self._arenas.values() for p in arena.params_in_order}
        for arena in replaced.values():
            for index, p in enumerate(arena.params_in_order):
                if p not in kept:  # removed from the groups: its memory becomes its own
                    arena.release(index)
                    if p in self.state:
                        self.state.put(p, {name: value.clone() if torch.is_tensor(value)
                                           else value for name, value in self.state[p].items()})
        self._params_seen = kept
        self._follow_state(everything=True)

    def _check_no_shared_memory(self, param_groups):
        """ValueError, naming both, for two params of `param_groups` that share memory, or one
        that shares the memory a param had before an arena took it (`b = nn.Parameter(a.data)`
        made before the optimizer, added after)."""
        listed = aliasing.labelled_params(param_groups)
        label_of = {id(p): label for label, p in listed}
        former = [(label_of[id(p)], tensor) for arena in self._arenas.values()
                  for p, tensor in arena.former_memory() if id(p) in label_of]
        aliasing.check_no_shared_memory(listed, former)

    @property
    def backends(self):
        """{(device, dtype): backend name ("numba", "triton" or "torch")} of every arena."""
        self._follow_groups()
        return self._arenas.backends

    @property
    def grad_copies(self):
        """How many gradients were copied because they could not be read in place (the ordinary
        `zero_grad(); backward(); step()` loop copies none)."""
        return self._arenas.grad_copies

    # ----------------------------------------------------------------------------------------
    # State

    def _follow_state(self, everything=False):
        """Import what was edited in `self.state` since the last step into the arenas: a
        cleared or deleted entry restarts that parameter's Adam, a tensor put into an entry
        becomes its value. All is checked before anything is written; an edit that is refused
        stays pending, so the next step refuses it again."""
        if not isinstance(self.state, TrackedState):  # replaced wholesale (`opt.state = {}`)
            self.state = TrackedState(self.state)
            everything = True
        log = self.state.log
        if not everything and log.empty:
            return
        everything = everything or log.everything
        targets = [(arena, index, p, dict.get(self.state, p))
                   for arena in self._arenas.values()
                   for index, p in enumerate(arena.params_in_order)
                   if everything or p in log.params]
        plans = [arena.plan_import(index, entry) for arena, index, _, entry in targets]
        for (arena, index, p, entry), planned in zip(targets, plans):
            if planned is None:  # no state (an empty entry is torch's "no state" too)
                if arena.has_state[index]:
                    arena.reset_state(index)
                continue
            for name, value in planned:
                arena.write_state(index, name, value)
            if arena.lacks_master(entry):
                arena.write_state(index, MASTER_KEY, p.detach())
            views = arena.state_entry(index, amsgrad=MAX_KEY in entry)
            self.state.put(p, {**entry, **views})
            arena.has_state[index] = True
            arena.has_max[index] = MAX_KEY in entry
        log.take()

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
        for key, arena in self._arenas.items():
            # Switched on after a parameter's first step, amsgrad finds no max_exp_avg_sq in
            # its state: torch's Adam raises KeyError there, and so does this, before any change.
            missing = (gradients[key].has_grad & arena.has_state & ~arena.has_max
                       & amsgrad[arena.host_groups])
            if missing.any():
                raise KeyError(MAX_KEY)
            if arena.quantized and amsgrad[arena.groups].any():
                raise ValueError("FusedAdam: amsgrad is not offered with 8-bit moments "
                                 "(state_dtype=torch.int8); a param group switched it on")
        for key, arena in self._arenas.items():
            has_grad = gradients[key].has_grad
            with clock("create state"):
                if amsgrad[arena.groups].any():
                    arena.ensure_max_buffer()
                self._create_state(arena, has_grad, amsgrad)
            with clock("version counters"):
                # Before the kernel: a step interrupted between the two must not leave a
                # changed parameter looking unchanged to autograd.
                bump_versions(arena.params_in_order if has_grad.all()
                              else list(itertools.compress(arena.params_in_order, has_grad)))
            with clock("kernel"):
                kernels = self._arenas.launcher(key)
                device = table_device(arena.device)
                kernels.adam_step(
                    arena.record, grads=gradients[key].for_backend,
                    group_table=self._group_tables.table(device, rows, self.param_groups),
                    inv_grad_scale=(None if grad_scale is None
                                    else grad_scale.to(device, torch.float64).reciprocal()),
                    found_inf=None if found_inf is None else found_inf.to(device),
                    clip_factor=self._pending_clip.factor(device))
            with clock("write back"):
                arena.write_back()

    def _create_state(self, arena, has_grad, amsgrad):
        """torch creates a parameter's state at its first gradient; so do we (as arena views).
        Done before the kernel runs: a step interrupted after it leaves state at step 0 with
        zero moments, which is where torch's own state starts."""
        new = has_grad & ~arena.has_state
        for index in np.flatnonzero(new):
            with_max = bool(amsgrad[arena.host_groups[index]])
            self.state.put(arena.params_in_order[index], arena.state_entry(index, with_max))
            arena.has_max[index] = with_max
        arena.has_state |= new

    def zero_grad(self, set_to_none=True):
        """torch's `zero_grad`; it also drops a clipping factor no step has applied."""
        self._pending_clip.clear()
        super().zero_grad(set_to_none)

    # ----------------------------------------------------------------------------------------
    # Gradient clipping

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
        norm_type, max_norm = float(norm_type), float(max_norm)
        self._follow_groups()
        self._follow_state()
        # A factor whose gradients are gone (a step skipped, then a zero_grad that never reached
        # this optimizer: ZeRO's, the model's) applies to nothing; those it still applies to
        # are scaled now, as torch's clip left them. One edited since is measured as it stands.
        self._pending_clip.resolve(self._arenas, refuse_edited=False)
        readings = []
        for key, arena in self._arenas.items():
            arena.adopt_moved_params()
            readings.append((key, arena, self._arenas.reader(key).read(NO_CLOCK)))
        norm = gradient_norm(
            [(arena, read, self._arenas.launcher(key)) for key, arena, read in readings],
            norm_type, process_group=process_group,
            torch_grads=lambda: [p.grad for group in self.param_groups
                                 for p in group["params"] if p.grad is not None])
        if self._pending_clip.armed:  # clipped twice: the gradients count as scaled once
            norm = (norm.double() * self._pending_clip.factor(norm.device)).to(norm.dtype)
        coefficient = clip_coefficient(norm, max_norm, error_if_nonfinite, norm_type)
        self._pending_clip.set(coefficient, {table_device(arena.device)
                                             for _, arena, _ in readings} | {norm.device})
        self._pending_clip.watch(
            {key: (arena, read) for key, arena, read in readings},
            grad_of=(local_grad_of if any(arena.is_distributed for _, arena, _ in readings)
                     else operator.attrgetter("grad")))
        return norm

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
        from the params."""
        self._follow_groups()
        loading = {}

        def check_and_keep(optimizer, final_state_dict):  # after every pre-hook of the user's
            self._check_checkpoint(final_state_dict)
            loading["state_dict"] = final_state_dict

        handle = self.register_load_state_dict_pre_hook(check_and_keep)
        self._loading = loading
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self._loading = None

    def _checkpoint_params(self, state_dict):
        """{saved id: param} as torch's loader pairs them, or None where the groups differ (its
        own ValueError follows)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"])
                for saved, group in zip(saved_groups, self.param_groups)):
            return None
        return dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                        itertools.chain.from_iterable(g["params"] for g in self.param_groups)))

    def _check_checkpoint(self, state_dict):
        by_id = self._checkpoint_params(state_dict)
        if by_id is None:
            return
        where = {p: (arena, index) for arena in self._arenas.values()
                 for index, p in enumerate(arena.params_in_order)}
        for saved_id, entry in state_dict["state"].items():
            p = by_id.get(saved_id)
            if p is not None and p in where:
                arena, index = where[p]
                arena.plan_import(index, entry)

    def __getstate__(self):
        state = super().__getstate__()
        state["_fused_adam_settings"] = self._settings
        return state

    def __setstate__(self, state):
        settings = state.pop("_fused_adam_settings", None)
        super().__setstate__(state)
        self._fill_group_defaults()
        self._after_setstate(settings)

    def _fill_group_defaults(self):
        """Keys a checkpoint of an older torch (or ours) may lack, with torch's defaults."""
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self.defaults["decoupled_weight_decay"])
            group.setdefault("capturable", False)
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def _after_setstate(self, settings):
        if "_arenas" not in self.__dict__:
            # A copy (pickle, deepcopy, torch.load of the optimizer): its params and state are
            # copies too; build its arenas from them.
            self._settings = settings or dict(backend=None, master_weights=False,
                                              state_dtype=None)
            self._start_machinery()
            self._constructed = True
            self.state = TrackedState(self.state)
            self._follow_groups()
            return
        # From load_state_dict: torch's loader has cast every value to its param's dtype;
        # take the checkpoint's own values instead, then import them all.
        loaded = self._loading.get("state_dict") if self._loading else None
        state = TrackedState(self.state)
        if loaded is not None:
            by_id = self._checkpoint_params(loaded) or {}
            for saved_id, entry in loaded["state"].items():
                p = by_id.get(saved_id)
                if p is not None and p in state:
                    state[p] = {**state[p], **entry}
        self.state = state
        self._follow_groups()
        self._follow_state(everything=True)


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
