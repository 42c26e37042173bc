"""Param groups: torch's checks of a new group and of Adam's hyperparameters, and the group
table the kernels read.

The table has one float64 row per param group (columns in `kernels/contract.py`); it is rebuilt
only when a hyperparameter changed (an LR scheduler writes `group["lr"]` every step or epoch).
A learning rate that is a GPU tensor is copied into the table on the device, so reading it
costs no host sync and a captured CUDA graph follows its changes.
"""
import torch

from fused_adam.kernels.contract import GROUP_COLUMNS, LR

# Stands in the row for a learning rate that lives on a GPU (see `GroupTables.table`).
_LR_ON_DEVICE = -1.0
# Group keys torch.optim.Adam keeps; carrying them all lets either optimizer load the other's
# state_dict with its meaning intact (decoupled_weight_decay above all).
TORCH_GROUP_DEFAULTS = dict(foreach=None, differentiable=False, fused=None)


def validate_hyperparameters(lr, betas, eps, weight_decay):
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
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")


def normalized_group(param_group, defaults, param_groups):
    """torch's `add_param_group` checks and defaults, as a new dict, before anything is
    appended (torch fills the caller's dict in as it goes, and may raise half-way)."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but "
            "the ordering of tensors in sets will change between runs. Please use a list "
            "instead.")
    else:
        params = list(params)
    names = [p[0] for p in params if isinstance(p, tuple)]
    params = [p[1] if isinstance(p, tuple) else p for p in params]
    if names and len(names) != len(params):
        raise ValueError("all optimizer params should be with/without names. Some param "
                         "names are missing")
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                            + torch.typename(p))
        if not (p.is_leaf or p.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor")
    group = {**defaults, **param_group, "params": params}
    if names:
        group["param_names"] = names
    if param_groups and ("param_names" in group) != ("param_names" in param_groups[0]):
        with_names = "with names" if "param_names" in group else "without names"
        raise ValueError("all optimizer param groups should be with/without names. "
                         f"cannot add param group {with_names} to the optimizer")
    validate_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    return group


def fill_group_defaults(param_groups, decoupled_weight_decay):
    """Keys a checkpoint of an older torch (or ours) may lack, with torch's defaults."""
    for group in param_groups:
        group.setdefault("amsgrad", False)
        group.setdefault("maximize", False)
        group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        group.setdefault("capturable", False)
        for key, value in TORCH_GROUP_DEFAULTS.items():
            group.setdefault(key, value)


def _lr_on_device(group):
    lr = group["lr"]
    return isinstance(lr, torch.Tensor) and lr.device.type != "cpu"


def group_row(group):
    """A param group as one row of the kernels' group table."""
    beta1, beta2 = group["betas"]
    lr = _LR_ON_DEVICE if _lr_on_device(group) else float(group["lr"])
    return (lr, float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), float(group["maximize"]), float(group["amsgrad"]),
            float(group["decoupled_weight_decay"]))


class GroupTables:
    """The group table on each device that needs one, rebuilt when a row changed."""

    def __init__(self):
        self._tables = {}  # device -> (rows, float64 table on that device)

    def table(self, device, rows, groups):
        cached = self._tables.get(device)
        if cached is None or cached[0] != rows:
            table = torch.tensor(rows, dtype=torch.float64).reshape(-1, GROUP_COLUMNS)
            cached = self._tables[device] = (rows, table.to(device))
        table = cached[1]
        for index, group in enumerate(groups):
            if _lr_on_device(group):
                table[index, LR].copy_(group["lr"].reshape(()), non_blocking=True)
        return table
