"""The optimizers the step benchmark compares, each building its own copy of a config's
parameters: torch's three Adam implementations and fused_adam's backends.

Every provider starts from the same values (one seed) so that all of them do the same work, and
each owns its parameters outright: fused_adam moves `p.data` into its arena, so sharing tensors
between providers would hand one provider's layout to another.
"""
import os
from dataclasses import dataclass
from math import prod

import torch

LR = 1e-3
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused")
OURS = ("fused_adam-numba", "fused_adam-triton", "fused_adam-torch")
ALL_PROVIDERS = TORCH_PROVIDERS + OURS
_BACKEND_MODULES = {"numba": "numba_adam", "triton": "triton_adam", "torch": "reference"}


def default_providers(device_type):
    """torch's three and our compiled backend for the device. `fused_adam-torch` (the plain-torch
    reference, one parameter at a time) is left out unless asked for: it is the oracle, not a
    contender. `fused_adam-triton` on CPU runs in Triton's interpreter, so it too needs asking."""
    ours = {"cpu": "fused_adam-numba", "cuda": "fused_adam-triton"}[device_type]
    return list(TORCH_PROVIDERS) + [ours]


def prepare_environment(providers, device_type):
    """Triton picks interpreter or compiler when it is first imported, so the interpreter must be
    switched on before anything imports it."""
    if device_type == "cpu" and "fused_adam-triton" in providers:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def make_params(shapes, device, seed=0, dtype=torch.float32):
    """Leaf tensors of `shapes`, N(0, 0.02) like GPT-2's init, identical for every provider."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, device=device, dtype=dtype)
        p.normal_(0.0, 0.02, generator=generator)
        params.append(p.requires_grad_())
    return params


def make_optimizer(name, params):
    """The optimizer `name` over `params`; ValueError/RuntimeError if it cannot run here."""
    if name == "torch-forloop":
        return torch.optim.Adam(params, lr=LR, foreach=False)
    if name == "torch-foreach":
        return torch.optim.Adam(params, lr=LR, foreach=True)
    if name == "torch-fused":
        return torch.optim.Adam(params, lr=LR, fused=True)
    if name.startswith("fused_adam-"):
        import fused_adam
        backend = name.split("-", 1)[1]
        optimizer = fused_adam.FusedAdam(params, lr=LR, backend=backend)
        # `backends` names kernel modules (numba_adam, triton_adam, reference); never benchmark
        # one backend under another's name.
        got = set(optimizer.backends.values())
        if got != {_BACKEND_MODULES[backend]}:
            raise RuntimeError(f"{name}: asked for backend {backend!r}, got {got}")
        return optimizer
    raise ValueError(f"unknown provider {name!r}; choose from {list(ALL_PROVIDERS)}")


def cheap_loss(params):
    """A loss over every parameter whose backward is one pass per tensor: autograd then hands each
    parameter a fresh gradient tensor (2p), exactly as a training loop's backward does."""
    return sum((p * p).sum() for p in params)


@dataclass
class Provider:
    """One optimizer over its own parameters, driven like a training loop."""

    name: str
    params: list
    optimizer: torch.optim.Optimizer
    bytes_per_step: int  # 28 B per fp32 parameter: read p, g, m, v; write p, m, v

    def forward_backward(self):
        cheap_loss(self.params).backward()

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self):
        """Params and moments (what lives across steps), for the huge-page report."""
        out = list(self.params)
        for state in self.optimizer.state.values():
            out += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
        return out


def build(name, config, device, seed=0):
    params = make_params(config.shapes, device, seed)
    optimizer = make_optimizer(name, params)
    n = sum(prod(shape) for shape in config.shapes)
    return Provider(name, params, optimizer, 28 * n)
