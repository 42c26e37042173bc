"""8-bit moments (`state_dtype=torch.int8`): the block map's error, every backend's step against
the reference's, blocks that start at each parameter, checkpoints both ways, and the errors."""
import pytest
import torch

import fused_adam
from fused_adam.kernels.contract import QUANT_BLOCK, SIGNED_LEVELS, UNSIGNED_LEVELS
from fused_adam.kernels import codecs
from helpers import (
    DTYPE_IDS, TOLERANCES, assert_close, cpu_backends, make_params, reloaded, run_steps,
)

SHAPES = [(300, 7), (5,), (QUANT_BLOCK,), (3, QUANT_BLOCK + 1), (40, 33)]
INT8 = dict(state_dtype=torch.int8)


def _blocks(values):
    """The values as rows of QUANT_BLOCK (the last zero-padded) and each row's absmax."""
    n_blocks = -(-values.numel() // QUANT_BLOCK)
    padded = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.float64)
    padded[:values.numel()] = values.double()
    return padded.view(n_blocks, QUANT_BLOCK)


def test_signed_map_error_is_half_a_level_in_the_square_root():
    """Each exp_avg value comes back within half a level (1/254 of its block's absmax's square
    root) in the square-root domain, and a block's largest magnitude comes back exactly."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(10 * QUANT_BLOCK + 37, generator=generator) * torch.logspace(
        -6, 2, 10 * QUANT_BLOCK + 37)
    codes, absmax = codecs.quantize(values, signed=True)
    decoded = codecs.decode(codes, absmax, signed=True)
    rows, back = _blocks(values), _blocks(decoded)
    scale = rows.abs().amax(dim=1, keepdim=True)
    root_error = ((rows.abs() / scale).sqrt() - (back.abs() / scale).sqrt()).abs()
    assert root_error.max() <= 0.5 / SIGNED_LEVELS + 1e-6
    assert torch.equal(torch.sign(back[rows.abs() > scale * 4 / SIGNED_LEVELS ** 2]),
                       torch.sign(rows[rows.abs() > scale * 4 / SIGNED_LEVELS ** 2]))
    assert torch.equal(absmax.double(), scale.squeeze(1))
    largest = rows.abs().argmax(dim=1)
    assert torch.equal(back.abs().gather(1, largest[:, None]), scale)


def test_unsigned_map_error_is_half_a_level_in_the_fourth_root():
    """exp_avg_sq comes back within half a level in the 4th-root domain: sqrt(v), which the
    step divides by, is within 1/255 of its block's in the square-root domain."""
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(7 * QUANT_BLOCK + 5, generator=generator) ** 8 * 1e-3
    codes, absmax = codecs.quantize(values, signed=False)
    assert codes.dtype == torch.uint8
    decoded = codecs.decode(codes, absmax, signed=False)
    rows, back = _blocks(values), _blocks(decoded)
    scale = rows.amax(dim=1, keepdim=True)
    error = ((rows / scale) ** 0.25 - (back / scale) ** 0.25).abs()
    assert error.max() <= 0.5 / UNSIGNED_LEVELS + 1e-6
    assert (decoded >= 0).all()
    largest = rows.argmax(dim=1)
    assert torch.equal(back.gather(1, largest[:, None]), scale)


def test_zero_and_nan_blocks():
    """A block of zeros stays zeros with absmax 0; a NaN makes its own block NaN, no other."""
    values = torch.zeros(3 * QUANT_BLOCK)
    values[QUANT_BLOCK + 3] = float("nan")
    values[2 * QUANT_BLOCK:] = 1.0
    for signed in (True, False):
        codes, absmax = codecs.quantize(values, signed=signed)
        decoded = codecs.decode(codes, absmax, signed=signed)
        assert torch.equal(decoded[:QUANT_BLOCK], torch.zeros(QUANT_BLOCK))
        assert decoded[QUANT_BLOCK:2 * QUANT_BLOCK].isnan().all()
        assert torch.equal(decoded[2 * QUANT_BLOCK:], torch.ones(QUANT_BLOCK))


def _train(backend, dtype=torch.float32, steps=20, seed=0, optimizer=fused_adam.FusedAdamW,
           **options):
    params = [torch.nn.Parameter(p) for p in make_params(SHAPES, dtype, seed=seed)]
    groups = [dict(params=params[:3]),
              dict(params=params[3:], lr=3e-3, weight_decay=0.1, maximize=True)]
    opt = optimizer(groups, lr=1e-2, backend=backend, **INT8, **options)
    run_steps(opt, params, 0, steps)
    return opt, params


def _assert_same_codes(ours, theirs, label, *, exact):
    """Codes equal (exact), or off by one level in at most 1 in 2000 elements (an fp32 moment
    a rounding apart lands on the other side of a level's midpoint); absmax within fp32's."""
    for p, q in zip(ours[1], theirs[1]):
        mine, reference_state = ours[0].state[p], theirs[0].state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            difference = (mine[key].int() - reference_state[key].int()).abs()
            if exact:
                assert torch.equal(mine[key], reference_state[key]), f"{label}: {key} codes"
            else:
                assert difference.max() <= 1, f"{label}: {key} codes off by {difference.max()}"
                assert (difference > 0).float().mean() <= 1 / 2000, f"{label}: {key}"
            absmax = key + "_absmax"
            if exact:
                assert torch.equal(mine[absmax], reference_state[absmax]), f"{label}: {absmax}"
            else:
                assert_close(mine[absmax], reference_state[absmax], what=f"{label}: {absmax}",
                             **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
@pytest.mark.parametrize("optimizer", [fused_adam.FusedAdam, fused_adam.FusedAdamW],
                         ids=["adam-l2", "adamw"])
def test_kernel_steps_as_the_reference(backend, optimizer):
    """20 steps over two groups (one maximizing, with weight decay): params within fp32's
    tolerance of the reference backend's, codes equal but for rare one-level flips."""
    ours = _train(backend, optimizer=optimizer, weight_decay=0.01)
    theirs = _train("torch", optimizer=optimizer, weight_decay=0.01)
    for index, (p, q) in enumerate(zip(ours[1], theirs[1])):
        assert_close(p, q, what=f"param {index}", **TOLERANCES[torch.float32])
    _assert_same_codes(ours, theirs, backend, exact=False)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
def test_kernel_codes_bit_for_bit_when_the_moments_are_exact(backend):
    """With beta1 = beta2 = 0 the new moments are g and g*g, one rounding each on every
    backend: then the codes and absmax are the quantizer's alone, and must be the reference's
    bit for bit, step after step (the gradients are given, so that the params' last-bit
    differences, from another order of rounding in the update, do not feed back)."""
    generator = torch.Generator().manual_seed(3)
    runs = []
    for name in (backend, "torch"):
        params = [torch.nn.Parameter(p) for p in make_params(SHAPES, torch.float32)]
        runs.append((fused_adam.FusedAdamW(params, betas=(0.0, 0.0), backend=name, **INT8),
                     params))
    for step in range(5):
        grads = [torch.randn(p.shape, generator=generator) * 10.0 ** (step - 2)
                 for p in runs[0][1]]
        grads[1][2] = 0.0
        for opt, params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        _assert_same_codes(runs[0], runs[1], f"{backend} step {step}", exact=True)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_master_weights_with_8bit_moments(backend, dtype):
    """16-bit params with an fp32 master copy and 8-bit moments, 20 steps: each step, from the
    reference's state, the kernel's master is the reference's to fp32 tolerance and the params
    are the master rounded. (Synced each step: a code a level apart would change the next
    step's update by a level's size, and a 16-bit param's rounding feeds that back.)"""
    generator = torch.Generator().manual_seed(4)
    runs = []
    for name in (backend, "torch"):
        params = [torch.nn.Parameter(p) for p in make_params(SHAPES, dtype)]
        runs.append((fused_adam.FusedAdamW(params, lr=1e-2, backend=name, master_weights=True,
                                           **INT8), params))
    (ours, our_params), (theirs, their_params) = runs
    for step in range(20):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in our_params]
        with torch.no_grad():
            for p, q in zip(our_params, their_params):
                p.copy_(q)
        ours.load_state_dict(theirs.state_dict())
        for opt, params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for index, (p, q) in enumerate(zip(our_params, their_params)):
            master = ours.state[p]["master_param"]
            assert torch.equal(p.detach(), master.to(dtype))
            assert_close(master, theirs.state[q]["master_param"],
                         what=f"step {step} param {index} master", **TOLERANCES[torch.float32])


# How far 8-bit moments may take a parameter from fp32 AdamW's after 20 steps, as a share of
# how far fp32 AdamW moved it: on average (measured: 0.4-0.9%), and at the worst element
# (measured: 0.8-2.3% of the farthest move).
MEAN_DRIFT, WORST_DRIFT = 0.015, 0.05


@pytest.mark.parametrize("backend", cpu_backends())
def test_close_to_fp32_adamw(backend):
    """The point of it: 20 steps with 8-bit moments stay near fp32 AdamW's trajectory."""
    opt, params = _train(backend)
    reference_params = [torch.nn.Parameter(p) for p in make_params(SHAPES, torch.float32)]
    start = [p.detach().clone() for p in reference_params]
    groups = [dict(params=reference_params[:3]),
              dict(params=reference_params[3:], lr=3e-3, weight_decay=0.1, maximize=True)]
    torch_opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    run_steps(torch_opt, reference_params, 0, 20)
    for index, (p, q, q0) in enumerate(zip(params, reference_params, start)):
        drift, moved = (p - q).detach().abs(), (q - q0).detach().abs()
        assert drift.mean() <= MEAN_DRIFT * moved.mean(), f"param {index}"
        assert drift.max() <= WORST_DRIFT * moved.max(), f"param {index}"


@pytest.mark.parametrize("backend", cpu_backends())
def test_blocks_start_at_each_parameter(backend):
    """A parameter's codes and absmax are the same alone as beside a neighbour whose length
    is not a multiple of the block."""
    torch.manual_seed(0)
    alone = torch.nn.Parameter(torch.randn(3 * QUANT_BLOCK + 9))
    paired = torch.nn.Parameter(alone.detach().clone())
    neighbour = torch.nn.Parameter(torch.randn(QUANT_BLOCK + 100))
    opt_alone = fused_adam.FusedAdam([alone], backend=backend, **INT8)
    opt_paired = fused_adam.FusedAdam([neighbour, paired], backend=backend, **INT8)
    for _ in range(3):
        grad = torch.randn_like(alone)
        alone.grad, paired.grad = grad.clone(), grad.clone()
        neighbour.grad = torch.randn_like(neighbour) * 100
        opt_alone.step()
        opt_paired.step()
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(opt_alone.state[alone][key], opt_paired.state[paired][key]), key
    assert torch.equal(alone, paired)


def test_state_holds_codes_and_absmax():
    opt, params = _train("numba", steps=1)
    entry = opt.state[params[3]]
    assert entry["exp_avg"].dtype == torch.int8 and entry["exp_avg"].shape == params[3].shape
    assert entry["exp_avg_sq"].dtype == torch.uint8
    assert entry["exp_avg_absmax"].shape == (-(-params[3].numel() // QUANT_BLOCK),)
    assert entry["exp_avg_absmax"].dtype == torch.float32


@pytest.mark.parametrize("backend", cpu_backends())
def test_checkpoint_resumes_exactly(backend):
    """state_dict -> torch.save/load -> a new optimizer: the next steps are the uninterrupted
    run's, bit for bit."""
    opt, params = _train(backend, steps=10)
    saved = reloaded(opt.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [dict(params=copies[:3]),
              dict(params=copies[3:], lr=3e-3, weight_decay=0.1, maximize=True)]
    resumed = fused_adam.FusedAdamW(groups, lr=1e-2, backend=backend, **INT8)
    resumed.load_state_dict(saved)
    run_steps(opt, params, 10, 15)
    run_steps(resumed, copies, 10, 15)
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed.state[q][key]))


def test_checkpoint_is_small():
    """The saved moments are a quarter of fp32's, plus 4 bytes per block each."""
    opt, params = _train("numba", steps=1)
    state = opt.state_dict()["state"]
    n = sum(p.numel() for p in params)
    moment_bytes = sum(entry[key].numel() * entry[key].element_size() for entry in state.values()
                       for key in ("exp_avg", "exp_avg_sq", "exp_avg_absmax",
                                   "exp_avg_sq_absmax"))
    blocks = sum(-(-p.numel() // QUANT_BLOCK) for p in params)
    assert moment_bytes == 2 * n + 2 * 4 * blocks


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_checkpoint_is_quantized_on_load(backend):
    """A torch.optim.AdamW checkpoint loads into 8-bit moments (its fp32 moments quantized as
    the reference quantizes them), and the step goes on from there."""
    params = [torch.nn.Parameter(p) for p in make_params(SHAPES, torch.float32)]
    torch_opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    run_steps(torch_opt, params, 0, 5)
    ours = fused_adam.FusedAdamW(params, lr=1e-2, backend=backend, **INT8)
    ours.load_state_dict(reloaded(torch_opt.state_dict()))
    for p in params:
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, absmax = codecs.quantize(torch_opt.state[p][key].reshape(-1), signed=signed)
            assert torch.equal(ours.state[p][key].reshape(-1), codes)
            assert torch.equal(ours.state[p][key + "_absmax"], absmax)
        assert float(ours.state[p]["step"]) == 5
    before = [p.detach().clone() for p in params]
    run_steps(ours, params, 5, 6)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", cpu_backends())
def test_dequantized_checkpoint_resumes_in_torch(backend):
    """`dequantized_state_dict` gives torch's format: torch.optim.AdamW loads it, holds the
    decoded moments, and its next step is the step FusedAdam takes from the same values."""
    opt, params = _train(backend, steps=10)
    converted = fused_adam.dequantized_state_dict(reloaded(opt.state_dict()))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [dict(params=copies[:3]),
              dict(params=copies[3:], lr=3e-3, weight_decay=0.1, maximize=True)]
    torch_opt = torch.optim.AdamW(groups, lr=1e-2, foreach=False)
    torch_opt.load_state_dict(converted)
    for p, q in zip(params, copies):
        state = opt.state[p]
        assert set(torch_opt.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            decoded = codecs.decode(state[key].reshape(-1), state[key + "_absmax"],
                                       signed=signed)
            assert torch_opt.state[q][key].dtype == torch.float32
            assert torch.equal(torch_opt.state[q][key].reshape(-1), decoded)
    run_steps(opt, params, 10, 11)
    run_steps(torch_opt, copies, 10, 11)
    for index, (p, q) in enumerate(zip(params, copies)):
        assert_close(p, q, what=f"param {index}", **TOLERANCES[torch.float32])


def test_codes_without_absmax_are_refused():
    opt, params = _train("numba", steps=2)
    saved = reloaded(opt.state_dict())
    del saved["state"][0]["exp_avg_absmax"]
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="without their 'exp_avg_absmax'"):
        opt.load_state_dict(saved)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_codes_into_float_moments_are_refused():
    """An 8-bit checkpoint loaded by a FusedAdam with float moments would read codes as
    values: refused, naming the conversion."""
    opt, params = _train("numba", steps=2)
    float_opt = fused_adam.FusedAdamW([dict(params=params[:3]), dict(params=params[3:])])
    with pytest.raises(ValueError, match="dequantized_state_dict"):
        float_opt.load_state_dict(reloaded(opt.state_dict()))


def test_unsupported_options_are_refused():
    params = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match="amsgrad"):
        fused_adam.FusedAdam(params, amsgrad=True, **INT8)
    with pytest.raises(ValueError, match="complex"):
        fused_adam.FusedAdam([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))], **INT8)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fused_adam.FusedAdam(params, state_dtype=torch.uint8)
    opt = fused_adam.FusedAdam(params, **INT8)
    before = params[0].detach().clone()
    opt.param_groups[0]["amsgrad"] = True  # switched on in the group, after construction
    params[0].grad = torch.ones(4)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    assert torch.equal(params[0], before)
