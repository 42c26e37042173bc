"""pytest-benchmark suite: `optimizer.step()` per config and provider, grouped by config so the
table compares providers side by side (`pytest bench/ --benchmark-only`).

The same configs, providers and roofline kernel as `python -m bench`, at quick sizes unless
FUSED_ADAM_BENCH_FULL=1. Each round's setup (untimed) is a real backward after zero_grad, so
every timed step reads fresh autograd gradients, as in training. `python -m bench` remains the
reference measurement (interleaved providers, roofline fractions, plots); this suite is for
pytest-benchmark's own tooling (`--benchmark-compare`, `--benchmark-json`, histograms).

`test_clip_step` times clip+step the same way: the gradients' norm clipped to
`providers.MAX_NORM` (torch's `clip_grad_norm_(foreach=True)` for torch's optimizers,
`FusedAdam.clip_grad_norm` for ours), then the step.
"""
import os

import pytest
import torch

from bench import configs, providers, roofline
from bench.timing import sync

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FUSED_ADAM_BENCH_FULL") != "1"
CONFIGS = configs.get_configs(quick=QUICK, device_type=DEVICE.type)
PROVIDERS = providers.default_providers(DEVICE.type) + ["roofline (no-math)"]
ROUNDS, WARMUP_ROUNDS = (10, 2) if QUICK else (30, 5)


def _group(config, prefix=""):
    tensors = f"{config.n_tensors} tensor" + ("" if config.n_tensors == 1 else "s")
    return f"{prefix}{config.name} ({config.n_params:,} params, {tensors})"


def _fresh_gradients(subject):
    """The untimed setup of every round: zero_grad, then a real backward."""
    def setup():
        subject.zero_grad()
        subject.forward_backward()
        sync(DEVICE)
    return setup


def _subject(name, config):
    if name == "roofline (no-math)":
        return roofline.NoMathRoofline(config.n_params, DEVICE)
    return providers.build(name, config, DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_step(benchmark, config, provider):
    try:
        subject = _subject(provider, config)
    except (ValueError, RuntimeError, ImportError) as error:
        pytest.skip(f"{provider} cannot run here: {error}")
    benchmark.group = _group(config)

    def step():
        subject.step()
        sync(DEVICE)

    benchmark.pedantic(step, setup=_fresh_gradients(subject), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes_per_step=subject.bytes_per_step,
                                GBps=subject.bytes_per_step / median_s / 1e9, quick=QUICK,
                                device=DEVICE.type)


@pytest.mark.parametrize("provider", providers.default_providers(DEVICE.type))
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_clip_step(benchmark, config, provider):
    try:
        subject = providers.build(provider, config, DEVICE)
    except (ValueError, RuntimeError, ImportError) as error:
        pytest.skip(f"{provider} cannot run here: {error}")
    benchmark.group = _group(config, prefix="clip+step: ")
    norms = []

    def clip_step():
        norms.append(subject.clip(providers.MAX_NORM))
        subject.step()
        sync(DEVICE)

    benchmark.pedantic(clip_step, setup=_fresh_gradients(subject), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=1)
    assert float(norms[-1]) > providers.MAX_NORM  # it clipped
    benchmark.extra_info.update(max_norm=providers.MAX_NORM, grad_norm=float(norms[-1]),
                                quick=QUICK, device=DEVICE.type)
