"""What the tests share: the tolerance table, a comparison that says where and by how much, the
backends that can run here, and a training loop that drives any optimizer the same way."""
import importlib.util
import io
import os

import torch

import fused_adam
from fused_adam.kernels import reference

# One table, per dtype. Never widened to make a test pass.
TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}
# The options torch's Adam has, one per variant, for the tests that run every variant against
# torch; "adamw" means FusedAdamW against torch.optim.AdamW, the rest FusedAdam against Adam.
ADAM_VARIANTS = {
    "adam": dict(),
    "l2": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
}
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
             torch.float16: "fp16"}


def cpu_backends():
    """Backends that can step CPU tensors here: Triton through its interpreter."""
    backends = ["numba", "torch"]
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    return backends


def assert_close(actual, expected, *, what, rtol, atol):
    """torch.testing-style closeness, failing with the worst element and its index."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    excess = (actual64 - expected64).abs() - (atol + rtol * expected64.abs())
    nonfinite_mismatch = actual64.isfinite() != expected64.isfinite()
    if (excess > 0).any() or nonfinite_mismatch.any():
        worst = int(excess.reshape(-1).nan_to_num(float("inf")).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {actual.numel()} elements differ; worst at "
            f"{index}: {actual64.reshape(-1)[worst].item()!r} vs "
            f"{expected64.reshape(-1)[worst].item()!r} (rtol={rtol}, atol={atol})")


def assert_same_trajectory(ours, theirs, ours_params, their_params, *, dtype, label=""):
    """Params and every state tensor of two optimizers agree within TOLERANCES[dtype]."""
    tolerance = TOLERANCES[dtype]
    for index, (p, q) in enumerate(zip(ours_params, their_params)):
        assert_close(p, q, what=f"{label}param {index}", **tolerance)
        ours_state, their_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert ours_state.keys() == their_state.keys(), \
            f"{label}param {index}: state keys {sorted(ours_state)} != {sorted(their_state)}"
        for key in their_state:
            assert_close(torch.as_tensor(ours_state[key]), torch.as_tensor(their_state[key]),
                         what=f"{label}param {index} state {key}", **tolerance)


def reloaded(state_dict):
    """A state_dict after torch.save / torch.load, as a checkpoint would bring it back."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_params(shapes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
            for shape in shapes]


def twins(shapes, dtype=torch.float32, seed=0, copies=2):
    """`copies` lists of leaf tensors of `shapes` with equal values (drawn in float64, then cast
    to `dtype`): one list for each optimizer a test compares."""
    initial = make_params(shapes, torch.float64, seed)
    return [[p.to(dtype, copy=True).requires_grad_() for p in initial] for _ in range(copies)]


def loss_of(params, step, skip):
    """A real autograd loss whose gradient changes every step; parameters with skip(step, i)
    are left out, so their .grad stays None after zero_grad()."""
    generator = torch.Generator().manual_seed(1000 + step)
    loss = 0
    for index, p in enumerate(params):
        if skip(step, index):
            continue
        target = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        loss = loss + ((p - target) ** 2).sum() * (0.5 + index % 3) + (p.sum() * 0.1) ** 2
    return loss


def never(step, index):
    return False


def train(optimizer, params, steps, *, skip=never, scheduler=None, on_step=None):
    """zero_grad(); loss.backward(); step() for `steps` steps."""
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_of(params, step, skip)
        if torch.is_tensor(loss):
            loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step)


def run_steps(optimizer, params, first, last, skip=never):
    """Steps `first` .. `last - 1` of `loss_of`'s loop (distinct losses per step)."""
    for step in range(first, last):
        optimizer.zero_grad()
        loss = loss_of(params, step, skip)
        if torch.is_tensor(loss):
            loss.backward()
        optimizer.step()


def run_both(ours, theirs, ours_params, torch_params, first, last):
    """`run_steps` for FusedAdam and for torch's optimizer, over the same steps."""
    run_steps(ours, ours_params, first, last)
    run_steps(theirs, torch_params, first, last)


def snapshot(optimizer, params):
    """{name: clone} of every param and every state tensor (step included)."""
    values = {}
    for index, p in enumerate(params):
        values[f"param {index}"] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            values[f"param {index} state {key}"] = torch.as_tensor(value).clone()
    return values


def assert_unchanged(before, after, what):
    """Two `snapshot`s are equal bit for bit, or say which entries changed."""
    assert before.keys() == after.keys(), \
        f"{what}: state entries changed: {sorted(before.keys() ^ after.keys())}"
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"{what}: {', '.join(changed)} changed"


def oracle_step(params64, grads64, states, step_counts, *, group, decoupled):
    """The float64 oracle: `reference.adam_update` on float64 copies, one parameter at a time."""
    for index, (p, g) in enumerate(zip(params64, grads64)):
        if g is None:
            continue
        state = states.setdefault(index, dict(
            exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
            max_exp_avg_sq=torch.zeros_like(p)))
        step_counts[index] = step_counts.get(index, 0) + 1
        reference.adam_update(
            p, g, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"],
            step=step_counts[index], lr=group["lr"], beta1=group["betas"][0],
            beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=decoupled)


def fused(params, backend, **options):
    return fused_adam.FusedAdam(params, backend=backend, **options)
