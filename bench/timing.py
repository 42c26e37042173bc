"""The one timing harness of bench/: `interleave()` runs subjects round-robin, each round in an
order that rotates, so that a round's cache, clock and neighbour noise falls on all of them
alike and no subject always follows the same one (a ratio between two subjects is only quoted
from rounds they shared). A `Subject` is a name and a `measure(round_index)` that runs one round
and returns {metric: value}. `timed()` times a callable with the device synchronized on both
sides; `iteration()` times a step-benchmark subject's `step()` (or clip and step) inside its
whole iteration. On CUDA a step's time comes from CUDA events recorded after a synchronize, so
it includes the host's launch cost (which is what fusion removes) but not the backward still in
flight.
"""
import time
from collections import namedtuple

import numpy as np
import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), its wall seconds), the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def iteration(subject, device, clip=None):
    """One training-shaped iteration of `subject` (forward_backward, step, zero_grad):
    {"step": seconds of step() alone, "iter": seconds of the whole iteration}.

    With `clip` (a max norm), the timed phase is `subject.clip(clip)` then `step()`, as a
    training loop that clips pays it: {"clip_step": its seconds, "clip_iter": the whole
    iteration's, "grad_norm": the norm the clip returned (read after the timing)}.

    zero_grad(set_to_none=True) comes last, so only the subject iterating holds gradients: that
    is what lets two large subjects share one machine's memory."""
    if clip is None:
        phase = subject.step
    else:
        def phase():
            norm = subject.clip(clip)
            subject.step()
            return norm
    sync(device)
    t0 = time.perf_counter()
    subject.forward_backward()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        norm = phase()
        end.record()
        subject.zero_grad()
        sync(device)
        step_s = start.elapsed_time(end) / 1e3
    else:
        t1 = time.perf_counter()
        norm = phase()
        step_s = time.perf_counter() - t1
        subject.zero_grad()
    total_s = time.perf_counter() - t0
    if clip is None:
        return {"step": step_s, "iter": total_s}
    return {"clip_step": step_s, "clip_iter": total_s, "grad_norm": float(norm)}


Subject = namedtuple("Subject", "name measure")  # measure(round_index) -> {metric: value}


def interleave(subjects, *, warmup, iters, first_round=0, on_round=None):
    """`warmup` untimed then `iters` timed rounds of every subject, the order rotating each round.

    Returns {subject name: {metric: [value per timed round]}}. `first_round` continues the
    rotation of an earlier call (a caller that decides `iters` after timing the warm-up calls
    this twice); `on_round(round_index)` is called after each round (progress)."""
    samples = {s.name: {} for s in subjects}
    for round_index in range(first_round, first_round + warmup + iters):
        shift = round_index % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            values = subject.measure(round_index)
            if round_index >= first_round + warmup:
                for metric, value in values.items():
                    samples[subject.name].setdefault(metric, []).append(value)
        if on_round is not None:
            on_round(round_index)
    return samples


def merge(into, samples):
    """Append `samples` ({name: {metric: [values]}}) to `into`, in place; returns `into`."""
    for name, metrics in samples.items():
        for metric, values in metrics.items():
            into.setdefault(name, {}).setdefault(metric, []).extend(values)
    return into


def summarize(seconds):
    """Median and p20/p80 in milliseconds, and the number of samples."""
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {"median": float(np.median(ms)), "p20": float(np.percentile(ms, 20)),
            "p80": float(np.percentile(ms, 80)), "n": int(ms.size)}
