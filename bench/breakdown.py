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
import torch

from bench import configs, memory, providers, report, results, roofline, system
from bench.timing import Subject, interleave, merge, timed

ROUNDS = (5, 30)  # (warm-up, timed)
ANCHOR = providers.ANCHOR
OURS = "FusedAdam"  # the provider name its rows carry (the backend is in the settings)


# --- The library seam this command times. -------------------------------------------------------
# FusedAdam's step is timed here as its two phases through private methods,
# `FusedAdam._gather_grads()` (the visit) and `FusedAdam._launch()` (the kernels and new state).
# Those methods are going away (issue 13: the benchmark must time the optimizer through a seam
# the library owns); this function is the one place that knows them, to be switched to the new
# seam. It must update exactly as `step()` does (tests/test_bench_breakdown.py checks that).

@torch.no_grad()
def split_step(optimizer, device):
    """One step of `optimizer` as its phases, each timed alone: {"visit": s, "visit_warm": s,
    "launch": s}. The visit runs twice (the second time warm); the launch uses the second."""
    addresses, visit = timed(optimizer._gather_grads, device)
    addresses, visit_warm = timed(optimizer._gather_grads, device)
    _, launch = timed(lambda: optimizer._launch(addresses), device)
    return {"visit": visit, "visit_warm": visit_warm, "launch": launch}
# -------------------------------------------------------------------------------------------------


def _subjects(config, device, seed):
    """The interleaved subjects: torch-fused's step, the roofline's, FusedAdam's whole step, and
    FusedAdam's step split (once counting only the visit and its warm repeat, once only the
    launch: whichever part runs first brings the other's metadata into cache, so each part gets
    rounds of its own, each right after a backward)."""
    torch_fused = providers.build(ANCHOR, config, device, seed)
    ours = providers.build(providers.COMPILED[device.type], config, device, seed)
    no_math = roofline.NoMathRoofline(config.n_params, device)

    def iteration(subject, measure):
        def run(_round):
            subject.forward_backward()
            seconds = measure()
            subject.zero_grad()
            return seconds
        return run

    def visit():
        seconds = split_step(ours.optimizer, device)
        del seconds["launch"]
        return seconds

    subjects = [
        Subject(ANCHOR, iteration(torch_fused, lambda: {"step": timed(torch_fused.step,
                                                                        device)[1]})),
        Subject(roofline.NoMathRoofline.name,
                iteration(no_math, lambda: {"step": timed(no_math.step, device)[1]})),
        Subject(OURS, iteration(ours, lambda: {"step": timed(ours.step, device)[1]})),
        Subject(f"{OURS} visit", iteration(ours, visit)),
        Subject(f"{OURS} launch", iteration(ours, lambda: {
            "launch": split_step(ours.optimizer, device)["launch"]})),
    ]
    return subjects, ours


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
            assert ours.optimizer.grad_copies == 0, "the ordinary loop copied a gradient"
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
