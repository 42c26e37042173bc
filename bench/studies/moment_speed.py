"""Narrow moments against fp32 moments, interleaved in one process: the ratios the project aims
at (fp32-moment step time over the bf16-moment step's, at least 1.3 on GPT-2-small's shapes, and
over the 8-bit-moment step's) and how close each step is to its bytes' floor.

    python -m bench.studies.moment_speed [--configs gpt2-small large-16M] [--rounds 15]
                                 [--kernel-from REV] [--threads N] [--kernel-only]

Subjects, each round in a rotating order, medians over rounds (ratios from the rounds two
subjects shared):

- `fp32`, `bf16`, `int8`: `FusedAdam(params)`, with `state_dtype=torch.bfloat16` and with
  `state_dtype=torch.int8`, stepping fp32 params whose gradients are set once (28, 20 and
  16 + 1/16 B per element);
- `fp32@REV`, `bf16@REV` with `--kernel-from REV`: the same, with `kernels/numba_adam.py` as it
  was at git revision REV (loaded beside the current one), for a before/after in one process;
- `no-math 28B`, `no-math 20B`, `no-math 16B`: Numba kernels that move exactly the steps'
  bytes (fp32 p, g; fp32, 16-bit or 8-bit m, v) with one add and no Adam math, built as the
  step's kernel is (parallel chunks, a contiguous inner loop);
- `copy`: torch's copy_ of one fp32 buffer (8 B per element), the bandwidth reference;
- `sqrt+2div in L1`: the step's divider work alone (one sqrt and two divisions per element) on
  data in L1, on the same threads: the arithmetic floor, which no bit-identical rewrite lowers.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from bench.configs import GPT2_SMALL, gpt2_shapes
from fused_adam import FusedAdam
from fused_adam.kernels import cpu_threads
from fused_adam.kernels.numba_adam import CHUNK_ELEMENTS

CONFIGS = {
    "gpt2-small": gpt2_shapes(**GPT2_SMALL),
    "large-64K": ((1 << 16,),),  # in L2 (1.8 MB of fp32 step); use --kernel-only
    "large-16M": ((1 << 24,),),
    "large-256K": ((1 << 18,),),
}


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _move_chunk(param, grad, exp_avg, exp_avg_sq):
    """p, m, v <- p + g, v, m: every byte of an Adam step read and written, no Adam math."""
    for i in range(param.shape[0]):
        param[i] = param[i] + grad[i]
        m = exp_avg[i]
        exp_avg[i] = exp_avg_sq[i]
        exp_avg_sq[i] = m


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def _no_math(param, grad, exp_avg, exp_avg_sq):
    n = param.shape[0]
    for chunk in prange((n + CHUNK_ELEMENTS - 1) // CHUNK_ELEMENTS):
        start = chunk * CHUNK_ELEMENTS
        end = min(start + CHUNK_ELEMENTS, n)
        _move_chunk(param[start:end], grad[start:end], exp_avg[start:end], exp_avg_sq[start:end])


# The step's divider work alone, on cache-resident data: per element one sqrt and two IEEE
# divisions (sqrt(v) / bias_correction2_sqrt, then m / denominator), which no bit-identical
# rewrite avoids. Each thread repeats the update over a row of its own, in L1.
_L1_ELEMENTS = 2048


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"nsz", "contract"}, inline="always")
def _divide_block(param, exp_avg, exp_avg_sq, bias_correction2_sqrt, eps, step_size):
    for i in range(param.shape[0]):
        param[i] = param[i] - step_size * exp_avg[i] / (np.sqrt(exp_avg_sq[i])
                                                         / bias_correction2_sqrt + eps)


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"nsz", "contract"})
def _divider_part(repeats, params, exp_avgs, exp_avg_sqs, bias_correction2_sqrt, eps, step_size,
                  part, _next_part):
    """Part `part`'s share: `repeats` passes over row `part` of the buffers."""
    for _repeat in range(repeats):
        _divide_block(params[part], exp_avgs[part], exp_avg_sqs[part], bias_correction2_sqrt,
                      eps, step_size)


def _divider_step(n):
    """n elements' divider work, split between the threads the step would use (`cpu_threads`,
    the pool of the kernel's fork path)."""
    parts = cpu_threads.parts_for(n)
    buffers = [np.full((parts, _L1_ELEMENTS), value, dtype=np.float32)
               for value in (0.5, 1e-3, 1e-6)]
    arguments = (max(1, n // parts // _L1_ELEMENTS), *buffers, np.float32(0.3),
                 np.float32(1e-8), np.float32(1e-4))
    step = lambda: cpu_threads.run_parts(_divider_part, arguments,  # noqa: E731
                                         list(range(parts + 1)))
    step()
    return step


def _kernel_module_at(revision):
    """kernels/numba_adam.py as it was at `revision`, imported as a module of its own."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = subprocess.run(["git", "show", f"{revision}:kernels/numba_adam.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    sha = subprocess.run(["git", "rev-parse", "--short", revision], cwd=root, check=True,
                         capture_output=True, text=True).stdout.strip()
    # Numba's dispatcher takes two namedtuple classes of one name for one type: the old
    # module's tables would miss the compiled signature and take the slow path (typing every
    # argument, 0.4-1 ms a call). Names of their own keep them apart.
    for name in ("Segments", "Chunks", "Coefficients"):
        source = source.replace(f'namedtuple("{name}"', f'namedtuple("{name}_{sha}"')
    folder = os.path.join(tempfile.gettempdir(), "fused_adam_kernels_at")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"numba_adam_{sha}.py")
    if not os.path.exists(path) or open(path).read() != source:
        with open(path, "w") as file:
            file.write(source)
    name = f"fused_adam.kernels.numba_adam_{sha}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, sha


def _optimizer_step(shapes, state_dtype, kernels=None, kernel_only=False):
    """A step() of FusedAdam over fresh fp32 params of `shapes`, gradients set once; with
    `kernel_only`, the numba kernel's one-thread pass over the arena alone (`_step_on_this_thread`,
    steps not advanced), without the optimizer's per-step Python work."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
              for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    options = {} if state_dtype is None else dict(state_dtype=state_dtype)
    optimizer = FusedAdam(params, lr=1e-4, weight_decay=0.0, **options)
    optimizer.step()  # builds the arenas (and compiles)
    backends = optimizer._arenas._backends
    (key, (name, current)), = backends.items()
    kernels = kernels or current
    calls = []
    backends[key] = (name, _Recording(kernels, calls))
    optimizer.step()  # compiles `kernels`' specialization, and records its arguments
    backends[key] = (name, kernels)
    if not kernel_only:
        return lambda: optimizer.step()
    record, inputs = calls[-1]
    derived = kernels._derived_for(record)
    arguments = (*derived.arguments, inputs["grads"].numpy(), inputs["group_table"].numpy(),
                 1.0, 1.0, False, 0, derived.n_chunks)
    # The one-thread pass (`_adam_chunks` in revisions before #22 named it by what it does).
    one_thread_pass = getattr(kernels, "_step_on_this_thread", None) or kernels._adam_chunks
    one_thread_pass(*arguments)
    # The kernel reads the gradients by address: the closure keeps them (and the arena) alive.
    return lambda: one_thread_pass(*arguments) or optimizer


class _Recording:
    """A kernel module whose `adam_step` also records its arguments."""

    def __init__(self, kernels, calls):
        self._kernels, self._calls = kernels, calls

    def __getattr__(self, name):
        return getattr(self._kernels, name)

    def adam_step(self, record, **inputs):
        self._calls.append((record, inputs))
        return self._kernels.adam_step(record, **inputs)


def _no_math_step(n, state_dtype):
    moment = {None: np.float32, torch.bfloat16: np.uint16, torch.int8: np.int8}[state_dtype]
    arrays = [np.full(n, 0.5, dtype=np.float32), np.zeros(n, dtype=np.float32),
              np.full(n, 0x3F, dtype=moment), np.full(n, 0x3E, dtype=moment)]
    step = lambda: _no_math(*arrays)  # noqa: E731
    step()
    return step


def _copy_step(n):
    source, destination = torch.full((n,), 1.0), torch.full((n,), 2.0)
    step = lambda: destination.copy_(source)  # noqa: E731
    step()
    return step


def _repeated(step, times):
    return step if times == 1 else lambda: [step() for _ in range(times)]


def measure(shapes, rounds, kernels=None, label="", kernel_only=False):
    """{name: (step, bytes per step)} and {name: [seconds per step, one per round]}. A config
    of under 512K elements repeats each step within a round, so that a round lasts a few
    hundred microseconds: short enough that most rounds see no other process take the core."""
    n = sum(int(np.prod(shape)) for shape in shapes)
    repeat = max(1, (1 << 19) // n)
    subjects = {"fp32": (_optimizer_step(shapes, None, None, kernel_only), 28 * n),
                "bf16": (_optimizer_step(shapes, torch.bfloat16, None, kernel_only), 20 * n),
                "int8": (_optimizer_step(shapes, torch.int8, None, kernel_only),
                         (16 + 16 / 256) * n)}
    if kernels is not None:
        subjects[f"fp32@{label}"] = (_optimizer_step(shapes, None, kernels, kernel_only), 28 * n)
        subjects[f"bf16@{label}"] = (_optimizer_step(shapes, torch.bfloat16, kernels,
                                                     kernel_only), 20 * n)
    subjects["no-math 28B"] = (_no_math_step(n, None), 28 * n)
    subjects["no-math 20B"] = (_no_math_step(n, torch.bfloat16), 20 * n)
    subjects["no-math 16B"] = (_no_math_step(n, torch.int8), 16 * n)
    subjects["copy"] = (_copy_step(n), 8 * n)
    subjects["sqrt+2div in L1"] = (_divider_step(n), 0)
    names = list(subjects)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step = _repeated(subjects[name][0], repeat)
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) / repeat)
    return n, subjects, times


def ratio(times, slow, fast):
    """Median over rounds of times[slow] / times[fast]."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.studies.moment_speed",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["gpt2-small", "large-16M"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--kernel-from", metavar="REV",
                        help="also time kernels/numba_adam.py as it was at this git revision")
    parser.add_argument("--threads", type=int,
                        help="torch's and numba's thread count (default: torch's)")
    parser.add_argument("--kernel-only", action="store_true",
                        help="time the numba kernel's one-thread pass over the arena alone, "
                             "without the optimizer's per-step Python work (for configs in "
                             "cache); implies --threads 1 unless given")
    args = parser.parse_args(argv)
    if args.kernel_only and not args.threads:
        # The pass is one thread's; so is everything beside it. Idle OpenMP workers of a
        # parallel subject otherwise spin and wait for a core between the rounds, and in
        # cache that is most of what gets timed.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    kernels, label = (None, "")
    if args.kernel_from:
        kernels, label = _kernel_module_at(args.kernel_from)
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds, interleaved; "
          "median ms and GB/s at the subject's bytes (and the fastest round's: the least disturbed "
          "by other work), ratios = median of per-round ratios")
    for config in args.configs:
        n, subjects, times = measure(CONFIGS[config], args.rounds, kernels, label,
                                     args.kernel_only)
        print(f"\n{config}: {n:,} elements")
        for name, (_, nbytes) in subjects.items():
            median, best = statistics.median(times[name]), min(times[name])
            print(f"  {name:<16} {median * 1e3:9.2f} ms  {nbytes / median / 1e9:6.1f} GB/s"
                  f"   (fastest round {best * 1e3:9.2f} ms  {nbytes / best / 1e9:6.1f} GB/s)"
                  if nbytes else f"  {name:<16} {median * 1e3:9.2f} ms"
                  f"               (fastest round {best * 1e3:9.2f} ms)")
        pairs = [("fp32", "bf16"), ("fp32", "int8"), ("no-math 28B", "no-math 20B"),
                 ("no-math 28B", "no-math 16B"), ("bf16", "no-math 20B"),
                 ("int8", "no-math 16B"), ("fp32", "no-math 28B"), ("bf16", "sqrt+2div in L1"),
                 ("int8", "sqrt+2div in L1"), ("fp32", "sqrt+2div in L1")]
        if kernels is not None:
            pairs = [("fp32", "bf16"), (f"fp32@{label}", f"bf16@{label}"),
                     (f"bf16@{label}", "bf16"), (f"fp32@{label}", "fp32")] + pairs[1:]
        for slow, fast in pairs:
            print(f"  {slow} / {fast}: {ratio(times, slow, fast):.3f}"
                  f"   (fastest rounds: {min(times[slow]) / min(times[fast]):.3f})")


if __name__ == "__main__":
    main()
