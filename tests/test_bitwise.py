"""Bit for bit against torch's for-loop Adam/AdamW (`foreach=False`) on CPU: 20 steps of every
variant, fp32 and fp64, every backend that runs here, two param groups (the second with
beta1 = 0.3, so that lerp takes its `w >= 0.5` branch), params that miss their gradient in
some steps, params and every state tensor compared with `torch.equal`.

One difference is left, and it is torch's own: on CPU `Tensor.sqrt` is MKL's vsSqrt/vdSqrt,
which is not correctly rounded (about 0.8% of fp32 and fp64 inputs come out one ulp low). The
compiled kernels take IEEE square roots (one `vsqrtps`, as torch's `fused=True` kernel does);
matching MKL would take a second pass over every chunk. So each case runs twice against
torch's loop:
- against torch's loop with `Tensor.sqrt` correctly rounded: `torch.equal` everywhere, for every
  backend (all of the rest of the arithmetic is torch's, rounding for rounding);
- against torch's loop as it is: the reference backend (plain torch) is equal; a compiled
  backend differs in no more elements than torch's `fused=True` does, both counts printed.
"""
import contextlib

import numpy as np
import pytest
import torch

import fused_adam
from helpers import ADAM_VARIANTS, DTYPE_IDS, cpu_backends, loss_of, make_params

STEPS = 20
VARIANTS = {**ADAM_VARIANTS,
            "adamw-amsgrad-maximize": dict(weight_decay=0.1, amsgrad=True, maximize=True)}
# 1000: a vector tail (1000 = 62 * 16 + 8) in torch's kernels and in ours; 0 elements last.
SHAPES = [(1,), (4097,), (33, 65), (1000,), (0,)]
# Group 0 takes the variant's options; group 1 other hyperparameters, and lerp's other branch.
SECOND_GROUP = dict(lr=3e-3, betas=(0.3, 0.99), eps=1e-6)


def skip_some(step, index):
    return (step + index) % 4 == 0


def _groups(params, variant):
    options = VARIANTS[variant]
    second = dict(SECOND_GROUP, **{k: v for k, v in options.items() if k != "lr"})
    return [dict(params=params[::2], lr=1e-3, **options), dict(params=params[1::2], **second)]


def _optimizer(variant, params, **how):
    cls = torch.optim.AdamW if variant.startswith("adamw") else torch.optim.Adam
    if "backend" in how:
        cls = fused_adam.FusedAdamW if variant.startswith("adamw") else fused_adam.FusedAdam
    return cls(_groups(params, variant), **how)


def _ieee_sqrt(tensor):
    """A correctly rounded square root (numpy's), in place of MKL's."""
    return torch.from_numpy(np.sqrt(tensor.detach().numpy()))


@contextlib.contextmanager
def _correctly_rounded_sqrt():
    original = torch.Tensor.sqrt
    torch.Tensor.sqrt = _ieee_sqrt
    try:
        yield
    finally:
        torch.Tensor.sqrt = original


def _differing(a, b):
    """How many elements of a and b differ (NaN equal to NaN)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    return int(((a != b) & ~(a.isnan() & b.isnan())).sum())


def _counts(ours_run, their_run):
    """{"param i" / "param i state key": differing elements} between two runs' (optimizer,
    params), all entries, zeros included."""
    (ours, ours_params), (theirs, their_params) = ours_run, their_run
    counts = {}
    for index, (p, q) in enumerate(zip(ours_params, their_params)):
        counts[f"param {index}"] = _differing(p.detach(), q.detach())
        ours_state, their_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert ours_state.keys() == their_state.keys(), f"param {index}: state keys differ"
        for key in their_state:
            counts[f"param {index} {key}"] = _differing(ours_state[key], their_state[key])
    return counts


def _run(variant, dtype, runs):
    """Each of `runs` ({name: (make optimizer, context)}) from the same initial params, STEPS
    steps of the same loss; returns {name: (optimizer, params)}."""
    initial = make_params(SHAPES, torch.float64)
    results = {}
    for name, (make, context) in runs.items():
        params = [p.to(dtype, copy=True).requires_grad_() for p in initial]
        optimizer = make(params)
        for step in range(STEPS):
            optimizer.zero_grad()
            loss = loss_of(params, step, skip_some)
            if torch.is_tensor(loss):
                loss.backward()
            with context():
                optimizer.step()
        results[name] = (optimizer, params)
    return results


def _cases():
    for backend in cpu_backends():
        for dtype in (torch.float32, torch.float64):
            for variant in VARIANTS:
                yield pytest.param(backend, dtype, variant,
                                   id=f"cpu-{backend}-{DTYPE_IDS[dtype]}-{variant}")


@pytest.mark.parametrize("backend,dtype,variant", list(_cases()))
def test_bit_for_bit_with_torch_for_loop(backend, dtype, variant):
    runs = _run(variant, dtype, {
        "ours": (lambda ps: _optimizer(variant, ps, backend=backend), contextlib.nullcontext),
        "torch": (lambda ps: _optimizer(variant, ps, foreach=False), contextlib.nullcontext),
        "torch-ieee-sqrt": (lambda ps: _optimizer(variant, ps, foreach=False),
                            _correctly_rounded_sqrt),
        "torch-fused": (lambda ps: _optimizer(variant, ps, fused=True), contextlib.nullcontext),
    })
    ours, torch_loop = runs["ours"], runs["torch"]
    # Everything but the square root: torch's loop, rounding for rounding.
    exact = runs["torch" if backend == "torch" else "torch-ieee-sqrt"]
    differing = {k: n for k, n in _counts(ours, exact).items() if n}
    assert not differing, f"differs from torch's loop{'' if backend == 'torch' else ' (IEEE sqrt)'}" \
                          f" in {differing}"
    # And against torch's loop as it is, beside torch's own fused kernel.
    ours_count = sum(_counts(ours, torch_loop).values())
    fused_count = sum(_counts(runs["torch-fused"], torch_loop).values())
    if ours_count or fused_count:
        print(f"\n{backend} {DTYPE_IDS[dtype]} {variant}: {ours_count} elements differ from "
              f"torch's loop (params and states, {STEPS} steps); torch fused=True: {fused_count}")
    assert ours_count <= fused_count, (
        f"{ours_count} elements differ from torch's loop, more than torch fused=True's "
        f"{fused_count}")



if "triton" in cpu_backends():
    import triton
    import triton.language as tl

    from fused_adam.kernels.triton_adam import _power

    @triton.jit
    def _powers(bases_ptr, exponents_ptr, out_ptr):
        i = tl.program_id(0)
        tl.store(out_ptr + i, _power(tl.load(bases_ptr + i), tl.load(exponents_ptr + i)))


def test_triton_power_is_pythons():
    """The Triton kernels' beta ** step (the bias corrections) is Python's, to the last bit."""
    if "triton" not in cpu_backends():
        pytest.skip("Triton's interpreter is not available")
    cases = [(beta, step) for beta in (0.9, 0.999, 0.99, 0.3, 0.95, 0.0, 0.9999)
             for step in (*range(1, 41), 97, 1000, 4097, 65535, 1_000_003, 2 ** 24)]
    bases = torch.tensor([beta for beta, _ in cases], dtype=torch.float64)
    exponents = torch.tensor([step for _, step in cases], dtype=torch.int64)
    out = torch.empty_like(bases)
    _powers[(len(cases),)](bases, exponents, out)
    expected = torch.tensor([beta ** float(step) for beta, step in cases], dtype=torch.float64)
    wrong = [(case, got) for case, got, want in zip(cases, out.tolist(), expected.tolist())
             if got != want]
    assert not wrong, f"{len(wrong)} of {len(cases)} powers differ from Python's: {wrong[:5]}"
