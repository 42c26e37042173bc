"""FusedAdam as a drop-in for torch.optim.Adam in the places real training code leans on it:
checkpoints in both directions and exact resumes, the flat arena under what users do to their
models (load_state_dict, `p.data = ...`, `.to(dtype)`, tied, frozen and hand-graded params),
bad input that must change nothing, NaN/Inf and GradScaler, and 64-bit offsets in every kernel.

Every comparison is against torch.optim.Adam/AdamW(foreach=False) doing the same thing, within
helpers.TOLERANCES, or bit for bit (torch.equal) where the claim is "the same run"."""
import io

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from helpers import (
    DTYPE_IDS, TOLERANCES, assert_close, assert_same_trajectory, assert_unchanged, cpu_backends,
    loss_of, make_params, reloaded, run_steps, snapshot, twins,
)

BACKENDS = cpu_backends()
BACKEND_IDS = [f"cpu-{backend}" for backend in BACKENDS]
LR = 1e-2
# (torch class, our class, options); weight decay in each so that the group flags matter.
VARIANTS = {
    "adam": (torch.optim.Adam, FusedAdam, dict(weight_decay=0.05)),
    "adamw": (torch.optim.AdamW, FusedAdamW, dict(weight_decay=0.1)),
    "amsgrad": (torch.optim.Adam, FusedAdam, dict(amsgrad=True, weight_decay=0.05)),
}
# A 0-dim parameter (a logit scale, say) among them; the last parameter never gets a gradient
# (so it has no state entry); the others miss theirs in different steps (so their step counts
# differ).
SHAPES = [(5, 7), (33,), (), (1,), (4,)]
NEVER = len(SHAPES) - 1


def skip_some(step, index):
    return index == NEVER or (step + index) % 3 == 0


def _run(optimizer, params, first, last, skip=skip_some):
    """`run_steps`, with some params left without a gradient by default."""
    run_steps(optimizer, params, first, last, skip)


def _load(state_dict, map_location):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location, weights_only=True)


def _assert_same_exactly(ours, theirs, ours_params, their_params):
    ours_values, their_values = snapshot(ours, ours_params), snapshot(theirs, their_params)
    assert ours_values.keys() == their_values.keys()
    different = [name for name in ours_values
                 if not torch.equal(ours_values[name], their_values[name])]
    assert not different, f"not bit-identical: {', '.join(different)}"


# ------------------------------------------------------------------------------------------------
# Checkpoints between torch.optim.Adam/AdamW and FusedAdam/FusedAdamW


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_torch_checkpoint_loads_and_continues_like_torch(backend, variant):
    """torch trains 6 steps and saves; ours loads the saved file into a fresh optimizer over
    params with the same values and continues exactly as torch (which never stopped) does."""
    torch_class, our_class, options = VARIANTS[variant]
    ours_params, torch_params = twins(SHAPES)
    theirs = torch_class(torch_params, lr=LR, foreach=False, **options)
    _run(theirs, torch_params, 0, 6)
    saved = reloaded(theirs.state_dict())
    with torch.no_grad():
        for p, q in zip(ours_params, torch_params):
            p.copy_(q)
    ours = our_class(ours_params, lr=0.5, backend=backend)  # lr and options come from the file
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["lr"] == LR
    assert ours_params[NEVER] not in ours.state, "a param that never had a grad got state"
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32,
                           label="after load: ")
    _run(ours, ours_params, 6, 20)
    _run(theirs, torch_params, 6, 20)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_our_checkpoint_loads_into_torch_and_continues_like_ours(backend, variant):
    """Ours trains 6 steps and saves; torch loads the file and continues as ours does. The file
    has torch's layout: the same state entries, keys, dtypes and group keys torch would write."""
    torch_class, our_class, options = VARIANTS[variant]
    ours_params, torch_params, reference_params = twins(SHAPES, copies=3)
    ours = our_class(ours_params, lr=LR, backend=backend, **options)
    _run(ours, ours_params, 0, 6)
    torch_own = torch_class(reference_params, lr=LR, foreach=False, **options)
    _run(torch_own, reference_params, 0, 6)

    saved = reloaded(ours.state_dict())
    expected = torch_own.state_dict()
    assert saved["state"].keys() == expected["state"].keys() == set(range(NEVER))
    for index, state in expected["state"].items():
        assert saved["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert saved["state"][index][key].dtype == value.dtype, f"{index} {key} dtype"
            assert saved["state"][index][key].shape == value.shape, f"{index} {key} shape"
    assert saved["param_groups"][0].keys() == expected["param_groups"][0].keys()

    with torch.no_grad():
        for p, q in zip(torch_params, ours_params):
            p.copy_(q)
    theirs = torch_class(torch_params, lr=0.5, foreach=False)
    theirs.load_state_dict(saved)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32,
                           label="after load: ")
    _run(ours, ours_params, 6, 20)
    _run(theirs, torch_params, 6, 20)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_checkpoint_with_map_location_cpu(backend):
    """Our checkpoint through torch.load(map_location="cpu", weights_only=True) into a fresh
    FusedAdam (amsgrad state included) continues as torch, which never stopped, does."""
    ours_params, torch_params, restored_params = twins(SHAPES, copies=3)
    ours = FusedAdam(ours_params, lr=LR, amsgrad=True, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, amsgrad=True, foreach=False)
    _run(ours, ours_params, 0, 5)
    _run(theirs, torch_params, 0, 5)
    with torch.no_grad():
        for p, q in zip(restored_params, ours_params):
            p.copy_(q)
    restored = FusedAdam(restored_params, backend=backend)
    restored.load_state_dict(_load(ours.state_dict(), map_location="cpu"))
    _run(restored, restored_params, 5, 12)
    _run(theirs, torch_params, 5, 12)
    assert_same_trajectory(restored, theirs, restored_params, torch_params, dtype=torch.float32)


def test_loading_its_own_state_dict_changes_nothing():
    """`opt.load_state_dict(opt.state_dict())` is the identity in torch (its state_dict holds
    the live tensors); it must not reset our state on the way through."""
    ours_params, torch_params = twins(SHAPES)
    ours = FusedAdam(ours_params, lr=LR, amsgrad=True)
    theirs = torch.optim.Adam(torch_params, lr=LR, amsgrad=True, foreach=False)
    _run(ours, ours_params, 0, 4)
    _run(theirs, torch_params, 0, 4)
    before = snapshot(ours, ours_params)
    ours.load_state_dict(ours.state_dict())
    theirs.load_state_dict(theirs.state_dict())
    assert_unchanged(before, snapshot(ours, ours_params), "after loading its own state_dict")
    _run(ours, ours_params, 4, 10)
    _run(theirs, torch_params, 4, 10)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


def test_mismatched_state_dict_is_torchs_error_and_changes_nothing():
    """A checkpoint of another model (group sizes differ): torch's ValueError, state intact."""
    params = twins(SHAPES, copies=1)[0]
    optimizer = FusedAdam(params, lr=LR)
    _run(optimizer, params, 0, 3)
    before = snapshot(optimizer, params)
    other = torch.optim.Adam(twins([(5, 7), (33,)], copies=1)[0], foreach=False)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        optimizer.load_state_dict(other.state_dict())
    assert_unchanged(before, snapshot(optimizer, params), "after the refused load")


def _step_with_grads(optimizer, params, step):
    """One step with deterministic grads made on each param's own device (loss_of builds its
    targets on the CPU, which a CUDA param cannot be subtracted from)."""
    grads = make_params([p.shape for p in params], torch.float32, seed=500 + step)
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, p.dtype)
    optimizer.step()


def _assert_same_across_devices(ours, theirs, ours_params, their_params):
    """Params and states on the CPU within the fp32 tolerance (torch keeps `step` on the CPU
    for CUDA params unless capturable; ours keeps it beside the param)."""
    tolerance = TOLERANCES[torch.float32]
    for index, (p, q) in enumerate(zip(ours_params, their_params)):
        assert_close(p.cpu(), q.cpu(), what=f"param {index}", **tolerance)
        assert ours.state[p].keys() == theirs.state[q].keys(), f"param {index} state keys"
        for key, value in theirs.state[q].items():
            assert_close(torch.as_tensor(ours.state[p][key]).cpu(), torch.as_tensor(value).cpu(),
                         what=f"param {index} state {key}", **tolerance)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("direction", ["cuda-to-cpu", "cpu-to-cuda"])
def test_checkpoint_moves_between_devices(direction):
    """Saved on one device, loaded on the other with map_location; continues like the original
    (which never stopped) on its own device."""
    source, target = direction.split("-to-")
    source_params = [p.to(source, copy=True).requires_grad_()
                     for p in make_params(SHAPES[:3], torch.float32)]
    original = FusedAdam(source_params, lr=LR, amsgrad=True)
    for step in range(5):
        _step_with_grads(original, source_params, step)
    target_params = [p.detach().to(target, copy=True).requires_grad_() for p in source_params]
    moved = FusedAdam(target_params)
    moved.load_state_dict(_load(original.state_dict(), map_location=target))
    assert all(value.device.type == target for state in moved.state.values()
               for value in state.values() if torch.is_tensor(value))
    for step in range(5, 12):
        _step_with_grads(original, source_params, step)
        _step_with_grads(moved, target_params, step)
    _assert_same_across_devices(moved, original, target_params, source_params)


@needs_cuda
def test_cpu_and_cuda_params_in_one_group():
    """One group, CPU and CUDA params interleaved: one arena (and backend) per device, both
    match torch."""
    devices = ["cpu", "cuda", "cpu", "cuda"]
    initial = make_params([(5, 7), (9,), (1,), (3, 3)], torch.float32)
    ours_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, devices)]
    torch_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, devices)]
    ours = FusedAdamW(ours_params, lr=LR, amsgrad=True)
    theirs = torch.optim.AdamW(torch_params, lr=LR, amsgrad=True, foreach=False)
    assert len(ours._arenas) == 2
    for step in range(8):
        _step_with_grads(ours, ours_params, step)
        _step_with_grads(theirs, torch_params, step)
    _assert_same_across_devices(ours, theirs, ours_params, torch_params)


# ------------------------------------------------------------------------------------------------
# Resume: save model + optimizer mid-run, load into fresh ones, continue bit for bit


class _Net(torch.nn.Module):
    """Embedding -> Linear -> tanh -> Linear, plus a layer the forward never uses (no grads)."""

    def __init__(self, seed):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.hidden = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 3)
        self.unused = torch.nn.Linear(2, 2)
        with torch.no_grad():
            shapes = [p.shape for p in self.parameters()]
            for p, value in zip(self.parameters(), make_params(shapes, torch.float64, seed)):
                p.copy_(value * 0.5)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


def _net_step(model, optimizer, step):
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 10, (8,), generator=generator)
    target = torch.randn(8, 3, generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(tokens), target).backward()
    optimizer.step()


@pytest.mark.parametrize("order", ["model-then-optimizer", "optimizer-then-model"])
@pytest.mark.parametrize("variant", ["adamw", "amsgrad"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_resume_is_bit_identical(backend, variant, order):
    """12 steps in one go == 5 steps, torch.save of model, optimizer and LR schedule, torch.load
    into a fresh model (other initial values), optimizer and schedule, 7 more steps:
    torch.equal everywhere."""
    _, our_class, options = VARIANTS[variant]
    unbroken = _Net(seed=1)
    unbroken_optimizer = our_class(unbroken.parameters(), lr=LR, backend=backend, **options)
    unbroken_schedule = torch.optim.lr_scheduler.StepLR(unbroken_optimizer, 4, gamma=0.5)
    for step in range(12):
        _net_step(unbroken, unbroken_optimizer, step)
        unbroken_schedule.step()

    first = _Net(seed=1)
    first_optimizer = our_class(first.parameters(), lr=LR, backend=backend, **options)
    first_schedule = torch.optim.lr_scheduler.StepLR(first_optimizer, 4, gamma=0.5)
    for step in range(5):
        _net_step(first, first_optimizer, step)
        first_schedule.step()
    checkpoint = reloaded(dict(model=first.state_dict(), optimizer=first_optimizer.state_dict(),
                               schedule=first_schedule.state_dict()))
    del first, first_optimizer, first_schedule

    resumed = _Net(seed=2)
    if order == "model-then-optimizer":
        resumed.load_state_dict(checkpoint["model"])
        resumed_optimizer = our_class(resumed.parameters(), backend=backend)
    else:
        resumed_optimizer = our_class(resumed.parameters(), backend=backend)
        resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_schedule = torch.optim.lr_scheduler.StepLR(resumed_optimizer, 4, gamma=0.5)
    resumed_schedule.load_state_dict(checkpoint["schedule"])
    for step in range(5, 12):
        _net_step(resumed, resumed_optimizer, step)
        resumed_schedule.step()

    assert resumed.unused.weight not in resumed_optimizer.state
    assert resumed_optimizer.param_groups[0]["lr"] == unbroken_optimizer.param_groups[0]["lr"]
    _assert_same_exactly(resumed_optimizer, unbroken_optimizer, list(resumed.parameters()),
                         list(unbroken.parameters()))


# ------------------------------------------------------------------------------------------------
# The arena under real use


def _in_arena(optimizer, p):
    """Whether `p`'s memory lies inside one of the optimizer's arenas."""
    for arena in optimizer._arenas.values():
        buffer = arena.record.params
        start = buffer.data_ptr()
        if start <= p.data_ptr() < start + buffer.numel() * buffer.element_size():
            return True
    return False


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_model_load_state_dict_after_optimizer_exists(backend):
    """Values loaded into the model land in the arena; training goes on from them, like torch."""
    ours_model, torch_model, source = _Net(seed=1), _Net(seed=1), _Net(seed=7)
    ours = FusedAdam(ours_model.parameters(), lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=LR, foreach=False)
    for step in range(3):
        _net_step(ours_model, ours, step)
        _net_step(torch_model, theirs, step)
    ours_model.load_state_dict(source.state_dict())
    torch_model.load_state_dict(source.state_dict())
    for name, p in ours_model.named_parameters():
        assert torch.equal(p, source.get_parameter(name)), name
        assert _in_arena(ours, p), f"{name} left the arena"
    for step in range(3, 10):
        _net_step(ours_model, ours, step)
        _net_step(torch_model, theirs, step)
    assert_same_trajectory(ours, theirs, list(ours_model.parameters()),
                           list(torch_model.parameters()), dtype=torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("when", ["before-first-step", "after-steps"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_param_data_reassigned_keeps_being_updated(backend, when, layout):
    """`p.data = new` (same shape and dtype) after the optimizer exists: the optimizer keeps
    updating p from its new values, as torch does. With "transposed", the caller keeps the new
    tensor (`new` holds it): as after torch's in-place step, it holds the updated values too."""
    ours_params, torch_params = twins([(5, 7), (9,)])
    ours = FusedAdam(ours_params, lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    first = 0 if when == "before-first-step" else 4
    _run(ours, ours_params, 0, first)
    _run(theirs, torch_params, 0, first)
    new = make_params([(7, 5), (9,)], torch.float32, seed=5)
    if layout == "transposed":
        new[0] = new[0].t()  # a non-contiguous tensor of shape (5, 7)
    else:
        new[0] = new[0].reshape(5, 7)
    assigned = new[0].clone()
    for p, q, value in zip(ours_params, torch_params, new):
        p.data = value.clone() if layout == "contiguous" else value
        q.data = value.clone()
    _run(ours, ours_params, first, first + 6)
    _run(theirs, torch_params, first, first + 6)
    assert not torch.equal(ours_params[0], assigned), "the reassigned parameter did not move"
    if layout == "transposed":
        assert torch.equal(new[0], ours_params[0]), "the caller's tensor was not kept current"
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    for p in ours_params:
        assert _in_arena(ours, p), "param left the arena"


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_model_converted_after_optimizer_exists_raises_at_step(backend):
    """`model.to(torch.float64)` after the optimizer was built: the step says so, clearly, and
    changes nothing, instead of silently no longer updating the model."""
    model = _Net(seed=1)
    optimizer = FusedAdam(model.parameters(), lr=LR, backend=backend)
    _net_step(model, optimizer, 0)
    before = snapshot(optimizer, list(model.parameters()))
    model.to(torch.float64)
    before_values = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(torch.arange(8) % 10).sum().backward()
    with pytest.raises(RuntimeError, match=r"float64.*create the optimizer after"):
        optimizer.step()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), before_values))
    states = lambda snapshot: {k: v for k, v in snapshot.items() if "state" in k}  # noqa: E731
    assert_unchanged(states(before), states(snapshot(optimizer, list(model.parameters()))),
                      "optimizer state")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_user_assigned_grads(backend):
    """Grads the user owns, like torch: param 0's grad is a view into one flat user buffer (as
    DDP's buckets are), assigned once and rewritten in place every step; param 1's is a fresh
    tensor assigned every step; param 2's is kept by zero_grad(set_to_none=False) and backward
    adds into it (a zeroed grad is still a grad: torch steps it). None of these needs a copy."""
    ours_params, torch_params = twins([(6, 4), (5,), (3,)])
    ours = FusedAdam(ours_params, lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    buckets = {}
    for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
        buckets[id(optimizer)] = bucket = torch.zeros(64)
        params[0].grad = bucket[16:40].view(6, 4)
    for step in range(10):
        generator = torch.Generator().manual_seed(step)
        values = torch.randn(6, 4, generator=generator), torch.randn(5, generator=generator)
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            if step % 3 == 2:
                optimizer.zero_grad(set_to_none=False)
            else:  # the first backward takes a new grad, the later ones add into it
                (params[2] ** 2).sum().backward()
            buckets[id(optimizer)][16:40].copy_(values[0].reshape(-1))
            params[1].grad = values[1].clone()
            optimizer.step()
    assert ours_params[0].grad.data_ptr() == buckets[id(ours)][16:].data_ptr()
    assert ours.grad_copies == 0
    assert ours.state[ours_params[2]]["step"].item() == 10
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_frozen_params_like_torch(backend):
    """A layer frozen from the start and a bias frozen midway: no update, no state, no step,
    and everything else exactly as torch."""
    ours_model, torch_model = _Net(seed=1), _Net(seed=1)
    for model in (ours_model, torch_model):
        model.embed.weight.requires_grad_(False)
    ours = FusedAdam(ours_model.parameters(), lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=LR, foreach=False)
    for step in range(10):
        if step == 4:
            ours_model.out.bias.requires_grad_(False)
            torch_model.out.bias.requires_grad_(False)
        _net_step(ours_model, ours, step)
        _net_step(torch_model, theirs, step)
    assert ours_model.embed.weight not in ours.state
    assert ours.state[ours_model.out.bias]["step"].item() == 4
    assert_same_trajectory(ours, theirs, list(ours_model.parameters()),
                           list(torch_model.parameters()), dtype=torch.float32)


class _Tied(torch.nn.Module):
    """A language-model head tied to its embedding: one nn.Parameter in two modules."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        with torch.no_grad():
            shapes = [p.shape for p in self.parameters()]
            for p, value in zip(self.parameters(), make_params(shapes, torch.float64, 3)):
                p.copy_(value * 0.5)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_tied_weights_are_updated_once_per_step(backend):
    ours_model, torch_model = _Tied(), _Tied()
    ours = FusedAdamW(ours_model.parameters(), lr=LR, backend=backend)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=LR, foreach=False)
    for step in range(10):
        for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
            generator = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, 11, (7,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(tokens), tokens).backward()
            optimizer.step()
    assert ours_model.head.weight is ours_model.embed.weight
    assert ours.state[ours_model.embed.weight]["step"].item() == 10
    assert len(ours.state) == len(theirs.state) == 3
    assert_same_trajectory(ours, theirs, list(ours_model.parameters()),
                           list(torch_model.parameters()), dtype=torch.float32)


@pytest.mark.parametrize("make", [
    pytest.param(lambda cls: cls([]), id="empty-list"),
    pytest.param(lambda cls: cls(torch.nn.ReLU().parameters()), id="module-without-params"),
])
def test_empty_parameter_list_is_torchs_value_error(make):
    for ours_class, torch_class in ((FusedAdam, torch.optim.Adam),
                                    (FusedAdamW, torch.optim.AdamW)):
        with pytest.raises(ValueError) as their_error:
            make(torch_class)
        with pytest.raises(ValueError) as our_error:
            make(ours_class)
        assert str(our_error.value) == str(their_error.value)


def test_group_with_no_params_is_accepted_like_torch():
    """torch accepts a group whose params list is empty (and steps nothing); so do we."""
    p = torch.ones(3, requires_grad=True)
    optimizer = FusedAdam([{"params": []}, {"params": [p], "lr": 0.1}])
    p.grad = torch.ones(3)
    optimizer.step()
    assert len(optimizer.param_groups) == 2 and optimizer.state[p]["step"].item() == 1


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("layout", ["same-arena", "second-arena"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_sparse_grad_is_refused_and_nothing_changes(backend, layout):
    """An nn.Embedding(sparse=True)-style gradient: the error says sparse, and no param, no
    state tensor and no step moved, in any arena (also when the sparse grad is in an arena the
    step reaches after another)."""
    dense = torch.ones(4, 3, requires_grad=True)
    dtype = torch.float32 if layout == "same-arena" else torch.float64
    embedding = torch.nn.Embedding(5, 3, sparse=True).to(dtype)
    params = [dense, embedding.weight]
    optimizer = FusedAdam(params, lr=0.1, backend=backend)
    for step in range(2):  # both get state first
        optimizer.zero_grad()
        dense.grad = torch.full((4, 3), 0.5)
        embedding.weight.grad = torch.ones(5, 3, dtype=dtype)
        optimizer.step()
    before = snapshot(optimizer, params)
    optimizer.zero_grad()
    dense.grad = torch.full((4, 3), 0.5)
    embedding(torch.tensor([1, 3])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert_unchanged(before, snapshot(optimizer, params), "after the refused step")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_fp32_and_fp64_params_in_one_group(backend):
    """One group, two dtypes interleaved: one arena each, both match torch at their dtype."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    initial = make_params([(5, 7), (9,), (1,), (3, 3)], torch.float64)
    ours_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    torch_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    ours = FusedAdamW(ours_params, lr=LR, amsgrad=True, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=LR, amsgrad=True, foreach=False)
    assert len(ours._arenas) == 2
    _run(ours, ours_params, 0, 12, skip=lambda step, index: (step + index) % 4 == 0)
    _run(theirs, torch_params, 0, 12, skip=lambda step, index: (step + index) % 4 == 0)
    for dtype in (torch.float32, torch.float64):
        pick = [i for i, d in enumerate(dtypes) if d == dtype]
        assert_same_trajectory(ours, theirs, [ours_params[i] for i in pick],
                               [torch_params[i] for i in pick], dtype=dtype,
                               label=f"{DTYPE_IDS[dtype]} ")


# ------------------------------------------------------------------------------------------------
# NaN, Inf and GradScaler


def _assert_same_nonfinite(actual, expected, *, what, dtype):
    """NaN, +Inf and -Inf exactly where torch has them; the finite rest within tolerance."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    for name, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        ours, theirs = where(actual), where(expected)
        assert torch.equal(ours, theirs), (
            f"{what}: {name} at {ours.nonzero().flatten().tolist()}, "
            f"torch has it at {theirs.nonzero().flatten().tolist()}")
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], what=what, **TOLERANCES[dtype])


NONFINITE_VARIANTS = {
    "adam": dict(),
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True, weight_decay=0.05),
}


@pytest.mark.parametrize("variant", NONFINITE_VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_nan_and_inf_grads_propagate_like_torch(backend, variant):
    """One grad with a NaN, one with +Inf, one with -Inf, one finite (step 2 of 5): every param
    and state tensor has its NaN/Inf where torch's has them, and the same finite values."""
    ours_params, torch_params = twins([(6,), (6,), (6,), (6,)])
    options = NONFINITE_VARIANTS[variant]
    ours = FusedAdam(ours_params, lr=LR, backend=backend, **options)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False, **options)
    poison = {0: float("nan"), 1: float("inf"), 2: float("-inf")}
    for step in range(5):
        grads = make_params([(6,)] * 4, torch.float32, seed=100 + step)
        if step == 1:
            for index, value in poison.items():
                grads[index][index + 1] = value
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        for index, (p, q) in enumerate(zip(ours_params, torch_params)):
            label = f"step {step} param {index}"
            _assert_same_nonfinite(p, q, what=label, dtype=torch.float32)
            assert ours.state[p].keys() == theirs.state[q].keys()
            for key, value in theirs.state[q].items():
                _assert_same_nonfinite(ours.state[p][key], value, what=f"{label} {key}",
                                       dtype=torch.float32)


def _scaler_loop(optimizer, params, scaler, *, steps, poisoned, unscale_first):
    """A GradScaler loop; in `poisoned` steps one gradient element is Inf."""
    for step in range(steps):
        optimizer.zero_grad()
        scaler.scale(loss_of(params, step, lambda s, i: False)).backward()
        if step in poisoned:
            params[step % len(params)].grad.view(-1)[0] = float("inf")
        if unscale_first:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_norm=100.0)
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-step", "unscale-then-step"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_grad_scaler_loop_matches_torch(backend, unscale_first):
    """torch.amp.GradScaler("cpu") around 12 steps, 3 of them with an Inf gradient: FusedAdam
    (which takes the scale and found_inf into its step) ends where torch.optim.Adam (whose grads
    the scaler unscales and whose Inf steps it skips) ends: params, states, steps, scale."""
    ours_params, torch_params = twins([(5, 7), (33,), (1,)])
    ours = FusedAdam(ours_params, lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
               for _ in range(2)]
    for optimizer, params, scaler in ((ours, ours_params, scalers[0]),
                                      (theirs, torch_params, scalers[1])):
        _scaler_loop(optimizer, params, scaler, steps=12, poisoned={2, 3, 7},
                     unscale_first=unscale_first)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    assert theirs.state[torch_params[0]]["step"].item() == 9
    assert scalers[0].get_scale() == scalers[1].get_scale()


@pytest.mark.parametrize("how", ["grad-scaler", "found_inf-argument"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_skipped_step_changes_nothing(backend, how):
    """A step with an Inf gradient under GradScaler (or found_inf=1 passed directly) moves no
    param, no state and no step count."""
    params = twins([(5, 7), (33,)], copies=1)[0]
    optimizer = FusedAdam(params, lr=LR, amsgrad=True, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _scaler_loop(optimizer, params, scaler, steps=3, poisoned=set(), unscale_first=False)
    before = snapshot(optimizer, params)
    optimizer.zero_grad()
    if how == "grad-scaler":
        _scaler_loop(optimizer, params, scaler, steps=1, poisoned={0}, unscale_first=False)
        assert scaler.get_scale() == 2.0 ** 9
    else:
        loss_of(params, 0, lambda s, i: False).backward()
        optimizer.step(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(1.0))
    assert_unchanged(before, snapshot(optimizer, params), "after the skipped step")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_grad_scale_argument_unscales_inside_the_step(backend):
    """step(grad_scale=s, found_inf=0) on grads scaled by s == torch on the unscaled grads."""
    ours_params, torch_params = twins([(5, 7), (33,)])
    ours = FusedAdam(ours_params, lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    scale = torch.tensor(2.0 ** 12)
    for step in range(8):
        for optimizer, params, factor in ((ours, ours_params, scale), (theirs, torch_params, 1)):
            optimizer.zero_grad()
            (loss_of(params, step, lambda s, i: False) * factor).backward()
        ours.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        theirs.step()
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
