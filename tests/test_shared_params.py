"""Parameters that are not one tensor each: two Parameters over the same memory (issue #21, 6)
and a parameter listed twice (issue #21, 8). torch.optim.Adam(foreach=False) takes both and
gives numbers no arena can give (memory stepped once per alias or per listing); FusedAdam refuses
them with a ValueError naming both, at construction and at `add_param_group`, before any
parameter moves into an arena. Parameters over disjoint parts of one storage, and one Parameter
tied into two modules, are ordinary parameters: torch's numbers."""
import pytest
import torch

from fused_adam import FusedAdam, FusedAdamW
from helpers import (
    TOLERANCES, assert_close, assert_same_trajectory, assert_unchanged, make_params, run_both,
    run_steps, snapshot,
)

LR = 1e-2


def _params(shapes=((5, 7), (4,), (3,)), seed=0):
    return [torch.nn.Parameter(p) for p in make_params(shapes, torch.float32, seed)]


def _layout(params):
    return [(p.data_ptr(), p.detach().clone()) for p in params]


def _assert_layout_kept(params, layout, what):
    for index, (p, (pointer, values)) in enumerate(zip(params, layout)):
        assert p.data_ptr() == pointer, f"{what}: param {index} was moved"
        assert torch.equal(p.detach(), values), f"{what}: param {index} changed"


def _assert_refused_group_left_nothing(ours, theirs, ours_params, torch_params, before, what):
    """After a refused `add_param_group` (`before`, a snapshot taken before it): one group, the
    state as it was, and steps 3 .. 9 as torch's optimizer takes them without the group."""
    assert len(ours.param_groups) == 1
    assert_unchanged(before, snapshot(ours, ours_params), what)
    run_both(ours, theirs, ours_params, torch_params, 3, 10)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)


def _assert_appended_param_refused_at_the_step(appended_of, match):
    """`appended_of(params)` appended to the param group after two steps: the next step raises
    a ValueError matching `match` and changes nothing."""
    ours_params = _params()
    ours = FusedAdam(ours_params, lr=LR)
    run_steps(ours, ours_params, 0, 2)
    before = snapshot(ours, ours_params)
    ours.param_groups[0]["params"].append(appended_of(ours_params))
    with pytest.raises(ValueError, match=match):
        ours.step()
    assert_unchanged(before, snapshot(ours, ours_params), "after the refused step")


# ------------------------------------------------------------------------------------------------
# Two Parameters over the same memory


def _aliased_by_parameter():
    a, c = _params()[:2]
    b = torch.nn.Parameter(a.data)  # the issue's own example
    return [a, c, b], (0, 2)


def _tied_by_data():
    first, second = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    second.weight.data = first.weight.data  # tied before the optimizer is built
    return [first.weight, first.bias, second.weight, second.bias], (0, 2)


def _overlapping_views():
    storage = torch.randn(10)
    return [torch.nn.Parameter(storage[:6]), torch.nn.Parameter(storage[4:])], (0, 1)


def _same_memory_other_view():
    a = _params()[0]
    return [a, torch.nn.Parameter(a.data.t())], (0, 1)  # the same elements, transposed


ALIASED = {"parameter-of-data": _aliased_by_parameter, "tied-by-data": _tied_by_data,
           "overlapping-views": _overlapping_views, "transposed-view": _same_memory_other_view}


def _copies(params):
    """The same layout for torch: copies that share memory as `params` do."""
    base = {}
    copies = []
    for p in params:
        storage = p.untyped_storage()
        key = storage.data_ptr()
        if key not in base:
            base[key] = torch.empty(0).set_(storage.clone())
        copies.append(torch.nn.Parameter(torch.empty(0).set_(
            base[key].untyped_storage(), p.storage_offset(), p.shape, p.stride())))
    return copies


@pytest.mark.parametrize("case", ALIASED)
def test_parameters_sharing_memory_are_refused_at_construction(case):
    """torch steps memory shared by two Parameters once per Parameter (the aliasing kept, the
    numbers not those of either alone); FusedAdam refuses, naming both, moving nothing."""
    params, (first, second) = ALIASED[case]()
    theirs_params = _copies(params)
    theirs = torch.optim.Adam(theirs_params, lr=LR, foreach=False)
    for p in theirs_params:
        p.grad = torch.ones_like(p)
    theirs.step()  # accepted; the shared memory took two steps
    shared = theirs_params[first].untyped_storage().data_ptr()
    assert shared == theirs_params[second].untyped_storage().data_ptr()

    layout = _layout(params)
    with pytest.raises(ValueError, match=(f"parameter {first} of param group 0 and parameter "
                                          f"{second} of param group 0 share memory")):
        FusedAdam(params, lr=LR)
    _assert_layout_kept(params, layout, "after the refused construction")


def test_the_error_names_named_parameters():
    a, c = _params()[:2]
    b = torch.nn.Parameter(a.data)
    with pytest.raises(ValueError, match="'encoder.weight'.*'decoder.weight'"):
        FusedAdamW([("encoder.weight", a), ("other", c), ("decoder.weight", b)])


@pytest.mark.parametrize("made", ["before", "after"])
def test_parameter_sharing_memory_is_refused_by_add_param_group(made):
    """An alias of a parameter already in the optimizer: of its memory before the optimizer
    took it (`made="before"`) or of the arena memory it has now (`"after"`). Refused, the
    optimizer unchanged, and it steps on as torch's does without the new group."""
    ours_params, torch_params = _params(), _params()
    alias = torch.nn.Parameter(ours_params[1].data) if made == "before" else None
    ours = FusedAdam(ours_params, lr=LR)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 3)
    if alias is None:
        alias = torch.nn.Parameter(ours_params[1].data)
    before = snapshot(ours, ours_params)
    with pytest.raises(ValueError, match="parameter 1 of param group 0 and parameter 0 of "
                                         "param group 1 share memory"):
        ours.add_param_group(dict(params=[alias], lr=1e-3))
    _assert_refused_group_left_nothing(ours, theirs, ours_params, torch_params, before,
                                       "after the refused group")


def test_parameter_sharing_memory_appended_to_a_group_is_refused_at_the_step():
    _assert_appended_param_refused_at_the_step(
        lambda params: torch.nn.Parameter(params[0].data), "share memory")


def test_parameter_tied_by_data_after_construction_is_refused_at_the_step():
    """`b.data = a.data` once the optimizer holds both: torch would step the shared memory
    twice; the next step refuses, changing nothing."""
    ours_params = _params(((5, 7), (4,), (4,)))
    ours = FusedAdam(ours_params, lr=LR)
    run_steps(ours, ours_params, 0, 2)
    ours_params[2].data = ours_params[1].data
    with pytest.raises(RuntimeError, match="parameter 2 of param group 0.*shares memory with "
                                           "parameter 1 of param group 0"):
        run_steps(ours, ours_params, 2, 3)


DISJOINT = {
    "slices": lambda storage: [storage[:12], storage[12:30], storage[30:]],
    "interleaved": lambda storage: [storage.view(20, 2)[:, 0], storage.view(20, 2)[:, 1]],
    "rows-and-columns": lambda storage: [storage.view(4, 10)[:2, :5], storage.view(4, 10)[2:],
                                         storage.view(4, 10)[:2, 5:]],
}


@pytest.mark.parametrize("case", DISJOINT)
def test_views_of_disjoint_parts_of_one_storage_give_torchs_numbers(case):
    """Parameters over disjoint elements of one storage (a flat buffer cut into params, as
    ZeRO's bucket views do): accepted, torch's numbers, and the storage (still held here) reads
    as torch's leaves it after every step."""
    initial = torch.randn(40, generator=torch.Generator().manual_seed(3))
    ours_storage, torch_storage = initial.clone(), initial.clone()
    ours_params = [torch.nn.Parameter(v) for v in DISJOINT[case](ours_storage)]
    torch_params = [torch.nn.Parameter(v) for v in DISJOINT[case](torch_storage)]
    ours = FusedAdamW(ours_params, lr=LR)
    theirs = torch.optim.AdamW(torch_params, lr=LR, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 20)
    assert_same_trajectory(ours, theirs, ours_params, torch_params, dtype=torch.float32)
    assert_close(ours_storage, torch_storage, what="the shared storage",
                 **TOLERANCES[torch.float32])


def test_weights_tied_the_usual_way_are_one_parameter():
    """One Parameter in two modules (tied input and output embeddings): `parameters()` lists
    it once, and it is stepped as torch steps it."""
    def model():
        torch.manual_seed(0)
        embedding, head = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11, bias=False)
        head.weight = embedding.weight
        return torch.nn.ModuleDict(dict(embedding=embedding, head=head))

    ours_model, torch_model = model(), model()
    ours = FusedAdamW(ours_model.parameters(), lr=LR)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=LR, foreach=False)
    tokens = torch.tensor([1, 4, 9, 2])
    for optimizer, m in ((ours, ours_model), (theirs, torch_model)):
        for _ in range(10):
            optimizer.zero_grad()
            m["head"](m["embedding"](tokens)).logsumexp(-1).sum().backward()
            optimizer.step()
    assert ours_model["head"].weight is ours_model["embedding"].weight
    assert_same_trajectory(ours, theirs, list(ours_model.parameters()),
                           list(torch_model.parameters()), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# A parameter listed twice


def test_parameter_listed_twice_in_a_group_is_refused_at_construction():
    """torch 2.13 warns ("... in future, this will cause an error") and steps it twice per
    step; FusedAdam raises that future error at once, naming both listings, moving nothing."""
    torch_params = _params()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        twice = torch.optim.Adam(torch_params + [torch_params[1]], lr=LR, foreach=False)
    once_params = _params()
    once = torch.optim.Adam(once_params, lr=LR, foreach=False)
    run_both(twice, once, torch_params, once_params, 0, 1)
    assert not torch.equal(torch_params[1], once_params[1])  # stepped twice, not once

    ours_params = _params()
    layout = _layout(ours_params)
    with pytest.raises(ValueError, match="parameter 3 of param group 0 is parameter 1 of param "
                                         "group 0 listed again"):
        FusedAdam(ours_params + [ours_params[1]], lr=LR)
    _assert_layout_kept(ours_params, layout, "after the refused construction")


def test_parameter_listed_twice_is_refused_by_add_param_group():
    ours_params, torch_params = _params(), _params()
    extra = torch.nn.Parameter(torch.randn(6))
    ours = FusedAdam(ours_params, lr=LR)
    theirs = torch.optim.Adam(torch_params, lr=LR, foreach=False)
    run_both(ours, theirs, ours_params, torch_params, 0, 3)
    before = snapshot(ours, ours_params)
    with pytest.raises(ValueError, match="listed again"):
        ours.add_param_group(dict(params=[extra, extra]))
    # In two groups: torch's own ValueError, as before.
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter "
                                         "group"):
        ours.add_param_group(dict(params=[ours_params[0]]))
    _assert_refused_group_left_nothing(ours, theirs, ours_params, torch_params, before,
                                       "after the refused groups")


def test_parameter_appended_twice_to_a_group_is_refused_at_the_step():
    _assert_appended_param_refused_at_the_step(lambda params: params[0], "listed again")
