"""Compressed state under torch.distributed: 8-bit moments (`state_dtype=torch.int8`) on fp32
params, and bf16 params with a compact master and 8-bit moments (`master_weights="bf16+8"`), on
two gloo ranks (test_distributed's launcher).

The reference everywhere is a single-process FusedAdam in the same mode, stepped with the
gradients the distributed run stepped with (DDP's all-reduced ones; FSDP2's reduce-scattered
shards gathered whole): the distributed run must be that run, bit for bit (codes, absmax,
remainders, params), except where the quantization blocks differ.

- DDP: every rank is the single-process run, so the ranks agree bit for bit.
- ZeroRedundancyOptimizer(optimizer_class=FusedAdam): each rank steps its partition as
  DDP + FusedAdam does; `consolidate_state_dict()` + `state_dict()` on rank 0 carries the codes,
  absmax and remainders, and loads into a fresh single-process FusedAdam (and into a fresh ZeRO
  on every rank) that resume identically.
- FSDP2 fully_shard: blocks start at each *shard*'s start. `_BlockNet`'s shapes put every shard
  boundary but one on a multiple of QUANT_BLOCK, where a shard's codes and absmax are a slice of
  the single-process run's; `c.bias` (256 values cut 128 + 128) is the exception, checked
  close. `d.weight` (7 rows of 256: 4 + 3 blocks) makes the ranks' block counts differ and
  `scale` (1 row) leaves rank 1 an empty shard.
- DCP: get_optimizer_state_dict -> dcp.save -> dcp.load -> set_optimizer_state_dict into a
  fresh FusedAdam: the state as saved, and the next steps bit for bit. Each DTensor parameter's
  absmax is a DTensor sharded like its blocks (see `fused_adam.distributed.blocks_like_param`):
  as plain tensors DCP would save one rank's and load it on every rank.
"""
import pytest
import torch
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

from torch.distributed.tensor import DTensor  # noqa: E402

from fused_adam import FusedAdam  # noqa: E402
from fused_adam.kernels.contract import QUANT_BLOCK  # noqa: E402
from helpers import reloaded  # noqa: E402
from test_distributed import WORLD_SIZE, _local, _on_two_ranks  # noqa: E402

STEPS = 20
LR = 1e-2
MODES = {
    "fp32-int8": (torch.float32, dict(state_dtype=torch.int8)),
    "bf16+8-int8": (torch.bfloat16, dict(master_weights="bf16+8", state_dtype=torch.int8)),
}
ABSMAX = ("exp_avg_absmax", "exp_avg_sq_absmax")
# The one parameter whose FSDP2 shard boundary (128) is not a multiple of QUANT_BLOCK.
UNALIGNED = "c.bias"
# How far that parameter may end from the single-process run's after STEPS steps, as a share
# of how far the single-process run moved it: on average (measured: 1.3-1.4%) and at the worst
# element (measured: 1.9-2.2% of the farthest move).
MEAN_DRIFT, WORST_DRIFT = 0.03, 0.05


class _BlockNet(torch.nn.Module):
    """Two ranks shard dim 0: a.weight (16, 64) at 512 values, c.weight (256, 16) at 2048,
    d.weight (7, 256) at 1024 (4 + 3 blocks), scale (1, 7) not at all (rank 1 holds nothing),
    c.bias (256,) at 128, inside a block."""

    def __init__(self, dtype, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = torch.nn.Linear(64, 16, bias=False)
        self.c = torch.nn.Linear(16, 256)
        self.d = torch.nn.Linear(256, 7, bias=False)
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(1, 7))
        self.to(dtype)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.a(x))))) * self.scale


def _groups(model):
    weights = [model.a.weight, model.c.weight, model.d.weight]
    rest = [model.c.bias, model.scale]
    return [dict(params=weights, weight_decay=0.05), dict(params=rest, betas=(0.8, 0.99))]


def _backward(model, step, rank, dtype):
    """This rank's batch of step `step` (ranks see different data), forward and backward."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    x, target = torch.randn(8, 64, generator=generator), torch.randn(8, 7, generator=generator)
    ((model(x.to(dtype)).float() - target) ** 2).mean().backward()


def _step_with_grads(optimizer, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.detach().clone()
    optimizer.step()


def _names(model):
    return [name for name, _ in model.named_parameters()]


def _assert_identical(ours, theirs, ours_model, their_model, label, only=None):
    """Params and every state tensor of `ours` equal `theirs`'s bit for bit (local values, for
    DTensors); `only`: the names to compare (default all)."""
    for name, p, q in zip(_names(ours_model), ours_model.parameters(),
                          their_model.parameters()):
        if only is not None and name not in only:
            continue
        what = f"{label}: {name}"
        assert torch.equal(_local(p), _local(q)), f"{what} differs"
        ours_state, their_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert ours_state.keys() == their_state.keys(), \
            f"{what}: state keys {sorted(ours_state)} != {sorted(their_state)}"
        for key, value in their_state.items():
            mine = ours_state[key]
            assert type(mine) is type(value), f"{what} {key}: {type(mine)} != {type(value)}"
            mine, value = torch.as_tensor(_local(mine)), torch.as_tensor(_local(value))
            assert mine.dtype == value.dtype and torch.equal(mine, value), f"{what} {key} differs"


def _assert_compressed(entry, p, master_weights, what):
    """A state entry holds codes, per-block absmax (and a compact master's remainder)."""
    assert entry["exp_avg"].dtype == torch.int8, what
    assert entry["exp_avg_sq"].dtype == torch.uint8, what
    for key in ABSMAX:
        assert entry[key].dtype == torch.float32, what
        assert entry[key].shape == (-(-p.numel() // QUANT_BLOCK),), f"{what} {key}"
    if master_weights:
        assert entry["master_remainder"].dtype == torch.int8, what
        assert "master_param" not in entry, what
    else:
        assert "master_remainder" not in entry, what


def _bytes(tensors):
    return torch.cat([torch.as_tensor(t).detach().reshape(-1).view(torch.uint8)
                      for t in tensors])


def _assert_ranks_agree(model, optimizer, label):
    """Every rank holds the same params and states, bit for bit."""
    tensors = []
    for p in model.parameters():
        tensors.append(p)
        tensors.extend(v for _, v in sorted(optimizer.state[p].items()))
    mine = _bytes(tensors)
    gathered = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks disagree"


# ------------------------------------------------------------------------------------------------
# What each rank runs

def _ddp(rank, mode):
    """DDP + FusedAdam against a single-process FusedAdam fed DDP's all-reduced gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype, options = MODES[mode]
    model, single_model = _BlockNet(dtype), _BlockNet(dtype)
    ddp = DDP(model)
    ours = FusedAdam(_groups(model), lr=LR, **options)
    single = FusedAdam(_groups(single_model), lr=LR, **options)
    for step in range(STEPS):
        ours.zero_grad()
        _backward(ddp, step, rank, dtype)
        ours.step()
        _step_with_grads(single, single_model.parameters(), [p.grad for p in model.parameters()])
    label = f"DDP {mode}, rank {rank}"
    _assert_identical(ours, single, model, single_model, label)
    for p in model.parameters():
        _assert_compressed(ours.state[p], p, "master_weights" in options, label)
    _assert_ranks_agree(model, ours, label)
    return dict(grad_copies=ours.grad_copies)


def _zero(rank, mode):
    """ZeRO(FusedAdam) steps as DDP + FusedAdam; its consolidated checkpoint resumes in a
    single-process FusedAdam (rank 0) and in a fresh ZeRO (every rank) bit for bit."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype, options = MODES[mode]
    model, dp_model = _BlockNet(dtype), _BlockNet(dtype)
    ddp, dp_ddp = DDP(model), DDP(dp_model)
    zero = ZeroRedundancyOptimizer(_groups(model), optimizer_class=FusedAdam, lr=LR, **options)
    dp = FusedAdam(_groups(dp_model), lr=LR, **options)

    def train(first, last, others=()):
        for step in range(first, last):
            for module, optimizer in ((ddp, zero), (dp_ddp, dp)):
                optimizer.zero_grad()
                _backward(module, step, rank, dtype)
                optimizer.step()
            for other_model, other in others:
                _step_with_grads(other, other_model.parameters(),
                                 [p.grad for p in dp_model.parameters()])

    label = f"ZeRO {mode}, rank {rank}"
    train(0, STEPS // 2)
    (arena,) = zero.optim._arenas.values()
    owned = set(arena.params_in_order)
    assert 0 < len(owned) < len(list(model.parameters())), "ZeRO did not partition"
    owned_names = {name for name, p in model.named_parameters() if p in owned}
    _assert_identical(zero.optim, dp, model, dp_model, label, only=owned_names)

    zero.consolidate_state_dict(to=0)
    saved = [reloaded(zero.state_dict()) if rank == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    (saved,) = saved
    in_order = [p for group in _groups(model) for p in group["params"]]  # ZeRO's indices
    assert sorted(saved["state"]) == list(range(len(in_order)))
    for index, p in enumerate(in_order):
        _assert_compressed(saved["state"][index], p, "master_weights" in options,
                           f"{label}: consolidated state {index}")

    resumed = []
    if rank == 0:  # a single-process FusedAdam from the consolidated checkpoint
        single_model = _BlockNet(dtype, seed=1)
        single_model.load_state_dict(model.state_dict())
        single = FusedAdam(_groups(single_model), lr=LR, **options)
        single.load_state_dict(saved)
        _assert_identical(single, dp, single_model, dp_model, f"{label}: loaded")
        resumed.append((single_model, single))
    # A fresh ZeRO (and its DDP) on every rank, from the same checkpoint.
    zero_model = _BlockNet(dtype, seed=1)
    zero_model.load_state_dict(model.state_dict())
    zero_ddp = DDP(zero_model)
    fresh_zero = ZeroRedundancyOptimizer(_groups(zero_model), optimizer_class=FusedAdam, lr=LR,
                                         **options)
    fresh_zero.load_state_dict(saved)
    train(STEPS // 2, STEPS, resumed)
    for step in range(STEPS // 2, STEPS):
        fresh_zero.zero_grad()
        _backward(zero_ddp, step, rank, dtype)
        fresh_zero.step()
    _assert_identical(zero.optim, dp, model, dp_model, f"{label}: resumed", only=owned_names)
    _assert_identical(fresh_zero.optim, dp, zero_model, dp_model, f"{label}: fresh ZeRO",
                      only=owned_names)
    for p, q in zip(zero_model.parameters(), dp_model.parameters()):
        assert torch.equal(p, q), f"{label}: fresh ZeRO's params"
    if resumed:
        _assert_identical(single, dp, single_model, dp_model, f"{label}: resumed single")
    return dict(params_owned=len(owned))


def _fully_sharded(dtype, seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = _BlockNet(dtype, seed)
    for module in (model.a, model.c, model.d, model):
        fully_shard(module, mesh=mesh)
    return model


def _shard_start(p):
    """Where this rank's shard of DTensor `p` starts in the flattened parameter."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return sum(o * s for o, s in zip(offset, p.stride()))


def _fsdp(rank, mode):
    """FSDP2 + FusedAdam against a single-process FusedAdam fed the gathered gradients: where
    the shard boundary is a multiple of QUANT_BLOCK, each shard's params, codes, absmax and
    remainders are a slice of the single-process run's, bit for bit."""
    dtype, options = MODES[mode]
    drifts = None
    model, single_model = _fully_sharded(dtype), _BlockNet(dtype)
    ours = FusedAdam(_groups(model), lr=LR, **options)
    single = FusedAdam(_groups(single_model), lr=LR, **options)
    start = [q.detach().clone() for q in single_model.parameters()]
    for step in range(STEPS):
        ours.zero_grad()
        _backward(model, step, rank, dtype)
        ours.step()
        _step_with_grads(single, single_model.parameters(),
                         [p.grad.full_tensor() for p in model.parameters()])
    label = f"FSDP2 {mode}, rank {rank}"
    for name, p, q, q0 in zip(_names(model), model.parameters(), single_model.parameters(),
                              start):
        what = f"{label}: {name}"
        first = _shard_start(p)
        n = p.to_local().numel()
        # The shard's blocks are the single-process run's where it starts at a block boundary
        # and ends at one or at the parameter's end (an empty shard has no blocks).
        aligned = n == 0 or (first % QUANT_BLOCK == 0
                             and ((first + n) % QUANT_BLOCK == 0 or first + n == p.numel()))
        assert aligned == (name != UNALIGNED), f"{what}: shard {first}..{first + n}"
        full = p.full_tensor()
        if not aligned:  # other blocks, other rounding: close to the single-process run
            drift, moved = (full - q).detach().float().abs(), (q - q0).detach().float().abs()
            drifts = [float(drift.mean() / moved.mean()), float(drift.max() / moved.max())]
            assert drift.max() > 0, f"{what}: blocks that start at the shard changed nothing"
            assert drift.mean() <= MEAN_DRIFT * moved.mean(), \
                f"{what}: mean drift {drift.mean()} vs move {moved.mean()}"
            assert drift.max() <= WORST_DRIFT * moved.max(), \
                f"{what}: worst drift {drift.max()} vs move {moved.max()}"
            continue
        assert torch.equal(full, q.detach()), f"{what}: params differ"
        entry, single_entry = ours.state[p], single.state[q]
        assert entry.keys() == single_entry.keys(), what
        for key, value in entry.items():
            theirs = single_entry[key]
            if key == "step":
                assert torch.equal(value, theirs), f"{what}: step"
            elif key in ABSMAX:
                assert isinstance(value, DTensor), f"{what} {key}: not a DTensor"
                local, blocks = value.to_local(), -(-n // QUANT_BLOCK)
                first_block = first // QUANT_BLOCK
                assert torch.equal(local[:blocks], theirs[first_block:first_block + blocks]), \
                    f"{what} {key} differs"
                assert not local[blocks:].any(), f"{what} {key}: padding"
            else:
                assert isinstance(value, DTensor), f"{what} {key}: not a DTensor"
                assert torch.equal(value.to_local().reshape(-1),
                                   theirs.reshape(-1)[first:first + n]), f"{what} {key} differs"
    if mode == "fp32-int8":
        _dtensor_without_fsdp(rank)
    return dict(grad_copies=ours.grad_copies, drift_of_unaligned=drifts)


def _check_dequantized(sharded_state, rank):
    """`dequantized_state_dict` of a sharded state: fp32 DTensors placed as the codes, each
    shard decoded with its own blocks."""
    from fused_adam import dequantized_state_dict
    from fused_adam.kernels import codecs

    converted = dequantized_state_dict(sharded_state)
    for fqn, entry in sharded_state["state"].items():
        values = converted["state"][fqn]
        assert not any(key in values for key in ABSMAX), fqn
        for key in ("exp_avg", "exp_avg_sq"):
            codes, absmax, decoded = entry[key], entry[key + "_absmax"], values[key]
            what = f"rank {rank}: dequantized {fqn} {key}"
            assert isinstance(decoded, DTensor) and decoded.dtype == torch.float32, what
            assert (decoded.shape, decoded.placements) == (codes.shape, codes.placements), what
            local = codes.to_local().reshape(-1)
            expected = codecs.decode(local, absmax.to_local()[:-(-local.numel() // QUANT_BLOCK)],
                                        signed=key == "exp_avg")
            assert torch.equal(decoded.to_local().reshape(-1), expected), what


def _dtensor_without_fsdp(rank):
    """A DTensor parameter FSDP2 does not manage (as tensor parallelism makes them), 7 rows of
    256 cut 4 + 3: its absmax is padded to the largest shard's blocks as well, and each shard is
    the single-process run's slice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    whole = torch.randn(7, QUANT_BLOCK, generator=torch.Generator().manual_seed(7))
    p = torch.nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
    q = torch.nn.Parameter(whole.clone())
    ours = FusedAdam([p], lr=LR, state_dtype=torch.int8)
    single = FusedAdam([q], lr=LR, state_dtype=torch.int8)
    for step in range(3):
        grad = torch.randn(7, QUANT_BLOCK, generator=torch.Generator().manual_seed(step))
        p.grad, q.grad = distribute_tensor(grad, mesh, [Shard(0)]), grad.clone()
        ours.step()
        single.step()
    what = f"DTensor without FSDP2, rank {rank}"
    assert torch.equal(p.full_tensor(), q.detach()), what
    first, n = _shard_start(p), p.to_local().numel()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ours.state[p][key].to_local().reshape(-1),
                           single.state[q][key].reshape(-1)[first:first + n]), f"{what} {key}"
        absmax = ours.state[p][key + "_absmax"]
        assert absmax.shape == (8,) and absmax.to_local().shape == (4,), f"{what} {key}"
        blocks = n // QUANT_BLOCK
        assert torch.equal(absmax.to_local()[:blocks], single.state[q][key + "_absmax"][
            first // QUANT_BLOCK:first // QUANT_BLOCK + blocks]), f"{what} {key}_absmax"
        assert not absmax.to_local()[blocks:].any(), f"{what} {key}_absmax padding"


def _fsdp_checkpoint(rank, mode, out):
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    dtype, options = MODES[mode]
    checkpoint = os.path.join(out, "checkpoint")
    model = _fully_sharded(dtype)
    optimizer = FusedAdam(_groups(model), lr=LR, **options)

    def train(model, optimizer, first, last):
        for step in range(first, last):
            optimizer.zero_grad()
            _backward(model, step, rank, dtype)
            optimizer.step()

    train(model, optimizer, 0, STEPS // 2)
    saved_state = get_optimizer_state_dict(model, optimizer)
    # Each shard's blocks, padded to the largest shard's: d.weight's 4 + 3 blocks as 4 + 4,
    # scale's 1 + 0 as 1 + 1.
    blocks = {"a.weight": 2, "c.weight": 8, "c.bias": 1, "d.weight": 4, "scale": 1}
    for fqn, entry in saved_state["state"].items():
        for key in ABSMAX:
            assert isinstance(entry[key], DTensor), f"{fqn} {key}: not a DTensor"
            assert entry[key].shape == (WORLD_SIZE * blocks[fqn],), f"{fqn} {key}"
            assert entry[key].to_local().shape == (blocks[fqn],), f"{fqn} {key}"
    _check_dequantized(saved_state, rank)
    dcp.save(dict(model=get_model_state_dict(model), optim=saved_state),
             checkpoint_id=checkpoint)

    fresh = _fully_sharded(dtype, seed=1)  # other initial values: the checkpoint must set them
    fresh_optimizer = FusedAdam(_groups(fresh), lr=LR, **options)
    state = dict(model=get_model_state_dict(fresh),
                 optim=get_optimizer_state_dict(fresh, fresh_optimizer))
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_optimizer, state["optim"])
    label = f"DCP {mode}, rank {rank}"
    _assert_identical(fresh_optimizer, optimizer, fresh, model, f"{label}: loaded")

    train(model, optimizer, STEPS // 2, STEPS)
    train(fresh, fresh_optimizer, STEPS // 2, STEPS)
    _assert_identical(fresh_optimizer, optimizer, fresh, model, f"{label}: resumed")

    # Blocks of shards are no blocks of the whole parameter: refused, not loaded.
    whole = _BlockNet(dtype)
    whole_optimizer = FusedAdam(_groups(whole), lr=LR, **options)
    with pytest.raises(ValueError, match="per-shard blocks of a sharded parameter"):
        whole_optimizer.load_state_dict(optimizer.state_dict())
    return dict(grad_copies=fresh_optimizer.grad_copies)


# ------------------------------------------------------------------------------------------------
# Two ranks per test

@pytest.mark.parametrize("mode", MODES)
def test_ddp(tmp_path, mode):
    """Under DDP each rank is a single-process FusedAdam fed the all-reduced gradients."""
    results = _on_two_ranks(tmp_path, _ddp, mode)
    assert [r["grad_copies"] for r in results] == [0] * WORLD_SIZE


@pytest.mark.parametrize("mode", MODES)
def test_zero_redundancy_optimizer(tmp_path, mode):
    """ZeRO partitions the compressed states and consolidates them into a checkpoint that a
    single-process FusedAdam and a fresh ZeRO resume from exactly."""
    results = _on_two_ranks(tmp_path, _zero, mode)
    assert sum(r["params_owned"] for r in results) == 5


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2(tmp_path, mode):
    """FSDP2: shards whose boundary is a block boundary are the single-process run's slices."""
    results = _on_two_ranks(tmp_path, _fsdp, mode)
    assert [r["grad_copies"] for r in results] == [0] * WORLD_SIZE


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_distributed_checkpoint(tmp_path, mode):
    """DCP saves each shard's codes and absmax and loads them back where they were."""
    _on_two_ranks(tmp_path, _fsdp_checkpoint, mode, str(tmp_path))
