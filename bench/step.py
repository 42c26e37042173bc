"""The step benchmark (`python -m bench`): for each config, torch-fused (the anchor) is built once
and every other subject (fused_adam's modes, the no-math roofline, torch's for-loop and foreach
Adam, our plain-torch backend, a copy) is timed against it in a pair, interleaved round by round,
then freed: every ratio comes from one pair's shared rounds, and two subjects alive at a time keep
the peak to one config's dearest pair (the memory present is checked before each config:
`bench.memory.plan`). In the pairs `--clip-providers` names, each round also times both
optimizers' clip+step. How it measures, and why: bench/RESULTS.md. Rounds and time:
`bench.schedule`; rows: `bench.step_rows`; the report, rewritten after each pair (the plot after
each config) so that an interrupted run leaves a readable one: `bench.report_step`.
"""
import time

import torch

from bench import configs as configs_module
from bench import memory, report, report_step, results, roofline, schedule, system, timing
from bench import providers as providers_module
from bench.providers import ANCHOR
from bench.schedule import HARD_LIMIT, duration
from bench.step_rows import ConfigRows, kind

# The name a subject's clip+step goes by in the round robin (its samples are its own again after).
CLIP_SUFFIX = " clip+step"


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class StepBenchmark:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.providers = list(args.providers or
                              providers_module.default_providers(self.device.type))
        if ANCHOR not in self.providers:
            self.providers.insert(0, ANCHOR)  # every ratio is to it: it is always measured
        self.subjects = schedule.run_order(
            [p for p in self.providers if p != ANCHOR] + list(roofline.SUBJECTS), self.device.type)
        self.config_names = list(args.configs or configs_module.CONFIG_NAMES)
        self.allocations = max(1, args.allocations)
        chosen = args.clip_providers
        if args.no_clip:
            chosen = []
        elif chosen is None:
            chosen = providers_module.default_clip_providers(self.device.type)
        elif "all" in chosen:
            chosen = list(self.providers)
        # The anchor's clip+step is timed in the pairs of the others that clip.
        self.clip_providers = [p for p in self.providers if p in chosen and p != ANCHOR]
        self.clip = bool(self.clip_providers)
        self.time_budget = (args.time_budget if args.time_budget is not None
                            else schedule.TIME_BUDGET_S[(self.device.type, bool(args.quick))])
        self.out = args.out
        self.meta = system.run_metadata(
            self.device, "step", quick=args.quick, allocations=self.allocations,
            providers=self.providers, configs=self.config_names, time_budget_s=self.time_budget,
            max_memory_gb=args.max_memory, seed=args.seed,
            clip_max_norm=providers_module.MAX_NORM if self.clip else None,
            clip_providers=self.clip_providers)
        self.rows = []  # of finished configs
        self.current = []  # of the config being measured, rebuilt after each pair

    def _rounds_for(self, name):
        return schedule.rounds_for(name, self.device.type, self.args.quick, self.args.warmup,
                                   self.args.iters)

    def run(self):
        weights, floors = schedule.expected_costs(
            self.config_names, self.subjects, device_type=self.device.type,
            quick=self.args.quick, allocations=self.allocations, rounds=self._rounds_for,
            clips=self.clip_providers)
        self.schedule = schedule.Schedule(self.time_budget, weights, floors)
        meta = self.meta
        print(f"device: {meta['device_name']} ({self.device.type}); {meta['hardware']}")
        print(f"load average now: {meta['load_average_at_start']} on {meta['cpu_count']} cores"
              + (" (busy: times will be noisy)" if (meta["load_average_at_start"] or 0)
                 > 0.5 * (meta["cpu_count"] or 1) else ""))
        print(f"providers: {', '.join(self.providers)}; each timed against {ANCHOR} in a "
              "pair of its own, and so are the no-math roofline and copy_")
        ceiling = (f"{self.args.max_memory:g} GB peak" if self.args.max_memory
                   else "none but the memory available")
        print(f"time budget {duration(self.time_budget)}, no pair starts after "
              f"{duration(self.time_budget * HARD_LIMIT)} (at full rounds a quiet development "
              f"machine needs about {duration(sum(weights.values()))}); memory ceiling: "
              f"{ceiling}")
        if self.clip:
            print(f"clip+step: the pairs of {', '.join(self.clip_providers)} also time a clip of "
                  f"the gradients' norm to {providers_module.MAX_NORM:g} then the step, against "
                  f"{ANCHOR}'s (--clip-providers all: every optimizer's; --no-clip: none)")
        print(f"results folder: {self.out}")
        try:
            for config_name in self.config_names:
                self._run_config(config_name)
        except KeyboardInterrupt:
            self.schedule.close()
            self.rows += self.current
            self._write(plot=True)
            print(f"\ninterrupted: the report so far is in {self.out}")
            raise
        self.schedule.close()
        paths = self._write(plot=True)
        print()
        print(report_step.headline_markdown(self.rows))
        for path in paths:
            print(f"wrote {path}")
        print(f"results folder: {self.out}")
        return self.rows

    def _write(self, plot=False):
        rows = self.rows + self.current
        if not rows:
            return []
        return report.write(rows, self.out, "step", plot=plot)

    def _skip(self, where, names, reason, line):
        """Rows saying why `names` were not measured; their pairs count as done."""
        self.schedule.write(line)
        for name in names:
            self.current.append(results.row(self.meta, where, name, "skipped", None, None,
                                            kind=kind(name), reason=reason))
            self.schedule.finish((where["config"], name))

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
            self.schedule.write(f"{config_name}: {plan.reason}")
        detail = config.detail + (f" ({plan.reason})" if plan.reason else "")
        where = results.config_fields(config_name, detail, config.n_params, config.n_tensors)
        self.config_rows = ConfigRows(self.meta, where, dict(
            estimated_peak_GB=round(plan.estimate / memory.GB, 2),
            load_average_at_config_start=system.load_average()), self.device.type)
        self.schedule.describe(config_name)
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
                    self.schedule.finish(pair)  # keep what the earlier allocations measured
                    continue
                if self.schedule.over_limit():
                    reason = (f"not run: the run reached its time limit "
                              f"({duration(self.time_budget * HARD_LIMIT)}); run it alone with "
                              f"--configs {config_name} --providers {name}")
                    skipped.add(name)
                    self._skip(where, [name], reason, f"  {config_name:<11} {name:<36} {reason}")
                    self._update_rows()
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
                    self._update_rows()
                    if last:
                        self.schedule.finish(pair)
                        self.schedule.write(report_step.pair_line(self.current, name,
                                                                  len(self.measured)))
                self._write()
            if self.device.type == "cpu":
                self.huge[ANCHOR] = system.huge_page_fraction(anchor.state_tensors())
            del anchor
            memory.release(self.device)
        self._update_rows()
        if self.measured:
            self.schedule.write(report_step.pair_line(self.current, ANCHOR, len(self.measured)))
        self._end_config()

    def _end_config(self):
        self.rows += self.current
        self.current = []
        paths = self._write(plot=True)
        name = self.rows[-1]["config"] if self.rows else "?"
        self.schedule.write(f"{name}: done; report so far in "
                            f"{paths[1] if len(paths) > 1 else self.out}")

    def _footprint(self, name):
        if name in roofline.SUBJECTS:
            return roofline.footprint(name, self.device.type)
        return providers_module.footprint(name, clip=(name in self.clip_providers))

    def _build(self, name, config):
        if name in roofline.SUBJECTS:
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
        if name in self.clip_providers:
            max_norm = providers_module.MAX_NORM
            subjects += [
                timing.Subject(ANCHOR + CLIP_SUFFIX, lambda _: timing.iteration(
                    anchor, self.device, clip=max_norm)),
                timing.Subject(name + CLIP_SUFFIX, lambda _: timing.iteration(
                    subject, self.device, clip=max_norm))]
        per_round = self.schedule.weights[pair] / self.allocations / (warmup + most)
        on_round = lambda _: self.schedule.advance(pair, per_round)  # noqa: E731
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

    def _update_rows(self):
        """The current config's rows from its samples so far (the anchor's pooled over the pairs
        done), replacing the last version, so that the report is whole after every pair."""
        skipped = [r for r in self.current if r["metric"] == "skipped"]
        self.current = self.config_rows.measured(self.samples, self.measured, self.peaks,
                                                 self.huge) + skipped


def run(args):
    return StepBenchmark(args).run()
