"""`python -m bench breakdown`: where a FusedAdam step's time goes, on one config (a study: its
finding is in bench/RESULTS.md, "Many small tensors").

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
drop-in for torch's Adam (`DROP_IN_CHECKS`: following edits of groups and state,
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
# Phases whose only job is to keep the step torch's (following edits of `param_groups` and
# `state`, checking gradients, bumping autograd's version counters): what being a drop-in costs.
DROP_IN_CHECKS = ("follow param_groups", "follow state edits", "check gradients",
                  "version counters")
PHASE = "phase:"  # prefix of a phase's metric
DESCRIPTION = ("Where a FusedAdam step's time goes: the visit of every parameter (Python) and the "
               "kernel, each timed alone right after a backward, beside the whole step, "
               "torch-fused's step and the no-math roofline.")


def add_arguments(parser):
    parser.add_argument("--config", choices=configs.CONFIG_NAMES, default="small-800")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--allocations", type=int, default=1,
                        help="build the subjects this many times and pool the samples")


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
    return PHASE + phase


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
    print(markdown(rows))
    for path in paths:
        print(f"wrote {path}")
    return rows


# The report (breakdown.md and breakdown.png), from rows alone.

def _breakdown_values(rows):
    """(table, config, [(label, stats, kind)]): torch-fused's step, FusedAdam's step, each of
    its phases in the order the step runs them, the roofline."""
    table = results.Table(rows)
    config = table.configs[0]
    phases = []
    for r in rows:
        metric = r["metric"]
        if r["provider"] == "FusedAdam" and metric.startswith(PHASE) and \
                metric.endswith("_ms_median"):
            phase = metric[len(PHASE):-len("_ms_median")]
            if phase not in phases:
                phases.append(phase)
    parts = [(ANCHOR, "step", "torch-fused step", "anchor"),
             ("FusedAdam", "step", "FusedAdam step", "step")]
    parts += [("FusedAdam", PHASE + phase, phase,
               "check" if phase in DROP_IN_CHECKS else "phase") for phase in phases]
    parts.append((roofline.NoMathRoofline.name, "step", "no-math roofline", "roofline"))
    out = []
    for provider, metric, label, kind in parts:
        stats = {q: table.get(config, provider, f"{metric}_ms_{q}") for q in results.QUANTILES}
        out.append((label, stats, kind))
    return table, config, out


def markdown(rows):
    table, config, parts = _breakdown_values(rows)
    first = table.first()
    settings = first.get("settings", {})
    torch_ms, step_ms, roof_ms = parts[0][1]["median"], parts[1][1]["median"], \
        parts[-1][1]["median"]
    phases = [(label, s, kind) for label, s, kind in parts if kind in ("phase", "check")]
    checks = [(label, s["median"]) for label, s, kind in phases if kind == "check"]
    visit = sum(s["median"] for label, s, _ in phases if "visit" in label)
    lines = report.header(first, f"Where the step's time goes, {config} ({first['config_detail']})")
    n = table.row(config, ANCHOR, "step_ms_median")["samples"]
    pooled = (f", pooled over {settings['allocations']} allocations"
              if settings.get("allocations", 1) > 1 else "")
    lines += [f"{settings.get('ours')}; medians of {n} rounds{pooled}, the phases timed "
              "through `FusedAdam._step`'s clock in rounds of their own, right after a backward, "
              "the subjects interleaved. Phases marked ✓ exist to keep the step a drop-in for "
              "torch's Adam.", "",
              "| what | ms median [p20–p80] | share of FusedAdam's step |", "|---|---:|---:|"]
    for label, s, kind in parts:
        mark = " ✓" if kind == "check" else ""
        lines.append(f"| {label}{mark} | {s['median']:.3f} [{s['p20']:.3f}–{s['p80']:.3f}] | "
                     f"{100 * s['median'] / step_ms:.1f}% |")
    phase_sum = sum(s["median"] for _, s, _ in phases)
    check_sum = sum(ms for _, ms in checks)
    lines += ["",
              f"- Step: {torch_ms / step_ms:.2f}x torch-fused. Its phases add up to "
              f"{phase_sum:.3f} ms (each median alone); the other {step_ms - phase_sum:.3f} ms "
              "are torch's `Optimizer.step` wrapper and `no_grad` around them, and rounding.",
              f"- Being a drop-in ({', '.join(label for label, _ in checks)}) costs "
              f"{check_sum:.3f} ms a step, {100 * check_sum / step_ms:.1f}% of it: "
              + ", ".join(f"{label} {ms * 1e3:.0f} us" for label, ms in checks) + ".",
              f"- 10x torch-fused would be a {torch_ms / 10:.3f} ms step. Visit + roofline = "
              f"{visit + roof_ms:.3f} ms ({torch_ms / (visit + roof_ms):.1f}x torch-fused): "
              f"what an optimizer that reads {first['n_tensors']} gradients this way and moves "
              "28 B/param with no math would take."]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import numpy as np

    table, config, parts = _breakdown_values(rows)
    first = table.first()
    labels = [label + (" ✓" if kind == "check" else "") for label, _, kind in parts]
    medians = [s["median"] for _, s, _ in parts]
    errors = np.array([[s["median"] - s["p20"] for _, s, _ in parts],
                       [s["p80"] - s["median"] for _, s, _ in parts]])
    colors = {"anchor": "#888888", "step": "#1f77b4", "phase": "#9ecae1", "check": "#fdae6b",
              "roofline": "#2ca02c"}
    fig, ax = report.pyplot().subplots(figsize=(8.5, 0.8 + 0.32 * len(parts)))
    ax.barh(range(len(labels)), medians, xerr=errors,
            color=[colors[kind] for _, _, kind in parts], edgecolor="#555555", capsize=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    target = medians[0] / 10
    ax.axvline(target, color="#d62728", linestyle="--",
               label=f"10x torch-fused ({target:.2f} ms)")
    ax.set_xlabel("ms (median, p20–p80); ✓ keeps the step a drop-in for torch's Adam")
    ax.set_title(f"{config}: {first['config_detail']}, {first['device_name']}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return report.save(fig, path)
