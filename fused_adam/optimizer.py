"""FusedAdam and FusedAdamW: drop-in `torch.optim.Adam` / `AdamW` whose step is one kernel launch
per arena (one arena per device and dtype), covering every parameter of every group.

The class reads like `torch/optim/adam.py`: `__init__` validates and builds `defaults`,
`add_param_group` packs parameters into arenas, `step()` gathers what the kernel needs and calls
one launcher per arena. Moments and step counts live in the arenas; `self.state[p]` holds
torch-named views into them, created at a parameter's first gradient as torch creates its state,
so `state_dict()` loads into `torch.optim.Adam` and back.
"""
from collections import defaultdict

import numpy as np
import torch
from torch.optim import Optimizer

from fused_adam import dispatch
from fused_adam.distributed import copy_into
from fused_adam.flat import Arena
from fused_adam.kernels import GROUP_COLUMNS, LR

# Group keys torch.optim.Adam keeps; carrying them all lets either optimizer load the other's
# state_dict with its meaning intact (decoupled_weight_decay above all).
_TORCH_GROUP_DEFAULTS = dict(foreach=None, differentiable=False, fused=None)


def _validate_hyperparameters(lr, betas, eps, weight_decay):
    """torch.optim.Adam's checks, with its messages."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


# Stands in the group table for a learning rate that lives on a GPU: `step` copies it into the
# table there, so reading it costs no host sync and a captured CUDA graph follows its changes.
_LR_ON_DEVICE = -1.0


def _lr_on_device(group):
    lr = group["lr"]
    return isinstance(lr, torch.Tensor) and lr.device.type != "cpu"


def _group_row(group):
    """A param group as one row of the kernels' group table (columns in `fused_adam.kernels`)."""
    beta1, beta2 = group["betas"]
    lr = _LR_ON_DEVICE if _lr_on_device(group) else float(group["lr"])
    return (lr, float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), float(group["maximize"]), float(group["amsgrad"]),
            float(group["decoupled_weight_decay"]))


class FusedAdam(Optimizer):
    """Adam (Kingma & Ba) with torch.optim.Adam's options and numbers, one fused pass per step.

    Args beyond torch's: `backend` is "numba", "triton", "torch" or None (by device; the
    `FUSED_ADAM_BACKEND` environment variable does the same). `foreach` and `fused` are accepted
    for drop-in use and ignored: the step is always fused. `capturable=True` (CUDA only): step
    counts, bias corrections and a tensor `lr` stay on the device and nothing is read back to the
    host, so the step can be captured in a CUDA graph after one eager step.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False, decoupled_weight_decay=False, backend=None,
                 master_weights=False, state_dtype=None, foreach=None, fused=None,
                 capturable=False, differentiable=False):
        _validate_hyperparameters(lr, betas, eps, weight_decay)
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype}; use torch.float32 or "
                             "torch.bfloat16")
        self._master_weights, self._state_dtype = master_weights, state_dtype
        if backend is not None and backend not in dispatch.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; choose one of {dispatch.BACKENDS}")
        if differentiable:
            raise ValueError("FusedAdam does not support differentiable=True")
        self._requested_backend = backend
        self._arenas = {}  # (device, dtype) -> Arena
        self._launchers = {}  # (device, dtype) -> the backend's adam_step
        self._group_tables = {}  # device -> (rows, float64 table on that device)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        capturable=capturable, **_TORCH_GROUP_DEFAULTS)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------------
    # Construction

    def add_param_group(self, param_group):
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_hyperparameters(merged["lr"], merged["betas"], merged["eps"],
                                  merged["weight_decay"])
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        # torch keeps a parameter listed twice in one group (with a warning) and steps it twice;
        # a parameter has one segment here, so it is stepped once.
        unique = list(dict.fromkeys(self.param_groups[-1]["params"]))
        by_arena = defaultdict(list)
        for p in unique:
            if p.is_complex():
                raise ValueError(
                    f"FusedAdam does not support complex parameters yet (got {p.dtype}); "
                    "optimize torch.view_as_real(p) instead")
            by_arena[(p.device, p.dtype)].append(p)
        for key, params in by_arena.items():
            if self.param_groups[-1]["capturable"] and key[0].type != "cuda":
                raise ValueError(
                    f"FusedAdam: capturable=True needs CUDA parameters, got {key[0].type} ones")
            if key not in self._arenas:
                kernels = dispatch.kernel_module(
                    dispatch.backend_name(self._requested_backend, *key))
                self._launchers[key] = kernels.adam_step
                self._arenas[key] = Arena(
                    *key, grad_alignment=kernels.GRAD_ADDRESS_ALIGNMENT,
                    keep_grad_tensors=kernels.READS_GRAD_TENSORS,
                    state_dtype=self._state_dtype, master_weights=self._master_weights)
            arena = self._arenas[key]
            arena.add(params, group_index)
            self._refresh_state_views(arena)

    def _refresh_state_views(self, arena):
        """Re-point `self.state` at `arena`'s buffers (they move when the arena grows)."""
        for index in np.flatnonzero(arena.has_state):
            p = arena.params_in_order[index]
            self.state[p] = arena.state_views(index, amsgrad="max_exp_avg_sq" in self.state[p])

    @property
    def backends(self):
        """{(device, dtype): backend name} of every arena."""
        return {key: launch.__module__.rsplit(".", 1)[-1] for key, launch in self._launchers.items()}

    @property
    def grad_copies(self):
        """How many gradients were copied because they could not be read in place (the ordinary
        `zero_grad(); backward(); step()` loop copies none)."""
        return sum(arena.grad_copies for arena in self._arenas.values())

    # ----------------------------------------------------------------------------------------
    # Step

    def _group_table(self, device, rows):
        """The group table on `device`, rebuilt only when a hyperparameter changed."""
        cached = self._group_tables.get(device)
        if cached is None or cached[0] != rows:
            table = torch.tensor(rows, dtype=torch.float64).reshape(-1, GROUP_COLUMNS)
            cached = (rows, table.to(device))
            self._group_tables[device] = cached
        table = cached[1]
        for index, group in enumerate(self.param_groups):
            if _lr_on_device(group):
                table[index, LR].copy_(group["lr"].reshape(()), non_blocking=True)
        return table

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
            return loss  # skipped, as torch skips it: no state is created either
        self._launch(self._gather_grads(), grad_scale, found_inf)
        return loss

    def _gather_grads(self):
        """Every arena's gradient address table. All are gathered before any arena is stepped,
        so that an error (a sparse gradient, say) leaves everything as it was."""
        grad_addresses = {}
        for key, arena in self._arenas.items():
            arena.check_params_in_place()
            grad_addresses[key] = arena.gather_grads()
        return grad_addresses

    def _launch(self, grad_addresses, grad_scale=None, found_inf=None):
        """One kernel launch per arena, then the per-parameter state torch would have created."""
        rows = [_group_row(group) for group in self.param_groups]
        amsgrad_groups = [group["amsgrad"] for group in self.param_groups]
        for key, arena in self._arenas.items():
            if arena.max_exp_avg_sq is None and any(amsgrad_groups[g] for g in arena.groups):
                arena.ensure_max_exp_avg_sq()
            inv_grad_scale = None
            if grad_scale is not None:
                inv_grad_scale = grad_scale.to(arena.device, torch.float64).reciprocal()
            self._launchers[key](
                arena, grad_addresses[key], self._group_table(arena.device, rows),
                inv_grad_scale=inv_grad_scale,
                found_inf=None if found_inf is None else found_inf.to(arena.device))
            self._create_state(arena, amsgrad_groups)
            arena.write_back()
            arena.grads_by_segment = None

    def _create_state(self, arena, amsgrad_groups):
        """torch creates a parameter's state at its first gradient; so do we (as arena views)."""
        new = arena.has_grad & ~arena.has_state
        for index in np.flatnonzero(new):
            amsgrad = amsgrad_groups[arena.host_groups[index]]
            self.state[arena.params_in_order[index]] = arena.state_views(index, amsgrad)
        arena.has_state |= new

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", self.defaults["decoupled_weight_decay"])
            group.setdefault("capturable", False)
            for key, value in _TORCH_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict):
        """Load a state_dict of FusedAdam or torch.optim.Adam: its values are copied into the
        arenas at their own precision (torch's loader would first cast them to the params'
        dtype, rounding an fp32 master copy to bf16). A checkpoint without `master_param`
        (torch's) takes the master copy from the params."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_by_param = {p: saved_state[i] for p, i in zip(params, saved_ids) if i in saved_state}
        self.state = defaultdict(dict)
        for arena in self._arenas.values():
            for index, p in enumerate(arena.params_in_order):
                saved = saved_by_param.get(p)
                if not saved:
                    arena.reset_segment(index)
                    continue
                # Values may be this arena's own views (a live state_dict): copied segment by
                # segment, each onto itself, nothing is lost.
                views = arena.state_views(index, amsgrad="max_exp_avg_sq" in saved)
                for name, view in views.items():
                    value = saved.get(name, p.detach() if name == "master_param" else 0.0)
                    if torch.is_tensor(value):
                        copy_into(view, value)
                    else:
                        view.fill_(float(value))
                self.state[p] = views
                arena.has_state[index] = True


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
