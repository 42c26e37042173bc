"""The step benchmark (`python -m bench`): for each config, build every provider plus the
roofline subjects, time them interleaved, turn the samples into rows, free everything before the
next config (so peak memory is one config's worth), then write results.json/.md/.png.
"""
import gc

import torch
from tqdm import tqdm

from bench import configs as configs_module
from bench import providers as providers_module
from bench import report, roofline, system, timing

# (warmup, timed) rounds. CPU rounds of GPT-2-small take seconds each; GPU rounds milliseconds.
# One warm-up round loads the cached Numba kernels and faults the buffers in; quick mode keeps
# to that so that it stays inside a minute on a 2-core CPU.
ROUNDS = {("cpu", False): (3, 20), ("cpu", True): (1, 10),
          ("cuda", False): (10, 100), ("cuda", True): (3, 20)}


def _build_subjects(config, provider_names, device, seed):
    subjects, skipped = [], []
    for name in provider_names:
        try:
            subjects.append(providers_module.build(name, config, device, seed))
        except (ValueError, RuntimeError, ImportError) as error:  # OOM is a RuntimeError
            skipped.append((name, f"{type(error).__name__}: {str(error).splitlines()[0]}"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    subjects += roofline.roofline_subjects(config.n_params, device)
    return subjects, skipped


def _measure_allocations(config, provider_names, device, seed, allocations, warmup, iters,
                         progress):
    """Build every subject and time it, `allocations` times over, pooling the samples.

    Each build allocates every subject's buffers anew: on a machine where the bandwidth a buffer
    gets depends on where its memory landed (this project's CPU VM: 30 ms or 50 ms for the same
    kernel on the same sizes, process to process), one allocation per subject turns that luck
    into a fake speedup, and a median over several allocations does not."""
    pooled = {}
    for allocation in range(allocations):
        subjects, skipped = _build_subjects(config, provider_names, device, seed)
        for name, reason in skipped:
            tqdm.write(f"  {config.name}: skipped {name}: {reason}")
            progress.total -= warmup + iters
        samples = timing.measure(subjects, device, warmup=warmup, iters=iters, progress=progress)
        for name, kinds in samples.items():
            for kind, values in kinds.items():
                pooled.setdefault(name, {}).setdefault(kind, []).extend(values)
        if allocation + 1 < allocations:
            del subjects
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return subjects, skipped, pooled


def run(args):
    device = torch.device(args.device)
    warmup, iters = ROUNDS[(device.type, args.quick)]
    warmup = max(1, args.warmup if args.warmup is not None else warmup)
    iters = args.iters if args.iters is not None else iters
    provider_names = args.providers or providers_module.default_providers(device.type)
    config_list = configs_module.get_configs(args.configs, quick=args.quick,
                                             device_type=device.type)
    meta = report.run_metadata(device, args.quick, system, args.allocations)
    print(f"device: {meta['device_name']} ({device.type}); {meta['hardware']}")
    print(f"providers: {', '.join(provider_names)}; {warmup} warm-up + {iters} timed rounds"
          + (f" in each of {args.allocations} allocations" if args.allocations > 1 else "")
          + (" (quick mode: scaled-down configs)" if args.quick else ""))

    rows = []
    allocations = max(1, args.allocations)
    per_round = len(provider_names) + 2  # + roofline and copy
    progress = tqdm(total=len(config_list) * allocations * (warmup + iters) * per_round,
                    unit="iter", dynamic_ncols=True)
    for config in config_list:
        progress.set_description(config.name)
        try:
            subjects, skipped, samples = _measure_allocations(
                config, provider_names, device, args.seed, allocations, warmup, iters, progress)
        except torch.OutOfMemoryError as error:
            # A config too big for this device must not cost the results of the others.
            reason = f"OutOfMemoryError while timing: {str(error).splitlines()[0]}"
            tqdm.write(f"  {config.name}: {reason}")
            skipped += [(s.name, reason) for s in subjects]
            rows += report.config_rows(config, [], {}, meta, None, skipped)
        else:
            stats = {name: {k: timing.summarize(v) for k, v in s.items()}
                     for name, s in samples.items()}
            huge_pages = None
            if device.type == "cpu":
                huge_pages = {s.name: system.huge_page_fraction(s.state_tensors())
                              for s in subjects}
            rows += report.config_rows(config, subjects, stats, meta, huge_pages, skipped)
            del samples
        del subjects
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Rows so far, so that a run cut short (a time limit on the GPU machine) keeps them.
        report.write_rows(rows, args.out)
    progress.close()

    paths = report.write_all(rows, args.out)
    print(report.markdown(rows))
    for path in paths.values():
        print(f"wrote {path}")
    return rows
