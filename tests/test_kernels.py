"""Every backend's launcher on bare tensors: an `ArenaRecord` record, a group table and
gradients, no optimizer and no Arena. Against the float64 oracle over 20 steps, with several
segments, two groups and a segment without a gradient; then 64-bit offsets in every kernel."""
import mmap
import platform

import numpy as np
import pytest
import torch

from fused_adam import dispatch
from fused_adam.kernels import contract, reference
from fused_adam.kernels.contract import ArenaRecord
from helpers import TOLERANCES, assert_close, cpu_backends, make_params
from kernel_helpers import group_table

BACKENDS = cpu_backends()
BACKEND_IDS = [f"cpu-{backend}" for backend in BACKENDS]


GROUPS = [
    {contract.LR: 1e-2, contract.BETA1: 0.9, contract.BETA2: 0.999, contract.EPS: 1e-8,
     contract.WEIGHT_DECAY: 0.1, contract.DECOUPLED_WD: 1.0},
    {contract.LR: 3e-3, contract.BETA1: 0.8, contract.BETA2: 0.99, contract.EPS: 1e-6,
     contract.WEIGHT_DECAY: 0.05, contract.AMSGRAD: 1.0, contract.MAXIMIZE: 1.0},
]


def _grads_for(kernel_module, grads):
    """The per-segment gradients in the form the backend reads (None: no gradient)."""
    if kernel_module.GRADS == "tensors":
        return grads
    return torch.tensor([0 if g is None else g.data_ptr() for g in grads], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_launcher_on_bare_tensors_matches_the_float64_oracle(backend, dtype):
    """Three segments (4097, 1 and 300 elements, starts aligned to 16) in two groups; the
    second segment has no gradient in odd steps. 20 steps of the launcher against
    `reference.adam_update` in float64 on each segment: params, moments, max and steps."""
    kernel_module = dispatch.load_backend(backend)
    lengths = [4097, 1, 300]
    starts = [0, 4112, 4128]
    groups = [0, 1, 1]
    size = 4432
    initial = make_params([(size,)], torch.float64, seed=3)[0]
    arena = ArenaRecord(
        params=initial.to(dtype), exp_avg=torch.zeros(size, dtype=dtype),
        exp_avg_sq=torch.zeros(size, dtype=dtype), max_exp_avg_sq=torch.zeros(size, dtype=dtype),
        segment_starts=torch.tensor(starts), segment_lengths=torch.tensor(lengths),
        segment_groups=torch.tensor(groups), steps=torch.zeros(3))
    oracle = [dict(p=initial[s:s + n].clone(), m=torch.zeros(n, dtype=torch.float64),
                   v=torch.zeros(n, dtype=torch.float64),
                   v_max=torch.zeros(n, dtype=torch.float64), step=0)
              for s, n in zip(starts, lengths)]
    table = group_table(*GROUPS)
    for step in range(20):
        grads = [g.to(dtype) for g in make_params([(n,) for n in lengths], torch.float64,
                                                  seed=100 + step)]
        if step % 2:
            grads[1] = None
        kernel_module.adam_step(arena, grads=_grads_for(kernel_module, grads), group_table=table)
        for segment, (state, grad) in enumerate(zip(oracle, grads)):
            if grad is None:
                continue
            group = GROUPS[groups[segment]]
            state["step"] += 1
            reference.adam_update(
                state["p"], grad.double(), state["m"], state["v"], state["v_max"],
                step=state["step"], lr=group[contract.LR], beta1=group[contract.BETA1],
                beta2=group[contract.BETA2], eps=group[contract.EPS],
                weight_decay=group[contract.WEIGHT_DECAY],
                amsgrad=bool(group.get(contract.AMSGRAD)),
                maximize=bool(group.get(contract.MAXIMIZE)),
                decoupled_weight_decay=bool(group.get(contract.DECOUPLED_WD)))
    assert arena.steps.tolist() == [state["step"] for state in oracle] == [20, 10, 20]
    for segment, (start, n, state) in enumerate(zip(starts, lengths, oracle)):
        for name, buffer, expected in (("param", arena.params, state["p"]),
                                       ("exp_avg", arena.exp_avg, state["m"]),
                                       ("exp_avg_sq", arena.exp_avg_sq, state["v"])):
            assert_close(buffer[start:start + n], expected, what=f"segment {segment} {name}",
                         **TOLERANCES[dtype])
        if groups[segment] == 1:
            assert_close(arena.max_exp_avg_sq[start:start + n], state["v_max"],
                         what=f"segment {segment} max_exp_avg_sq", **TOLERANCES[dtype])
    # Padding between segments is never written.
    assert torch.equal(arena.params[4097:4112], initial[4097:4112].to(dtype))
    assert not arena.exp_avg[4097:4112].any() and not arena.exp_avg_sq[4097:4112].any()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_found_inf_skips_everything(backend):
    kernel_module = dispatch.load_backend(backend)
    arena = ArenaRecord(
        params=torch.ones(16), exp_avg=torch.zeros(16), exp_avg_sq=torch.zeros(16),
        segment_starts=torch.tensor([0]), segment_lengths=torch.tensor([16]),
        segment_groups=torch.tensor([0]), steps=torch.zeros(1))
    grad = torch.ones(16)
    kernel_module.adam_step(arena, grads=_grads_for(kernel_module, [grad]),
                            group_table=group_table(GROUPS[0]), found_inf=torch.ones(1))
    assert torch.equal(arena.params, torch.ones(16)) and not arena.exp_avg.any()
    assert arena.steps.tolist() == [0.0]


def _big_numba_case(seed):
    """A record of 5 segments, 2^18 elements in all (enough to be split across threads), with
    its gradients and the group table."""
    lengths = [100_003, 17, 90_000, 1, 72_123]
    starts = np.cumsum([0] + [-(-n // 16) * 16 for n in lengths])
    size = int(starts[-1])
    generator = torch.Generator().manual_seed(seed)
    arena = ArenaRecord(
        params=torch.randn(size, generator=generator), exp_avg=torch.zeros(size),
        exp_avg_sq=torch.zeros(size), max_exp_avg_sq=torch.zeros(size),
        segment_starts=torch.tensor(starts[:-1]), segment_lengths=torch.tensor(lengths),
        segment_groups=torch.tensor([0, 1, 0, 1, 0]), steps=torch.zeros(5))
    grads = [torch.randn(n, generator=generator) for n in lengths]
    grads[3] = None
    return arena, grads, group_table(*GROUPS)


def _clone(arena):
    return ArenaRecord(**{name: None if value is None else value.clone()
                           for name, value in vars(arena).items()})


def test_numba_pass_split_across_threads_is_the_one_pass():
    """The launcher splits a large arena across threads (`cpu_threads`); 3 steps of that are
    bit for bit 3 steps of the kernel in one call on one thread."""
    from fused_adam.kernels import cpu_threads, numba_adam

    arena, grads, table = _big_numba_case(seed=21)
    assert cpu_threads.parts_for(arena.params.numel()) > 1 or torch.get_num_threads() == 1
    one_pass = _clone(arena)
    addresses = _grads_for(numba_adam, grads)
    derived = numba_adam._Derived(one_pass)
    for _ in range(3):
        numba_adam.adam_step(arena, grads=addresses, group_table=table)
        numba_adam._step_on_this_thread(*derived.arguments, addresses.numpy(), table.numpy(),
                                        inv_grad_scale=1.0, clip_factor=1.0, advance=True,
                                        first=0, last=derived.n_chunks)
    for name in ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "steps"):
        assert torch.equal(getattr(arena, name), getattr(one_pass, name)), name


def test_numba_bf16_rounding_is_torchs_on_the_edges_of_every_binade():
    """The bf16 store (`_narrow`, branch-free) against torch's `.to(torch.bfloat16)`: every
    high half (every sign, exponent and bf16 mantissa: zeros, subnormals, infinities and NaNs
    included) with the low halves where rounding turns (ties, one either side, all ones) and
    a few others. NaN stays NaN, quieted, its high bits kept: (bits >> 16) | 0x40."""
    import numba
    from fused_adam.kernels import numba_adam

    @numba.njit
    def narrow_all(values, out):
        for i in range(values.shape[0]):
            out[i] = numba_adam._narrow(values[i], out)

    lows = np.array([0, 1, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF, 0x1234, 0xC000],
                    dtype=np.uint32)
    bits = (np.arange(1 << 16, dtype=np.uint32)[:, None] << np.uint32(16) | lows).ravel()
    values = bits.view(np.float32)
    ours = np.empty(len(values), dtype=np.uint16)
    narrow_all(values, ours)
    nan = np.isnan(values)
    torchs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(ours[~nan], torchs.view(np.uint16)[~nan])
    assert np.array_equal(ours[nan], ((bits[nan] >> np.uint32(16)) | np.uint32(0x40))
                          .astype(np.uint16))


def _step_in_child(arena, grads, table, connection):
    from fused_adam.kernels import numba_adam

    numba_adam.adam_step(arena, grads=_grads_for(numba_adam, grads), group_table=table)
    connection.send_bytes(arena.params.numpy().tobytes())
    connection.close()


def test_numba_threads_survive_fork():
    """A process forked after a split pass (the pool's threads started) runs one itself, with
    the right numbers: numba's own OpenMP layer kills such a child."""
    import multiprocessing

    from fused_adam.kernels import numba_adam

    arena, grads, table = _big_numba_case(seed=22)
    numba_adam.adam_step(arena, grads=_grads_for(numba_adam, grads), group_table=table)
    expected = _clone(arena)
    numba_adam.adam_step(expected, grads=_grads_for(numba_adam, grads), group_table=table)
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_step_in_child, args=(arena, grads, table, writer))
    child.start()
    writer.close()
    received = reader.recv_bytes() if reader.poll(120) else None
    child.join(120)
    assert child.exitcode == 0 and received is not None, f"the child exited with {child.exitcode}"
    assert np.array_equal(np.frombuffer(received, dtype=np.float32), expected.params.numpy())


# ------------------------------------------------------------------------------------------------
# Large arenas: 64-bit offsets in every kernel
#
# A kernel that computes an element offset (or a byte offset) in 32 bits breaks only past 2^31
# elements, and allocating that much memory four times over is out of the question in CI. So the
# buffers here are *virtual*: anonymous private mappings made with MAP_NORESERVE, which Linux
# neither backs nor counts against memory until a page is written; reading an untouched page
# maps the shared zero page. A segment is placed at element 2^32 + 2^31 + 16 (byte offset about
# 25.8e9), and only its few pages are ever touched. If any step of the address arithmetic were
# 32-bit, the update would land on the int32/uint32-truncated index, 2^31 + 16 (or before the
# buffer, a crash), or the gradient would be read from the wrong place; the tests check that the
# right elements hold exactly what the oracle computes and that the truncated ones stay zero.

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux x86-64/aarch64 value
_FAR = 2 ** 32 + 2 ** 31 + 16  # a multiple of 16: a valid segment start
needs_virtual_memory = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="MAP_NORESERVE mappings as used here are Linux x86-64/aarch64")


def _virtual(numel, dtype):
    """A zero float tensor of `numel` elements that costs only the pages written to it."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    size = numel * np.dtype(np_dtype).itemsize
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return torch.from_numpy(np.frombuffer(mapping, dtype=np_dtype))


def _far_case(n, dtype, seed):
    """Initial param and moments and a grad for an n-element segment, the oracle's result of one
    Adam step from them (step 5, amsgrad, L2 weight decay), and the group table."""
    p, m, v, v_max, g = make_params([(n,)] * 5, dtype, seed)
    m, v = m * 0.1, v.abs() * 0.01
    v_max = torch.maximum(v, v_max.abs() * 0.01)
    expected = [x.double() for x in (p, m, v, v_max)]
    reference.adam_update(*expected[:1], g.double(), *expected[1:], step=5, lr=1e-2, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True)
    table = group_table({contract.LR: 1e-2, contract.BETA1: 0.9, contract.BETA2: 0.999,
                          contract.EPS: 1e-8, contract.WEIGHT_DECAY: 0.1, contract.AMSGRAD: 1.0})
    return (p, m, v, v_max, g), expected, table


def _check_far(buffers, at, n, expected, dtype, truncated):
    for name, buffer, value in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                                   buffers, expected):
        assert_close(buffer[at:at + n], value.to(dtype), what=f"{name} at element {at}",
                     **TOLERANCES[dtype])
        for wrong in truncated:
            assert not buffer[wrong:wrong + n].any(), \
                f"{name}: the update landed at element {wrong} (32-bit offset arithmetic)"


@needs_virtual_memory
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_segment_past_2_to_the_32_elements(backend):
    """Every backend's launcher, through its contract, on a record whose one segment starts at
    element 2^32 + 2^31 + 16 of (virtual) buffers."""
    dtype, n = torch.float32, 37
    (p, m, v, v_max, g), expected, table = _far_case(n, dtype, seed=11)
    kernel_module = dispatch.load_backend(backend)
    buffers = [_virtual(_FAR + 64, dtype) for _ in range(4)]
    for buffer, value in zip(buffers, (p, m, v, v_max)):
        buffer[_FAR:_FAR + n] = value
    arena = ArenaRecord(
        params=buffers[0], exp_avg=buffers[1], exp_avg_sq=buffers[2], max_exp_avg_sq=buffers[3],
        segment_starts=torch.tensor([_FAR]), segment_lengths=torch.tensor([n]),
        segment_groups=torch.tensor([0]), steps=torch.tensor([4.0]))

    kernel_module.adam_step(arena, grads=_grads_for(kernel_module, [g]), group_table=table)

    assert arena.steps.tolist() == [5.0]
    _check_far(buffers, _FAR, n, expected, dtype, truncated=[_FAR % 2 ** 32, _FAR % 2 ** 31])


@needs_virtual_memory
def test_numba_kernel_offsets_within_a_segment_past_2_to_the_31():
    """numba's `_step_on_this_thread` on one chunk whose offset *inside* its segment is past 2^31 (a
    parameter of more than 2^31 elements), in a segment that itself starts past 2^31: the grad
    is read at address + offset * itemsize and the update written at start + offset, both
    beyond 32 bits. The chunk table is made by hand so that only this chunk runs."""
    from fused_adam.kernels import numba_adam

    dtype, n = torch.float32, 37
    (p, m, v, v_max, g), expected, table = _far_case(n, dtype, seed=12)
    start = 2 ** 31 + 2 ** 30 + 16
    offset = 2 ** 31 + 2 ** 30 + 32
    at = start + offset  # 2^32 + 2^31 + 48
    buffers = [_virtual(at + 64, dtype) for _ in range(4)]
    for buffer, value in zip(buffers, (p, m, v, v_max)):
        buffer[at:at + n] = value
    grad = _virtual(offset + 64, dtype)
    grad[offset:offset + n] = g
    int64 = dict(dtype=np.int64)
    steps = np.array([5.0], dtype=np.float32)  # the launcher advances steps before the chunks
    numba_adam._step_on_this_thread(
        params=buffers[0].numpy(), master_params=None, exp_avg=buffers[1].numpy(),
        exp_avg_sq=buffers[2].numpy(), max_exp_avg_sq=buffers[3].numpy(),
        exp_avg_absmax=None, exp_avg_sq_absmax=None,
        segments=numba_adam.Segments(np.array([start], **int64), np.array([0], **int64), steps),
        chunks=numba_adam.Chunks(np.array([0], **int64), np.array([offset], **int64),
                                 np.array([n], **int64)),
        grad_addresses=np.array([grad.data_ptr()], **int64), group_table=table.numpy(),
        inv_grad_scale=1.0, clip_factor=1.0, advance=False, first=0, last=1)
    _check_far(buffers, at, n, expected, dtype, truncated=[at % 2 ** 32, at % 2 ** 31])


@needs_virtual_memory
@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (interpreter or GPU)")
def test_triton_kernel_offsets_within_a_segment_past_2_to_the_31():
    """The Triton kernel, under the interpreter, on one hand-made chunk at an offset past 2^31
    inside a segment that starts past 2^31. The interpreter keeps Triton's integer types (an
    int32 offset would wrap there too), so this checks the kernel's offset arithmetic is int64
    from the loaded tables to the pointers; the PTX check in test_triton_compile.py covers what
    the compiler makes of it."""
    from fused_adam.kernels import triton_adam

    dtype, n = torch.float32, 37
    (p, m, v, v_max, g), expected, table = _far_case(n, dtype, seed=13)
    start = 2 ** 31 + 2 ** 30 + 16
    small = ArenaRecord(params=torch.zeros(16), exp_avg=torch.zeros(16),
                         exp_avg_sq=torch.zeros(16), segment_starts=torch.tensor([0]),
                         segment_lengths=torch.tensor([16]), segment_groups=torch.tensor([0]),
                         steps=torch.zeros(1))
    block_size, _ = triton_adam.launch_config(small)
    offset = (2 ** 31 + 2 ** 30) // block_size * block_size + block_size  # a chunk boundary
    at = start + offset
    buffers = [_virtual(at + block_size, dtype) for _ in range(4)]
    for buffer, value in zip(buffers, (p, m, v, v_max)):
        buffer[at:at + n] = value
    grad = _virtual(offset + block_size, dtype)
    grad[offset:offset + n] = g
    int64 = dict(dtype=torch.int64)
    steps = torch.tensor([5.0])  # the launcher advances steps before the kernel runs
    triton_adam._adam_kernel[(1,)](
        param_ptr=buffers[0], master_param_ptr=None, exp_avg_ptr=buffers[1],
        exp_avg_sq_ptr=buffers[2], max_exp_avg_sq_ptr=buffers[3],
        chunk_table_ptr=torch.tensor([[0, offset]], **int64),
        segment_starts_ptr=torch.tensor([start], **int64),
        segment_lengths_ptr=torch.tensor([offset + n], **int64),
        segment_groups_ptr=torch.tensor([0], **int64), steps_ptr=steps,
        grad_addresses_ptr=torch.tensor([grad.data_ptr()], **int64), group_table_ptr=table,
        inv_grad_scale_ptr=torch.ones(()), inv_grad_scale=1.0, found_inf_ptr=torch.zeros(()),
        clip_factor_ptr=torch.ones((), dtype=torch.float64), HAS_MASTER=False, HAS_MAX_EXP_AVG_SQ=True, BLOCK_SIZE=block_size)
    _check_far(buffers, at, n, expected, dtype, truncated=[at % 2 ** 32, at % 2 ** 31])
    assert not buffers[0][at + n:at + block_size].any(), "wrote past the segment's end"
