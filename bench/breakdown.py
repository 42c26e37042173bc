"""`python -m bench breakdown`: where a FusedAdam step's time goes, on one config.

A step runs in phases (`FusedAdam._step`, which runs each under a clock it is given; an ordinary
step's clock does nothing): it follows edits of `param_groups` and `state`, takes back replaced
params, visits every parameter's gradient, checks each gradient fits its parameter, collects
their addresses, creates new state, bumps the params' autograd version counters, launches one
kernel per arena and writes back params whose memory others hold. Here a clock of our own times
each phase, from the state a training step starts from: right after a real backward, with the
other subjects' iterations in between as in the step benchmark. The same rounds time the whole
step (which adds torch's `Optimizer.step` wrapper and `no_grad` to the phases), torch-fused's
step and the no-math roofline.

With hundreds of small tensors the visit is not negligible: after a backward each parameter's
metadata (tensor, autograd record, gradient, storage) is out of cache, so reading it costs
memory latencies. torch's Adam reads every `p.grad` too. The phases that keep FusedAdam a
drop-in for torch's Adam (`report.DROP_IN_CHECKS`: following edits of groups and state,
checking the gradients, bumping version counters) are summed in the report, as a share of the
step.
"""
import time
from collections import defaultdict

import torch

from bench import configs, memory, providers, report, results, roofline, system
from bench.timing import Subject, interleave, merge, sync, timed

ROUNDS = (5, 30)  # (warm-up, timed)
ANCHOR = providers.ANCHOR
OURS = "FusedAdam"  # the provider name its rows carry (the backend is in the settings)


class PhaseClock:
    """The clock `FusedAdam._step` runs its phases under: seconds per phase, the device
    synchronized around each; a phase met in several arenas adds up."""

    def __init__(self, device):
        self.device, self.seconds, self._phase = device, defaultdict(float), None

    def __call__(self, phase):
        self._phase = phase
        return self

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exception):
        sync(self.device)
        self.seconds[self._phase] += time.perf_counter() - self._start
        return False


@torch.no_grad()
def timed_phases(optimizer, device):
    """One step of `optimizer` through the library's own seam, each phase timed:
    {phase: seconds}."""
    clock = PhaseClock(device)
    optimizer._step(None, None, clock)
    return dict(clock.seconds)


def metric_of(phase):
    """The row metric for a phase: "phase:<phase>"."""
    return f"phase:{phase}"


def _subjects(config, device, seed):
    """The interleaved subjects: torch-fused's step, the roofline's, FusedAdam's whole step,
    and FusedAdam's step timed phase by phase (rounds of its own: timing adds a little)."""
    torch_fused = providers.build(ANCHOR, config, device, seed)
    ours = providers.build(providers.COMPILED[device.type], config, device, seed)
    phased = providers.build(providers.COMPILED[device.type], config, device, seed)
    no_math = roofline.NoMathRoofline(config.n_params, device)

    def iteration(subject, measure):
        def run(_round):
            subject.forward_backward()
            seconds = measure()
            subject.zero_grad()
            return seconds
        return run

    def phases():
        return {metric_of(phase): seconds
                for phase, seconds in timed_phases(phased.optimizer, device).items()}

    subjects = [
        Subject(ANCHOR, iteration(torch_fused, lambda: {"step": timed(torch_fused.step,
                                                                        device)[1]})),
        Subject(roofline.NoMathRoofline.name,
                iteration(no_math, lambda: {"step": timed(no_math.step, device)[1]})),
        Subject(OURS, iteration(ours, lambda: {"step": timed(ours.step, device)[1]})),
        Subject(f"{OURS} phases", iteration(phased, phases)),
    ]
    return subjects, (ours, phased)


def run(args):
    from tqdm import tqdm

    device = torch.device(args.device)
    warmup, iters = ROUNDS
    warmup = max(1, args.warmup if args.warmup is not None else warmup)
    iters = max(1, args.iters if args.iters is not None else iters)
    allocations = max(1, args.allocations)
    config = configs.get_configs([args.config], device_type=device.type)[0]
    meta = system.run_metadata(device, "breakdown", allocations=allocations, warmup=warmup,
                               iters=iters, ours=providers.COMPILED[device.type], seed=args.seed)
    pooled = {}
    with tqdm(total=allocations * (warmup + iters), desc=f"breakdown {config.name}",
              unit="round") as progress:
        # Fresh subjects (fresh buffers) per allocation, samples pooled: see `bench.step`.
        for _ in range(allocations):
            subjects, ours = _subjects(config, device, args.seed)
            merge(pooled, interleave(subjects, warmup=warmup, iters=iters,
                                     on_round=lambda *_: progress.update(1)))
            assert all(subject.optimizer.grad_copies == 0 for subject in ours), \
                "the ordinary loop copied a gradient"
            del subjects, ours
            memory.release(device)
    where = results.config_fields(config.name, config.detail, config.n_params, config.n_tensors)
    rows = []
    for name, metrics in pooled.items():
        provider = OURS if name.startswith(OURS) else name
        kind = ("roofline" if name == roofline.NoMathRoofline.name
                else "part" if name != provider else "optimizer")
        for metric, seconds in metrics.items():
            rows += results.time_rows(meta, where, provider, metric, seconds, kind=kind)
    paths = report.write(rows, args.out, "breakdown")
    print(report.breakdown_markdown(rows))
    for path in paths:
        print(f"wrote {path}")
    return rows
