"""FusedAdam under torch.distributed: two gloo ranks on CPU, started by each test itself.

Modes: DDP with `gradient_as_bucket_view` False and True, ZeroRedundancyOptimizer with
`optimizer_class=FusedAdam` and `parameters_as_bucket_view` False and True, FSDP2
`fully_shard` (DTensor params: the arena holds each rank's local shards), and
torch.distributed.checkpoint round trips of FusedAdam's state under FSDP2, into FusedAdam and
into torch.optim.Adam. In each mode FusedAdam and torch.optim.Adam(foreach=False) train the same
model on the same per-rank batches, and on every rank the params and every state tensor agree
within helpers.TOLERANCES (the ranks' replicas agree bit for bit where the mode replicates). Each
rank reports `optimizer.grad_copies`: the numba backend reads every gradient in place, DDP's
unaligned bucket views included, so it is 0 in every mode.
"""
import datetime
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from fused_adam import FusedAdam  # noqa: E402
from helpers import TOLERANCES, assert_close  # noqa: E402

WORLD_SIZE = 2
STEPS = 12
LR = 1e-2


class _Net(torch.nn.Module):
    """Rows that shard unevenly over two ranks (13 = 7 + 6, 5 = 3 + 2) and a (1, 5) scale whose
    FSDP2 shard on rank 1 is empty."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(1, 5))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _groups(model):
    """Two groups (weights decay, the rest do not), as training code usually has them."""
    weights = [model.a.weight, model.b.weight]
    rest = [model.a.bias, model.b.bias, model.scale]
    return [dict(params=weights, weight_decay=0.05), dict(params=rest, betas=(0.8, 0.99))]


def _train_step(model, optimizer, step, rank, clip=None):
    """One iteration on this rank's own batch: ranks see different data. `clip()`, if given,
    runs between backward and step; its result is returned."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    x, target = torch.randn(8, 7, generator=generator), torch.randn(8, 5, generator=generator)
    optimizer.zero_grad()
    ((model(x) - target) ** 2).mean().backward()
    clipped = None if clip is None else clip()
    optimizer.step()
    return clipped


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _assert_same(ours, theirs, ours_model, their_model, rank, label):
    """Params and every state tensor of this rank agree; DTensor-ness of states as torch's."""
    tolerance = TOLERANCES[torch.float32]
    names = [name for name, _ in ours_model.named_parameters()]
    for name, p, q in zip(names, ours_model.parameters(), their_model.parameters()):
        what = f"{label}, rank {rank}: {name}"
        assert_close(_local(p), _local(q), what=what, **tolerance)
        ours_state, their_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert ours_state.keys() == their_state.keys(), \
            f"{what}: state keys {sorted(ours_state)} != {sorted(their_state)}"
        for key, theirs_value in their_state.items():
            ours_value = ours_state[key]
            assert type(ours_value) is type(theirs_value), \
                f"{what} {key}: {type(ours_value).__name__} != {type(theirs_value).__name__}"
            assert_close(_local(ours_value), _local(theirs_value), what=f"{what} {key}",
                         **tolerance)


def _assert_ranks_agree(model, label):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks disagree"


# ------------------------------------------------------------------------------------------------
# What each rank runs

def _ddp(rank, bucket_view):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ours_model, their_model = _Net(), _Net()
    ours_ddp = DDP(ours_model, gradient_as_bucket_view=bucket_view)
    their_ddp = DDP(their_model, gradient_as_bucket_view=bucket_view)
    ours = FusedAdam(_groups(ours_model), lr=LR)
    theirs = torch.optim.Adam(_groups(their_model), lr=LR, foreach=False)
    for step in range(STEPS):
        _train_step(ours_ddp, ours, step, rank)
        _train_step(their_ddp, theirs, step, rank)
    grads = [p.grad for p in ours_model.parameters()]
    if bucket_view:
        # The grads FusedAdam read were views into DDP's flat bucket, some not 16-byte aligned.
        assert all(g.untyped_storage().nbytes() > g.numel() * g.element_size() for g in grads)
        assert any(g.data_ptr() % 16 for g in grads)
    label = f"DDP(gradient_as_bucket_view={bucket_view})"
    _assert_same(ours, theirs, ours_model, their_model, rank, label)
    _assert_ranks_agree(ours_model, label)
    return dict(grad_copies=ours.grad_copies)


def _zero(rank, bucket_view):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ours_model, their_model = _Net(), _Net()
    ours_ddp, their_ddp = DDP(ours_model), DDP(their_model)
    ours = ZeroRedundancyOptimizer(_groups(ours_model), optimizer_class=FusedAdam,
                                   parameters_as_bucket_view=bucket_view, lr=LR)
    theirs = ZeroRedundancyOptimizer(_groups(their_model), optimizer_class=torch.optim.Adam,
                                     parameters_as_bucket_view=bucket_view, lr=LR, foreach=False)
    for step in range(STEPS):
        _train_step(ours_ddp, ours, step, rank)
        _train_step(their_ddp, theirs, step, rank)
    (arena,) = ours.optim._arenas.values()
    assert 0 < len(arena) < len(list(ours_model.parameters())), "ZeRO did not partition"
    # With bucket views ZeRO moved every owned param into its bucket after FusedAdam packed
    # them; FusedAdam steps them in the arena and writes them back to the bucket ZeRO sends.
    assert len(arena.former_memory) == (len(arena) if bucket_view else 0)
    label = f"ZeRO(parameters_as_bucket_view={bucket_view})"
    # States live with each rank's local optimizer; params are synced to every rank.
    _assert_same(ours.optim, theirs.optim, ours_model, their_model, rank, label)
    _assert_ranks_agree(ours_model, label)
    return dict(grad_copies=ours.optim.grad_copies, params_owned=len(arena))


def _fully_sharded(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = _Net(seed)
    fully_shard(model.a, mesh=mesh)
    fully_shard(model.b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _assert_in_arena(optimizer, model):
    """Every local shard lies in the arena (no parameter left it)."""
    (buffer,) = [arena.record.params for arena in optimizer._arenas.values()]
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        local = p.to_local()
        assert local.numel() == 0 or start <= local.data_ptr() < end, f"{name} left the arena"


def _fsdp(rank, built):
    ours_model, their_model = _fully_sharded(), _fully_sharded()
    if built == "after-backward":
        # FSDP2's lazy init (which re-reads the shards) has run before the optimizer exists.
        for model in (ours_model, their_model):
            model(torch.randn(2, 7)).sum().backward()
            model.zero_grad(set_to_none=True)
    ours = FusedAdam(_groups(ours_model), lr=LR)
    theirs = torch.optim.Adam(_groups(their_model), lr=LR, foreach=False)
    for step in range(STEPS):
        _train_step(ours_model, ours, step, rank)
        _train_step(their_model, theirs, step, rank)
    _assert_in_arena(ours, ours_model)
    _assert_same(ours, theirs, ours_model, their_model, rank, f"FSDP2 ({built})")
    for name, p, q in zip([n for n, _ in ours_model.named_parameters()],
                          ours_model.parameters(), their_model.parameters()):
        assert_close(p.full_tensor(), q.full_tensor(), what=f"FSDP2, rank {rank}: full {name}",
                     **TOLERANCES[torch.float32])
    return dict(grad_copies=ours.grad_copies)


def _fsdp_checkpoint(rank, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    checkpoint = os.path.join(out, "checkpoint")
    model = _fully_sharded()
    optimizer = FusedAdam(_groups(model), lr=LR)
    for step in range(STEPS // 2):
        _train_step(model, optimizer, step, rank)
    dcp.save(dict(model=get_model_state_dict(model),
                  optim=get_optimizer_state_dict(model, optimizer)), checkpoint_id=checkpoint)

    restored = {}
    for name, make in [("FusedAdam", lambda params: FusedAdam(params, lr=LR)),
                       ("torch.optim.Adam",
                        lambda params: torch.optim.Adam(params, lr=LR, foreach=False))]:
        fresh = _fully_sharded(seed=1)  # other initial values: the checkpoint must set them
        fresh_optimizer = make(_groups(fresh))
        state = dict(model=get_model_state_dict(fresh),
                     optim=get_optimizer_state_dict(fresh, fresh_optimizer))
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, fresh_optimizer, state["optim"])
        _assert_same(fresh_optimizer, optimizer, fresh, model, rank, f"{name} as loaded")
        restored[name] = (fresh, fresh_optimizer)
    _assert_in_arena(*reversed(restored["FusedAdam"]))

    for step in range(STEPS // 2, STEPS):
        _train_step(model, optimizer, step, rank)
        for fresh, fresh_optimizer in restored.values():
            _train_step(fresh, fresh_optimizer, step, rank)
    for name, (fresh, fresh_optimizer) in restored.items():
        _assert_same(fresh_optimizer, optimizer, fresh, model, rank, f"resumed in {name}")
    return dict(grad_copies=restored["FusedAdam"][1].grad_copies)


# ------------------------------------------------------------------------------------------------
# Two ranks per test

def _rank_main(rank, name, args, out):
    """`name`: a function of this module by name, or a module-level function of another test
    module (pickled by reference, so that module is imported in the rank)."""
    # Two ranks share this machine's cores: one thread each, for numba and for torch (after
    # numba: starting numba's OpenMP pool can raise torch's count).
    import numba
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        result = (globals()[name] if isinstance(name, str) else name)(rank, *args)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # NOTE: about 1 exit in 10 here aborts after all of the above is done ("terminate called
    # without an active exception", a C++ thread torch leaves running at interpreter shutdown,
    # seen with torch.optim.Adam alone too): a rank whose work is done leaves at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _on_two_ranks(tmp_path, name, *args):
    """Runs `name(rank, *args)` on two gloo ranks (`name` as `_rank_main` takes it); a failure
    on either fails the test, with that rank's traceback. Returns each rank's result."""
    mp.start_processes(_rank_main, args=(name, args, str(tmp_path)), nprocs=WORLD_SIZE,
                       start_method="spawn")
    results = [json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
               for rank in range(WORLD_SIZE)]
    print(f"{getattr(name, '__name__', name)}{args}: {results}")
    return results


@pytest.mark.parametrize("bucket_view", [False, True], ids=["grads-own", "grads-bucket-view"])
def test_ddp(tmp_path, bucket_view):
    """DDP: FusedAdam reads the all-reduced grads in place, whether autograd's tensors or views
    into DDP's flat buckets (contiguous, not all 16-byte aligned)."""
    results = _on_two_ranks(tmp_path, "_ddp", bucket_view)
    assert [r["grad_copies"] for r in results] == [0] * WORLD_SIZE


@pytest.mark.parametrize("bucket_view", [False, True],
                         ids=["params-own", "params-bucket-view"])
def test_zero_redundancy_optimizer(tmp_path, bucket_view):
    """ZeroRedundancyOptimizer(optimizer_class=FusedAdam): each rank's FusedAdam steps its
    partition and ZeRO broadcasts the updated params. With parameters_as_bucket_view=True ZeRO
    re-points the params into its buckets after FusedAdam packed them, on one rank a bucket of
    exactly one param, on the other a bucket of four."""
    results = _on_two_ranks(tmp_path, "_zero", bucket_view)
    assert sorted(r["params_owned"] for r in results) == [1, 4]
    assert [r["grad_copies"] for r in results] == [0] * WORLD_SIZE


@pytest.mark.parametrize("built", ["before-forward", "after-backward"])
def test_fsdp2(tmp_path, built):
    """FSDP2 fully_shard: the arena holds each rank's local shards (uneven ones, and an empty
    one, included) and FSDP's padded all-gather input; grads are read in place from FSDP's
    reduce-scatter output; states are DTensors like torch's."""
    results = _on_two_ranks(tmp_path, "_fsdp", built)
    assert [r["grad_copies"] for r in results] == [0] * WORLD_SIZE


def test_fsdp2_distributed_checkpoint(tmp_path):
    """get_optimizer_state_dict -> dcp.save -> dcp.load -> set_optimizer_state_dict into a fresh
    FusedAdam and a fresh torch.optim.Adam: both hold the saved state and resume as the
    original run continues."""
    _on_two_ranks(tmp_path, "_fsdp_checkpoint", str(tmp_path))
