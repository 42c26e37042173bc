"""Property tests: random shapes (0, 1 and 0-dim included), hyperparameters, step counts, missing
gradients and gradient magnitudes that change between steps, every CPU backend against the
float64 oracle (reference.adam_update on float64 copies, helpers.oracle_step) and against
torch.optim.Adam(foreach=False).

fp64 params: params and every state tensor within TOLERANCES[float64] of the oracle.
fp32 params: each param's error against the oracle at most twice torch's own error plus atol
(flash-attention's rule); states within TOLERANCES[float32] of torch. Both widened only by what
one ulp of input noise does to torch's own result (see _check_against_oracle).

The oracle starts from the float64 values of exactly the fp32 params and grads the optimizers
see, so the errors measured are those of the arithmetic, not of rounding the inputs."""
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fused_adam
from helpers import DTYPE_IDS, TOLERANCES, cpu_backends, oracle_step

# A failing run makes Hypothesis write example patches under its storage directory, by default
# .hypothesis/ in the working tree; keep them out of the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "fused_adam-hypothesis"))

# Examples per backend: the Triton interpreter costs a few milliseconds per program and step.
EXAMPLES = {"numba": 150, "torch": 100, "triton": 60}

shapes = st.one_of(
    st.sampled_from([(0,), (1,), (), (2, 0), (1, 1)]),
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 9), st.integers(1, 13)),
    # Across a Triton block (1024 fp64 / 2048 fp32 elements) with a ragged end.
    st.tuples(st.integers(1000, 2300)),
)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    param_shapes = draw(st.lists(shapes, min_size=1, max_size=4))
    steps = draw(st.integers(1, 6))
    # has_grad[step][index]: a parameter without a grad in a step neither moves nor counts it.
    has_grad = draw(st.lists(st.lists(st.booleans(), min_size=len(param_shapes),
                                      max_size=len(param_shapes)),
                             min_size=steps, max_size=steps))
    decoupled = draw(st.booleans())
    options = dict(
        lr=draw(st.sampled_from([1e-4, 1e-3, 1e-2, 0.1, 0.3])),
        # No beta2 = 0 here: m / sqrt(v) is then unbounded when gradients shrink, params jump
        # past 16, where one fp32 ulp exceeds atol, and the fp32 rule would count ulps.
        betas=(draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
               draw(st.sampled_from([0.9, 0.99, 0.999, 0.9999]))),
        eps=draw(st.sampled_from([1e-12, 1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1, 1.0])),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )
    # Gradient magnitudes that change between steps: old moments far from the new gradient.
    grad_scales = draw(st.lists(st.sampled_from([1e-3, 1.0, 1e3]), min_size=steps,
                                max_size=steps))
    seed = draw(st.integers(0, 2 ** 16))
    return dict(dtype=dtype, shapes=param_shapes, steps=steps, has_grad=has_grad,
                decoupled=decoupled, options=options, grad_scales=grad_scales, seed=seed)


# Always run: beta1 = 0 makes the first-moment update torch.lerp(m, g, 1), which torch computes
# as `g - (g - m) * 0`, exactly g; `m + 1 * (g - m)` is g only to within an ulp of the old m.
# With beta2 = 0 too (the update is then lr * m / |g|) and a gradient much smaller than the
# last one, that ulp is a visible share of the step.
BETA1_ZERO = dict(dtype=torch.float32, shapes=[(64,), (1,)], steps=2,
                  has_grad=[[True, True], [True, True]], decoupled=False,
                  options=dict(lr=1e-2, betas=(0.0, 0.0), eps=1e-8, weight_decay=0.0,
                               amsgrad=False, maximize=False),
                  grad_scales=[1e3, 1e-3], seed=0)


def _nudged(tensor, generator):
    """`tensor` with every element moved one ulp up or down at random: one rounding's noise."""
    up = torch.rand(tensor.shape, generator=generator) < 0.5
    toward = torch.where(up, float("inf"), float("-inf")).to(tensor.dtype)
    return torch.nextafter(tensor, toward)


def _assert_within(actual, expected, allowance, *, what):
    """|actual - expected| <= allowance elementwise (NaN anywhere fails), with the worst spot."""
    actual, expected = actual.detach().double(), expected.detach().double()
    excess = (actual - expected).abs() - allowance
    if excess.numel() and not (excess <= 0).all():
        worst = int(excess.reshape(-1).nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int((~(excess <= 0)).sum())} of {excess.numel()} elements exceed the "
            f"allowance; worst at flat index {worst}: {actual.reshape(-1)[worst].item()!r} vs "
            f"{expected.reshape(-1)[worst].item()!r}, allowed "
            f"{allowance.reshape(-1)[worst].item():.3g}")


def _check_against_oracle(backend, case):
    """Runs the case on ours, on torch, on torch with inputs nudged by one ulp, and on the
    float64 oracle, then checks:

    params: |ours - oracle| <= 2 |torch - oracle| + 2 |torch - nudged torch| + atol (fp32), or
        <= atol + rtol |oracle| + 2 |torch - nudged torch| (fp64). The nudge term is what one
        rounding of the inputs does to the result: next to nothing where the step is well
        conditioned, a lot where it is not (L2 decay cancelling the gradient to about eps,
        where lr * m / (sqrt(v) + eps) turns an ulp of g into a visible change of p). Without
        it the rule measures which implementation fuses a multiply-add, not whether it is right.
    states: within TOLERANCES of torch (fp32) or of the oracle (fp64), atol in units of the
        largest gradient scale s > 1 (s for exp_avg, s^2 for exp_avg_sq and max_exp_avg_sq).
    steps and which params have state: exactly torch's."""
    dtype, options, decoupled = case["dtype"], case["options"], case["decoupled"]
    generator = torch.Generator().manual_seed(case["seed"])
    nudges = torch.Generator().manual_seed(case["seed"] + 1)
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
               for shape in case["shapes"]]
    ours_params = [p.clone().requires_grad_() for p in initial]
    torch_params = [p.clone().requires_grad_() for p in initial]
    nudged_params = [_nudged(p, nudges).requires_grad_() for p in initial]
    oracle_params = [p.double() for p in initial]
    if decoupled:  # FusedAdamW carries decoupled weight decay itself; Adam takes the flag
        ours = fused_adam.FusedAdamW(ours_params, backend=backend, **options)
    else:
        ours = fused_adam.FusedAdam(ours_params, backend=backend, **options)
    theirs, nudged = (torch.optim.Adam(params, foreach=False, decoupled_weight_decay=decoupled,
                                       **options) for params in (torch_params, nudged_params))
    oracle_states, oracle_steps = {}, {}
    for present, scale in zip(case["has_grad"], case["grad_scales"]):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64).mul(scale)
                 .to(dtype) if here else None for p, here in zip(initial, present)]
        for optimizer, params, noisy in ((ours, ours_params, False),
                                         (theirs, torch_params, False),
                                         (nudged, nudged_params, True)):
            optimizer.zero_grad()
            for p, g in zip(params, grads):
                p.grad = None if g is None else _nudged(g, nudges) if noisy else g.clone()
            optimizer.step()
        oracle_step(oracle_params, [None if g is None else g.double() for g in grads],
                    oracle_states, oracle_steps, group=dict(options), decoupled=decoupled)

    label = f"{backend} {DTYPE_IDS[dtype]}: "
    rtol, atol = TOLERANCES[dtype]["rtol"], TOLERANCES[dtype]["atol"]
    units = max(1.0, *case["grad_scales"])
    for index, (p, q, r) in enumerate(zip(ours_params, torch_params, nudged_params)):
        what = f"{label}param {index}"
        steps = oracle_steps.get(index, 0)
        assert (p in ours.state) == (q in theirs.state) == bool(steps), \
            f"{what}: state after {steps} steps"
        oracle = oracle_params[index]
        spread = 2 * (q.detach().double() - r.detach().double()).abs()
        if dtype == torch.float64:
            allowance = atol + rtol * oracle.abs() + spread
        else:
            allowance = 2 * (q.detach().double() - oracle).abs() + spread + atol
        _assert_within(p, oracle, allowance, what=f"{what} vs float64 oracle")
        if not steps:
            continue
        assert ours.state[p]["step"].item() == theirs.state[q]["step"].item() == steps, \
            f"{what}: step"
        assert ours.state[p].keys() == theirs.state[q].keys(), f"{what}: state keys"
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key not in ours.state[p]:
                continue
            expected = oracle_states[index][key] if dtype == torch.float64 else \
                theirs.state[q][key]
            power = 1 if key == "exp_avg" else 2
            _assert_within(ours.state[p][key], expected,
                           atol * units ** power + rtol * expected.detach().double().abs(),
                           what=f"{what} {key}")


def _property_test(backend):
    @pytest.mark.skipif(backend not in cpu_backends(), reason=f"{backend} cannot run here")
    @settings(max_examples=EXAMPLES[backend], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases())
    @example(case=BETA1_ZERO)
    def test(case):
        _check_against_oracle(backend, case)

    test.__name__ = f"test_{backend}_matches_float64_oracle"
    test.__doc__ = f"The {backend} backend against the float64 oracle and torch, random cases."
    return test


test_numba_matches_float64_oracle = _property_test("numba")
test_torch_matches_float64_oracle = _property_test("torch")
test_triton_matches_float64_oracle = _property_test("triton")
