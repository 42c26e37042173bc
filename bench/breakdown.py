"""`python -m bench breakdown`: where a FusedAdam step's time goes, on one config.

A step does two things: it visits every parameter to read where its gradient and its storage
are (`FusedAdam._gather_grads`: Python, one attribute read after another), then launches one
kernel per arena and creates any new state (`FusedAdam._launch`). Each part is timed alone
here, starting from the state a training step starts from: right after a real backward, with
the other subjects' iterations in between as in the step benchmark. Each part gets rounds of its
own, because whichever part runs first brings the other's metadata into cache. The visit is
timed a second time straight after the first, warm, which shows how much of it is the reading
and how much the waiting for memory. The same rounds time the whole step (which adds torch's
`Optimizer.step` wrapper and `no_grad` to the two parts), torch-fused's step and the no-math
roofline.

With hundreds of small tensors the visit is not negligible: after a backward each parameter's
metadata (tensor, autograd record, gradient, storage) is out of cache, so reading it costs
memory latencies. torch's Adam reads every `p.grad` too.
"""
import gc
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
VISIT = "FusedAdam: visit of every parameter (Python)"
VISIT_WARM = "FusedAdam: the same visit again, warm"
LAUNCH = "FusedAdam: kernel launch and new state"
ROOFLINE = roofline.NoMathRoofline.name
NAMES = (TORCH, STEP, VISIT, VISIT_WARM, LAUNCH, ROOFLINE)


class _SplitStep:
    """A FusedAdam provider's step as its two parts, `FusedAdam._gather_grads` and
    `FusedAdam._launch`, exactly as `step()` calls them; each call times them."""

    def __init__(self, provider, device):
        self.optimizer, self.device = provider.optimizer, device

    @torch.no_grad()
    def __call__(self):
        """{VISIT: s, VISIT_WARM: s, LAUNCH: s}."""
        addresses, visit = timed(self.optimizer._gather_grads, self.device)
        addresses, visit_warm = timed(self.optimizer._gather_grads, self.device)
        _, launch = timed(lambda: self.optimizer._launch(addresses), self.device)
        return {VISIT: visit, VISIT_WARM: visit_warm, LAUNCH: launch}


def _samples(config, device, warmup, iters, seed, progress):
    torch_fused = providers.build("torch-fused", config, device, seed)
    ours = providers.build(providers.COMPILED[device.type], config, device, seed)
    split_step = _SplitStep(ours, device)
    no_math = roofline.NoMathRoofline(config.n_params, device)

    def iteration(subject, measure):
        """One training iteration of `subject` in which only `measure()` ({name: s}) counts."""
        def run():
            subject.forward_backward()
            seconds = measure()
            subject.zero_grad()
            return seconds
        return run

    # The split step's rounds count only the visit (whose warm repeat follows it at once) or
    # only the launch, each after a backward of its own.
    subjects = [
        iteration(torch_fused, lambda: {TORCH: timed(torch_fused.step, device)[1]}),
        iteration(no_math, lambda: {ROOFLINE: timed(no_math.step, device)[1]}),
        iteration(ours, lambda: {STEP: timed(ours.step, device)[1]}),
        iteration(ours, lambda: {k: v for k, v in split_step().items() if k != LAUNCH}),
        iteration(ours, lambda: {LAUNCH: split_step()[LAUNCH]}),
    ]
    samples = {name: [] for name in NAMES}
    for round_index in range(warmup + iters):
        shift = round_index % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            for name, seconds in subject().items():
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
    iters = max(1, args.iters if args.iters is not None else iters)
    allocations = max(1, args.allocations)
    config = configs.get_configs([args.config], device_type=device.type)[0]
    pooled = {}
    with tqdm(total=allocations * (warmup + iters), desc=f"breakdown {config.name}",
              unit="round") as progress:
        # Fresh subjects (fresh buffers) per allocation, samples pooled: see `bench.step`.
        for _ in range(allocations):
            provider, samples = _samples(config, device, warmup, iters, args.seed, progress)
            for name, values in samples.items():
                pooled.setdefault(name, []).extend(values)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
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
    median = {name: stats[name]["median"] for name in NAMES}
    torch_ms = median[TORCH]
    pooled = (f" in each of {result['allocations']} allocations (pooled)"
              if result["allocations"] > 1 else "")
    lines = [f"# Where the step's time goes: {result['config']} ({result['config_detail']}), "
             f"{result['device_name']} ({result['device']})", "",
             f"Hardware: {result['hardware']} torch {result['torch']}, git {result['git_sha']}. "
             f"{result['provider']}; medians of {result['iters']} rounds after "
             f"{result['warmup']} warm-up{pooled}, each part timed in rounds of its own right "
             "after a backward, the subjects interleaved.", "",
             "| what | ms median [p20–p80] | x torch-fused's step time |", "|---|---:|---:|"]
    for name in NAMES:
        s = stats[name]
        lines.append(f"| {name} | {s['median']:.3f} [{s['p20']:.3f}–{s['p80']:.3f}] | "
                     f"{s['median'] / torch_ms:.3f} |")
    parts = median[VISIT] + median[LAUNCH]
    floor = median[VISIT] + median[ROOFLINE]
    lines += ["",
              f"- Step: {torch_ms / median[STEP]:.2f}x torch-fused. Visit + launch = "
              f"{parts:.3f} ms; the other {median[STEP] - parts:.3f} ms of the step are around "
              "them (torch's `Optimizer.step` wrapper, `no_grad`, the group rows), cold too.",
              f"- The visit takes {median[VISIT]:.3f} ms after a backward and "
              f"{median[VISIT_WARM]:.3f} ms straight after itself: the difference is waiting "
              "for parameter metadata that the backward pushed out of cache.",
              f"- 10x torch-fused would be a {torch_ms / 10:.3f} ms step. Visit + roofline = "
              f"{floor:.3f} ms ({torch_ms / floor:.1f}x torch-fused): what an optimizer that "
              f"reads {result['n_tensors']} gradients this way and moves 28 B/param with no math "
              "would take."]
    return "\n".join(lines) + "\n"


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = result["stats_ms"]
    medians = [stats[n]["median"] for n in NAMES]
    errors = np.array([[stats[n]["median"] - stats[n]["p20"] for n in NAMES],
                       [stats[n]["p80"] - stats[n]["median"] for n in NAMES]])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = ["#888888", "#1f77b4", "#9ecae1", "#deebf7", "#9ecae1", "#2ca02c"]
    ax.barh(range(len(NAMES)), medians, xerr=errors, color=colors, edgecolor="#555555",
            capsize=3)
    ax.set_yticks(range(len(NAMES)), NAMES)
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
