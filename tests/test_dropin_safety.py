"""FusedAdam as a drop-in where a step could go wrong quietly: gradients and params it must not
step (refused, changing nothing), version counters autograd relies on, numbers at the edges of
the float range, and the places an optimizer travels (copies, pickles, a forked child,
torch.compile, meta and complex tensors), plus the costs and interruptions of a step.

Public API only. Every comparison is against torch.optim.Adam/AdamW(foreach=False) doing the same
thing, within helpers.TOLERANCES, or bit for bit (torch.equal) where the claim is "nothing
changed"; where FusedAdam deliberately differs from torch, the test says so."""
import copy
import io
import itertools
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fused_adam import FusedAdam
from helpers import TOLERANCES, assert_close, assert_same_trajectory, assert_unchanged, \
    cpu_backends, loss_of, make_params, never, reloaded, run_both, run_steps, snapshot, twins

# numba and torch everywhere; Triton (its interpreter is slow) only where the kernel itself
# decides the outcome: reading a gradient, arithmetic at the edges, version counters, complex
# numbers, a forked child.
BACKENDS = [backend for backend in cpu_backends() if backend != "triton"]
BACKEND_IDS = [f"cpu-{backend}" for backend in BACKENDS]


def _backend_grid(*axes, triton=()):
    """pytest params over (backend, *axis values): every combination for numba and torch, the
    ones listed in `triton` for Triton."""
    params = []
    for backend in cpu_backends():
        for combo in itertools.product(*axes):
            if backend == "triton" and combo not in triton:
                continue
            params.append(pytest.param(backend, *combo, id="-".join((f"cpu-{backend}",) + combo)))
    return params
LR = 1e-2
SHAPES = [(5, 7), (4,), (), (3,)]


# ------------------------------------------------------------------------------------------------
# Unsafe input refused, nothing changed


def _mismatched(case):
    return {
        "float64": lambda: torch.randn(4, dtype=torch.float64),
        "smaller": lambda: torch.randn(2),
        "reshaped": lambda: torch.randn(2, 2),
        "cuda": lambda: torch.randn(4, device="cuda"),
    }[case]()


@pytest.mark.parametrize("backend,case,when", _backend_grid(
    ["float64", "smaller", "reshaped", "cuda"], ["first-step", "later-step"],
    triton=[("float64", "later-step"), ("smaller", "first-step"), ("smaller", "later-step")]))
def test_grad_that_does_not_fit_its_param_is_refused_and_changes_nothing(backend, case, when):
    """`p.grad.data = t` bypasses autograd's checks; a gradient of another dtype, size or device
    than its (4,) param is torch's RuntimeError at step(), and (unlike torch, which has already
    advanced the step count and the params before it by then) nothing changes: params, states,
    step counts, in every arena. A smaller gradient must not be read past its end."""
    if case == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    shapes = [(5,), (4,), (3,)]
    dtypes = [torch.float32, torch.float32, torch.float64]
    initial = make_params(shapes, torch.float64)
    ours_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    torch_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    ours = FusedAdam(ours_params, lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    warm = 0 if when == "first-step" else 3
    run_both(ours, theirs, ours_params, torch_params, 0, warm)

    probe = torch.ones(4, requires_grad=True)  # torch's error type for the same gradient
    probe.grad = torch.ones(4)
    probe.grad.data = _mismatched(case)
    with pytest.raises(RuntimeError):
        torch.optim.Adam([probe], foreach=False).step()

    ours.zero_grad()
    loss_of(ours_params, warm, never).backward()
    ours_params[1].grad.data = _mismatched(case)
    before = snapshot(ours, ours_params)
    with pytest.raises(RuntimeError):
        ours.step()
    assert_unchanged(before, snapshot(ours, ours_params), "after the refused step")
    run_both(ours, theirs, ours_params, torch_params, warm, warm + 20)
    for dtype in (torch.float32, torch.float64):
        pick = [i for i, d in enumerate(dtypes) if d == dtype]
        assert_same_trajectory(ours, theirs, [ours_params[i] for i in pick],
                               [torch_params[i] for i in pick], dtype=dtype)


UNSTEPPABLE = {
    # torch's step raises "more than one element of the written-to tensor refers to a single
    # memory location"
    "expanded": lambda: torch.nn.Parameter(torch.zeros(1).expand(4)),
    # torch steps it without an error, updating the shared elements twice
    "overlapping-as-strided": lambda: torch.nn.Parameter(
        torch.arange(3.0).as_strided((2, 2), (1, 1))),
}


@pytest.mark.parametrize("where", ["construction", "add_param_group"])
@pytest.mark.parametrize("kind", UNSTEPPABLE)
def test_param_that_cannot_be_stepped_in_place_is_refused(kind, where):
    """A leaf whose elements share memory cannot be updated in place: RuntimeError when it is
    given to FusedAdam, with nothing half-built (the other params keep their storage, the bad
    one is untouched, an existing optimizer keeps its groups and steps on like torch)."""
    if kind == "expanded":
        probe = UNSTEPPABLE[kind]()
        probe.grad = torch.ones(4)
        with pytest.raises(RuntimeError, match="single memory location"):
            torch.optim.Adam([probe], foreach=False).step()
    bad = UNSTEPPABLE[kind]()
    bad_layout = (bad.data_ptr(), bad.stride(), bad.detach().clone())
    ours_params, torch_params = twins([(5, 7), (4,)])
    good_pointers = [p.data_ptr() for p in ours_params]
    if where == "construction":
        with pytest.raises(RuntimeError):
            FusedAdam([ours_params[0], bad, ours_params[1]], lr=LR)
    else:
        ours = FusedAdam(ours_params, lr=LR)
        theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
        run_both(ours, theirs, ours_params, torch_params, 0, 3)
        with pytest.raises(RuntimeError):
            ours.add_param_group(dict(params=[bad]))
        assert len(ours.param_groups) == 1 and bad not in ours.state
        run_both(ours, theirs, ours_params, torch_params, 3, 23)
        assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    assert (bad.data_ptr(), bad.stride()) == bad_layout[:2] and torch.equal(bad, bad_layout[2])
    if where == "construction":
        assert [p.data_ptr() for p in ours_params] == good_pointers
        assert all(torch.equal(p, q) for p, q in zip(ours_params, torch_params))


@pytest.mark.parametrize("backend", cpu_backends(), ids=[f"cpu-{b}" for b in cpu_backends()])
def test_step_bumps_version_counters_like_torch(backend):
    """A step modifies params in place, so autograd must know: every stepped param's _version
    grows (a param without a grad keeps its own), and a backward through a graph that saved a
    param before the step is torch's "modified by an inplace operation" error, as with torch."""
    for make in (lambda params: FusedAdam(params, lr=LR, backend=backend),
                 lambda params: torch.optim.Adam(params, lr=LR, foreach=False)):
        w, b, frozen = (p.requires_grad_() for p in make_params([(3,), (2,), (4,)],
                                                                   torch.float32))
        optimizer = make([w, b, frozen])
        (w * w).sum().add(b.sum()).backward()
        optimizer.step()  # state exists: the second step is the ordinary one
        saved = torch.sin(w).sum() + (b * b).sum()  # sin saves w, b * b saves b
        versions = [p._version for p in (w, b, frozen)]
        optimizer.step()
        assert w._version > versions[0] and b._version > versions[1], \
            f"{type(optimizer).__name__}: stepped params kept their versions"
        assert frozen._version == versions[2], "a param without a grad changed version"
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()


EDGE_GRADS = {
    # (dtype, value) -- (1 - beta2) * g is rounded before * g, as torch's addcmul does: g * g
    # first overflows where torch's exp_avg_sq stays finite (1e20 in fp32, 1e155 in fp64).
    "fp32-1e20": (torch.float32, 1e20),
    "fp64-1e155": (torch.float64, 1e155),
    "fp64-1e160": (torch.float64, 1e160),  # torch's exp_avg_sq overflows to inf too
    "fp32-+inf": (torch.float32, float("inf")),
    "fp32--inf": (torch.float32, float("-inf")),
    "fp64-+inf": (torch.float64, float("inf")),
    "fp64--inf": (torch.float64, float("-inf")),
}


def _assert_same_nonfinite(actual, expected, *, what, dtype):
    """NaN, +Inf and -Inf exactly where torch has them; the finite rest within tolerance."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    for name, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(where(actual), where(expected)), (
            f"{what}: {name} at {where(actual).nonzero().flatten().tolist()}, "
            f"torch has it at {where(expected).nonzero().flatten().tolist()}")
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], what=what, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,case,variant", _backend_grid(
    list(EDGE_GRADS), ["adam", "amsgrad"],
    triton=[("fp32-1e20", "adam"), ("fp64-1e155", "amsgrad"), ("fp64-+inf", "adam"),
            ("fp32--inf", "amsgrad")]))
def test_huge_and_infinite_grads_like_torch(backend, case, variant):
    """One element's gradient at the edge of the range in steps 0 and 3 of 6, ordinary ones
    around it: every param and state tensor after every step is torch's, NaN-aware."""
    dtype, value = EDGE_GRADS[case]
    amsgrad = variant == "amsgrad"
    ours_params, torch_params = twins([(4,), (3,)], dtype)
    ours = FusedAdam(ours_params, lr=LR, amsgrad=amsgrad, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, amsgrad=amsgrad, foreach=False)
    for step in range(6):
        grads = make_params([(4,), (3,)], dtype, seed=100 + step)
        if step in (0, 3):
            grads[0][1] = value
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        for index, (p, q) in enumerate(zip(ours_params, torch_params)):
            label = f"step {step} param {index}"
            _assert_same_nonfinite(p, q, what=label, dtype=dtype)
            assert ours.state[p].keys() == theirs.state[q].keys()
            for key, expected in theirs.state[q].items():
                _assert_same_nonfinite(ours.state[p][key], expected, what=f"{label} {key}",
                                       dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Copies, processes, compilers, devices


def _torch_save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy-optimizer": lambda model, optimizer: (None, copy.deepcopy(optimizer)),
    "pickle-model-and-optimizer": lambda model, optimizer: pickle.loads(
        pickle.dumps((model, optimizer))),
    "torch-save-model-and-optimizer": lambda model, optimizer: _torch_save_load(
        (model, optimizer)),
}


def _params_of(model, optimizer):
    if model is None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    return list(model)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_copied_optimizer_steps_its_own_params_like_torch(backend, how):
    """A copy of a trained optimizer (alone, or with its model) steps the copy's params for 20
    steps exactly as torch's optimizer copied the same way does; the original is not moved by
    the copy's steps, and goes on like torch's original."""
    ours_params, torch_params = twins(SHAPES)
    ours_model = torch.nn.ParameterList(ours_params)
    torch_model = torch.nn.ParameterList(torch_params)
    ours = FusedAdam([dict(params=ours_params[:2]),
                      dict(params=ours_params[2:], amsgrad=True, lr=3e-2)], lr=LR,
                     weight_decay=0.05, backend=backend)
    theirs = torch.optim.Adam([dict(params=torch_params[:2]),
                               dict(params=torch_params[2:], amsgrad=True, lr=3e-2)], lr=LR,
                              weight_decay=0.05, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 5)
    ours_copy = COPIES[how](ours_model, ours)
    their_copy = COPIES[how](torch_model, theirs)
    before = snapshot(ours, ours_params)
    ours_copy_params, their_copy_params = _params_of(*ours_copy), _params_of(*their_copy)
    assert not set(map(id, ours_copy_params)) & set(map(id, ours_params))
    run_steps(ours_copy[1], ours_copy_params, 5, 25)
    run_steps(their_copy[1], their_copy_params, 5, 25)
    assert_same_trajectory(ours_copy[1], their_copy[1], ours_copy_params, their_copy_params,
                           dtype=torch.float32, label="the copy: ")
    assert_unchanged(before, snapshot(ours, ours_params), "the original after the copy's steps")
    run_both(ours, theirs, ours_params, torch_params, 5, 10)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32,
                           label="the original: ")


def _child_steps(optimizer, params, first, last, connection):
    """In the forked child: step on, send back every param and state tensor as bytes (tensors
    sent through shared memory would die with the child)."""
    try:
        run_steps(optimizer, params, first, last)
        buffer = io.BytesIO()
        torch.save(snapshot(optimizer, params), buffer)
        connection.send_bytes(buffer.getvalue())
    finally:
        connection.close()


@pytest.mark.parametrize("backend", cpu_backends(), ids=[f"cpu-{b}" for b in cpu_backends()])
def test_forked_child_steps_like_torch(backend):
    """The parent steps (its kernels and thread pools warm), a fork()ed child steps 20 more and
    sends back its params and states: torch's numbers, no hang, exit code 0; the parent is not
    affected and steps on like torch."""
    ours_params, torch_params = twins(SHAPES)
    ours = FusedAdam(ours_params, lr=LR, amsgrad=True, backend=backend)
    theirs = torch.optim.Adam(torch_params, lr=LR, amsgrad=True, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 3)
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_steps, args=(ours, ours_params, 3, 23, writer))
    child.start()
    writer.close()
    try:
        received = reader.recv_bytes() if reader.poll(120) else None
    except EOFError:
        received = None
    finally:
        child.join(120)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, f"the child exited with {child.exitcode}"
    assert received is not None, "the child sent nothing back"
    from_child = torch.load(io.BytesIO(received), weights_only=True)
    run_both(ours, theirs, ours_params, torch_params, 3, 5)  # the parent goes on
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32,
                           label="parent: ")
    run_steps(theirs, torch_params, 5, 23)
    expected = snapshot(theirs, torch_params)
    assert from_child.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(from_child[name], value, what=f"child {name}", **TOLERANCES[torch.float32])


def _child_steps_given_grads(optimizer, params, grads, connection):
    """In the forked child: step on gradients made before the fork, with no torch op of its own
    (torch's parallel ops hang in a child forked after its parent used OpenMP; the optimizer's
    step must not), and send back every param and state tensor as bytes."""
    try:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            optimizer.step()
        # numpy copies: even a torch clone of 180 K elements is a parallel op.
        values = {}
        for index, p in enumerate(params):
            values[f"param {index}"] = p.detach().numpy().copy()
            for key, value in optimizer.state[p].items():
                values[f"param {index} state {key}"] = value.numpy().copy()
        connection.send(values)
    finally:
        connection.close()


def test_forked_child_steps_a_threaded_arena():
    """An arena large enough that the numba pass runs on several threads: the parent steps it
    (its OpenMP threads then exist), a fork()ed child steps it 3 more times on gradients made
    before the fork. GNU OpenMP does not survive fork(): a kernel that ran there hung the child
    (14228fa). Here the child steps on threads of its own, exits 0 and matches torch."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the pass is never split")
    shapes = [(600, 300), (5, 7)]  # 180 K elements: past cpu_threads' split threshold
    ours_params, torch_params = twins(shapes)
    ours = FusedAdam(ours_params, lr=LR, amsgrad=True, backend="numba")
    theirs = torch.optim.Adam(torch_params, lr=LR, amsgrad=True, foreach=False)
    generator = torch.Generator().manual_seed(5)
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(5)]
    for step_grads in grads[:2]:  # the parent steps: its threads are warm
        for params, optimizer in ((ours_params, ours), (torch_params, theirs)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_steps_given_grads,
                            args=(ours, ours_params, grads[2:], writer))
    child.start()
    writer.close()
    try:
        received = reader.recv() if reader.poll(60) else None
    except EOFError:
        received = None
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, f"the child exited with {child.exitcode} (hung or killed)"
    assert received is not None, "the child sent nothing back"
    for step_grads in grads[2:]:
        for p, g in zip(torch_params, step_grads):
            p.grad = g.clone()
        theirs.step()
    expected = snapshot(theirs, torch_params)
    assert received.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(torch.from_numpy(received[name]), value, what=f"child {name}",
                     **TOLERANCES[torch.float32])


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _compiled_run(backend, compiler):
    """20 steps of a torch.compile'd forward-backward-step against torch's Adam (whose step runs
    outside compilation, in the same compiled function, so both see the same gradients)."""
    torch.compiler.reset()
    ours_model, torch_model = _net(), _net()
    ours = FusedAdam(ours_model.parameters(), lr=LR, weight_decay=0.05, backend=backend)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=LR, weight_decay=0.05,
                              foreach=False)
    torch_step = torch.compiler.disable(theirs.step)

    def train_step(model, step, x):
        for p in model.parameters():
            p.grad = None
        loss = model(x).pow(2).sum()
        loss.backward()
        step()
        return loss.detach()

    compiled = torch.compile(train_step, backend=compiler)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(5, 4, generator=generator)
        compiled(ours_model, ours.step, x)
        compiled(torch_model, torch_step, x)
    assert_same_trajectory(ours, theirs, list(ours_model.parameters()),
                           list(torch_model.parameters()), dtype=torch.float32)
    assert ours.state[next(ours_model.parameters())]["step"].item() == 20


# A fresh process is where a first step (and a first kernel call) happens under compilation.
COMPILE_CASES = [("torch", "eager", "this-process"), ("numba", "eager", "fresh-process"),
                 ("numba", "inductor", "this-process")]


@pytest.mark.parametrize("backend,compiler,where", COMPILE_CASES,
                         ids=["cpu-{}-{}-{}".format(*case) for case in COMPILE_CASES])
def test_compiled_train_step_like_torch(backend, compiler, where):
    """torch.compile of a function doing forward, backward and opt.step() runs and gives torch's
    numbers over 20 steps. (torch's own Adam traced by torch.compile computes its bias
    corrections as tensors and leaves eager torch's numbers by a little more than the fp32
    tolerance over these 20 steps; the reference here is eager torch.)"""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported here")
    if compiler == "inductor" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        pytest.skip("inductor needs a C++ compiler on the CPU")
    if where == "this-process":
        _compiled_run(backend, compiler)
        return
    code = (f"import test_dropin_safety as t; t._compiled_run({backend!r}, {compiler!r}); "
            "print('done')")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}
    child = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__),
                           env=environment, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip().endswith("done"), child.stderr[-3000:]


def test_meta_params_step_like_torch():
    """Meta tensors have no data (shape inference, deferred init): a step makes torch's state
    (exp_avg on meta, step a CPU tensor counting steps) and touches no CUDA API (which would
    raise here, where torch has no CUDA)."""
    ours_param = torch.nn.Parameter(torch.empty(3, device="meta"))
    torch_param = torch.nn.Parameter(torch.empty(3, device="meta"))
    ours = FusedAdam([ours_param], lr=LR, amsgrad=True)
    theirs = torch.optim.Adam([torch_param], lr=LR, amsgrad=True, foreach=False)
    for _ in range(2):
        for optimizer, p in ((ours, ours_param), (theirs, torch_param)):
            p.grad = torch.empty(3, device="meta")
            optimizer.step()
    assert ours_param.device.type == "meta" and ours_param.shape == (3,)
    assert ours.state[ours_param].keys() == theirs.state[torch_param].keys()
    for key, expected in theirs.state[torch_param].items():
        actual = ours.state[ours_param][key]
        assert (actual.device, actual.dtype, actual.shape) == \
            (expected.device, expected.dtype, expected.shape), key
        if expected.device.type == "cpu":
            assert torch.equal(actual, expected), f"{key}: {actual} vs torch's {expected}"


COMPLEX_VARIANTS = {"adam-weight-decay": dict(weight_decay=0.05),
                    "amsgrad-weight-decay": dict(amsgrad=True, weight_decay=0.05)}
REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


COMPLEX_DTYPES = {"c64": torch.complex64, "c128": torch.complex128}


@pytest.mark.parametrize("backend,dtype_name,variant", _backend_grid(
    list(COMPLEX_DTYPES), list(COMPLEX_VARIANTS), triton=[("c64", "amsgrad-weight-decay")]))
def test_complex_params_like_torch(backend, dtype_name, variant):
    """torch.optim.Adam steps a complex param as view_as_real and keeps complex state: the same
    trajectory over 20 steps, state exp_avg etc. complex like torch's."""
    dtype, options = COMPLEX_DTYPES[dtype_name], COMPLEX_VARIANTS[variant]
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, dtype=dtype, generator=generator) for shape in [(3, 4), (5,)]]
    ours_params = [p.clone().requires_grad_() for p in initial]
    torch_params = [p.clone().requires_grad_() for p in initial]
    ours = FusedAdam(ours_params, lr=LR, backend=backend, **options)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False, **options)
    for _ in range(20):
        grads = [torch.randn(p.shape, dtype=dtype, generator=generator) for p in initial]
        for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    tolerance = TOLERANCES[REAL_OF[dtype]]
    for index, (p, q) in enumerate(zip(ours_params, torch_params)):
        assert p.dtype == dtype
        assert_close(torch.view_as_real(p.detach()), torch.view_as_real(q.detach()),
                     what=f"param {index}", **tolerance)
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, expected in theirs.state[q].items():
            actual = ours.state[p][key]
            assert actual.dtype == expected.dtype, f"param {index} {key}: {actual.dtype}"
            if expected.is_complex():
                actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
            assert_close(actual, expected, what=f"param {index} state {key}", **tolerance)


@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.999)), (torch.tensor(0.9), 0.999)],
                         ids=["float-tensor", "tensor-float"])
def test_betas_mixing_float_and_tensor_is_torchs_error(betas):
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adam([torch.zeros(3, requires_grad=True)], betas=betas)
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="betas must be either both floats or both Tensors") \
            as our_error:
        FusedAdam([p], betas=betas)
    assert str(our_error.value) == str(torch_error.value)


# ------------------------------------------------------------------------------------------------
# The cost and the atomicity of a step


def _python_calls(make_optimizer, groups, backend):
    """Python function calls made constructing an optimizer over `groups` one-param groups and
    taking one step: deterministic work, not time."""
    params = [torch.zeros(2, requires_grad=True) for _ in range(groups)]
    for p in params:
        p.grad = torch.ones(2)
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        make_optimizer([dict(params=[p]) for p in params], backend).step()
    finally:
        sys.setprofile(previous)
    return calls


@pytest.mark.parametrize("backend", ["numba", "torch"], ids=["cpu-numba", "cpu-torch"])
def test_construction_and_first_step_are_linear_in_the_number_of_groups(backend):
    """Doubling the number of one-param groups at most (about) doubles the Python calls made
    building the optimizer and taking a step; quadratic work would quadruple them. (torch's own
    Optimizer.add_param_group is quadratic by this measure: its check that a new group shares
    no param with the others hashes every param of every group, 3.2x here.)"""
    make = lambda groups, backend: FusedAdam(groups, lr=LR, backend=backend)  # noqa: E731
    _python_calls(make, 1, backend)  # kernels compiled and modules imported
    small, large = _python_calls(make, 100, backend), _python_calls(make, 200, backend)
    assert large <= 2.3 * small, \
        f"{small} Python calls for 100 groups, {large} for 200 ({large / small:.2f}x)"


class _InterruptAt:
    """A trace function that raises KeyboardInterrupt at the k-th line run in fused_adam's code."""

    def __init__(self, k):
        self.k, self.lines = k, 0
        self.roots = tuple({module.__file__.rsplit("/", 1)[0] + "/"
                            for name, module in list(sys.modules.items())
                            if name.split(".")[0] == "fused_adam"
                            and getattr(module, "__file__", None)})

    def __call__(self, frame, event, arg):
        return self._line if frame.f_code.co_filename.startswith(self.roots) else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.k:
                raise KeyboardInterrupt
        return self._line


def _per_param(optimizer, params):
    return [{"value": p.detach().clone(),
             **{key: torch.as_tensor(value).clone()
                for key, value in optimizer.state.get(p, {}).items()}} for p in params]


def _not_started(values):
    """A parameter's values without its state, if that state is Adam's starting point (step 0,
    zero moments): torch's own step creates exactly that before it updates anything, so a
    step interrupted in between leaves it, and a next step from it is a first step."""
    state = {key: value for key, value in values.items() if key != "value"}
    if state and state["step"].item() == 0 and not any(
            value.any() for key, value in state.items() if key != "step"):
        return {"value": values["value"]}
    return values


def _same(actual, expected, *, close):
    if not close:
        actual, expected = _not_started(actual), _not_started(expected)
    if actual.keys() != expected.keys():
        return False
    for key, value in expected.items():
        if close:
            try:
                assert_close(actual[key], value, what=key, **TOLERANCES[value.dtype])
            except AssertionError:
                return False
        elif not torch.equal(actual[key], value):
            return False
    return True


def _interrupt_groups(params):
    return [dict(params=params[:2], weight_decay=0.05),
            dict(params=params[2:], amsgrad=True, lr=3e-2)]


def _torch_twin(optimizer, params):
    """torch.optim.Adam over copies of `params`, loaded from `optimizer`'s state_dict, with
    copies of their grads: torch's state before the next step."""
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, twin_params):
        q.grad = None if p.grad is None else p.grad.clone()
    twin = torch.optim.Adam(_interrupt_groups(twin_params), lr=LR, foreach=False)
    twin.load_state_dict(reloaded(optimizer.state_dict()))
    return twin, twin_params


@pytest.mark.parametrize("warm", [0, 2], ids=["first-step", "later-step"])
@pytest.mark.parametrize("backend", ["numba", "torch"], ids=["cpu-numba", "cpu-torch"])
def test_step_interrupted_anywhere_leaves_a_consistent_optimizer(backend, warm):
    """KeyboardInterrupt at the k-th line fused_adam's code runs in a step, for every k until a
    step completes: it propagates, and every param's value and state are all torch's before
    the step or all torch's after it (two arenas, two groups, amsgrad in one); the state_dict
    loads into torch.optim.Adam, and the next step is what that torch optimizer does. The
    first-step variant builds a fresh optimizer for every k (state is created in that step);
    the later-step one goes on with the same optimizer."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    initial = make_params([(3,), (2,), (4,), ()], torch.float64)
    ours = None
    for k in itertools.count(1):
        assert k < 5000, "a step runs over 5000 lines"
        if ours is None or warm == 0:
            ours_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
            ours = FusedAdam(_interrupt_groups(ours_params), lr=LR, backend=backend)
            run_steps(ours, ours_params, 0, warm)
        ours.zero_grad()
        loss_of(ours_params, warm + 2 * k, never).backward()
        theirs, torch_params = _torch_twin(ours, ours_params)
        before = _per_param(ours, ours_params)
        theirs.step()
        after = _per_param(theirs, torch_params)

        trace, previous = _InterruptAt(k), sys.gettrace()
        sys.settrace(trace)
        try:
            ours.step()
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(previous)
        assert interrupted == (trace.lines >= k), f"k={k}: the KeyboardInterrupt was swallowed"
        now = _per_param(ours, ours_params)
        for index in range(len(ours_params)):
            assert _same(now[index], before[index], close=False) or \
                _same(now[index], after[index], close=True), \
                f"interrupted at line {k}: param {index} is half-stepped: {now[index]}"
        if not interrupted:
            assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
            break
        ours.zero_grad()
        loss_of(ours_params, warm + 2 * k + 1, never).backward()
        probe, probe_params = _torch_twin(ours, ours_params)
        ours.step()
        probe.step()
        for dtype in (torch.float32, torch.float64):
            pick = [i for i, d in enumerate(dtypes) if d == dtype]
            assert_same_trajectory(ours, probe, [ours_params[i] for i in pick],
                                   [probe_params[i] for i in pick], dtype=dtype,
                                   label=f"the step after the interrupt at line {k}: ")
