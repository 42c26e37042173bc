"""Fewer bytes per parameter: bf16/fp16 params with an fp32 master copy, and bf16 moments.
Compared with fp32 torch.optim.Adam fed the same gradients, for every backend that runs them."""
import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from helpers import DTYPE_IDS, cpu_backends, reloaded

BACKENDS = cpu_backends()
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _mantissa_bits(dtype):
    return {torch.bfloat16: 7, torch.float16: 10}[dtype]


def _spacing(values, dtype):
    exponent = torch.floor(torch.log2(values.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - _mantissa_bits(dtype))


def _grads(step, shape):
    generator = torch.Generator().manual_seed(500 + step)
    return torch.randn(shape, generator=generator)


def _run(optimizer, param, steps, grad_dtype):
    """`steps` steps with gradients representable in `grad_dtype`, handed over in the param's
    dtype: an fp32 run with grad_dtype bf16 sees exactly the bf16 run's gradients."""
    for step in range(steps):
        param.grad = _grads(step, param.shape).to(grad_dtype).to(param.dtype)
        optimizer.step()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_stay_within_one_ulp_of_fp32_adam(backend, dtype):
    """60 steps at lr 1e-4: the low-precision params stay within one ulp of fp32 Adam's
    trajectory rounded to their dtype, where plain low-precision Adam drifts far."""
    generator = torch.Generator().manual_seed(0)
    # Representable in `dtype`, so that all three runs start from the same values.
    initial = (torch.randn(4099, generator=generator) * 0.05).to(dtype).float()
    reference = initial.clone().requires_grad_()
    fp32_adam = torch.optim.Adam([reference], lr=1e-4, foreach=False)
    ours_param = initial.to(dtype).requires_grad_()
    ours = FusedAdam([ours_param], lr=1e-4, master_weights=True, backend=backend)
    plain_param = initial.to(dtype).requires_grad_()
    plain = torch.optim.Adam([plain_param], lr=1e-4, foreach=False)
    _run(fp32_adam, reference, 60, dtype)  # the same gradients, in fp32
    _run(ours, ours_param, 60, dtype)
    _run(plain, plain_param, 60, dtype)

    target = reference.detach().to(dtype).float()
    spacing = _spacing(target, dtype)
    our_error = (ours_param.float() - target).abs() / spacing
    plain_error = (plain_param.float() - target).abs() / spacing
    assert our_error.max() <= 1, f"master weights: {our_error.max():.2f} ulp off fp32 Adam"
    assert (plain_error > 1).float().mean() > 0.2, "plain low-precision Adam should drift"
    master = ours.state[ours_param]["master_param"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, reference.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_states_keep_the_update_within_two_percent(backend):
    generator = torch.Generator().manual_seed(1)
    initial = torch.randn(8191, generator=generator)
    reference = initial.clone().requires_grad_()
    fp32_adam = torch.optim.Adam([reference], lr=1e-3, foreach=False)
    ours_param = initial.clone().requires_grad_()
    ours = FusedAdam([ours_param], lr=1e-3, state_dtype=torch.bfloat16, backend=backend)
    _run(fp32_adam, reference, 60, torch.float32)
    _run(ours, ours_param, 60, torch.float32)
    assert ours.state[ours_param]["exp_avg"].dtype == torch.bfloat16
    their_update, our_update = reference.detach() - initial, ours_param.detach() - initial
    relative = (our_update - their_update).norm() / their_update.norm()
    assert relative < 0.02, f"bf16 states moved the update by {relative:.2%}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_copy_round_trips_through_state_dict(backend):
    param = torch.randn(300).to(torch.bfloat16).requires_grad_()
    optimizer = FusedAdamW([param], lr=1e-3, master_weights=True, backend=backend)
    _run(optimizer, param, 5, torch.bfloat16)
    saved = reloaded(optimizer.state_dict())
    master = saved["state"][0]["master_param"]
    assert master.dtype == torch.float32 and not torch.equal(master, param.detach().float())

    fresh_param = param.detach().clone().requires_grad_()
    fresh = FusedAdamW([fresh_param], lr=1e-3, master_weights=True, backend=backend)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state[fresh_param]["master_param"], master)
    _run(optimizer, param, 5, torch.bfloat16)
    _run(fresh, fresh_param, 5, torch.bfloat16)
    assert torch.equal(fresh_param, param)
    assert torch.equal(fresh.state[fresh_param]["master_param"],
                       optimizer.state[param]["master_param"])


def test_torch_checkpoint_takes_the_master_copy_from_the_params():
    param = torch.randn(40).to(torch.bfloat16).requires_grad_()
    theirs = torch.optim.Adam([param], lr=1e-3)
    _run(theirs, param, 3, torch.bfloat16)
    ours_param = param.detach().clone().requires_grad_()
    ours = FusedAdam([ours_param], lr=1e-3, master_weights=True)
    ours.load_state_dict(reloaded(theirs.state_dict()))
    state = ours.state[ours_param]
    assert torch.equal(state["master_param"], param.detach().float())
    assert torch.equal(state["exp_avg"], theirs.state[param]["exp_avg"].float())
    assert state["step"].item() == 3
