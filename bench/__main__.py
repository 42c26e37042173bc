"""`python -m bench`: the command line.

    python -m bench [--quick] [--out DIR] [--configs ...] [--providers ...] ...   the step benchmark
    python -m bench train [--iters N] [--ddp] ...       the char GPT, FusedAdamW against AdamW
    python -m bench accuracy [--variants ...] ...       the char GPT once per optimizer variant
    python -m bench report DIR                          redraw every table and plot in DIR
    python -m bench gpu [--out DIR]                     on a GPU machine: everything, one folder
    python -m bench breakdown | grad-layout ...         two studies (bench/studies/)

`python -m bench COMMAND --help` for the options. Without a subcommand it runs the step benchmark
on the best device present (CUDA if there is one). Each run writes into a folder of its own, by
default `bench/results/<device>-<YYYY-MM-DD-HHMMSS>-<git sha>/`, so that no run overwrites
another and a GPU run's files can be copied back and committed as they are; `--out DIR` writes
into DIR.
"""
import argparse
import importlib
import signal
import sys
from pathlib import Path

COMMANDS = ("step", "train", "accuracy", "grad-layout", "breakdown", "report", "gpu")


def _best_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_out(device, suffix=""):
    import torch

    from bench import system
    return system.new_results_dir(torch.device(device), suffix)


def _common(parser):
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: a new one, bench/results/<device>-"
                             "<date>-<time>-<git sha>/)")
    parser.add_argument("--seed", type=int, default=0)


def _step_parser():
    from bench.configs import CONFIG_NAMES
    from bench.memory import DEFAULT_MAX_GB
    from bench.schedule import HARD_LIMIT, TIME_BUDGET_S
    from bench.providers import ALL_PROVIDERS
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time optimizer.step() of torch's Adam implementations and fused_adam on "
                    "built-in configs, against a roofline measured in the same run. Other "
                    f"commands: {', '.join(c for c in COMMANDS if c != 'step')} "
                    "(python -m bench COMMAND --help).")
    _common(parser)
    parser.add_argument("--quick", action="store_true",
                        help="scaled-down configs and few rounds (about a minute on 2 CPU cores)")
    parser.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=None,
                        help="default: all")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=None,
                        help="default: torch's three, fused_adam-numba (CPU) or "
                             "fused_adam-triton (CUDA) in fp32 and its compressed modes, and "
                             "fused_adam-torch")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per pair")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed rounds per pair, fixed (default: as many as the time "
                             "budget allows, between a floor and a ceiling)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="what the whole run aims to take (default: "
                             f"{TIME_BUDGET_S[('cpu', False)]:g} on CPU, "
                             f"{TIME_BUDGET_S[('cpu', True)]:g} with --quick, "
                             f"{TIME_BUDGET_S[('cuda', False)]:g} on CUDA); a busy machine gets "
                             f"fewer rounds, and no pair starts after {HARD_LIMIT:g}x this")
    parser.add_argument("--max-memory", type=float, default=DEFAULT_MAX_GB, metavar="GB",
                        help="ceiling on peak memory (CPU: the process's resident memory; "
                             "CUDA: allocated); a config that would need more is scaled down "
                             "or skipped, and so is one that needs more than 80%% of what is "
                             f"available now (default {DEFAULT_MAX_GB:g})")
    parser.add_argument("--allocations", type=int, default=1,
                        help="build every pair's buffers this many times and pool the "
                             "samples: a median over where memory landed (default 1)")
    parser.add_argument("--clip-providers", nargs="+", choices=ALL_PROVIDERS + ("all",),
                        default=None,
                        help="whose pairs also time clip+step (the gradients' norm clipped to "
                             "1.0, then the step: torch's clip_grad_norm_(foreach=True) for "
                             "torch's optimizers, FusedAdam.clip_grad_norm for ours), against "
                             "torch-fused's clip+step in the same rounds (default: "
                             "torch-foreach and fused_adam-numba (CPU) or fused_adam-triton "
                             "(CUDA); all: every optimizer)")
    parser.add_argument("--no-clip", action="store_true", help="time the step only")
    return parser


def _char_gpt_parser(command, description):
    """The options `train` and `accuracy` share: they train the same char GPT."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {command}", description=description)
    _common(parser)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X",
                        help="clip the gradients' total norm to X before each step (default "
                             "1.0): FusedAdamW with its fused clip_grad_norm, torch's optimizers "
                             "with torch.nn.utils.clip_grad_norm_(foreach=True); 0: no clipping")
    return parser


def _train_parser():
    from bench.train import DTYPES
    parser = _char_gpt_parser(
        "train", "Train a small character GPT on Python's own standard-library source, once with "
                 "fused_adam.FusedAdamW and once with torch.optim.AdamW (same seed, interleaved); "
                 "report per-phase times and both loss curves.")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="fused_adam's parameter dtype (the torch run stays fp32)")
    parser.add_argument("--master-weights", action="store_true",
                        help="fp32 master copy of bf16 parameters (FusedAdamW(master_weights=True))")
    parser.add_argument("--state-dtype", choices=("fp32", "bf16", "int8"), default=None,
                        help="fused_adam's moments (FusedAdamW(state_dtype=...)); int8: 8-bit "
                             "moments with an absmax per 256 values (default: as torch)")
    parser.add_argument("--ddp", action="store_true",
                        help="DistributedDataParallel, each rank on its own batches (launch with "
                             "torchrun --nproc_per_node=N -m bench train --ddp); rank 0 writes "
                             "train_ddp.*")
    parser.add_argument("--bucket-view", action="store_true",
                        help="with --ddp: gradient_as_bucket_view=True (grads are views of DDP's "
                             "buckets, which FusedAdamW reads in place)")
    return parser


def _accuracy_parser():
    from bench.accuracy import FINAL_WINDOW, TOLERANCE, VARIANTS
    parser = _char_gpt_parser(
        "accuracy", "Train the char GPT of `bench train` once per optimizer variant (same seed, "
                    "same batches, gradients clipped) and compare every variant's final loss "
                    f"(mean of the last {FINAL_WINDOW} iterations) with fp32 torch AdamW's, "
                    "beside its optimizer-state bytes per parameter and step time.")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, metavar="F",
                        help="PASS when |final loss / torch AdamW fp32's - 1| <= F "
                             f"(default {TOLERANCE:g})")
    parser.add_argument("--variants", nargs="+", metavar="NAME", default=None,
                        help="default: all; torch-fp32, the reference, always runs. "
                             + "; ".join(f"{v.name}: {v.label}" for v in VARIANTS))
    return parser


def _check_variants(parser, args):
    from bench.accuracy import VARIANT_NAMES
    unknown = [name for name in args.variants or () if name not in VARIANT_NAMES]
    if unknown:
        parser.error(f"unknown variant{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(map(repr, unknown))}; choose from {', '.join(VARIANT_NAMES)}")
    return args


def _study_parser(command, study):
    parser = argparse.ArgumentParser(prog=f"python -m bench {command}",
                                     description=study.DESCRIPTION)
    _common(parser)
    study.add_arguments(parser)
    return parser


def _resolve(args, suffix=""):
    if args.device is None:
        args.device = _best_device()
    elif args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
    if args.out is None:
        args.out = _default_out(args.device, suffix)
    return args


def _gpu(argv):
    """The GPU machine's one command: the GPU tests (a failure is recorded, not fatal), then the
    step benchmark, the step breakdown on 800 small tensors, the gradient layouts and the
    training comparison, each in its own process, all writing into one folder that can be
    copied back and committed. Needs no network."""
    import subprocess

    import torch

    from bench.system import REPO_ROOT
    parser = argparse.ArgumentParser(prog="python -m bench gpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="quick benchmark and a short run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("python -m bench gpu: no CUDA device is available")
    out = args.out or _default_out("cuda", "gpu")
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if args.quick else []
    bench = [sys.executable, "-m", "bench"]
    steps = [
        ("tests", [sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-p", "bench.gpu_tests",
                   f"--junitxml={out / 'tests.xml'}"]),
        ("bench", bench + ["--device", "cuda", "--out", str(out), *quick]),
        ("breakdown", bench + ["breakdown", "--device", "cuda", "--out", str(out)]),
        ("grad_layout", bench + ["grad-layout", "--device", "cuda", "--out", str(out), *quick]),
        ("train", bench + ["train", "--device", "cuda", "--out", str(out)]
         + (["--iters", "50"] if args.quick else [])),
    ]
    failed = []
    for name, command in steps:
        print(f"== {name}: {' '.join(command)}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, cwd=REPO_ROOT)
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
            if process.wait() != 0:
                failed.append(name)
    print(f"results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "step"
    if command == "gpu":
        return _gpu(argv)
    if command == "report":
        if len(argv) != 1:
            sys.exit("usage: python -m bench report RESULTS_DIR")
        from bench import report
        for path in report.redraw(argv[0]):
            print(f"wrote {path}")
        return
    if command == "step":
        args = _step_parser().parse_args(argv)
        # Must precede any import of triton (interpreter mode is chosen at import).
        from bench.providers import default_providers, prepare_environment
        _resolve(args, "quick" if args.quick else "")
        prepare_environment(args.providers or default_providers(args.device), args.device)
        from bench import step
        # A `kill` (a time limit on a shared machine) stops the run the way Ctrl-C does: with
        # the report so far written.
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        try:
            return step.run(args)
        finally:
            signal.signal(signal.SIGTERM, previous)
    elif command == "accuracy":
        parser = _accuracy_parser()
        args = _resolve(_check_variants(parser, parser.parse_args(argv)), "accuracy")
        from bench import accuracy
        return accuracy.run(args)
    elif command == "train":
        args = _resolve(_train_parser().parse_args(argv), "train")
        from bench import train
        return train.run(args)
    else:  # a study
        study = importlib.import_module(f"bench.studies.{command.replace('-', '_')}")
        return study.run(_resolve(_study_parser(command, study).parse_args(argv), command))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
