"""`python -m bench breakdown`: where a FusedAdam step's time goes, on one config.

A step does two things: it visits every parameter to read where its gradient and its storage
are (Python: `Arena.check_params_in_place` and `Arena.gather_grads`), then runs one kernel.
Each is timed alone here, starting from the state a training step starts from: right after a
real backward, with the other subjects' iterations in between as in the step benchmark. Each
part gets rounds of its own, because whichever part runs first brings the other's metadata into
cache. The same rounds time the whole step, torch-fused's step and the no-math roofline (after
a backward of its own: params just read, gradients just written).

With hundreds of small tensors the visit is not negligible: after a backward each parameter's
metadata (tensor, autograd record, gradient, storage) is out of cache, so reading it costs
memory latencies. Any optimizer pays this, torch's included. This command measures how large
it is next to the kernel and the roofline.
"""
import json
from pathlib import Path

import numpy as np
import torch

from bench import configs, providers, roofline, system
from bench.timing import summarize, timed

ROUNDS = (5, 30)  # (warm-up, timed)
# Sample names, in the order the report lists them.
TORCH = "torch-fused step"
STEP = "FusedAdam step"
READS = "FusedAdam: visit every parameter (Python)"
KERNEL = "FusedAdam: kernel alone"
ROOFLINE = "no-math roofline (28 B/param)"


class _SplitStep:
    """A FusedAdam provider's step, run as its two parts, each timed.

    It reaches into the optimizer (its arenas, launchers and group table): what it times is
    exactly what `FusedAdam.step` runs, minus the bookkeeping around it."""

    def __init__(self, provider, device):
        from fused_adam.optimizer import _group_row

        self.optimizer, self.device, self._group_row = provider.optimizer, device, _group_row

    def _visit(self):
        """`step()`'s visit of every parameter: each arena's gradient address table."""
        addresses = {}
        for key, arena in self.optimizer._arenas.items():
            arena.check_params_in_place()
            addresses[key] = arena.gather_grads()
        return addresses

    def _kernel(self, addresses):
        rows = [self._group_row(group) for group in self.optimizer.param_groups]
        for key, arena in self.optimizer._arenas.items():
            table = self.optimizer._group_table(arena.device, rows)
            self.optimizer._launchers[key](arena, addresses[key], table)

    def _bookkeeping(self):
        amsgrad_groups = [group["amsgrad"] for group in self.optimizer.param_groups]
        for arena in self.optimizer._arenas.values():
            self.optimizer._create_state(arena, amsgrad_groups)
            arena.write_back()
            arena.grads_by_segment = None

    def __call__(self):
        """(visit seconds, kernel seconds)."""
        addresses, visit_seconds = timed(self._visit, self.device)
        _, kernel_seconds = timed(lambda: self._kernel(addresses), self.device)
        self._bookkeeping()
        return visit_seconds, kernel_seconds


def _samples(config, device, warmup, iters, progress):
    torch_fused = providers.build("torch-fused", config, device)
    ours = providers.build(providers.COMPILED[device.type], config, device)
    split_step = _SplitStep(ours, device)
    no_math = roofline.NoMathRoofline(config.n_params, device)

    def iteration(subject, measure):
        """One training iteration of `subject` in which only `measure()` (seconds) counts."""
        def run():
            subject.forward_backward()
            seconds = measure()
            subject.zero_grad()
            return seconds
        return run

    subjects = {
        TORCH: iteration(torch_fused, lambda: timed(torch_fused.step, device)[1]),
        ROOFLINE: iteration(no_math, lambda: timed(no_math.step, device)[1]),
        STEP: iteration(ours, lambda: timed(ours.step, device)[1]),
        READS: iteration(ours, lambda: split_step()[0]),
        KERNEL: iteration(ours, lambda: split_step()[1]),
    }
    names = list(subjects)
    samples = {name: [] for name in names}
    for round_index in range(warmup + iters):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = subjects[name]()
            if round_index >= warmup:
                samples[name].append(seconds)
        progress.update(1)
    assert ours.optimizer.grad_copies == 0, "the ordinary loop copied a gradient"
    return ours.name, samples


def run(args):
    from tqdm import tqdm

    device = torch.device(args.device)
    warmup, iters = ROUNDS
    warmup = max(1, args.warmup if args.warmup is not None else warmup)
    iters = args.iters if args.iters is not None else iters
    allocations = max(1, args.allocations)
    config = configs.get_configs([args.config], device_type=device.type)[0]
    pooled = {}
    with tqdm(total=allocations * (warmup + iters), desc=f"breakdown {config.name}",
              unit="round") as progress:
        # Fresh subjects (fresh buffers) per allocation, samples pooled: see `bench.step`.
        for _ in range(allocations):
            provider, samples = _samples(config, device, warmup, iters, progress)
            for name, values in samples.items():
                pooled.setdefault(name, []).extend(values)
    stats = {name: summarize(values) for name, values in pooled.items()}
    result = dict(config=config.name, config_detail=config.detail, n_params=config.n_params,
                  n_tensors=config.n_tensors, provider=provider, device=device.type,
                  device_name=system.device_name(device),
                  hardware=system.hardware_sentence(device), git_sha=system.git_sha(),
                  warmup=warmup, iters=iters, allocations=allocations, **system.versions(),
                  stats_ms=stats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(result, indent=1) + "\n")
    md = _markdown(result)
    (out / "breakdown.md").write_text(md)
    _plot(result, out / "breakdown.png")
    print(md)
    for name in ("breakdown.json", "breakdown.md", "breakdown.png"):
        print(f"wrote {out / name}")
    return result


def _markdown(result):
    stats = result["stats_ms"]
    torch_ms, roofline_ms = stats[TORCH]["median"], stats[ROOFLINE]["median"]
    lines = [f"# Where the step's time goes: {result['config']} ({result['config_detail']}), "
             f"{result['device_name']} ({result['device']})", "",
             f"Hardware: {result['hardware']} torch {result['torch']}, git {result['git_sha']}. "
             f"{result['provider']}; medians of {result['iters']} rounds after "
             f"{result['warmup']} warm-up"
             + (f" in each of {result['allocations']} allocations (pooled)"
                if result["allocations"] > 1 else "")
             + ", each part timed in rounds of its own right after a backward, the subjects "
             "interleaved.", "",
             "| what | ms median [p20–p80] | x torch-fused's step time |", "|---|---:|---:|"]
    for name in (TORCH, STEP, READS, KERNEL, ROOFLINE):
        s = stats[name]
        lines.append(f"| {name} | {s['median']:.3f} [{s['p20']:.3f}–{s['p80']:.3f}] | "
                     f"{s['median'] / torch_ms:.3f} |")
    parts = stats[READS]["median"] + stats[KERNEL]["median"]
    lines += ["",
              f"- Speedup of the step: {torch_ms / stats[STEP]['median']:.2f}x torch-fused. "
              f"Parts: visit {stats[READS]['median']:.3f} ms + kernel "
              f"{stats[KERNEL]['median']:.3f} ms = {parts:.3f} ms.",
              f"- 10x torch-fused would be a {torch_ms / 10:.3f} ms step; a kernel that only "
              f"moves the 28 B/param takes {roofline_ms:.3f} ms here "
              f"({torch_ms / roofline_ms:.1f}x torch-fused), before any Python runs.",
              f"- Floor for any optimizer that must find {result['n_tensors']} gradients and "
              f"move the bytes: visit + roofline = "
              f"{stats[READS]['median'] + roofline_ms:.3f} ms "
              f"({torch_ms / (stats[READS]['median'] + roofline_ms):.1f}x torch-fused)."]
    return "\n".join(lines) + "\n"


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = result["stats_ms"]
    names = [TORCH, STEP, READS, KERNEL, ROOFLINE]
    medians = [stats[n]["median"] for n in names]
    errors = np.array([[stats[n]["median"] - stats[n]["p20"] for n in names],
                       [stats[n]["p80"] - stats[n]["median"] for n in names]])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    colors = ["#888888", "#1f77b4", "#9ecae1", "#9ecae1", "#2ca02c"]
    ax.barh(range(len(names)), medians, xerr=errors, color=colors, capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    target = stats[TORCH]["median"] / 10
    ax.axvline(target, color="#d62728", linestyle="--",
               label=f"10x torch-fused ({target:.2f} ms)")
    ax.set_xlabel("ms (median, p20–p80)")
    ax.set_title(f"{result['config']}: {result['config_detail']}, {result['device_name']}",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
