"""The optimizer's behaviour around the kernel: param groups, schedulers, add_param_group,
closures, torch's argument errors, backend choice, where gradients are read, memory."""
import subprocess
import sys

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW, dispatch
from fused_adam.clock import NO_CLOCK
from fused_adam.arena import Arena
from fused_adam.grads import GradientReader
from helpers import (
    DTYPE_IDS, assert_same_trajectory, cpu_backends, loss_of, make_params, train,
)

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float64]


def _twin_params(shapes, dtype, seed=0):
    initial = make_params(shapes, torch.float64, seed)
    return ([p.to(dtype, copy=True).requires_grad_() for p in initial],
            [p.to(dtype, copy=True).requires_grad_() for p in initial])


def _groups(params, split):
    first = dict(params=params[:split], lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    second = dict(params=params[split:], amsgrad=True, maximize=True)
    return [first, second]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_with_step_lr(backend, dtype):
    """Groups differ in every hyperparameter and share one arena; StepLR changes lr mid-run."""
    shapes = [(5, 7), (1,), (130,), (3, 3), (64,)]
    ours_params, torch_params = _twin_params(shapes, dtype)
    ours = FusedAdam(_groups(ours_params, 2), lr=1e-2, backend=backend)
    theirs = torch.optim.Adam(_groups(torch_params, 2), lr=1e-2, foreach=False)
    assert len(ours._arenas) == 1
    ours_lr = torch.optim.lr_scheduler.StepLR(ours, step_size=5, gamma=0.5)
    their_lr = torch.optim.lr_scheduler.StepLR(theirs, step_size=5, gamma=0.5)
    skip = lambda step, index: (step * index) % 7 == 3  # noqa: E731
    train(ours, ours_params, 25, skip=skip, scheduler=ours_lr)
    train(theirs, torch_params, 25, skip=skip, scheduler=their_lr)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] < 3e-2
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_steps(backend):
    """A group added after some steps joins the arena; earlier params keep their state."""
    ours_params, torch_params = _twin_params([(17,), (4, 4), (9,), (300,)], torch.float32)
    ours = FusedAdam(ours_params[:2], lr=1e-2, backend=backend)
    theirs = torch.optim.Adam(torch_params[:2], lr=1e-2, foreach=False)
    train(ours, ours_params[:2], 5)
    train(theirs, torch_params[:2], 5)
    ours.add_param_group(dict(params=ours_params[2:], lr=5e-3, weight_decay=0.1))
    theirs.add_param_group(dict(params=torch_params[2:], lr=5e-3, weight_decay=0.1))
    train(ours, ours_params, 20)
    train(theirs, torch_params, 20)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_closure(backend):
    ours_params, torch_params = _twin_params([(10,), (3, 5)], torch.float32)
    ours = FusedAdamW(ours_params, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    for step in range(25):
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            def closure():
                optimizer.zero_grad()
                loss = loss_of(params, step, lambda s, i: False)
                loss.backward()
                return loss
            returned = optimizer.step(closure)
            assert torch.is_tensor(returned)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("make_optimizer,kwargs,message", [
    (FusedAdam, dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (FusedAdam, dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (FusedAdam, dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (FusedAdam, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (FusedAdam, dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (FusedAdamW, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (FusedAdam, dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
])
def test_bad_hyperparameters_raise_torchs_errors(make_optimizer, kwargs, message):
    p = torch.zeros(3, requires_grad=True)
    torch_class = torch.optim.AdamW if make_optimizer is FusedAdamW else torch.optim.Adam
    with pytest.raises(ValueError) as torch_error:
        torch_class([torch.zeros(3, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=message) as our_error:
        make_optimizer([p], **kwargs)
    assert str(our_error.value) == str(torch_error.value)
    assert torch.equal(p, torch.zeros(3))


def test_backend_choice(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    assert FusedAdam([p]).backends == {(torch.device("cpu"), torch.float32): "numba"}
    assert set(FusedAdam([p], backend="torch").backends.values()) == {"torch"}
    monkeypatch.setenv("FUSED_ADAM_BACKEND", "torch")
    assert set(FusedAdam([p]).backends.values()) == {"torch"}
    assert set(FusedAdam([p], backend="numba").backends.values()) == {"numba"}
    monkeypatch.setenv("FUSED_ADAM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        FusedAdam([p])
    with pytest.raises(ValueError, match="Invalid backend"):
        FusedAdam([p], backend="cuda")


def test_backend_that_cannot_run_is_refused_at_construction(monkeypatch):
    meta = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="numba backend runs on CPU tensors, not meta"):
        FusedAdam([meta], backend="numba")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="only under TRITON_INTERPRET=1"):
        FusedAdam([torch.zeros(3, requires_grad=True)], backend="triton")
    # Chosen by device, a device with no kernel gets the torch reference.
    assert set(FusedAdam([meta]).backends.values()) == {"torch"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ordinary_loop_reads_grads_in_place(backend):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = FusedAdam(model.parameters(), backend=backend)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    assert optimizer.grad_copies == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_assigned_strided_grad_is_copied_and_right(backend):
    ours_params, torch_params = _twin_params([(6, 4), (5,)], torch.float32)
    ours = FusedAdam(ours_params, lr=1e-2, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=1e-2, foreach=False)
    for step in range(25):
        generator = torch.Generator().manual_seed(step)
        wide = torch.randn(4, 12, generator=generator)
        ours_params[0].grad = wide[:, ::2].t()  # non-contiguous view
        torch_params[0].grad = wide[:, ::2].t().clone()
        offset = torch.randn(6, generator=generator)
        ours_params[1].grad = offset[1:]  # contiguous, 4 bytes past a 64-byte boundary
        torch_params[1].grad = offset[1:].clone()
        ours.step()
        theirs.step()
    # The strided gradient is always copied; the misaligned one only for a kernel that needs
    # 16-byte aligned gradients (Triton's 128-bit loads).
    needs_alignment = dispatch.load_backend(backend).GRAD_ADDRESS_ALIGNMENT > 4
    assert ours.grad_copies == 25 + (25 if needs_alignment else 0)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_holds_the_gradient_copies_it_hands_out(backend):
    """A copied gradient has no owner but the step, so the reader must hand it out with the
    addresses, alive until the kernel has read it. Gradients read in place are autograd's."""
    kernels = dispatch.load_backend(backend)
    strided, plain = torch.zeros(6, 4, requires_grad=True), torch.zeros(5, requires_grad=True)
    arena = Arena("cpu", torch.float32, [(strided, 0, 0), (plain, 0, 1)])
    reader = GradientReader(arena, form=kernels.GRADS, alignment=kernels.GRAD_ADDRESS_ALIGNMENT)
    strided.grad = torch.randn(4, 12)[:, ::2].t()
    plain.grad = torch.randn(5)
    gradients = reader.read(NO_CLOCK)
    (copy,) = gradients.copies
    assert copy.is_contiguous() and torch.equal(copy, strided.grad) and reader.copies == 1
    if kernels.GRADS == "tensors":
        assert gradients.for_backend[0].data_ptr() == copy.data_ptr()
        assert gradients.for_backend[1].data_ptr() == plain.grad.data_ptr()
        return
    addresses = gradients.for_backend.tolist()
    assert copy.data_ptr() == addresses[0] != strided.grad.data_ptr()

    strided.grad = torch.randn(6, 4)
    gradients = reader.read(NO_CLOCK)
    assert gradients.for_backend.tolist() == [strided.grad.data_ptr(), plain.grad.data_ptr()]
    assert gradients.copies == [] and reader.copies == 1


_MEMORY_PROBE = """
import gc, torch
from fused_adam import FusedAdam

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

warm = torch.zeros(4, requires_grad=True)  # load the compiled kernel before measuring
warm.grad = torch.ones(4)
FusedAdam([warm]).step()

numel = 16 * 2 ** 20  # 64 MiB of fp32 params
model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(numel // 4)) for _ in range(4)])
gc.collect()
before = resident()
optimizer = FusedAdam(model.parameters())
optimizer.zero_grad()
sum(p.sum() for p in model).backward()
optimizer.step()
gc.collect()
arena = next(iter(optimizer._arenas.values())).record.params
start, end = arena.data_ptr(), arena.data_ptr() + arena.numel() * 4
assert all(start <= p.data_ptr() < end for p in model)
print((resident() - before) / (4 * numel))
"""


def test_params_become_arena_views_without_a_second_copy():
    """After construction and a step every parameter's memory is the arena's, and the storage
    the model had is freed: measured as the resident memory of a fresh process, which grows by
    the grads and two moments (3x the params' bytes), not by a second copy of the params (4x)."""
    probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True,
                           text=True, check=True)
    growth = float(probe.stdout.strip().splitlines()[-1])
    assert 2.5 < growth < 3.5, f"resident memory grew by {growth:.2f}x the parameters' bytes"
