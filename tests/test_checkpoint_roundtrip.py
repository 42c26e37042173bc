"""A compressed checkpoint's way to torch and back (issue #21, 7), and the fp32 master out of a
compact one: `dequantized_state_dict` gives torch.optim.AdamW only the keys it uses, torch's own
`state_dict()` after that loads back into every mode (the master taken from torch's params), and
`fused_adam.master_params` returns the fp32 master a mode keeps."""
import pytest
import torch

import fused_adam
from fused_adam.kernels import codecs
from helpers import make_params, reloaded, run_steps

SHAPES = [(300, 7), (5,), (3, 257)]
TORCH_KEYS = {"step", "exp_avg", "exp_avg_sq"}
STATE_DTYPES = {"fp32-moments": None, "bf16-moments": torch.bfloat16,
                "int8-moments": torch.int8}
MODES = {f"fp32-params-{name}": (torch.float32, dict(state_dtype=state_dtype))
         for name, state_dtype in STATE_DTYPES.items()}
MODES.update({f"bf16-params-master-{master}-{name}":
              (torch.bfloat16, dict(master_weights=master, state_dtype=state_dtype))
              for master in (True, "bf16+16", "bf16+8")
              for name, state_dtype in STATE_DTYPES.items()})


def _trained(dtype, options, steps=5):
    params = [torch.nn.Parameter(p) for p in make_params(SHAPES, dtype)]
    optimizer = fused_adam.FusedAdamW(params, lr=1e-2, **options)
    run_steps(optimizer, params, 0, steps)
    return optimizer, params


def _stored(value, like):
    """What a FusedAdam moment `like` (codes, or floats of its dtype) holds of torch's `value`."""
    if like.is_floating_point():
        return value.to(like.dtype)
    return codecs.quantize(value.float().reshape(-1), signed=like.dtype == torch.int8)[0]


@pytest.mark.parametrize("mode", MODES)
def test_torch_round_trip_loads_back_into_every_mode(mode):
    """FusedAdamW -> dequantized_state_dict -> torch AdamW (loads, steps) -> its state_dict()
    -> FusedAdamW of the same mode: torch is given only its own keys, and the checkpoint it
    saves loads back, holding torch's moments as the mode stores them, torch's step count,
    and torch's params as the master."""
    dtype, options = MODES[mode]
    ours, params = _trained(dtype, options)
    converted = fused_adam.dequantized_state_dict(reloaded(ours.state_dict()))
    for index, entry in converted["state"].items():
        assert set(entry) == TORCH_KEYS, f"state {index}: {sorted(entry)} given to torch"
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(copies, lr=1e-2, foreach=False)
    theirs.load_state_dict(converted)
    run_steps(theirs, copies, 5, 7)
    saved = reloaded(theirs.state_dict())

    back_params = [torch.nn.Parameter(q.detach().clone()) for q in copies]
    back = fused_adam.FusedAdamW(back_params, lr=1e-2, **options)
    back.load_state_dict(saved)
    masters = fused_adam.master_params(back)
    for index, (p, q) in enumerate(zip(back_params, copies)):
        state, their_state = back.state[p], theirs.state[q]
        assert float(state["step"]) == 7
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key].reshape(-1),
                               _stored(their_state[key], state[key]).reshape(-1)), \
                f"param {index} {key}"
        assert torch.equal(masters[p], q.detach().float()), f"param {index} master"
    run_steps(back, back_params, 7, 8)  # and it steps on


@pytest.mark.parametrize("master", ["fp32", "bf16+16"])
def test_master_params_is_the_fp32_master_bit_for_bit(master):
    """`master_params` of master_weights=True is its fp32 copy, and of bf16+16 holding that
    master (from its checkpoint) the same bits: copies, shaped as the params."""
    full, params = _trained(torch.bfloat16, dict(master_weights=True))
    saved = reloaded(full.state_dict())
    if master == "fp32":
        optimizer, stepped = full, params
    else:
        stepped = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = fused_adam.FusedAdamW(stepped, lr=1e-2, master_weights="bf16+16")
        optimizer.load_state_dict(saved)
    masters = fused_adam.master_params(optimizer)
    assert set(masters) == set(stepped)
    for index, p in enumerate(stepped):
        expected = saved["state"][index]["master_param"]
        assert masters[p].dtype == torch.float32 and masters[p].shape == p.shape
        assert torch.equal(masters[p].view(torch.int32), expected.view(torch.int32))
        assert not torch.equal(p.detach().float(), expected)  # more than the bf16 params
    before = {p: masters[p].clone() for p in stepped}
    run_steps(optimizer, stepped, 5, 6)
    assert all(torch.equal(masters[p], before[p]) for p in stepped), "not a copy"


def test_master_params_of_bf16_plus_8_is_the_16_significant_bit_master():
    """bf16+8 keeps the fp32 master to 16 significant bits: `master_params` is that value (the
    bf16 param joined with its 8-bit remainder), within 2^-15 of the fp32 master."""
    full, params = _trained(torch.bfloat16, dict(master_weights=True))
    saved = reloaded(full.state_dict())
    compact = fused_adam.FusedAdamW(params, lr=1e-2, master_weights="bf16+8")
    compact.load_state_dict(saved)
    masters = fused_adam.master_params(compact)
    for index, p in enumerate(params):
        exact = saved["state"][index]["master_param"]
        high, remainder = codecs.split_master(exact.reshape(-1), torch.int8)
        expected = codecs.join_master(high, remainder).view(p.shape)
        assert torch.equal(masters[p], expected)
        assert torch.equal(masters[p].reshape(-1), codecs.join_master(
            p.detach().reshape(-1), compact.state[p]["master_remainder"].reshape(-1)))
        assert ((masters[p].double() - exact.double()).abs()
                <= exact.double().abs() * 2.0 ** -15).all()
        assert (masters[p] - exact).abs().max() < (p.detach().float() - exact).abs().max()


def test_master_params_without_a_master_are_the_params():
    """fp32 params (no master): their values; bf16 params without a master: as fp32."""
    for dtype in (torch.float32, torch.bfloat16):
        optimizer, params = _trained(dtype, {})
        masters = fused_adam.master_params(optimizer)
        for p in params:
            assert masters[p].dtype == torch.float32
            assert torch.equal(masters[p], p.detach().float())
            assert masters[p].data_ptr() != p.data_ptr()


@pytest.mark.parametrize("master", [True, "bf16+8"])
def test_a_master_torch_carried_is_not_taken_for_the_master(master):
    """A checkpoint converted before `dequantized_state_dict` dropped the master: torch cast
    `master_param` / `master_remainder` to bf16 and carried it unchanged through its steps.
    Loaded back, the stale value is not the master: the params (torch's) are."""
    options = dict(master_weights=master, state_dtype=torch.int8)
    ours, params = _trained(torch.bfloat16, options)
    saved = reloaded(ours.state_dict())
    converted = fused_adam.dequantized_state_dict(saved)
    key = "master_param" if master is True else "master_remainder"
    for index, entry in converted["state"].items():
        entry[key] = saved["state"][index][key]  # as the old conversion kept it
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = torch.optim.AdamW(copies, lr=1e-2, foreach=False)
    theirs.load_state_dict(converted)
    run_steps(theirs, copies, 5, 7)
    carried = reloaded(theirs.state_dict())
    assert carried["state"][0][key].dtype == torch.bfloat16
    back_params = [torch.nn.Parameter(q.detach().clone()) for q in copies]
    back = fused_adam.FusedAdamW(back_params, lr=1e-2, **options)
    back.load_state_dict(carried)
    masters = fused_adam.master_params(back)
    for p, q in zip(back_params, copies):
        assert torch.equal(masters[p], q.detach().float())
