"""FusedAdam as a drop-in where users and libraries reach into an optimizer: every parameter and
state tensor a storage of its own (what torch.save, safetensors and accelerate reason about),
`opt.state` and `opt.param_groups` edited mid-run, and load_state_dict through torch's machinery
(its hooks, a checkpoint that does not fit, AdamW's decoupling).

Public API only. Every comparison is against torch.optim.Adam/AdamW(foreach=False) making the
same edit at the same point and then going on for 20 steps, params and every state tensor within
helpers.TOLERANCES, or bit for bit (torch.equal) where the claim is "nothing changed"."""
import collections
import copy
import io
import re

import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from helpers import TOLERANCES, assert_close, assert_same_trajectory, assert_unchanged, \
    cpu_backends, loss_of, make_params, never, reloaded, run_both, run_steps, snapshot, twins

# The optimizer layer is tested with numba and torch; the Triton interpreter (slow) only where
# its buffers could differ: the storages.
ALL_BACKENDS = cpu_backends()
BACKENDS = [backend for backend in ALL_BACKENDS if backend != "triton"]
BACKEND_IDS = [f"cpu-{backend}" for backend in BACKENDS]
LR = 1e-2
SHAPES = [(5, 7), (4,), (), (3,)]


def _groups(params):
    """Two groups that differ in every hyperparameter."""
    return [dict(params=params[:2], weight_decay=0.05),
            dict(params=params[2:], lr=3e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=True)]


def _twin_optimizers(backend):
    """(FusedAdam, torch's Adam, their params): twin params in the two `_groups`."""
    ours_params, torch_params = twins(SHAPES)
    return (FusedAdam(_groups(ours_params), lr=LR, backend=backend),
            torch.optim.Adam(_groups(torch_params), lr=LR, foreach=False),
            ours_params, torch_params)


def _assert_same_then_after(ours, theirs, ours_params, torch_params, label, first, last):
    """Params and states agree now (`label` says when), and again after steps first..last-1."""
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32,
                           label=label)
    run_both(ours, theirs, ours_params, torch_params, first, last)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


def _groups_view(optimizer):
    """param_groups as plain values, params by identity."""
    return [{key: tuple(map(id, value)) if key == "params" else value
             for key, value in group.items()} for group in optimizer.param_groups]


def _assert_same_state_dict(actual, expected, what):
    assert actual["param_groups"] == expected["param_groups"], f"{what}: param_groups differ"
    assert actual["state"].keys() == expected["state"].keys(), f"{what}: state entries differ"
    for index, state in expected["state"].items():
        assert actual["state"][index].keys() == state.keys(), f"{what}: param {index} keys"
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(actual["state"][index][key]),
                               torch.as_tensor(value)), f"{what}: param {index} {key} differs"


# ------------------------------------------------------------------------------------------------
# A storage of its own for every parameter and every state tensor


def _assert_own_storage(tensor, what):
    storage = tensor.untyped_storage()
    size = tensor.numel() * tensor.element_size()
    assert storage.nbytes() == size, \
        f"{what}: its storage has {storage.nbytes()} bytes, the tensor {size}"
    assert storage.data_ptr() == tensor.data_ptr(), \
        f"{what}: starts {tensor.data_ptr() - storage.data_ptr()} bytes into its storage"


def _assert_storages_of_their_own(optimizer, params):
    starts = {}
    for index, p in enumerate(params):
        tensors = {f"param {index}": p}
        tensors.update({f"param {index} state {key}": value
                        for key, value in optimizer.state.get(p, {}).items()})
        for what, tensor in tensors.items():
            _assert_own_storage(tensor, what)
            start = tensor.untyped_storage().data_ptr()
            assert start not in starts, f"{what} shares its storage with {starts.get(start)}"
            starts[start] = what


STORAGE_VARIANTS = {
    "fp32-amsgrad": (torch.float32, dict(amsgrad=True)),
    "bf16-master-weights": (torch.bfloat16, dict(master_weights=True)),
}


@pytest.mark.parametrize("variant", STORAGE_VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS, ids=[f"cpu-{b}" for b in ALL_BACKENDS])
def test_every_param_and_state_tensor_has_a_storage_of_its_own(backend, variant):
    """After construction, the first step and 20 steps, each param and each state tensor (step,
    exp_avg, exp_avg_sq, max_exp_avg_sq, master_param) owns a storage covering exactly itself,
    shared with nothing else; the step still updates the param in place (an alias taken after
    construction sees it), and (fp32) the numbers are torch's."""
    dtype, options = STORAGE_VARIANTS[variant]
    ours_params, torch_params = twins(SHAPES, dtype)
    ours = FusedAdam(ours_params, lr=LR, backend=backend, **options)
    _assert_storages_of_their_own(ours, ours_params)
    aliases = [p.detach() for p in ours_params]
    before = [p.detach().clone() for p in ours_params]
    run_steps(ours, ours_params, 0, 1)
    assert ours.state.keys() == set(ours_params)
    assert all("master_param" in ours.state[p] for p in ours_params) == (dtype == torch.bfloat16)
    _assert_storages_of_their_own(ours, ours_params)
    run_steps(ours, ours_params, 1, 20)
    _assert_storages_of_their_own(ours, ours_params)
    for index, (p, alias, old) in enumerate(zip(ours_params, aliases, before)):
        assert not torch.equal(p.detach(), old), f"param {index} did not move"
        assert torch.equal(alias, p.detach()), f"param {index} was not updated in place"
    if dtype == torch.float32:
        theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False, **options)
        run_steps(theirs, torch_params, 0, 20)
        assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=dtype)


class _Net(torch.nn.Module):
    """A 256 KiB backbone and a 26-element head."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.backbone = torch.nn.Linear(256, 256)
        self.head = torch.nn.Linear(8, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x))[:, :8])


def _saved_size(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def _net_steps(model, optimizer, steps):
    for step in range(steps):
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_saving_a_small_part_saves_only_that_part(backend):
    """torch.save writes a tensor's whole storage: a submodule's state_dict must save as small as
    clones of its tensors, and the optimizer state_dict of a model whose big backbone is frozen
    as small as torch.optim.Adam's (a few hundred bytes of slack; the backbone is 256 KiB)."""
    model = _Net()
    ours = FusedAdam(model.parameters(), lr=LR, backend=backend)
    _net_steps(model, ours, 2)
    head = model.head.state_dict()
    clones = {name: tensor.clone() for name, tensor in head.items()}
    assert _saved_size(head) <= _saved_size(clones) + 300, \
        f"head state_dict saves as {_saved_size(head)} bytes, its clones {_saved_size(clones)}"

    model, torch_model = _Net(), _Net()
    for net in (model, torch_model):
        net.backbone.requires_grad_(False)
    ours = FusedAdam(model.parameters(), lr=LR, backend=backend)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=LR, foreach=False)
    _net_steps(model, ours, 3)
    _net_steps(torch_model, theirs, 3)
    assert_same_trajectory(ours, theirs, list(model.parameters()), list(torch_model.parameters()),
                           dtype=torch.float32)
    ours_size, their_size = _saved_size(ours.state_dict()), _saved_size(theirs.state_dict())
    assert ours_size <= their_size + 1024, \
        f"optimizer state_dict saves as {ours_size} bytes, torch's as {their_size}"


# ------------------------------------------------------------------------------------------------
# Live state and param groups, edited mid-run


def _clear(optimizer, params):
    optimizer.state.clear()


def _delete_one(optimizer, params):
    del optimizer.state[params[1]]


def _new_dict(optimizer, params):
    optimizer.state = collections.defaultdict(dict)


STATE_RESETS = {"state-clear": _clear, "del-state-of-one": _delete_one,
                "state-new-defaultdict": _new_dict}


@pytest.mark.parametrize("reset", STATE_RESETS)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_dropping_state_restarts_adam_like_torch(backend, reset):
    """Dropped state is re-initialised at the next step, as torch does: step 1 again, fresh
    moments (amsgrad's too), then 20 more steps like torch."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 6)
    STATE_RESETS[reset](ours, ours_params)
    STATE_RESETS[reset](theirs, torch_params)
    run_both(ours, theirs, ours_params, torch_params, 6, 7)
    _assert_same_then_after(ours, theirs, ours_params, torch_params,
                            "first step after the reset: ", 7, 27)


def _replacement(key, like):
    if key == "step":
        return torch.tensor(100.0)
    generator = torch.Generator().manual_seed(7)
    value = torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.dtype)
    return value if key == "exp_avg" else value.abs() * 1e-2


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_assigning_a_state_tensor_changes_adam_like_torch(backend, key):
    """`opt.state[p][key] = new_tensor` is what the next step uses, as in torch."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 6)
    index = 3  # in the amsgrad group
    new = _replacement(key, torch_params[index])
    ours.state[ours_params[index]][key] = new.clone()
    theirs.state[torch_params[index]][key] = new.clone()
    run_both(ours, theirs, ours_params, torch_params, 6, 7)
    _assert_same_then_after(ours, theirs, ours_params, torch_params,
                            "first step after the assignment: ", 7, 27)


@pytest.mark.parametrize("edit", ["append", "remove"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_editing_a_groups_param_list_like_torch(backend, edit):
    """A param appended to `param_groups[i]["params"]` mid-run is stepped from then on (its own
    step 1); one removed stops moving, and keeps its state entry as it was, as in torch. Every
    param gets a gradient every step."""
    ours_params, torch_params = twins(SHAPES)
    shapes_used = slice(0, 3) if edit == "append" else slice(0, 4)
    ours = FusedAdam(_groups(ours_params[shapes_used]), lr=LR, backend=backend)
    theirs = torch.optim.Adam(_groups(torch_params[shapes_used]), lr=LR, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 6)
    for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
        if edit == "append":
            optimizer.param_groups[1]["params"].append(params[3])
        else:
            del optimizer.param_groups[0]["params"][1]
    removed_before = ours_params[1].detach().clone()
    run_both(ours, theirs, ours_params, torch_params, 6, 26)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    if edit == "remove":
        assert torch.equal(ours_params[1].detach(), removed_before), "a removed param moved"
        assert ours_params[1] in ours.state
    else:
        assert ours.state[ours_params[3]]["step"].item() == 20


BAD_GROUPS = {
    "bad-lr": lambda params: dict(params=[params[2]], lr=-1.0),
    "param-already-in-a-group": lambda params: dict(params=[params[2], params[0]]),
    "capturable-on-cpu": lambda params: dict(params=[params[2]], capturable=True),
}


@pytest.mark.parametrize("bad", BAD_GROUPS)
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_refused_add_param_group_changes_nothing(backend, bad):
    """add_param_group raising ValueError (a bad lr or capturable=True on CPU, which torch only
    refuses at its step; a param already in another group, which torch refuses too) leaves
    param_groups and state_dict() as they were, and the optimizer steps on like torch. The new
    param is fp64, a dtype the optimizer has not seen, so a half-built addition would show."""
    initial = make_params([(5, 7), (4,)], torch.float64) + make_params([(3,)], torch.float64, 1)
    dtypes = [torch.float32, torch.float32, torch.float64]
    ours_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    torch_params = [p.to(d, copy=True).requires_grad_() for p, d in zip(initial, dtypes)]
    ours = FusedAdam(ours_params[:2], lr=LR, weight_decay=0.05, backend=backend)
    theirs = torch.optim.Adam(torch_params[:2], lr=LR, weight_decay=0.05, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 4)
    groups_before, state_dict_before = _groups_view(ours), reloaded(ours.state_dict())
    with pytest.raises(ValueError):
        ours.add_param_group(BAD_GROUPS[bad](ours_params))
    if bad == "param-already-in-a-group":
        with pytest.raises(ValueError, match="more than one parameter group"):
            theirs.add_param_group(BAD_GROUPS[bad](torch_params))
    assert _groups_view(ours) == groups_before, "param_groups changed"
    _assert_same_state_dict(ours.state_dict(), state_dict_before, "after the refused group")
    run_both(ours, theirs, ours_params, torch_params, 4, 24)
    assert_same_trajectory(ours, theirs, ours_params[:2], torch_params[:2], dtype=torch.float32)
    assert torch.equal(ours_params[2], torch_params[2]) and ours_params[2] not in ours.state


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_amsgrad_switched_on_mid_run_is_torchs_key_error(backend):
    """torch raises KeyError('max_exp_avg_sq') at the next step (before touching anything, when
    it is the first group) for params that already have state; so must we, changing nothing.
    Switched back off, the run goes on like torch's."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 5)
    for optimizer, params in ((ours, ours_params), (theirs, torch_params)):
        optimizer.param_groups[0]["amsgrad"] = True
        optimizer.zero_grad()
        loss_of(params, 5, never).backward()
    before = snapshot(theirs, torch_params)
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        theirs.step()
    assert_unchanged(before, snapshot(theirs, torch_params), "torch after its KeyError")
    before = snapshot(ours, ours_params)
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        ours.step()
    assert_unchanged(before, snapshot(ours, ours_params), "after the KeyError")
    for optimizer in (ours, theirs):
        optimizer.param_groups[0]["amsgrad"] = False
    run_both(ours, theirs, ours_params, torch_params, 5, 25)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_amsgrad_switched_off_mid_run_like_torch(backend):
    """Plain Adam from then on; torch keeps the stale max_exp_avg_sq in the state."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 6)
    for optimizer in (ours, theirs):
        optimizer.param_groups[1]["amsgrad"] = False
    run_both(ours, theirs, ours_params, torch_params, 6, 26)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# load_state_dict through torch's machinery


def _halve_exp_avg(optimizer, state_dict):
    state = {index: {**values, "exp_avg": values["exp_avg"] * 0.5}
             for index, values in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _zero_exp_avg(optimizer):
    for values in optimizer.state.values():
        values["exp_avg"].zero_()
    first = optimizer.param_groups[0]["params"][0]
    optimizer.state[first]["exp_avg_sq"] = torch.full_like(first.detach(), 1e-4)


@pytest.mark.parametrize("hook", ["pre-hook-returns-a-new-dict", "post-hook-writes-state"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_load_state_dict_hooks_like_torch(backend, hook):
    """A pre-hook's returned state_dict is what gets loaded; a post-hook's writes into
    opt.state (in place, and a replaced tensor) are what the next step uses."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 5)
    saved = reloaded(theirs.state_dict())
    for optimizer in (ours, theirs):
        if hook.startswith("pre"):
            optimizer.register_load_state_dict_pre_hook(_halve_exp_avg)
        else:
            optimizer.register_load_state_dict_post_hook(_zero_exp_avg)
        # torch's state takes the loaded tensors themselves: each optimizer gets its own copy
        optimizer.load_state_dict(reloaded(saved))
    expected = theirs.state[torch_params[0]]["exp_avg"]
    assert not torch.equal(expected, saved["state"][0]["exp_avg"])  # the hook did something
    _assert_same_then_after(ours, theirs, ours_params, torch_params,
                            "after the load: ", 5, 25)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_checkpoint_with_a_wrong_state_shape_is_refused_and_changes_nothing(backend, key):
    """Same group sizes, one state tensor of the wrong shape (torch loads it and fails, or
    broadcasts, at a later step): ValueError naming the param (index 1 of its group), and
    state, params and param_groups as they were; the run goes on like torch's."""
    ours, theirs, ours_params, torch_params = _twin_optimizers(backend)
    run_both(ours, theirs, ours_params, torch_params, 0, 5)
    bad = reloaded(theirs.state_dict())
    bad["param_groups"][0]["lr"] = 0.5
    bad["state"][1][key] = torch.ones(9)  # param 1 of group 0 has shape (4,)
    bad_index = 1
    before, groups_before = snapshot(ours, ours_params), _groups_view(ours)
    with pytest.raises(ValueError) as error:
        ours.load_state_dict(bad)
    message = str(error.value)
    assert re.search("param", message, re.IGNORECASE) and re.search(rf"\b{bad_index}\b", message), \
        f"the message does not name the param: {message!r}"
    assert_unchanged(before, snapshot(ours, ours_params), "after the refused load")
    assert _groups_view(ours) == groups_before, "param_groups changed"
    run_both(ours, theirs, ours_params, torch_params, 5, 25)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_adamw_loading_an_adam_checkpoint_stays_decoupled_like_torch(backend):
    """torch.optim.AdamW re-sets decoupled_weight_decay=True on load (its __setstate__), so an
    Adam checkpoint with weight decay continues as AdamW; FusedAdamW must do the same."""
    ours_params, torch_params = twins(SHAPES)
    source_params = copy.deepcopy(torch_params)
    source = torch.optim.Adam(source_params, lr=LR, weight_decay=0.1, foreach=False)
    run_steps(source, source_params, 0, 5)
    saved = reloaded(source.state_dict())
    with torch.no_grad():
        for p, q, s in zip(ours_params, torch_params, source_params):
            p.copy_(s)
            q.copy_(s)
    ours = FusedAdamW(ours_params, lr=0.5, backend=backend)
    theirs = torch.optim.AdamW(torch_params, lr=0.5, foreach=False)
    ours.load_state_dict(reloaded(saved))  # torch's state takes the loaded tensors themselves
    theirs.load_state_dict(reloaded(saved))
    assert theirs.param_groups[0]["decoupled_weight_decay"] is True
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    run_both(ours, theirs, ours_params, torch_params, 5, 25)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    # and it is not what coupled (L2) Adam does from the same checkpoint
    run_steps(source, source_params, 5, 25)
    difference = max((p - s).abs().max().item() for p, s in zip(torch_params, source_params))
    assert difference > 1e-4, "the test cannot tell decoupled from coupled weight decay"


# torch's own suite's hooks (test/optim/test_optim.py, TestOptimRenewed): state entries that are
# not per-parameter dicts ("test": 1, bools) ride along in `state`, state_dict() and the load.
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    ran = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    state_dict["ran_state_dict_pre_hook"] = ran
    return state_dict


def _load_state_dict_pre_hook(optimizer, state_dict):
    mine = copy.deepcopy(state_dict)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


STATE_HOOKS = {
    "state-dict-pre": dict(state_dict_pre=_state_dict_pre_hook),
    "state-dict-pre-post": dict(state_dict_pre=_state_dict_pre_hook,
                                state_dict_post=_state_dict_post_hook),
    "load-post": dict(load_state_dict_post=_load_state_dict_post_hook),
    "load-pre-post": dict(load_state_dict_pre=_load_state_dict_pre_hook,
                          load_state_dict_post=_load_state_dict_post_hook),
}


def _split_state(state):
    """(per-parameter entries, the other entries) of a state or a state_dict's "state"."""
    params = {key: value for key, value in state.items() if isinstance(value, dict)}
    return params, {key: value for key, value in state.items() if not isinstance(value, dict)}


@pytest.mark.parametrize("hooks", STATE_HOOKS)
@pytest.mark.parametrize("adamw", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_state_entries_that_are_not_param_dicts_pass_through_like_torch(backend, adamw, hooks):
    """torch's suite's state_dict / load_state_dict hook tests: a pre-hook's `state["test"] = 1`
    and a post-hook's bools stay in `state`, go through state_dict() and load_state_dict() as
    torch's do, and the optimizer steps on as torch's."""
    ours_params, torch_params = twins(SHAPES)
    ours = (FusedAdamW if adamw else FusedAdam)(_groups(ours_params), lr=LR, backend=backend)
    theirs = (torch.optim.AdamW if adamw else torch.optim.Adam)(_groups(torch_params), lr=LR,
                                                                 foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 5)
    saved = {}
    for name, optimizer in (("ours", ours), ("theirs", theirs)):
        for kind, hook in STATE_HOOKS[hooks].items():
            getattr(optimizer, f"register_{kind}_hook")(hook)
        if hooks.startswith("load"):
            optimizer.load_state_dict(reloaded(theirs.state_dict()))
        saved[name] = optimizer.state_dict()
    for name in saved:  # torch's group says foreach=False (as asked), ours None (ignored)
        saved[name]["param_groups"] = [{k: v for k, v in group.items() if k != "foreach"}
                                       for group in saved[name]["param_groups"]]
    (ours_params_state, ours_entries), (their_params_state, their_entries) = (
        _split_state(saved[name]["state"]) for name in ("ours", "theirs"))
    assert ours_entries == their_entries
    assert {k: v for k, v in saved["ours"].items() if k != "state"} == \
        {k: v for k, v in saved["theirs"].items() if k != "state"}
    assert ours_params_state.keys() == their_params_state.keys()
    for index, state in their_params_state.items():
        assert ours_params_state[index].keys() == state.keys()
        for key, value in state.items():
            assert_close(torch.as_tensor(ours_params_state[index][key]), torch.as_tensor(value),
                         what=f"state_dict(): param {index} {key}", **TOLERANCES[torch.float32])
    assert _split_state(ours.state)[1] == _split_state(theirs.state)[1]
    assert _split_state(theirs.state)[1], "the hooks left no such entry: the test tests nothing"
    run_both(ours, theirs, ours_params, torch_params, 5, 25)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    # and each loads the other's checkpoint, extra entries included
    ours_saved, their_saved = reloaded(ours.state_dict()), reloaded(theirs.state_dict())
    ours.load_state_dict(their_saved)
    theirs.load_state_dict(ours_saved)
    assert _split_state(ours.state)[1] == _split_state(theirs.state)[1]
    run_both(ours, theirs, ours_params, torch_params, 25, 30)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
