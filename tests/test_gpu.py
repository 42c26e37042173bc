"""GPU tests: the Triton kernel compiled for the device, against torch.optim.Adam on the same
device; GradScaler with inf steps; a training step captured in a CUDA graph and replayed.
Skipped cleanly without a CUDA GPU (CI has none; the README's GPU command runs them)."""
import copy

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from helpers import DTYPE_IDS, assert_same_trajectory, make_params, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VARIANTS = {"adam": dict(), "l2": dict(weight_decay=0.1), "amsgrad": dict(amsgrad=True),
            "maximize": dict(maximize=True)}


def _cuda_twins(shapes, dtype):
    initial = make_params(shapes, torch.float64)
    return ([p.to("cuda", dtype, copy=True).requires_grad_() for p in initial],
            [p.to("cuda", dtype, copy=True).requires_grad_() for p in initial])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_triton_matches_torch_on_gpu(dtype, variant):
    shapes = [(1,), (4097,), (1823, 781), (64, 64), (3,), (0,)]
    ours_params, torch_params = _cuda_twins(shapes, dtype)
    ours = FusedAdam(ours_params, lr=1e-2, **VARIANTS[variant])
    assert set(ours.backends.values()) == {"triton"}
    theirs = torch.optim.Adam(torch_params, lr=1e-2, foreach=False, **VARIANTS[variant])
    skip = lambda step, index: (step + index) % 4 == 0  # noqa: E731
    train(ours, ours_params, 25, skip=skip)
    train(theirs, torch_params, 25, skip=skip)
    assert ours.grad_copies == 0
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=dtype)


def test_grad_scaler_with_inf_steps_on_gpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4)).cuda()
    twin = copy.deepcopy(model)
    runs = []
    for net, optimizer in ((model, FusedAdamW(model.parameters(), lr=1e-2)),
                           (twin, torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False))):
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=3)
        generator = torch.Generator(device="cuda").manual_seed(1)
        for step in range(20):
            optimizer.zero_grad()
            x = torch.randn(16, 32, device="cuda", generator=generator)
            if step % 6 == 5:
                x[0, 0] = float("inf")  # this step's grads are inf: the scaler skips it
            scaler.scale(net(x).square().mean()).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append((optimizer, list(net.parameters())))
    (ours, ours_params), (theirs, torch_params) = runs
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


def test_capturable_step_replays_in_a_cuda_graph():
    """Warm up eagerly, capture forward + backward + step, replay with new data and a changed
    tensor lr: the params follow torch.optim.Adam run eagerly on the same data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8)).cuda()
    twin = copy.deepcopy(model)
    lr = torch.tensor(1e-2, device="cuda")
    ours = FusedAdam(model.parameters(), lr=lr, capturable=True)
    theirs = torch.optim.Adam(twin.parameters(), lr=1e-2, foreach=False)
    static_x = torch.zeros(16, 64, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(2)
    batches = [torch.randn(16, 64, device="cuda", generator=generator) for _ in range(12)]

    def eager_step(net, optimizer, x):
        optimizer.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in batches[:3]:
            static_x.copy_(x)
            eager_step(model, ours, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    ours.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(static_x).square().mean().backward()
        ours.step()
    for index, x in enumerate(batches[3:]):
        if index == 5:
            lr.fill_(3e-3)
        static_x.copy_(x)
        graph.replay()
    torch.cuda.synchronize()

    for index, x in enumerate(batches):
        if index == 8:
            theirs.param_groups[0]["lr"] = 3e-3
        eager_step(twin, theirs, x)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        assert ours.state[p]["step"].item() == theirs.state[q]["step"].item() == 12


def test_cuda_params_and_states_own_their_storages():
    """On CUDA too every parameter and state tensor is a tensor over the arena with a storage
    of just itself (made through __cuda_array_interface__), updated in place by the kernel,
    and saved by torch.save as exactly its own bytes."""
    import io

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 3)).cuda()
    twin = copy.deepcopy(model)
    ours = FusedAdam(model.parameters(), lr=1e-2, amsgrad=True)
    theirs = torch.optim.Adam(twin.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    x = torch.randn(8, 16, device="cuda")
    for net, optimizer in ((model, ours), (twin, theirs)):
        for _ in range(5):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    tensors = list(model.parameters())
    tensors += [v for state in ours.state.values() for v in state.values()]
    for t in tensors:
        assert t.is_cuda and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert t.untyped_storage().data_ptr() == t.data_ptr()
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    buffer = io.BytesIO()
    torch.save(model[1].state_dict(), buffer)
    assert buffer.tell() < 4096, f"a 99-parameter state_dict took {buffer.tell()} bytes"
    assert_same_trajectory(ours, theirs, list(model.parameters()), list(twin.parameters()),
                           dtype=torch.float32)
