"""Compact master weights (`master_weights="bf16+16"` / `"bf16+8"`): bf16 params plus a 16- or
8-bit remainder instead of a 4-byte fp32 copy, against the fp32 master, on every backend."""
import pytest
import torch

import fused_adam
from fused_adam.kernels import codecs
from helpers import TOLERANCES, assert_close, cpu_backends, make_params, reloaded

SHAPES = [(300, 7), (5,), (3, 257)]
STEPS = 20


def _run(backend, master_weights, state_dtype=None, steps=STEPS, seed=0):
    """FusedAdamW on bf16 params with given gradients (the same for every run, so that the
    masters evolve from the same inputs whatever their params round to)."""
    params = [torch.nn.Parameter(p) for p in make_params(SHAPES, torch.bfloat16, seed=seed)]
    opt = fused_adam.FusedAdamW(params, lr=1e-2, backend=backend, master_weights=master_weights,
                                state_dtype=state_dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
        opt.step()
    return opt, params


def _master(opt, p):
    state = opt.state[p]
    if "master_param" in state:
        return state["master_param"]
    return codecs.join_master(p.detach().reshape(-1),
                                 state["master_remainder"].reshape(-1)).view(p.shape)


def _edge_values():
    """fp32 values whose low 16 bits sit on and around every rounding case (ties, carries into
    the exponent, the largest finite, subnormals, signed zeros, infinities)."""
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(-2 ** 31, 2 ** 31, (4000,), generator=generator, dtype=torch.int64)
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x7F, 0x80, 0x81], dtype=torch.int64)
    bits = torch.cat([bits, (bits[:500, None] & ~0xFFFF | low).reshape(-1),
                      torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80000000,
                                    0x7F800000, 0xFF800000, 0x3F808000, 0xBF808000])])
    values = (bits & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return values[values.isfinite() | values.isinf()]


@pytest.mark.parametrize("backend", cpu_backends())
def test_bf16_plus_16_holds_any_fp32_master_exactly(backend):
    """bf16+16 stores any fp32 master bit for bit: a master loaded from a checkpoint and stepped
    by nothing (lr 0, zero gradient) comes back, through the kernel's split and join, as it
    was; the params are its rounding to nearest."""
    values = _edge_values()
    param = torch.nn.Parameter(values.to(torch.bfloat16))
    full = fused_adam.FusedAdamW([param], lr=0.0, weight_decay=0.0, master_weights=True)
    param.grad = torch.zeros_like(param)
    full.step()
    full.state[param]["master_param"].copy_(values)
    compact_param = torch.nn.Parameter(param.detach().clone())
    compact = fused_adam.FusedAdamW([compact_param], lr=0.0, weight_decay=0.0, backend=backend,
                                    master_weights="bf16+16")
    compact.load_state_dict(reloaded(full.state_dict()))
    compact_param.grad = torch.zeros_like(compact_param)
    compact.step()
    assert torch.equal(_master(compact, compact_param).view(torch.int32),
                       values.view(torch.int32))
    finite = values.abs() < 3.3e38  # the largest few round to inf in bf16, as torch's would
    assert (compact_param.detach().float()[finite] - values[finite]).abs().le(
        values[finite].abs() * 2.0 ** -8 + 2.0 ** -133).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, torch.int8],
                         ids=["fp32-moments", "bf16-moments", "int8-moments"])
def test_bf16_plus_16_steps_as_an_fp32_master(backend, state_dtype):
    """20 steps of bf16+16 follow an fp32 master's (to fp32's tolerance: the two are compiled
    apart, and a multiply-add may be fused in one and not the other)."""
    compact, compact_params = _run(backend, "bf16+16", state_dtype)
    full, full_params = _run(backend, True, state_dtype)
    for index, (p, q) in enumerate(zip(compact_params, full_params)):
        assert compact.state[p]["master_remainder"].dtype == torch.int16
        assert_close(_master(compact, p), full.state[q]["master_param"],
                     what=f"param {index} master", **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", cpu_backends())
def test_bf16_plus_8_keeps_16_significant_bits(backend):
    """bf16+8's master is the fp32 master to 16 significant bits: each step rounds it once, by
    at most 2^-16 of its value, so after 20 steps it is within 20 of those."""
    compact, compact_params = _run(backend, "bf16+8")
    full, full_params = _run(backend, True)
    for p, q in zip(compact_params, full_params):
        master, exact = _master(compact, p).double(), full.state[q]["master_param"].double()
        assert compact.state[p]["master_remainder"].dtype == torch.int8
        # Each step's rounding is relative to the value then, at most lr away per step.
        largest = exact.abs() + 1e-2 * STEPS
        assert ((master - exact).abs() <= STEPS * 2.0 ** -16 * largest).all()
        # Far better than the bf16 params alone (2^-9 relative).
        assert (master - exact).abs().max() < (p.detach().double() - exact).abs().max()


@pytest.mark.parametrize("mode", ["bf16+16", "bf16+8"])
def test_checkpoint_resumes_exactly(mode):
    opt, params = _run("numba", mode, torch.int8, steps=5)
    saved = reloaded(opt.state_dict())
    assert saved["state"][0]["master_remainder"].dtype == reference_dtype(mode)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = fused_adam.FusedAdamW(copies, lr=1e-2, master_weights=mode, state_dtype=torch.int8)
    resumed.load_state_dict(saved)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            q.grad = p.grad.clone()
        opt.step()
        resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_remainder"], resumed.state[q]["master_remainder"])


def reference_dtype(mode):
    return {"bf16+16": torch.int16, "bf16+8": torch.int8}[mode]


def test_an_fp32_master_checkpoint_loads_into_bf16_plus_16_exactly():
    """A checkpoint of master_weights=True: its fp32 master becomes the params (rounded) plus
    the remainder, and the joined master is the saved one bit for bit."""
    full, params = _run("numba", True, steps=5)
    saved = reloaded(full.state_dict())
    compact = fused_adam.FusedAdamW(params, lr=1e-2, master_weights="bf16+16")
    compact.load_state_dict(saved)
    for index, p in enumerate(params):
        assert torch.equal(_master(compact, p), saved["state"][index]["master_param"])


def test_a_torch_checkpoint_takes_the_master_from_the_params():
    params = [torch.nn.Parameter(p) for p in make_params(SHAPES, torch.bfloat16)]
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    compact = fused_adam.FusedAdamW(params, lr=1e-2, master_weights="bf16+8")
    compact.load_state_dict(reloaded(torch_opt.state_dict()))
    for p in params:
        assert not compact.state[p]["master_remainder"].any()
        assert torch.equal(_master(compact, p), p.detach().float())


def test_unsupported_choices_are_refused():
    with pytest.raises(ValueError, match="bfloat16 parameters, not float16"):
        fused_adam.FusedAdam([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))],
                             master_weights="bf16+8")
    with pytest.raises(ValueError, match="Invalid master_weights"):
        fused_adam.FusedAdam([torch.nn.Parameter(torch.ones(3))], master_weights="fp8")
    with pytest.warns(UserWarning, match="does nothing here"):
        fused_adam.FusedAdam([torch.nn.Parameter(torch.ones(3))], master_weights="bf16+16")
