"""Memory: how much a benchmark may use, what a config will need, and the decision between them.

The step benchmark keeps two subjects alive at a time (torch-fused and the one it is paired
with), so a config's peak is the process's baseline plus the dearest pair. `plan()` picks, for
each config, the largest of its sizes whose estimated peak fits the budget, or skips it; a pure
function of its inputs, so that a test can fake the budget. The estimate is bytes per element
of the config, per subject (`Footprint`: params and moments, and during its own iteration its
gradients and temporaries), checked against measured peaks (bench/RESULTS.md, "Memory"); every
pair's measured peak is in the results (`peak_memory_GB`) beside the estimate
(`estimated_peak_GB`).
"""
import ctypes
import gc
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from bench.system import proc_bytes

GB = 1e9
# The step benchmark's default ceiling on the process's peak resident memory (CPU) or on the
# device memory it allocates (CUDA): the whole run stays within 6 GB on a 24 GB machine.
DEFAULT_MAX_GB = 5.6
# Of what the OS says is available, leave this share to everyone else.
AVAILABLE_SHARE = 0.8
# The allocator's slack over the tensors' own bytes (freed gradients it keeps, page rounding).
SLACK = 1.12
FIXED_SLACK_BYTES = 0.2 * GB


def rss_bytes():
    """This process's resident memory now (None where /proc is missing)."""
    return proc_bytes("/proc/self/status", "VmRSS")


class RssSampler:
    """The peak of this process's resident memory over a stretch of code, sampled every
    `interval` seconds by a thread (a sleeping thread, woken 20 times a second, that reads one
    /proc file: no measurable cost to the timed code).

    Not by resetting the kernel's peak (writing 5 to /proc/self/clear_refs): that also resets
    the peak that `/usr/bin/time` reports at exit, which would then understate the run's peak."""

    def __init__(self, interval=0.05):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while True:
            self.peak = max(self.peak, rss_bytes() or 0)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)
        return False


def available_bytes():
    """Memory this process could still take without the OS running short: MemAvailable, or the
    cgroup's limit minus its use if lower (containers). None if neither can be read."""
    candidates = [n for n in (proc_bytes("/proc/meminfo", "MemAvailable"),) if n is not None]
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def release(device=None):
    """Give freed memory back: collect cycles, return the C heap's free pages to the OS, empty
    CUDA's cache. Without it the next pair's peak would sit on top of the last one's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Budget:
    """`limit`: bytes the process (CPU) or the device allocations (CUDA) may reach at peak;
    `baseline`: what is held already; `why`: which bound set `limit`, in words."""

    limit: float
    baseline: float
    why: str


def budget(device, max_gb=DEFAULT_MAX_GB):
    """The budget for the next config, read now (other processes come and go)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        baseline = torch.cuda.memory_allocated(device)
        ceiling = baseline + AVAILABLE_SHARE * free
        if max_gb is None or ceiling < max_gb * GB:
            return Budget(ceiling, baseline, f"{AVAILABLE_SHARE:.0%} of the GPU's free memory")
        return Budget(max_gb * GB, baseline, f"--max-memory {max_gb:g} GB")
    baseline = rss_bytes() or 0
    available = available_bytes()
    limit = float("inf") if max_gb is None else max_gb * GB
    why = f"--max-memory {max_gb:g} GB of peak resident memory"
    if available is not None and baseline + AVAILABLE_SHARE * available < limit:
        limit = baseline + AVAILABLE_SHARE * available
        why = f"{AVAILABLE_SHARE:.0%} of the memory available now ({available / GB:.1f} GB)"
    return Budget(limit, baseline, why)


@dataclass(frozen=True)
class Footprint:
    """A subject's memory, in bytes per element of its config: `resident` while it exists,
    `transient` more during its own iteration, `per_largest` more per element of the config's
    largest tensor (temporaries made one tensor at a time). `max_elements` caps the elements
    it holds (the roofline's buffers)."""

    resident: float
    transient: float
    per_largest: float = 0.0
    max_elements: int = None

    def bytes(self, n_params, largest, *, iterating):
        n = n_params if self.max_elements is None else min(n_params, self.max_elements)
        largest = min(largest, n)
        extra = self.transient * n + self.per_largest * largest if iterating else 0.0
        return self.resident * n + extra


def pair_peak(anchor, subject, n_params, largest, baseline):
    """Estimated peak of `anchor` and `subject` alive together, each iterating in turn."""
    both = (anchor.bytes(n_params, largest, iterating=False)
            + subject.bytes(n_params, largest, iterating=False))
    extra = max(anchor.bytes(n_params, largest, iterating=True)
                - anchor.bytes(n_params, largest, iterating=False),
                subject.bytes(n_params, largest, iterating=True)
                - subject.bytes(n_params, largest, iterating=False))
    return baseline + SLACK * (both + extra) + FIXED_SLACK_BYTES


@dataclass(frozen=True)
class Plan:
    """What to run for one config: `config` (None: skip), its estimated peak, and `reason`
    (None when the config runs at full size; otherwise why it was scaled down or skipped)."""

    config: object
    estimate: float
    reason: str = None


def plan(sizes, anchor, subjects, budget_):
    """The first of `sizes` (a config's sizes, largest first) whose dearest pair fits `budget_`.

    `anchor` and `subjects` are Footprints (`subjects` may be empty: the anchor alone). Returns
    a Plan: the full size with no reason, a smaller size with the reason it was scaled down, or
    no config with the reason it was skipped."""
    full = sizes[0]
    estimates = []
    for config in sizes:
        largest = max((prod(s) for s in config.shapes), default=0)
        estimate = max(pair_peak(anchor, s, config.n_params, largest, budget_.baseline)
                       for s in (subjects or [Footprint(0.0, 0.0)]))
        estimates.append(estimate)
        if estimate <= budget_.limit:
            if config is full:
                return Plan(config, estimate)
            return Plan(config, estimate, (
                f"scaled down from {full.n_params / 1e6:.1f} M to {config.n_params / 1e6:.1f} M "
                f"parameters: the full size needs about {estimates[0] / GB:.1f} GB at peak, "
                f"over the budget of {budget_.limit / GB:.1f} GB ({budget_.why})"))
    return Plan(None, estimates[-1], (
        f"skipped: even its smallest size ({sizes[-1].n_params / 1e6:.1f} M parameters) needs "
        f"about {estimates[-1] / GB:.1f} GB at peak, over the budget of "
        f"{budget_.limit / GB:.1f} GB ({budget_.why})"))
