"""The step benchmark (`python -m bench`): for each config, torch-fused (the anchor) is built once
and every other subject (fused_adam's modes, the no-math roofline, torch's for-loop and foreach
Adam, our plain-torch backend, a copy) is timed against it in a pair, interleaved round by round,
then freed. Every ratio comes from one pair's shared rounds; the roofline fraction chains two
such ratios through the anchor. Two subjects alive at a time keep the peak near one config's
dearest pair (under 5 GB for GPT-2-small's shapes), and the memory present is checked before
each config (`bench.memory.plan`: scaled down or skipped, with the reason printed).

Rounds adapt to a time budget: each pair gets a share of the time left in proportion to its
expected cost, and its number of timed rounds is that share over the round time its warm-up
measured, between a floor and a ceiling. A quiet machine runs every pair at the ceiling; a busy
one gets fewer rounds (the report says how many each ratio rests on). Past the hard limit
(HARD_LIMIT x the budget) the pairs left are not run, and the report says which and why, so the
run ends in bounded time whatever else the machine is doing.

Clip+step: in the pairs of the optimizers `--clip-providers` names (by default torch-foreach and
the compiled FusedAdam, against torch-fused: see `providers.default_clip_providers`; `all`: every
optimizer's; `--no-clip`: none) two more subjects join the round robin, the same two optimizers each timed as a training loop that clips pays it: the
gradients' norm clipped to `providers.MAX_NORM` (torch's optimizers through
`torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)`, ours through
`FusedAdam.clip_grad_norm(max_norm)`), then `step()`, after the same stand-in backward. So each
such round runs four iterations (step and clip+step of each optimizer, the order rotating), the
clip+step ratio to torch-fused comes from the same rounds as the step's, and the clip's own cost
(clip+step minus step) from one optimizer's own rounds. The time budget covers them: a pair's
expected cost counts them, and its rounds come from its warm-up, which runs all four.
`--no-clip` leaves them out.

After each pair the rows so far go to results.json and results.md, and the plot is redrawn
after each config, so an interrupted run leaves a readable report.
"""
import sys
import time

import torch
from tqdm import tqdm

from bench import configs as configs_module
from bench import memory, report, results, roofline, system, timing
from bench import providers as providers_module
from bench.providers import ANCHOR

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
# Seconds the whole run aims to take (--time-budget overrides). On CPU a quiet 2-core machine
# needs about half of it at full rounds; a busy one gets fewer rounds. The README's command
# installs first (2-5 minutes), and install and benchmark together keep within 10 minutes.
TIME_BUDGET_S = {("cpu", False): 300, ("cpu", True): 40, ("cuda", False): 600, ("cuda", True): 90}
# Past HARD_LIMIT x the budget no new pair starts (300 s -> 6 min 15 s on CPU).
HARD_LIMIT = 1.25
# A round of a pair with clip+step runs four iterations instead of two, and each clip+step adds
# the clip (torch's: read and scale every gradient, 12 B per parameter; ours: read it, 4 B):
# planning only.
CLIP_ROUND_FACTOR = 2.3
# The name a subject's clip+step goes by in the round robin (its samples are its own again after).
CLIP_SUFFIX = " clip+step"
# Seconds to build a subject, per parameter (normal_ init, the arena's copy): planning only.
_BUILD_S_PER_PARAM = 15e-9
ROOFLINE_NAMES = tuple(roofline.SUBJECTS)


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class Schedule:
    """The time budget, shared out between pairs by their expected cost (their weight, in
    seconds a quiet development machine would take at full rounds), and the estimate of the time
    left that the progress bar shows."""

    def __init__(self, seconds, weights, floors):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.limit = self.start + seconds * HARD_LIMIT
        self.weights = dict(weights)  # pairs not finished -> weight
        self.floors = dict(floors)  # pair -> share of its weight it takes at its fewest rounds
        self.done = 0.0  # weight of the work done (finished pairs and rounds of the current one)

    def share(self, pair):
        """Seconds `pair` may take from now."""
        left = max(0.0, self.deadline - time.perf_counter())
        return left * self.weights[pair] / max(sum(self.weights.values()), 1e-9)

    def over_limit(self):
        return time.perf_counter() > self.limit

    def advance(self, weight):
        self.done += weight

    def finish(self, pair):
        return self.weights.pop(pair, 0.0)

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


class Progress:
    """One bar over the whole run (in units of expected seconds) with the schedule's estimate
    of the time left, and the lines written above it."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.bar = tqdm(total=sum(schedule.weights.values()), file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, smoothing=0,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")

    def describe(self, text):
        self.bar.set_description_str(text, refresh=False)

    def advance(self, weight):
        self.schedule.advance(weight)
        self.bar.update(weight)
        eta = self.schedule.eta()
        if eta is not None:
            self.bar.set_postfix_str(f"about {_duration(eta)} left", refresh=False)

    def write(self, line):
        self.bar.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self):
        self.bar.close()


class StepBenchmark:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        key = (self.device.type, bool(args.quick))
        self.rounds = ROUNDS[key]
        self.providers = list(args.providers or
                              providers_module.default_providers(self.device.type))
        if ANCHOR not in self.providers:
            self.providers.insert(0, ANCHOR)  # every ratio is to it: it is always measured
        self.subjects = sorted([p for p in self.providers if p != ANCHOR] + list(ROOFLINE_NAMES),
                               key=self._priority)
        self.config_names = list(args.configs or configs_module.CONFIG_NAMES)
        self.allocations = max(1, args.allocations)
        chosen = getattr(args, "clip_providers", None)
        if getattr(args, "no_clip", False):
            chosen = []
        elif chosen is None:
            chosen = providers_module.default_clip_providers(self.device.type)
        elif "all" in chosen:
            chosen = list(self.providers)
        # The anchor's clip+step is timed in the pairs of the others that clip.
        self.clip_providers = [p for p in self.providers if p in chosen and p != ANCHOR]
        self.clip = bool(self.clip_providers)
        self.time_budget = (args.time_budget if args.time_budget is not None
                            else TIME_BUDGET_S[key])
        self.out = args.out
        self.meta = system.run_metadata(
            self.device, "step", quick=args.quick, allocations=self.allocations,
            providers=self.providers, configs=self.config_names, time_budget_s=self.time_budget,
            max_memory_gb=args.max_memory, seed=args.seed,
            clip_max_norm=providers_module.MAX_NORM if self.clip else None,
            clip_providers=self.clip_providers)
        self.rows = []  # of finished configs
        self.current = []  # of the config being measured, rebuilt after each pair
        self.advanced = {}  # pair -> weight the progress bar already counted for it

    # -- planning ---------------------------------------------------------------------------

    def _priority(self, name):
        """The order pairs run in: what the headline needs first, so that a run cut short by
        its time limit loses the least."""
        compiled = providers_module.COMPILED[self.device.type]
        order = [compiled, roofline.NoMathRoofline.name, f"{compiled}:bf16-states"]
        if name in order:
            return (order.index(name), name)
        if name.startswith("fused_adam-") and name != "fused_adam-torch":
            return (3, name)
        if name in ("torch-forloop", "torch-foreach"):
            return (4, name)
        return (5 if name != roofline.CopyBandwidth.name else 6, name)

    def _kind(self, name):
        return roofline.SUBJECTS[name].kind if name in ROOFLINE_NAMES else "optimizer"

    def _clips(self, name):
        """Whether `name`'s pair times clip+step too (--clip-providers)."""
        return name in self.clip_providers

    def _rounds_for(self, name):
        slow = name not in ROOFLINE_NAMES and providers_module.is_slow(name, self.device.type)
        warmup, fewest, most = self.rounds["slow" if slow else "fast"]
        if self.args.warmup is not None:
            warmup = max(1, self.args.warmup)
        if self.args.iters is not None:
            fewest = most = max(1, self.args.iters)
        return warmup, fewest, most

    def _round_seconds(self, name, config):
        """A-priori seconds of one round of the pair (anchor + `name`), for planning."""
        device_type = self.device.type
        anchor = providers_module.iteration_seconds(ANCHOR, config, device_type)
        if name in ROOFLINE_NAMES:
            n = roofline.elements(config.n_params, device_type)
            per = 1.0e-9 if name == roofline.NoMathRoofline.name else 0.3e-9
            return anchor + n * per / (20 if device_type == "cuda" else 1)
        pair = anchor + providers_module.iteration_seconds(name, config, device_type)
        return pair * (CLIP_ROUND_FACTOR if self._clips(name) else 1.0)

    def _plan_time(self):
        """Each pair's weight (expected seconds at its most rounds) and floor share."""
        weights, floors = {}, {}
        for config_name in self.config_names:
            config = configs_module.sizes(config_name, quick=self.args.quick,
                                          device_type=self.device.type)[0]
            build = config.n_params * _BUILD_S_PER_PARAM
            for name in self.subjects:
                warmup, fewest, most = self._rounds_for(name)
                per_round = self._round_seconds(name, config)
                pair = (config_name, name)
                weights[pair] = self.allocations * (per_round * (warmup + most) + build
                                                    + build / len(self.subjects))
                floors[pair] = ((per_round * (warmup + fewest) + build)
                                / (per_round * (warmup + most) + build))
        return weights, floors

    # -- running ----------------------------------------------------------------------------

    def run(self):
        weights, floors = self._plan_time()
        self.schedule = Schedule(self.time_budget, weights, floors)
        meta = self.meta
        print(f"device: {meta['device_name']} ({self.device.type}); {meta['hardware']}")
        print(f"load average now: {meta['load_average_at_start']} on {meta['cpu_count']} cores"
              + (" (busy: times will be noisy)" if (meta["load_average_at_start"] or 0)
                 > 0.5 * (meta["cpu_count"] or 1) else ""))
        print(f"providers: {', '.join(self.providers)}; each timed against {ANCHOR} in a "
              "pair of its own, and so are the no-math roofline and copy_")
        ceiling = (f"{self.args.max_memory:g} GB peak" if self.args.max_memory
                   else "none but the memory available")
        print(f"time budget {_duration(self.time_budget)}, no pair starts after "
              f"{_duration(self.time_budget * HARD_LIMIT)} (at full rounds a quiet development "
              f"machine needs about {_duration(sum(weights.values()))}); memory ceiling: "
              f"{ceiling}")
        if self.clip:
            print(f"clip+step: the pairs of {', '.join(self.clip_providers)} also time a clip of "
                  f"the gradients' norm to {providers_module.MAX_NORM:g} then the step, against "
                  f"{ANCHOR}'s (--clip-providers all: every optimizer's; --no-clip: none)")
        print(f"results folder: {self.out}")
        self.progress = Progress(self.schedule)
        try:
            for config_name in self.config_names:
                self._run_config(config_name)
        except KeyboardInterrupt:
            self.progress.close()
            self.rows += self.current
            self._write(plot=True)
            print(f"\ninterrupted: the report so far is in {self.out}")
            raise
        self.progress.close()
        paths = self._write(plot=True)
        print()
        print(report.headline_markdown(self.rows))
        for path in paths:
            print(f"wrote {path}")
        print(f"results folder: {self.out}")
        return self.rows

    def _write(self, plot=False):
        rows = self.rows + self.current
        if not rows:
            return []
        return report.write(rows, self.out, "step", plot=plot)

    def _finish_pair(self, pair):
        weight = self.schedule.finish(pair)
        self.progress.advance(max(0.0, weight - self.advanced.pop(pair, 0.0)))

    def _skip(self, where, names, reason, line):
        """Rows saying why `names` were not measured; their pairs count as done."""
        self.progress.write(line)
        for name in names:
            self.current.append(results.row(self.meta, where, name, "skipped", None, None,
                                            kind=self._kind(name), reason=reason))
            self._finish_pair((where["config"], name))

    def _run_config(self, config_name):
        sizes = configs_module.sizes(config_name, quick=self.args.quick,
                                     device_type=self.device.type)
        memory.release(self.device)
        plan = memory.plan(sizes, providers_module.footprint(ANCHOR),
                           [self._footprint(n) for n in self.subjects],
                           memory.budget(self.device, self.args.max_memory))
        full = sizes[0]
        where = results.config_fields(config_name, full.detail, full.n_params, full.n_tensors)
        self.current = []
        if plan.config is None:
            self._skip(where, [ANCHOR] + self.subjects, plan.reason,
                       f"{config_name}: {plan.reason}")
            self._end_config()
            return
        config = plan.config
        if plan.reason:
            self.progress.write(f"{config_name}: {plan.reason}")
        detail = config.detail + (f" ({plan.reason})" if plan.reason else "")
        where = results.config_fields(config_name, detail, config.n_params, config.n_tensors)
        self.extra = dict(estimated_peak_GB=round(plan.estimate / memory.GB, 2),
                          load_average_at_config_start=system.load_average())
        self.progress.describe(config_name)
        self.samples = {}  # subject -> {metric: [...]}; the anchor's under (ANCHOR, subject)
        self.peaks, self.huge, self.measured = {}, {}, []
        skipped = set()
        for allocation in range(self.allocations):
            last = allocation == self.allocations - 1
            try:
                anchor = providers_module.build(ANCHOR, config, self.device, self.args.seed)
            except (ValueError, RuntimeError, ImportError, MemoryError) as error:
                reason = f"{ANCHOR} could not be built: {_first_line(error)}"
                left = [n for n in self.subjects if (config_name, n) in self.schedule.weights]
                self._skip(where, [ANCHOR] + left, reason, f"{config_name}: skipped: {reason}")
                break
            for name in self.subjects:
                pair = (config_name, name)
                if name in skipped:
                    continue
                if self.schedule.over_limit() and name in self.measured:
                    self._finish_pair(pair)  # keep what the earlier allocations measured
                    continue
                if self.schedule.over_limit():
                    reason = (f"not run: the run reached its time limit "
                              f"({_duration(self.time_budget * HARD_LIMIT)}); run it alone with "
                              f"--configs {config_name} --providers {name}")
                    skipped.add(name)
                    self._skip(where, [name], reason, f"  {config_name:<11} {name:<36} {reason}")
                    self._update_rows(where)
                    continue
                outcome = self._run_pair(pair, config, anchor, allocation)
                if isinstance(outcome, str):
                    skipped.add(name)
                    self._skip(where, [name], outcome,
                               f"  {config_name:<11} {name:<36} skipped: {outcome}")
                else:
                    timing.merge(self.samples, outcome)
                    if name not in self.measured:
                        self.measured.append(name)
                    self._update_rows(where)
                    if last:
                        self._finish_pair(pair)
                        self._print_pair(where, name)
                self._write()
            if self.device.type == "cpu":
                self.huge[ANCHOR] = system.huge_page_fraction(anchor.state_tensors())
            del anchor
            memory.release(self.device)
        self._update_rows(where)
        if self.measured:
            self._print_pair(where, ANCHOR)
        self._end_config()

    def _end_config(self):
        self.rows += self.current
        self.current = []
        paths = self._write(plot=True)
        name = self.rows[-1]["config"] if self.rows else "?"
        self.progress.write(f"{name}: done; report so far in "
                            f"{paths[1] if len(paths) > 1 else self.out}")

    def _footprint(self, name):
        if name in ROOFLINE_NAMES:
            return roofline.footprint(name, self.device.type)
        return providers_module.footprint(name, clip=self._clips(name))

    def _build(self, name, config):
        if name in ROOFLINE_NAMES:
            return roofline.build(name, config.n_params, self.device)
        return providers_module.build(name, config, self.device, self.args.seed)

    def _run_pair(self, pair, config, anchor, allocation):
        """Time `pair`'s subject against the anchor: {subject: samples, (ANCHOR, subject):
        the anchor's samples in the same rounds}, or the reason it could not run."""
        name = pair[1]
        pair_start = time.perf_counter()
        try:
            subject = self._build(name, config)
        except (ValueError, RuntimeError, ImportError, MemoryError) as error:
            memory.release(self.device)
            return _first_line(error)
        warmup, fewest, most = self._rounds_for(name)
        subjects = [timing.Subject(ANCHOR, lambda _: timing.iteration(anchor, self.device)),
                    timing.Subject(name, lambda _: timing.iteration(subject, self.device))]
        if self._clips(name):
            max_norm = providers_module.MAX_NORM
            subjects += [
                timing.Subject(ANCHOR + CLIP_SUFFIX, lambda _: timing.iteration(
                    anchor, self.device, clip=max_norm)),
                timing.Subject(name + CLIP_SUFFIX, lambda _: timing.iteration(
                    subject, self.device, clip=max_norm))]
        per_round = self.schedule.weights[pair] / self.allocations / (warmup + most)

        def on_round(_index, _seconds):
            self.advanced[pair] = self.advanced.get(pair, 0.0) + per_round
            self.progress.advance(per_round)

        try:
            with memory.RssSampler() as sampler:
                started = time.perf_counter()
                timing.interleave(subjects, warmup=warmup, iters=0, on_round=on_round)
                round_s = (time.perf_counter() - started) / warmup
                share = self.schedule.share(pair) / (self.allocations - allocation)
                share -= time.perf_counter() - pair_start
                iters = int(min(most, max(fewest, share // max(round_s, 1e-9))))
                samples = timing.interleave(subjects, warmup=0, iters=iters,
                                            first_round=warmup, on_round=on_round)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            subject = subjects = None  # the lambdas hold the cell: free what it points to
            memory.release(self.device)
            return f"failed while timing: {_first_line(error)}"
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else sampler.peak)
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak or 0.0)
        if self.device.type == "cpu" and hasattr(subject, "state_tensors"):
            self.huge[name] = system.huge_page_fraction(subject.state_tensors())
        subject = subjects = None  # the lambdas hold the cell: free what it points to
        memory.release(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Each optimizer's clip+step samples join its step's (metrics clip_step, clip_iter,
        # grad_norm), round for round.
        return {key: {**samples[who], **samples.get(who + CLIP_SUFFIX, {})}
                for key, who in ((name, name), ((ANCHOR, name), ANCHOR))}

    # -- rows -------------------------------------------------------------------------------

    def _bytes_per_step(self, name, n_params):
        if name in ROOFLINE_NAMES:
            n = roofline.elements(n_params, self.device.type)
            per = (roofline.ADAM_BYTES_PER_ELEMENT if name == roofline.NoMathRoofline.name
                   else roofline.COPY_BYTES_PER_ELEMENT)
            return per * n
        return providers_module.parse(name)[3] * n_params

    def _update_rows(self, where):
        """The current config's rows from its samples so far (the anchor's pooled over the pairs
        done), replacing the last version, so that the report is whole after every pair."""
        skipped = [r for r in self.current if r["metric"] == "skipped"]
        rows = []
        for name in self.measured:
            rows += self._subject_rows(where, name)
        if self.measured:
            rows += self._anchor_rows(where)
            rows += self._roofline_rows(where, rows)
        self.current = rows + skipped

    def _row(self, where, name, *args, **kwargs):
        return results.row(self.meta, where, name, *args, kind=self._kind(name), **self.extra,
                           **kwargs)

    def _subject_rows(self, where, name):
        step, anchor_step = self.samples[name]["step"], self.samples[(ANCHOR, name)]["step"]
        stats, anchor_stats = timing.summarize(step), timing.summarize(anchor_step)
        bytes_per_step = self._bytes_per_step(name, where["n_params"])
        kind = self._kind(name)
        rows = results.time_rows(self.meta, where, name, "step", step, kind=kind, **self.extra)
        if kind == "optimizer":
            rows += results.time_rows(self.meta, where, name, "iter", self.samples[name]["iter"],
                                      kind=kind, **self.extra)
        rows += [
            self._row(where, name, "GBps", bytes_per_step / stats["median"] / 1e6, "GB/s",
                      bytes_per_step=bytes_per_step),
            self._row(where, name, "speedup_vs_torch_fused",
                      anchor_stats["median"] / stats["median"], "x", samples=stats["n"]),
            self._row(where, name, "torch_fused_step_ms_in_pair", anchor_stats["median"], "ms",
                      samples=anchor_stats["n"]),
        ]
        rows += self._clip_rows(where, name, self.samples[name],
                                self.samples[(ANCHOR, name)])
        if self.peaks.get(name):
            rows.append(self._row(where, name, "peak_memory_GB", self.peaks[name] / memory.GB,
                                  "GB"))
        if self.huge.get(name) is not None:
            rows.append(self._row(where, name, "huge_page_fraction", self.huge[name],
                                  "fraction"))
        return rows

    def _clip_rows(self, where, name, samples, anchor_samples=None):
        """clip+step's rows, where `name` timed it: its times (`clip_step_ms_*`, and the whole
        iteration's, `clip_iter_ms_*`), its ratio to torch-fused's clip+step in the same rounds
        (and torch-fused's median there), the clip's own cost (`clip_cost_fraction`: its
        clip+step median over its step median, minus 1, from its own rounds) and the gradients'
        norm the clip found (`grad_norm`, with the max norm it clipped to)."""
        if not samples.get("clip_step"):
            return []
        kind = self._kind(name)
        clip_step = timing.summarize(samples["clip_step"])
        step = timing.summarize(samples["step"])
        rows = (results.time_rows(self.meta, where, name, "clip_step", samples["clip_step"],
                                  kind=kind, **self.extra)
                + results.time_rows(self.meta, where, name, "clip_iter", samples["clip_iter"],
                                    kind=kind, **self.extra))
        if anchor_samples is None:  # the anchor itself
            speedup, pair_ms, pair_n = 1.0, None, None
        else:
            anchor = timing.summarize(anchor_samples["clip_step"])
            speedup, pair_ms, pair_n = anchor["median"] / clip_step["median"], anchor["median"], \
                anchor["n"]
        rows.append(self._row(where, name, "clip_step_speedup_vs_torch_fused", speedup, "x",
                              samples=clip_step["n"]))
        if pair_ms is not None:
            rows.append(self._row(where, name, "torch_fused_clip_step_ms_in_pair", pair_ms, "ms",
                                  samples=pair_n))
        rows += [
            self._row(where, name, "clip_cost_fraction",
                      clip_step["median"] / step["median"] - 1.0, "fraction",
                      samples=clip_step["n"]),
            self._row(where, name, "grad_norm", samples["grad_norm"][-1], None,
                      max_norm=providers_module.MAX_NORM)]
        return rows

    def _anchor_rows(self, where):
        """The anchor's own rows: its samples from every pair it was in, pooled."""
        step = [s for name in self.measured for s in self.samples[(ANCHOR, name)]["step"]]
        iters = [s for name in self.measured for s in self.samples[(ANCHOR, name)]["iter"]]
        median = timing.summarize(step)["median"]
        bytes_per_step = self._bytes_per_step(ANCHOR, where["n_params"])
        rows = (results.time_rows(self.meta, where, ANCHOR, "step", step, **self.extra)
                + results.time_rows(self.meta, where, ANCHOR, "iter", iters, **self.extra))
        rows += [self._row(where, ANCHOR, "GBps", bytes_per_step / median / 1e6, "GB/s",
                           bytes_per_step=bytes_per_step),
                 self._row(where, ANCHOR, "speedup_vs_torch_fused", 1.0, "x")]
        pooled = {}
        for name in self.measured:
            anchor_samples = self.samples[(ANCHOR, name)]
            if anchor_samples.get("clip_step"):
                for metric in ("step", "clip_step", "clip_iter", "grad_norm"):
                    pooled.setdefault(metric, []).extend(anchor_samples[metric])
        rows += self._clip_rows(where, ANCHOR, pooled)
        if self.huge.get(ANCHOR) is not None:
            rows.append(self._row(where, ANCHOR, "huge_page_fraction", self.huge[ANCHOR],
                                  "fraction"))
        return rows

    def _roofline_rows(self, where, rows):
        """Each optimizer's share of the roofline's bandwidth: (bytes_S / t_S) / (bytes_R / t_R),
        with t_R / t_S chained through the anchor (each link from one pair's shared rounds)."""
        table = results.Table(rows)
        config, roof = where["config"], roofline.NoMathRoofline.name
        roof_speedup = table.get(config, roof, "speedup_vs_torch_fused")
        if roof_speedup is None:
            return []
        roof_bytes = table.row(config, roof, "GBps")["bytes_per_step"]
        out = []
        for name in [ANCHOR] + self.measured:
            if self._kind(name) == "copy":
                continue
            speedup = table.get(config, name, "speedup_vs_torch_fused")
            fraction = (table.row(config, name, "GBps")["bytes_per_step"] * speedup
                        / (roof_bytes * roof_speedup))
            out.append(self._row(where, name, "roofline_fraction", fraction, "fraction"))
        return out

    def _print_pair(self, where, name):
        table = results.Table(self.current)
        config = where["config"]
        median = table.get(config, name, "step_ms_median")
        line = (f"  {config:<11} {name:<36} {report.fmt_ms(median):>9} ms"
                f"  {table.get(config, name, 'GBps'):6.1f} GB/s")
        if name == ANCHOR:
            n = table.row(config, name, "step_ms_median")["samples"]
            line += f"  (its {n} rounds in all {len(self.measured)} pairs)"
        elif self._kind(name) != "copy":
            pair_ms = table.row(config, name, "torch_fused_step_ms_in_pair")
            line += (f"  {table.get(config, name, 'speedup_vs_torch_fused'):5.2f}x {ANCHOR} "
                     f"({report.fmt_ms(pair_ms['value'])} ms in the same {pair_ms['samples']} "
                     "rounds)")
        clip_ms = table.get(config, name, "clip_step_ms_median")
        if clip_ms is not None:
            line += f"; clip+step {report.fmt_ms(clip_ms)} ms"
            if name != ANCHOR:
                speed = table.get(config, name, "clip_step_speedup_vs_torch_fused")
                pair_ms = table.get(config, name, "torch_fused_clip_step_ms_in_pair")
                line += f" {speed:.2f}x {ANCHOR}'s ({report.fmt_ms(pair_ms)} ms)"
            cost = table.get(config, name, "clip_cost_fraction")
            line += f", the clip {100 * cost:+.0f}% of the step"
        if self.peaks.get(name):
            line += f"  peak {self.peaks[name] / memory.GB:.1f} GB"
        self.progress.write(line)


def run(args):
    return StepBenchmark(args).run()
