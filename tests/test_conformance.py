"""FusedAdam/FusedAdamW against torch.optim.Adam/AdamW(foreach=False) and the float64 oracle:
25 steps of a real autograd loop, params and every state tensor, for every backend that runs on
CPU, with parameters that miss their gradient in some steps and a checkpoint round trip midway."""
import pytest
import torch

import fused_adam
from helpers import (
    ADAM_VARIANTS, DTYPE_IDS, TOLERANCES, assert_close, assert_same_trajectory, cpu_backends,
    loss_of, make_params, oracle_step, reloaded,
)

STEPS = 25
LR = 1e-2
VARIANTS = ADAM_VARIANTS
SHAPES = {
    # Not powers of two, one element, several dims; the empty parameter last, as torch's tests do.
    "awkward": [(1,), (4097,), (33, 65), (7, 3, 5), (0,)],
    "tiny-many": [(3,)] * 40 + [(2, 2)] * 20 + [(0,)],
    "large": [(1823, 781), (0,)],
}


def skip_some(step, index):
    """Every parameter misses its gradient in some steps, at different steps."""
    return (step + index) % 4 == 0


def _optimizers(variant, ours_params, torch_params, backend):
    options = dict(lr=LR, **VARIANTS[variant])
    if variant == "adamw":
        return (fused_adam.FusedAdamW(ours_params, backend=backend, **options),
                torch.optim.AdamW(torch_params, foreach=False, **options))
    return (fused_adam.FusedAdam(ours_params, backend=backend, **options),
            torch.optim.Adam(torch_params, foreach=False, **options))


def _cases():
    for backend in cpu_backends():
        for dtype in (torch.float32, torch.float64):
            for shapes in SHAPES:
                if shapes == "large" and backend == "triton":
                    continue  # the interpreter takes about a second per million elements
                for variant in VARIANTS:
                    yield pytest.param(backend, dtype, shapes, variant,
                                       id=f"cpu-{backend}-{DTYPE_IDS[dtype]}-{shapes}-{variant}")


@pytest.mark.parametrize("backend,dtype,shapes,variant", list(_cases()))
def test_matches_torch_and_float64_oracle(backend, dtype, shapes, variant):
    initial = make_params(SHAPES[shapes], torch.float64)
    ours_params = [p.to(dtype, copy=True).requires_grad_() for p in initial]
    torch_params = [p.to(dtype, copy=True).requires_grad_() for p in initial]
    oracle_params = [p.clone().requires_grad_() for p in initial]
    ours, theirs = _optimizers(variant, ours_params, torch_params, backend)
    oracle_group = dict(theirs.param_groups[0])
    oracle_states, oracle_steps = {}, {}

    for step in range(STEPS):
        if step == STEPS // 2:  # checkpoint round trip into a fresh optimizer
            saved = reloaded(ours.state_dict())
            ours, _ = _optimizers(variant, ours_params, [torch.zeros(1)], backend)
            ours.load_state_dict(saved)
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            optimizer.zero_grad()
            loss = loss_of(params, step, skip_some)
            if torch.is_tensor(loss):
                loss.backward()
            optimizer.step()
        for p in oracle_params:
            p.grad = None
        loss = loss_of(oracle_params, step, skip_some)
        if torch.is_tensor(loss):
            loss.backward()
        oracle_grads = [p.grad for p in oracle_params]
        with torch.no_grad():
            oracle_step([p.detach() for p in oracle_params], oracle_grads, oracle_states,
                        oracle_steps, group=oracle_group, decoupled=variant == "adamw")

    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=dtype)
    for index, p in enumerate(ours_params):
        expected_steps = oracle_steps.get(index, 0)
        if expected_steps:
            assert ours.state[p]["step"].item() == expected_steps, f"param {index} step"
        else:
            assert p not in ours.state, f"param {index} never had a gradient but has state"
    # Against float64: exact to fp64 tolerance in fp64; in fp32, at most twice torch's own
    # error plus atol (flash-attention's rule for low precision).
    tolerance = TOLERANCES[dtype]
    for index, (p, q, oracle) in enumerate(zip(ours_params, torch_params, oracle_params)):
        if dtype == torch.float64:
            assert_close(p, oracle, what=f"param {index} vs oracle", **tolerance)
        else:
            our_error = (p.double() - oracle.detach()).abs()
            torch_error = (q.double() - oracle.detach()).abs()
            excess = our_error - (2 * torch_error + tolerance["atol"])
            assert not (excess > 0).any(), (
                f"param {index}: error vs float64 oracle {our_error.max().item():.3g} exceeds "
                f"2x torch's {torch_error.max().item():.3g} + atol")
