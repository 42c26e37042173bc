"""Timing: every subject (optimizer or roofline kernel) runs one training-shaped iteration per
round, the subjects interleaved round-robin so that each round's cache, clock and neighbour noise
falls on all of them alike; the order rotates every round so no subject always follows the same
one.

An iteration is forward, backward, step, zero_grad(set_to_none=True). That is the usual
`zero_grad, forward, backward, step` loop read from a different starting point, so it costs the
same; freeing the gradients at the end means only one subject holds gradients at a time, which
is what lets five copies of a 2^30-element config fit on one GPU.

Only `step()` is the step time; the device is synchronized on both sides of it. On CUDA the time
comes from CUDA events recorded after a synchronize, so it includes the host's launch cost (which
is what fusion removes) but not the backward still in flight. The whole iteration is a second
metric, on the host clock, synchronized at its end.
"""
import time

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


def run_iteration(subject, device):
    """One iteration of `subject`: (step seconds, whole-iteration seconds)."""
    sync(device)
    t0 = time.perf_counter()
    subject.forward_backward()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        subject.step()
        end.record()
        subject.zero_grad()
        sync(device)
        step_s = start.elapsed_time(end) / 1e3
    else:
        t1 = time.perf_counter()
        subject.step()
        step_s = time.perf_counter() - t1
        subject.zero_grad()
    return step_s, time.perf_counter() - t0


def measure(subjects, device, *, warmup, iters, progress=None):
    """Round-robin `warmup` untimed then `iters` timed rounds; {name: {"step": [s], "iter": [s]}}."""
    samples = {s.name: {"step": [], "iter": []} for s in subjects}
    for round_index in range(warmup + iters):
        shift = round_index % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            step_s, iter_s = run_iteration(subject, device)
            if round_index >= warmup:
                samples[subject.name]["step"].append(step_s)
                samples[subject.name]["iter"].append(iter_s)
            if progress is not None:
                progress.update(1)
    return samples


def summarize(seconds):
    """Median and p20/p80 in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    return {"median": float(np.median(ms)), "p20": float(np.percentile(ms, 20)),
            "p80": float(np.percentile(ms, 80)), "n": int(ms.size)}
