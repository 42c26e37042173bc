"""The optimizers the step benchmark compares, each building its own copy of a config's
parameters: torch's three Adam implementations and fused_adam's backends.

Every provider starts from the same values (one seed) so that all of them do the same work, and
each owns its parameters outright: fused_adam moves `p.data` into its arena, so sharing tensors
between providers would hand one provider's layout to another.
"""
import os
from dataclasses import dataclass

import torch

from bench.memory import Footprint

LR = 1e-3
# `clip+step` clips the gradients' total 2-norm to this before the step. The stand-in backward
# (`cheap_loss`) hands every parameter a gradient of ones, so the norm is sqrt(n_params) (over
# 1,000 for every config, 11,155 for GPT-2-small's shapes): 1.0 clips every step, as it must for
# the measurement to include the scaling.
MAX_NORM = 1.0
TORCH_PROVIDERS = ("torch-forloop", "torch-foreach", "torch-fused")
OURS = ("fused_adam-numba", "fused_adam-triton", "fused_adam-torch")
# Modes that move fewer (or differently split) bytes per parameter, as `provider:mode`:
# (param dtype, FusedAdam options, bytes per parameter per step).
MODES = {
    # fp32 params, bf16 moments: read p 4, g 4, m 2, v 2; write p 4, m 2, v 2.
    "bf16-states": (torch.float32, dict(state_dtype=torch.bfloat16), 20),
    # fp32 params, 8-bit moments: read p 4, g 4, m 1, v 1; write p 4, m 1, v 1; and each
    # moment's fp32 absmax per 256 values, read and written (16 B per 256).
    "int8-states": (torch.float32, dict(state_dtype=torch.int8), 16 + 16 / 256),
    # bf16 params with an fp32 master and fp32 moments: read master 4, g 2, m 4, v 4;
    # write master 4, p 2, m 4, v 4.
    "bf16-master": (torch.bfloat16, dict(master_weights=True), 28),
    # bf16 params, fp32 master, bf16 moments: read 4 + 2 + 2 + 2, write 4 + 2 + 2 + 2.
    "bf16-master-bf16-states": (torch.bfloat16,
                                dict(master_weights=True, state_dtype=torch.bfloat16), 20),
    # bf16 params with an int8 remainder (16 significant bits) and 8-bit moments: read p 2,
    # remainder 1, g 2, m 1, v 1; write p 2, remainder 1, m 1, v 1; and the absmax.
    "bf16+8-int8-states": (torch.bfloat16,
                           dict(master_weights="bf16+8", state_dtype=torch.int8), 12 + 16 / 256),
    # bf16 params with an int16 remainder (exactly an fp32 master) and 8-bit moments.
    "bf16+16-int8-states": (torch.bfloat16,
                            dict(master_weights="bf16+16", state_dtype=torch.int8),
                            14 + 16 / 256),
}
MODE_PROVIDERS = tuple(f"{ours}:{mode}" for ours in OURS[:2] for mode in MODES)
# torch's own bf16 Adam (bf16 params and moments, 14 B/param), the comparator for the modes.
TORCH_BF16 = "torch-fused:bf16"
ALL_PROVIDERS = TORCH_PROVIDERS + OURS + MODE_PROVIDERS + (TORCH_BF16,)
# fused_adam's compiled backend for each device type.
COMPILED = {"cpu": "fused_adam-numba", "cuda": "fused_adam-triton"}
# The one every other provider is paired with, and every speedup is relative to.
ANCHOR = "torch-fused"

def default_clip_providers(device_type):
    """Whose pairs time clip+step by default: torch-fused (the anchor: torch's
    `clip_grad_norm_` foreach + fused Adam, the comparison that matters), torch-foreach and the
    compiled backend in fp32; every optimizer's (`--clip-providers all`) costs too much time and
    memory for the default run (bench/RESULTS.md, "Time")."""
    return [ANCHOR, "torch-foreach", COMPILED[device_type]]


def default_providers(device_type):
    """torch's three, and every backend of ours that runs on the device: the compiled one (in
    fp32 and in the two mixed-precision modes) and the plain-torch reference, one parameter at a
    time. `fused_adam-triton` on CPU runs in Triton's interpreter, an emulator rather than a
    backend for CPUs: it only runs when asked for."""
    ours = COMPILED[device_type]
    return list(TORCH_PROVIDERS) + [ours, f"{ours}:bf16-states", f"{ours}:int8-states",
                                    f"{ours}:bf16-master", f"{ours}:bf16+8-int8-states",
                                    "fused_adam-torch"]


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


def parse(name):
    """`provider[:mode]` -> (provider, param dtype, FusedAdam options, bytes per parameter)."""
    provider, _, mode = name.partition(":")
    if name == TORCH_BF16:
        return provider, torch.bfloat16, {}, 14
    if mode:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
        return (provider, *MODES[mode])
    return provider, torch.float32, {}, 28


def make_optimizer(name, params, **options):
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
        optimizer = fused_adam.FusedAdam(params, lr=LR, backend=backend, **options)
        # Never benchmark one backend under another's name.
        got = set(optimizer.backends.values())
        if got != {backend}:
            raise RuntimeError(f"{name}: asked for backend {backend!r}, got {sorted(got)}")
        return optimizer
    raise ValueError(f"unknown provider {name!r}; choose from {list(ALL_PROVIDERS)}")


def cheap_loss(params):
    """A loss over every parameter whose backward hands each parameter a fresh gradient tensor
    (all ones), exactly as a training loop's backward does, for the least work: its forward
    reads each parameter once and its backward writes each gradient once (8 B per fp32
    parameter)."""
    return sum(p.sum() for p in params)


@dataclass
class Provider:
    """One optimizer over its own parameters, driven like a training loop."""

    name: str
    params: list
    optimizer: torch.optim.Optimizer
    bytes_per_step: int  # 28 B per fp32 parameter: read p, g, m, v; write p, m, v (MODES)

    def forward_backward(self):
        cheap_loss(self.params).backward()

    def step(self):
        self.optimizer.step()

    def clip(self, max_norm=MAX_NORM):
        return clip_grad_norm(self.optimizer, self.params, max_norm)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self):
        """Params and moments (what lives across steps), for the huge-page report."""
        out = list(self.params)
        for state in self.optimizer.state.values():
            out += [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]
        return out


def clip_grad_norm(optimizer, params, max_norm):
    """What a training loop calls before `step()` to clip: `FusedAdam.clip_grad_norm(max_norm)`
    (the norm alone; the step's kernel scales) for ours, torch's `clip_grad_norm_(params,
    max_norm, foreach=True)` (a norm over every gradient, then every gradient scaled in place)
    for every other optimizer. Returns the total norm (a tensor)."""
    if hasattr(optimizer, "clip_grad_norm"):  # fused_adam's
        return optimizer.clip_grad_norm(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def footprint(name, clip=False):
    """`name`'s memory in bytes per parameter (see `bench.memory`): params and moments
    (`resident`), plus during its own iteration its gradients and temporaries: the loss's and
    backward's (one tensor's worth, for the largest tensor), and for torch's for-loop Adam and our
    plain-torch backend the step's own (8 B more: sqrt and its quotient, one tensor at a time);
    torch's foreach Adam makes a sqrt of every exp_avg_sq at once (4 B per parameter). With
    `clip` (its pair times clip+step), our plain-torch backend's clip holds every gradient as
    float64 at once (8 B per parameter) and its power, a tensor at a time (8 B more); torch's
    `clip_grad_norm_` (foreach) and the compiled backends' clip need nothing per parameter."""
    provider, dtype, options, _ = parse(name)
    size = torch.tensor([], dtype=dtype).element_size()
    state_size = (torch.tensor([], dtype=options["state_dtype"]).element_size()
                  if "state_dtype" in options else (4 if options.get("master_weights") else size))
    if options.get("state_dtype") == torch.int8:
        state_size += 4 / 256  # the absmax per block
    master = {"bf16+8": 1, "bf16+16": 2}.get(options.get("master_weights"),
                                             4 if options.get("master_weights") else 0)
    resident = size + master + 2 * state_size
    transient = size + (4 if provider == "torch-foreach" else 0)
    per_largest = size + (8 if provider in ("torch-forloop", "fused_adam-torch") else 0)
    if clip and provider == "fused_adam-torch":
        transient += 8
        per_largest += 8
    return Footprint(resident, transient, per_largest)


def build(name, config, device, seed=0):
    provider, dtype, options, bytes_per_param = parse(name)
    params = make_params(config.shapes, device, seed, dtype)
    return Provider(name, params, make_optimizer(provider, params, **options),
                    bytes_per_param * config.n_params)
