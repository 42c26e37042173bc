"""The step benchmark (`python -m bench`): for each config, torch-fused (the anchor) is built once
and every other subject (torch's for-loop and foreach Adam, each of fused_adam's modes, the
no-math roofline, a copy) is timed against it in a pair, interleaved round by round, then freed.
Every ratio comes from one pair's shared rounds; the roofline fraction chains two such ratios
through the anchor. Two subjects alive at a time keep the peak near one config's dearest pair
(5 GB for GPT-2-small's shapes), and the memory present is checked before each config
(`bench.memory.plan`: scaled down or skipped, with the reason printed, never killed half-way).

Rounds adapt to a time budget: each pair gets a share of the time left in proportion to its
expected cost, and its number of timed rounds is that share over the round time its warm-up
measured, between a floor and a ceiling. A quiet machine runs every pair at the ceiling; a busy
one gets fewer rounds (the report says how many each ratio rests on) instead of a run that
never ends.

After each pair the rows so far go to results.json and results.md, after each config the plot
too, so an interrupted run leaves a readable report.
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
# round loads the cached Numba kernels and faults the buffers in; the slow providers (torch's
# for-loop and foreach, our plain-torch backend: 2-8x the anchor's time) get fewer rounds.
ROUNDS = {
    ("cpu", False): {"fast": (2, 6, 20), "slow": (1, 3, 8)},
    ("cpu", True): {"fast": (1, 3, 8), "slow": (1, 2, 4)},
    ("cuda", False): {"fast": (10, 30, 100), "slow": (3, 10, 30)},
    ("cuda", True): {"fast": (3, 10, 20), "slow": (1, 3, 6)},
}
# Seconds the whole run aims to take (--time-budget overrides). The CPU default leaves room
# under the 10 minutes the default run must keep to on a busy 2-core machine; a quiet one
# finishes in about half.
TIME_BUDGET_S = {("cpu", False): 420, ("cpu", True): 40, ("cuda", False): 600, ("cuda", True): 90}
# Seconds to build a subject, per parameter (normal_ init, the arena's copy): planning only.
_BUILD_S_PER_PARAM = 15e-9
ROOFLINE_NAMES = tuple(roofline.SUBJECTS)


class _Budget:
    """The time budget, shared out between pairs by their expected cost (their weight)."""

    def __init__(self, seconds, weights):
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.weights = dict(weights)  # pair -> expected seconds, for pairs not finished
        self.done_weight = 0.0

    def share(self, pair):
        """Seconds pair `pair` may take from now."""
        left = max(0.0, self.deadline - time.perf_counter())
        return left * self.weights[pair] / max(sum(self.weights.values()), 1e-9)

    def finish(self, pair):
        self.done_weight += self.weights.pop(pair)

    def left(self):
        return max(0.0, self.deadline - time.perf_counter())


class _Progress:
    """One bar over the whole run, in units of expected seconds, and an estimate of the time
    left: the pace so far (actual seconds per expected second) times the work left, and never
    more than the time budget left unless the budget is already spent."""

    def __init__(self, total, budget):
        self.budget = budget
        self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                        smoothing=0, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                                                "{elapsed} elapsed{postfix}")

    def describe(self, text):
        self.bar.set_description_str(text, refresh=False)

    def advance(self, weight):
        self.bar.update(weight)
        done, total = self.bar.n, self.bar.total
        elapsed = time.perf_counter() - self.budget.start
        if done <= 0:
            return
        estimate = elapsed * (total - done) / done
        if self.budget.left() > 0:
            estimate = min(estimate, self.budget.left() + 15)
        self.bar.set_postfix_str(f"about {_duration(estimate)} left", refresh=True)

    def write(self, line):
        self.bar.write(line, file=sys.stdout)

    def close(self):
        self.bar.close()


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _subject_footprint(name, device_type):
    if name in ROOFLINE_NAMES:
        return roofline.footprint(name, device_type)
    return providers_module.footprint(name)


def _build(name, config, device, seed):
    if name in ROOFLINE_NAMES:
        return roofline.build(name, config.n_params, device)
    return providers_module.build(name, config, device, seed)


def _round_seconds(name, config, device_type):
    """A-priori seconds of one round of the pair (anchor + `name`), for planning."""
    anchor = providers_module.iteration_seconds(ANCHOR, config, device_type)
    if name in ROOFLINE_NAMES:
        n = roofline.elements(config.n_params, device_type)
        per = 1.0e-9 if name == roofline.NoMathRoofline.name else 0.3e-9
        return anchor + n * per / (20 if device_type == "cuda" else 1)
    return anchor + providers_module.iteration_seconds(name, config, device_type)


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
        self.subjects = [p for p in self.providers if p != ANCHOR] + list(ROOFLINE_NAMES)
        self.config_names = list(args.configs or configs_module.CONFIG_NAMES)
        self.allocations = max(1, args.allocations)
        self.time_budget = (args.time_budget if args.time_budget is not None
                            else TIME_BUDGET_S[key])
        self.out = args.out
        self.meta = system.run_metadata(
            self.device, "step", quick=args.quick, allocations=self.allocations,
            providers=self.providers, configs=self.config_names, time_budget_s=self.time_budget,
            max_memory_gb=args.max_memory, seed=args.seed)
        self.rows = []
        self._advanced = {}  # pair -> progress already shown for it

    # -- planning ---------------------------------------------------------------------------

    def _rounds_for(self, name):
        cls = "slow" if (name not in ROOFLINE_NAMES
                         and providers_module.is_slow(name, self.device.type)) else "fast"
        warmup, fewest, most = self.rounds[cls]
        if self.args.warmup is not None:
            warmup = max(1, self.args.warmup)
        if self.args.iters is not None:
            fewest = most = max(1, self.args.iters)
        return warmup, fewest, most

    def _weights(self):
        """Expected seconds of every (config, subject) pair at its most rounds."""
        weights = {}
        for config_name in self.config_names:
            config = configs_module.sizes(config_name, quick=self.args.quick,
                                          device_type=self.device.type)[0]
            anchor_build = config.n_params * _BUILD_S_PER_PARAM
            for name in self.subjects:
                warmup, _, most = self._rounds_for(name)
                seconds = _round_seconds(name, config, self.device.type) * (warmup + most)
                build = config.n_params * _BUILD_S_PER_PARAM + anchor_build / len(self.subjects)
                weights[(config_name, name)] = (seconds + build) * self.allocations
        return weights

    # -- running ----------------------------------------------------------------------------

    def run(self):
        weights = self._weights()
        self.budget = _Budget(self.time_budget, weights)
        print(f"device: {self.meta['device_name']} ({self.device.type}); {self.meta['hardware']}")
        print(f"load average now: {self.meta['load_average_at_start']} "
              f"({self.meta['cpu_count']} cores)")
        print(f"providers: {', '.join(self.providers)}, each timed against {ANCHOR} in rounds "
              "of its own; plus the no-math roofline and copy_")
        ceiling = (f"{self.args.max_memory:g} GB peak" if self.args.max_memory
                   else "none but the memory available")
        print(f"time budget {_duration(self.time_budget)} (at full rounds the development "
              f"machine needs about {_duration(sum(weights.values()))}); memory ceiling: "
              f"{ceiling}")
        print(f"results folder: {self.out}")
        self.progress = _Progress(sum(weights.values()), self.budget)
        try:
            for config_name in self.config_names:
                self._run_config(config_name)
        except KeyboardInterrupt:
            self.progress.close()
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
        if not self.rows:
            return []
        return report.write(self.rows, self.out, "step", plot=plot)

    def _skip_pairs(self, config_name, names):
        for name in names:
            weight = self.budget.weights.get((config_name, name), 0.0)
            self.budget.finish((config_name, name))
            self.progress.advance(weight)

    def _run_config(self, config_name):
        sizes = configs_module.sizes(config_name, quick=self.args.quick,
                                     device_type=self.device.type)
        memory.release(self.device)
        budget = memory.budget(self.device, self.args.max_memory)
        plan = memory.plan(sizes, providers_module.footprint(ANCHOR),
                           [_subject_footprint(n, self.device.type) for n in self.subjects],
                           budget)
        where = results.config_fields(config_name, sizes[0].detail, sizes[0].n_params,
                                      sizes[0].n_tensors)
        if plan.config is None:
            self.progress.write(f"{config_name}: {plan.reason}")
            for name in [ANCHOR] + self.subjects:
                self.rows.append(results.row(self.meta, where, name, "skipped", None, None,
                                             kind=self._kind(name), reason=plan.reason))
            self._skip_pairs(config_name, self.subjects)
            self._write(plot=True)
            return
        config = plan.config
        note = plan.reason
        if note:
            self.progress.write(f"{config_name}: {note}")
        detail = config.detail + (f" ({note})" if note else "")
        where = results.config_fields(config_name, detail, config.n_params, config.n_tensors)
        extra = dict(estimated_peak_GB=round(plan.estimate / memory.GB, 2),
                     load_average_at_config_start=system.load_average())
        self.progress.describe(config_name)

        pooled = {}  # subject -> {metric: [...]}, the anchor's under (ANCHOR, subject)
        peaks, huge, skipped, measured = {}, {}, {}, []
        for allocation in range(self.allocations):
            last = allocation == self.allocations - 1
            try:
                anchor = _build(ANCHOR, config, self.device, self.args.seed)
            except (ValueError, RuntimeError, ImportError, MemoryError) as error:
                reason = f"{ANCHOR} could not be built: {_first_line(error)}"
                self.progress.write(f"{config_name}: skipped: {reason}")
                for name in [ANCHOR] + self.subjects:
                    self.rows.append(results.row(self.meta, where, name, "skipped", None, None,
                                                 kind=self._kind(name), reason=reason))
                self._skip_pairs(config_name, [n for n in self.subjects
                                               if (config_name, n) in self.budget.weights])
                memory.release(self.device)
                self._write(plot=True)
                return
            for name in self.subjects:
                if name in skipped:
                    continue
                pair = (config_name, name)
                outcome = self._run_pair(pair, config, anchor, allocation)
                if isinstance(outcome, str):
                    skipped[name] = outcome
                    self.rows.append(results.row(self.meta, where, name, "skipped", None, None,
                                                 kind=self._kind(name), reason=outcome))
                    self.progress.write(f"  {config_name:<11} {name:<36} skipped: {outcome}")
                    self._finish_pair(pair)
                    self._write()
                    continue
                else:
                    samples, anchor_samples, peak, huge_fraction = outcome
                    timing.merge(pooled, {name: samples, (ANCHOR, name): anchor_samples})
                    peaks[name] = max(peaks.get(name, 0.0), peak or 0.0)
                    if huge_fraction is not None:
                        huge[name] = huge_fraction
                    if name not in measured:
                        measured.append(name)
                if last:
                    self._subject_rows(where, name, pooled, peaks, huge, extra)
                    self._finish_pair(pair)
                    self._write()
            if self.device.type == "cpu":
                huge[ANCHOR] = system.huge_page_fraction(_state_tensors(anchor))
            del anchor
            memory.release(self.device)
        self._anchor_rows(where, pooled, measured, huge, extra)
        self._roofline_rows(config_name, measured)
        paths = self._write(plot=True)
        self.progress.write(f"{config_name}: done; report so far in {paths[1] if paths else self.out}")

    def _finish_pair(self, pair):
        weight = self.budget.weights.get(pair, 0.0)
        self.budget.finish(pair)
        self.progress.advance(max(0.0, weight - self._advanced.pop(pair, 0.0)))

    def _run_pair(self, pair, config, anchor, allocation):
        """Time `pair`'s subject against the anchor. Returns (subject samples, anchor samples,
        peak bytes, huge-page fraction), or the reason it could not run."""
        name = pair[1]
        pair_start = time.perf_counter()
        try:
            subject = _build(name, config, self.device, self.args.seed)
        except (ValueError, RuntimeError, ImportError, MemoryError) as error:
            memory.release(self.device)
            return _first_line(error)
        memory.reset_peak_rss()
        warmup, fewest, most = self._rounds_for(name)
        subjects = [timing.Subject(ANCHOR, lambda _: timing.iteration(anchor, self.device)),
                    timing.Subject(name, lambda _: timing.iteration(subject, self.device))]
        weight = self.budget.weights[pair] / self.allocations
        per_round = weight / (warmup + most)

        def on_round(_index, _seconds):
            self._advanced[pair] = self._advanced.get(pair, 0.0) + per_round
            self.progress.advance(per_round)

        try:
            started = time.perf_counter()
            timing.interleave(subjects, warmup=warmup, iters=0, on_round=on_round)
            round_s = (time.perf_counter() - started) / warmup
            share = self.budget.share(pair) / (self.allocations - allocation)
            share -= time.perf_counter() - pair_start
            iters = int(min(most, max(fewest, share // max(round_s, 1e-9))))
            samples = timing.interleave(subjects, warmup=0, iters=iters, first_round=warmup,
                                        on_round=on_round)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            del subject, subjects
            memory.release(self.device)
            return f"failed while timing: {_first_line(error)}"
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else memory.peak_rss_bytes())
        huge_fraction = (system.huge_page_fraction(_state_tensors(subject))
                         if self.device.type == "cpu" else None)
        del subject, subjects
        memory.release(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return samples[name], samples[ANCHOR], peak, huge_fraction

    # -- rows -------------------------------------------------------------------------------

    def _kind(self, name):
        return roofline.SUBJECTS[name].kind if name in ROOFLINE_NAMES else "optimizer"

    def _bytes_per_step(self, name, config_n):
        if name in ROOFLINE_NAMES:
            n = roofline.elements(config_n, self.device.type)
            per = (roofline.ADAM_BYTES_PER_ELEMENT if name == roofline.NoMathRoofline.name
                   else roofline.COPY_BYTES_PER_ELEMENT)
            return per * n, n
        return providers_module.parse(name)[3] * config_n, config_n

    def _subject_rows(self, where, name, pooled, peaks, huge, extra):
        kind = self._kind(name)
        step, anchor_step = pooled[name]["step"], pooled[(ANCHOR, name)]["step"]
        stats, anchor_stats = timing.summarize(step), timing.summarize(anchor_step)
        bytes_per_step, elements = self._bytes_per_step(name, where["n_params"])
        add = lambda *a, **k: self.rows.append(results.row(self.meta, where, name, *a, kind=kind,  # noqa: E731
                                                           **extra, **k))
        self.rows.extend(results.time_rows(self.meta, where, name, "step", step, kind=kind,
                                           **extra))
        if kind == "optimizer":
            self.rows.extend(results.time_rows(self.meta, where, name, "iter",
                                               pooled[name]["iter"], kind=kind, **extra))
        gbps = bytes_per_step / stats["median"] / 1e6
        add("GBps", gbps, "GB/s", bytes_per_step=bytes_per_step, elements=elements)
        speedup = anchor_stats["median"] / stats["median"]
        add("speedup_vs_torch_fused", speedup, "x", samples=stats["n"])
        add("torch_fused_step_ms_in_pair", anchor_stats["median"], "ms",
            samples=anchor_stats["n"])
        if peaks.get(name):
            add("peak_memory_GB", peaks[name] / memory.GB, "GB")
        if huge.get(name) is not None:
            add("huge_page_fraction", huge[name], "fraction")
        line = (f"  {where['config']:<11} {name:<36} {report.fmt_ms(stats['median']):>9} ms"
                f"  {gbps:6.1f} GB/s")
        if kind != "copy":
            line += (f"  {speedup:5.2f}x {ANCHOR} ({report.fmt_ms(anchor_stats['median'])} ms "
                     f"in the same {stats['n']} rounds)")
        if peaks.get(name):
            line += f"  peak {peaks[name] / memory.GB:.1f} GB"
        self.progress.write(line)

    def _anchor_rows(self, where, pooled, measured, huge, extra):
        """The anchor's own rows: its samples from every pair it was in, pooled."""
        if not measured:
            return
        step = [s for name in measured for s in pooled[(ANCHOR, name)]["step"]]
        iters = [s for name in measured for s in pooled[(ANCHOR, name)]["iter"]]
        stats = timing.summarize(step)
        self.rows.extend(results.time_rows(self.meta, where, ANCHOR, "step", step, **extra))
        self.rows.extend(results.time_rows(self.meta, where, ANCHOR, "iter", iters, **extra))
        bytes_per_step, _ = self._bytes_per_step(ANCHOR, where["n_params"])
        gbps = bytes_per_step / stats["median"] / 1e6
        add = lambda *a, **k: self.rows.append(results.row(self.meta, where, ANCHOR, *a, **extra, **k))  # noqa: E731
        add("GBps", gbps, "GB/s", bytes_per_step=bytes_per_step)
        add("speedup_vs_torch_fused", 1.0, "x")
        if huge.get(ANCHOR) is not None:
            add("huge_page_fraction", huge[ANCHOR], "fraction")
        self.progress.write(f"  {where['config']:<11} {ANCHOR:<36} "
                            f"{report.fmt_ms(stats['median']):>9} ms  {gbps:6.1f} GB/s  "
                            f"(its {stats['n']} rounds in all {len(measured)} pairs)")

    def _roofline_rows(self, config_name, measured):
        """Each optimizer's share of the roofline's bandwidth: (bytes_S / t_S) / (bytes_R / t_R),
        with t_R / t_S chained through the anchor (each link from one pair's shared rounds)."""
        table = results.Table([r for r in self.rows if r["config"] == config_name])
        roof = roofline.NoMathRoofline.name
        roof_speedup = table.get(config_name, roof, "speedup_vs_torch_fused")
        roof_bytes = table.row(config_name, roof, "GBps")
        if not roof_speedup or roof_bytes is None:
            return
        for name in [ANCHOR] + measured:
            if self._kind(name) != "optimizer" and name != roof:
                continue
            speedup = table.get(config_name, name, "speedup_vs_torch_fused")
            gbps = table.row(config_name, name, "GBps")
            if speedup is None or gbps is None:
                continue
            fraction = (gbps["bytes_per_step"] * speedup) / (roof_bytes["bytes_per_step"]
                                                             * roof_speedup)
            base = {k: gbps[k] for k in ("config", "config_detail", "n_params", "n_tensors")}
            self.rows.append(results.row(self.meta, base, name, "roofline_fraction", fraction,
                                         "fraction", kind=self._kind(name)))


def _state_tensors(subject):
    return subject.state_tensors() if hasattr(subject, "state_tensors") else []


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run(args):
    return StepBenchmark(args).run()
