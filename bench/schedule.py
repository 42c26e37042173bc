"""The step benchmark's time: how many rounds each pair gets, what each pair is expected to cost,
the budget shared out between pairs by that cost, and the progress bar that shows the time left.

Rounds adapt to a time budget: each pair gets a share of the time left in proportion to its
expected cost, and its number of timed rounds is that share over the round time its warm-up
measured, between a floor and a ceiling. A quiet machine runs every pair at the ceiling; a busy
one gets fewer rounds (the report says how many each ratio rests on). Past HARD_LIMIT x the
budget the pairs left are not run, so the run ends in bounded time whatever else the machine is
doing.
"""
import sys
import time

from tqdm import tqdm

from bench import configs, providers, roofline

# (warm-up, fewest timed, most timed) rounds by device, quick mode and speed class. One warm-up
# round creates the optimizers' state, loads the cached Numba kernels and faults the buffers in;
# the slow providers (torch's for-loop and foreach, our plain-torch backend: 2-8x the anchor's
# time) get fewer rounds.
ROUNDS = {
    ("cpu", False): {"fast": (2, 5, 20), "slow": (1, 3, 8)},
    ("cpu", True): {"fast": (1, 3, 8), "slow": (1, 2, 4)},
    ("cuda", False): {"fast": (10, 30, 100), "slow": (3, 10, 30)},
    ("cuda", True): {"fast": (3, 10, 20), "slow": (1, 3, 6)},
}
# Seconds the whole run aims to take (--time-budget overrides). The README's command installs
# first, and install and benchmark together keep within 10 minutes on a 2-core machine.
TIME_BUDGET_S = {("cpu", False): 300, ("cpu", True): 40, ("cuda", False): 600, ("cuda", True): 90}
# Past HARD_LIMIT x the budget no new pair starts.
HARD_LIMIT = 1.25
# A round of a pair with clip+step runs four iterations instead of two, and each clip+step adds
# the clip (torch's: read and scale every gradient, 12 B per parameter; ours: read it, 4 B):
# planning only.
CLIP_ROUND_FACTOR = 2.3
# Seconds to build a subject, per parameter (normal_ init, the arena's copy): planning only.
_BUILD_S_PER_PARAM = 15e-9
# What a provider's iteration costs, roughly: nanoseconds per parameter and microseconds per
# tensor (fp32, the development machine, from the step benchmark's iteration times); planning
# only.
_COST = {
    "torch-fused": (2.0, 25), "torch-forloop": (3.5, 45), "torch-foreach": (4.5, 40),
    "fused_adam-numba": (2.0, 20), "fused_adam-torch": (8.0, 55),
    "fused_adam-triton": (2.0, 20),  # on CUDA; on CPU it is the interpreter, below
}
_INTERPRETED_TRITON_COST = (1000.0, 500)
# Providers whose rounds take several times the anchor's: they get fewer rounds.
SLOW = ("torch-forloop", "torch-foreach", "fused_adam-torch")


def duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def run_order(subjects, device_type):
    """`subjects` in the order their pairs run: what the headline needs first, so that a run cut
    short by its time limit loses the least."""
    compiled = providers.COMPILED[device_type]
    first = [compiled, roofline.NoMathRoofline.name, f"{compiled}:bf16-states"]

    def rank(name):
        if name in first:
            return (first.index(name), name)
        if name.startswith("fused_adam-") and name != "fused_adam-torch":
            return (3, name)
        if name in ("torch-forloop", "torch-foreach"):
            return (4, name)
        return (5 if name != roofline.CopyBandwidth.name else 6, name)
    return sorted(subjects, key=rank)


def iteration_seconds(name, config, device_type):
    """A rough a-priori guess of one iteration's seconds (see _COST), for planning only."""
    provider = providers.parse(name)[0]
    per_param, per_tensor = _COST.get(provider, _COST["torch-foreach"])
    if provider == "fused_adam-triton" and device_type == "cpu":
        per_param, per_tensor = _INTERPRETED_TRITON_COST
    elif device_type == "cuda":
        per_param, per_tensor = per_param / 20, per_tensor / 4
    return config.n_params * per_param * 1e-9 + config.n_tensors * per_tensor * 1e-6


def is_slow(name, device_type):
    provider = providers.parse(name)[0]
    return provider in SLOW or (provider == "fused_adam-triton" and device_type == "cpu")


def rounds_for(name, device_type, quick, warmup=None, iters=None):
    """(warm-up, fewest timed, most timed) rounds of `name`'s pair; `warmup` and `iters` (the
    command line's) override."""
    slow = name not in roofline.SUBJECTS and is_slow(name, device_type)
    default_warmup, fewest, most = ROUNDS[(device_type, bool(quick))]["slow" if slow else "fast"]
    if iters is not None:
        fewest = most = max(1, iters)
    return (default_warmup if warmup is None else max(1, warmup)), fewest, most


def _round_seconds(name, config, device_type, clips):
    """A-priori seconds of one round of the pair (anchor + `name`), for planning."""
    anchor = iteration_seconds(providers.ANCHOR, config, device_type)
    if name in roofline.SUBJECTS:
        n = roofline.elements(config.n_params, device_type)
        per = 1.0e-9 if name == roofline.NoMathRoofline.name else 0.3e-9
        return anchor + n * per / (20 if device_type == "cuda" else 1)
    pair = anchor + iteration_seconds(name, config, device_type)
    return pair * (CLIP_ROUND_FACTOR if clips else 1.0)


def expected_costs(config_names, subjects, *, device_type, quick, allocations, rounds, clips):
    """Each pair's weight (seconds a quiet development machine would take at its most rounds)
    and floor (the share of that its fewest rounds take), by (config, subject); `rounds(name)`
    gives a pair's rounds, `clips` the subjects whose pairs time clip+step."""
    weights, floors = {}, {}
    for config_name in config_names:
        config = configs.sizes(config_name, quick=quick, device_type=device_type)[0]
        build = config.n_params * _BUILD_S_PER_PARAM
        for name in subjects:
            warmup, fewest, most = rounds(name)
            per_round = _round_seconds(name, config, device_type, name in clips)
            pair = (config_name, name)
            weights[pair] = allocations * (per_round * (warmup + most) + build
                                           + build / len(subjects))
            floors[pair] = ((per_round * (warmup + fewest) + build)
                            / (per_round * (warmup + most) + build))
    return weights, floors


class Schedule:
    """The time budget, shared out between pairs by their expected cost (their weight), and one
    progress bar over the whole run (in units of weight) with the estimate of the time left and
    the lines written above it."""

    def __init__(self, seconds, weights, floors):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.limit = self.start + seconds * HARD_LIMIT
        self.weights = dict(weights)  # pairs not finished -> weight
        self.floors = dict(floors)  # pair -> share of its weight it takes at its fewest rounds
        self.done = 0.0  # weight of the work done (finished pairs and rounds of the current one)
        self.advanced = {}  # pair -> weight of its rounds done so far
        self.bar = tqdm(total=sum(self.weights.values()), file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, smoothing=0,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")

    def share(self, pair):
        """Seconds `pair` may take from now."""
        left = max(0.0, self.deadline - time.perf_counter())
        return left * self.weights[pair] / max(sum(self.weights.values()), 1e-9)

    def over_limit(self):
        return time.perf_counter() > self.limit

    def advance(self, pair, weight):
        """`weight` of `pair`'s work is done (a round)."""
        self.advanced[pair] = self.advanced.get(pair, 0.0) + weight
        self._count(weight)

    def finish(self, pair):
        """`pair` is done, run or skipped: what is left of its weight counts as done."""
        weight = self.weights.pop(pair, 0.0)
        self._count(max(0.0, weight - self.advanced.pop(pair, 0.0)))

    def _count(self, weight):
        self.done += weight
        self.bar.update(weight)
        eta = self.eta()
        if eta is not None:
            self.bar.set_postfix_str(f"about {duration(eta)} left", refresh=False)

    def eta(self):
        """Seconds left, from the pace so far (seconds per unit of weight) and the rounds the
        pairs left will get: all of them if they fit in the budget left, else their share of it
        but never less than their floor; never past the hard limit."""
        now = time.perf_counter()
        if self.done <= 0:
            return None
        pace = (now - self.start) / self.done
        work = {pair: weight * pace for pair, weight in self.weights.items()}
        left = max(0.0, self.deadline - now)
        total = sum(work.values())
        if total > left:
            total = sum(max(left * w / max(sum(self.weights.values()), 1e-9),
                            work[pair] * self.floors.get(pair, 1.0))
                        for pair, w in self.weights.items())
        return min(total, max(0.0, self.limit - now))

    def describe(self, text):
        self.bar.set_description_str(text, refresh=False)

    def write(self, line):
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self):
        self.bar.close()
