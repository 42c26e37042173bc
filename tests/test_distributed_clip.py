"""Gradient clipping under torch.distributed: two gloo ranks (test_distributed's machinery), one
spawn per mode, each norm type a case inside it.

In each mode FusedAdam clips with its own norm (`FusedAdam.clip_grad_norm`, or
`fused_adam.clip_grad_norm_` through ZeroRedundancyOptimizer) and torch.optim.Adam(foreach=False)
with `torch.nn.utils.clip_grad_norm_` as that mode is used with torch, on the same per-rank
batches, for STEPS steps of (backward, clip, step) at a max_norm every step's norm exceeds. On
every rank, each step's returned norm equals torch's within 1e-6 relative (torch's full value
where it returns a DTensor), the ranks return one norm, and the params agree within
helpers.TOLERANCES (full tensors under FSDP2; bit for bit across ranks where the mode
replicates them).

- DDP: every rank has the all-reduced gradients, the local norm is the global one.
- ZeroRedundancyOptimizer(optimizer_class=FusedAdam): each rank's FusedAdam holds a partition of
  the params (1 and 4 here); the p-th powers add up over ZeRO's process group. torch clips over
  all the model's params, which every rank has after DDP's all-reduce.
- FSDP2 fully_shard: the local shards' p-th powers add up over the mesh's shard dimension; on a
  (2, 1) HSDP mesh (replicate 2, shard 1: every rank holds a whole replica as DTensors placed
  (Replicate(), Shard(0))) they must not add up over the replicate dimension.

Without the all-reduce (or with it over the replicas too) the ZeRO and FSDP2 tests fail.

Inside the same spawns: a NaN or inf gradient on either rank makes every rank's norm non-finite
(and error_if_nonfinite raise everywhere); a ZeRO rank holding no param still joins the
all-reduce; `distributed.shard_groups` sums over a `_StridedShard` dim (FSDP2 over tensor
parallelism, 4 ranks to build for real) and refuses a Partial gradient.
"""
import itertools

import pytest
import torch
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

from torch.distributed.tensor import DTensor  # noqa: E402

import fused_adam  # noqa: E402
from fused_adam import FusedAdam, distributed  # noqa: E402
from helpers import TOLERANCES, assert_close  # noqa: E402
from test_distributed import (  # noqa: E402
    LR, WORLD_SIZE, _groups, _local, _Net, _on_two_ranks, _train_step,
)

STEPS = 20
INF = float("inf")
# Below every step's norm of _Net's gradients on these batches (asserted): each step clips.
MAX_NORM = {2.0: 0.1, INF: 0.02}


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _clip_and_train(ours_model, ours, ours_clip, their_model, theirs, their_clip, rank, label,
                    max_norm):
    """STEPS steps of both, the norms as torch's on this rank and on every rank alike."""
    for step in range(STEPS):
        ours_norm = _train_step(ours_model, ours, step, rank, ours_clip)
        their_norm = _full(_train_step(their_model, theirs, step, rank, their_clip))
        what = f"{label}, rank {rank}, step {step}"
        assert ours_norm.dtype == their_norm.dtype == torch.float32, what
        assert abs(float(ours_norm) - float(their_norm)) <= 1e-6 * float(their_norm), \
            f"{what}: norm {float(ours_norm)!r} vs torch's {float(their_norm)!r}"
        assert float(their_norm) > max_norm, f"{what}: max_norm {max_norm} does not clip"
        gathered = [torch.empty_like(ours_norm) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, ours_norm)
        assert all(torch.equal(g, ours_norm) for g in gathered), \
            f"{what}: ranks return norms {[float(g) for g in gathered]}"


def _assert_params(ours_model, their_model, rank, label, replicated):
    """The full params as torch's; every rank's copy the same where the mode replicates."""
    for name, p, q in zip([n for n, _ in ours_model.named_parameters()],
                          ours_model.parameters(), their_model.parameters()):
        assert_close(_full(p), _full(q), what=f"{label}, rank {rank}: {name}",
                     **TOLERANCES[torch.float32])
    if replicated:
        flat = torch.cat([_local(p).detach().reshape(-1) for p in ours_model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks disagree"


# ------------------------------------------------------------------------------------------------
# What each rank runs

def _ddp_clip(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for norm_type, max_norm in MAX_NORM.items():
        ours_model, their_model = _Net(), _Net()
        ours = FusedAdam(_groups(ours_model), lr=LR)
        theirs = torch.optim.Adam(_groups(their_model), lr=LR, foreach=False)
        label = f"DDP, norm_type={norm_type}"
        _clip_and_train(
            DDP(ours_model, gradient_as_bucket_view=True), ours,
            lambda: ours.clip_grad_norm(max_norm, norm_type),
            DDP(their_model, gradient_as_bucket_view=True), theirs,
            lambda: torch.nn.utils.clip_grad_norm_(their_model.parameters(), max_norm,
                                                   norm_type),
            rank, label, max_norm)
        _assert_params(ours_model, their_model, rank, label, replicated=True)
    return {}


def _zero_clip(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    owned = []
    for norm_type, max_norm in MAX_NORM.items():
        ours_model, their_model = _Net(), _Net()
        ours = ZeroRedundancyOptimizer(_groups(ours_model), optimizer_class=FusedAdam, lr=LR)
        theirs = ZeroRedundancyOptimizer(_groups(their_model), optimizer_class=torch.optim.Adam,
                                         lr=LR, foreach=False)
        label = f"ZeRO, norm_type={norm_type}"
        _clip_and_train(
            DDP(ours_model), ours, lambda: fused_adam.clip_grad_norm_(ours, max_norm, norm_type),
            DDP(their_model), theirs,
            lambda: torch.nn.utils.clip_grad_norm_(their_model.parameters(), max_norm,
                                                   norm_type),
            rank, label, max_norm)
        _assert_params(ours_model, their_model, rank, label, replicated=True)
        owned.append(sum(len(group["params"]) for group in ours.optim.param_groups))

    # A non-finite gradient in one rank's partition: every rank's norm is non-finite, and
    # error_if_nonfinite raises on every rank. (gloo's MAX drops a NaN that comes from rank 1:
    # the inf-norm sees it through the NaN flag total_norm reduces beside the max.)
    for norm_type, poison, poisoned in itertools.product(MAX_NORM, (float("nan"), INF),
                                                         range(WORLD_SIZE)):
        model = _Net()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedAdam, lr=LR)
        for error_if_nonfinite in (False, True):
            zero.optim.zero_grad()  # drops the factor: ZeRO's zero_grad is torch's, not ours
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)
            if rank == poisoned:
                zero.optim.param_groups[0]["params"][0].grad[0, 0] = poison
            what = f"rank {rank}: {poison} in rank {poisoned}'s gradients, the {norm_type}-norm"
            if error_if_nonfinite:
                with pytest.raises(RuntimeError, match="non-finite"):
                    fused_adam.clip_grad_norm_(zero, 1.0, norm_type, error_if_nonfinite=True)
            else:
                norm = fused_adam.clip_grad_norm_(zero, 1.0, norm_type)
                assert norm.isnan() if poison != INF else float(norm) == INF, f"{what}: {norm}"

    # Fewer params than ranks: rank 1's FusedAdam holds none, and still joins the all-reduce.
    single = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    zero = ZeroRedundancyOptimizer([single], optimizer_class=FusedAdam, lr=LR)
    single.grad = torch.tensor([3.0, 4.0])
    for norm_type, expected in ((2.0, 5.0), (INF, 4.0)):
        norm = fused_adam.clip_grad_norm_(zero, 1.0, norm_type)
        assert float(norm) == expected, f"rank {rank}: the {norm_type}-norm is {float(norm)}"
        zero.optim.zero_grad()
        single.grad = torch.tensor([3.0, 4.0])
    owned.append(len(zero.optim.param_groups[0]["params"]))
    return dict(params_owned=owned)


class _EvenNet(_Net):
    """_Net with a (2, 1, 5) scale (the output broadcasts to (2, 8, 5)): one row a rank."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(1 + 0.1 * torch.randn(2, 1, 5))


def _sharded(mesh, even):
    """_Net (rank 1's shard of its scale is empty) or _EvenNet under FSDP2 on `mesh`."""
    from torch.distributed.fsdp import fully_shard

    model = _EvenNet() if even else _Net()
    for module in (model.a, model.b, model):
        fully_shard(module, mesh=mesh)
    return model


def _fsdp_clip(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.placement_types import (
        Partial, Replicate, Shard, _StridedShard,
    )

    # torch's clip cannot take the inf norm of an empty shard (vector_norm has no identity for
    # max): the inf case trains _EvenNet, which leaves no rank an empty shard.
    for shape, norm_type in [((WORLD_SIZE,), 2.0), ((WORLD_SIZE,), INF), ((WORLD_SIZE, 1), 2.0)]:
        max_norm, even = MAX_NORM[norm_type], norm_type == INF
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
        ours_model, their_model = _sharded(mesh, even), _sharded(mesh, even)
        ours = FusedAdam(_groups(ours_model), lr=LR)
        theirs = torch.optim.Adam(_groups(their_model), lr=LR, foreach=False)
        label = f"FSDP2 on mesh {shape}, norm_type={norm_type}"
        _clip_and_train(
            ours_model, ours, lambda: ours.clip_grad_norm(max_norm, norm_type),
            their_model, theirs,
            lambda: torch.nn.utils.clip_grad_norm_(their_model.parameters(), max_norm,
                                                   norm_type),
            rank, label, max_norm)
        _assert_params(ours_model, their_model, rank, label, replicated=len(shape) == 2)
        # FSDP2 places each gradient as its parameter (FSDPParam.to_sharded_dtensor, one
        # spec for both): Shard(0) on the mesh's one dim, (Replicate(), Shard(0)) for HSDP.
        expected = (Shard(0),) if len(shape) == 1 else (Replicate(), Shard(0))
        for name, p in ours_model.named_parameters():
            assert isinstance(p.grad, DTensor), f"{label}: {name}"
            assert p.grad.placements == p.placements == expected, \
                f"{label}: {name} placed {p.placements}, its gradient {p.grad.placements}"
    # FSDP2 over tensor parallelism on one dim places the DP dim _StridedShard (4 ranks to
    # build), which is not `is_shard()` in torch 2.13: its group is summed over all the same.
    # A Partial gradient (tensor parallelism's, not FSDP2's) is refused: its local values are
    # not a shard, their powers do not add up to the norm.
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    strided = DTensor.from_local(torch.ones(2), mesh, (_StridedShard(0, split_factor=2),),
                                 run_check=False)
    assert distributed.shard_groups(strided) == (mesh.get_group(0),)
    replicated = torch.nn.Parameter(DTensor.from_local(torch.ones(2), mesh, (Replicate(),)))
    assert distributed.shard_groups(replicated) == ()
    replicated.grad = DTensor.from_local(torch.ones(2), mesh, (Partial(),))
    with pytest.raises(NotImplementedError, match="Partial"):
        FusedAdam([replicated]).clip_grad_norm(1.0)
    return {}


# ------------------------------------------------------------------------------------------------
# Two ranks per mode

def test_clip_under_ddp(tmp_path):
    _on_two_ranks(tmp_path, _ddp_clip)


def test_clip_under_zero_redundancy_optimizer(tmp_path):
    results = _on_two_ranks(tmp_path, _zero_clip)
    # Each rank's count of params per case; the rank with 1 of _Net's holds the single param.
    assert sorted(r["params_owned"] for r in results) == [[1, 1, 1], [4, 4, 0]]


def test_clip_under_fsdp2_and_hsdp(tmp_path):
    _on_two_ranks(tmp_path, _fsdp_clip)
