"""`python -m bench grad-layout`: where should gradients live? The study behind reading them in
place (bench/RESULTS.md, "Where gradients should live").

A flat gradient buffer lets a kernel stream gradients, but it changes what autograd does: with
`p.grad` already a tensor, backward *adds into* it (read 4 B, read 4 B, write 4 B per element)
instead of handing over a fresh one (write 4 B), and the buffer must be zeroed every iteration
(write 4 B). So the step is the wrong thing to time; this times the whole iteration, per phase:

  torch-fused                   torch.optim.Adam(fused=True), zero_grad(set_to_none=True)
  fused_adam grads-in-place     FusedAdam reading each grad where autograd left it (the default)
  fused_adam flat-grads         FusedAdam, every p.grad a view of one flat buffer (segments
                                aligned like the arena's), zeroed by one `zero_()` per iteration,
                                backward accumulating into the views

on real models: GPT-2 (its 148 tensors; a tiny batch keeps the matmuls small next to the
gradient traffic) and 400 Linear(64, 64) layers (800 small tensors). Variants run interleaved.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import configs, memory, report, results, system
from bench.model import GPT
from bench.providers import LR, cheap_loss, make_params
from bench.timing import Subject, interleave, timed
# Flat-buffer segments start where the arena's do (64 B for fp32: kernels read grads 128 bits
# at once).
from fused_adam.kernels.contract import SEGMENT_ALIGNMENT as _ALIGN

VARIANTS = ("torch-fused", "fused_adam grads-in-place", "fused_adam flat-grads")
PHASES = ("zero", "forward", "backward", "step")
ROUNDS = {False: (2, 10), True: (1, 5)}  # quick -> (warmup, timed)
DESCRIPTION = ("Whole iteration (zero_grad, forward, backward, step) with gradients where "
               "autograd leaves them vs gradients as views of one flat buffer.")


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="scaled-down GPT-2, few rounds")
    parser.add_argument("--configs", nargs="+", choices=("gpt2-small", "small-800"),
                        default=None, help="default: both")
    parser.add_argument("--cheap-loss", action="store_true",
                        help="GPT-2 shapes with a cheap loss instead of a real GPT-2 forward")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)


class DeepLinear(nn.Module):
    """`n_layer` Linear(width, width) layers, each as a bounded residual update.

    A bare stack of 400 linear layers vanishes or explodes (a gain of 0.58 or 1.15 per layer at
    torch's default init); `x + tanh(layer(x))` keeps activations and gradients finite and away
    from denormals, which would otherwise make the CPU backward tens of times slower.
    """

    def __init__(self, n_layer=400, width=64):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layer))

    def forward(self, x, target):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return F.mse_loss(x, target)


def _gpt2_words(hp):
    return ("GPT-2 {n_layer} layers, n_embd {n_embd}, vocab {vocab_size}, n_ctx {n_ctx}"
            .format(**hp))


class Workload:
    """A model (or bare parameters) and a batch: `loss()` runs the forward."""

    def __init__(self, config_name, quick, cheap, device, seed):
        torch.manual_seed(seed)
        if config_name == "small-800":
            self.module = DeepLinear(400, 64).to(device)
            x = torch.randn(16, 64, device=device)
            target = torch.randn(16, 64, device=device)
            self.loss = lambda: self.module(x, target)
            self.params = list(self.module.parameters())
            self.detail = "400 x Linear(64, 64) as residual tanh layers, batch 16"
            return
        hp = configs.GPT2_QUICK if quick else configs.GPT2_SMALL
        if cheap:
            self.params = make_params(configs.gpt2_shapes(**hp), device, seed)
            self.loss = lambda: cheap_loss(self.params)
            self.detail = f"{_gpt2_words(hp)}, cheap loss sum(p*p)"
            return
        self.module = GPT(n_head=hp["n_embd"] // 64, **hp).to(device)
        tokens = 32 if quick else 64
        idx = torch.randint(hp["vocab_size"], (1, tokens + 1), device=device)
        self.loss = lambda: self.module(idx[:, :-1], idx[:, 1:])
        self.params = list(self.module.parameters())
        assert tuple(tuple(p.shape) for p in self.params) == configs.gpt2_shapes(**hp)
        self.detail = f"{_gpt2_words(hp)}, batch 1 x {tokens} tokens"


class Variant:
    def __init__(self, name, workload):
        import fused_adam

        self.name, self.workload, self.flat = name, workload, None
        params = workload.params
        if name == "torch-fused":
            self.optimizer = torch.optim.Adam(params, lr=LR, fused=True)
        else:
            self.optimizer = fused_adam.FusedAdam(params, lr=LR)
        if name == "fused_adam flat-grads":
            sizes = [-(-p.numel() // _ALIGN) * _ALIGN for p in params]
            self.flat = torch.zeros(sum(sizes), device=params[0].device, dtype=params[0].dtype)
            offset = 0
            for p, size in zip(params, sizes):
                p.grad = self.flat[offset:offset + p.numel()].view_as(p)
                offset += size
            self._grad_addresses = [p.grad.data_ptr() for p in params]

    def zero(self):
        if self.flat is not None:
            self.flat.zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def check(self):
        """The measurement measures what it says: flat views survive backward, nothing copied."""
        if self.flat is not None:
            now = [p.grad.data_ptr() for p in self.workload.params]
            assert now == self._grad_addresses, "backward replaced a flat-buffer grad view"
        copies = getattr(self.optimizer, "grad_copies", 0)
        assert copies == 0, f"{self.name}: {copies} gradients were copied"


def _subject(variant, device):
    """One whole iteration of `variant`, each phase timed alone."""
    def measure(_round):
        _, t_zero = timed(variant.zero, device)
        loss, t_forward = timed(variant.workload.loss, device)
        _, t_backward = timed(loss.backward, device)
        _, t_step = timed(variant.optimizer.step, device)
        variant.check()
        return dict(zip(PHASES, (t_zero, t_forward, t_backward, t_step)))
    return Subject(variant.name, measure)


def run(args):
    from tqdm import tqdm

    device = torch.device(args.device)
    warmup, iters = ROUNDS[args.quick]
    warmup = max(1, args.warmup if args.warmup is not None else warmup)
    iters = args.iters if args.iters is not None else iters
    meta = system.run_metadata(device, "grad-layout", quick=args.quick, warmup=warmup,
                               iters=iters, cheap_loss=args.cheap_loss, seed=args.seed)
    rows = []
    for config_name in tqdm(args.configs or ("gpt2-small", "small-800"), desc="grad-layout"):
        # One workload (own parameters) per variant: fused_adam moves p.data into its arena.
        variants = [Variant(name, Workload(config_name, args.quick, args.cheap_loss, device,
                                           args.seed)) for name in VARIANTS]
        workload = variants[0].workload
        where = results.config_fields(config_name, workload.detail,
                                      sum(p.numel() for p in workload.params),
                                      len(workload.params))
        samples = interleave([_subject(v, device) for v in variants], warmup=warmup,
                             iters=iters)
        for name, phases in samples.items():
            for phase in PHASES:
                rows += results.time_rows(meta, where, name, phase, phases[phase])
            total = np.sum([phases[p] for p in PHASES], axis=0)
            rows += results.time_rows(meta, where, name, "iter", total)
        del variants, workload
        memory.release(device)
        report.write(rows, args.out, "grad-layout")  # after each config: a partial report
    paths = report.write(rows, args.out, "grad-layout")
    print(markdown(rows))
    for path in paths:
        print(f"wrote {path}")
    return rows


# The report (grad_layout.md), from rows alone.

GRAD_LAYOUT_BYTES = {
    "torch-fused": "backward writes a fresh grad (4 B), step reads it (4 B)",
    "fused_adam grads-in-place": "backward writes a fresh grad (4 B), step reads it in place (4 B)",
    "fused_adam flat-grads": "zero_() writes 4 B, backward adds into the view (read 4 B, write "
                             "4 B; plus the fresh product it adds), step reads 4 B",
}


def markdown(rows):
    table = results.Table(rows)
    first = table.first()
    lines = report.header(first, "Gradient layout: whole iteration")
    n = next(r["samples"] for r in rows if r["metric"] == "iter_ms_median")
    lines += [f"Medians of {n} rounds, the variants interleaved; ms.", "",
              "| config | variant | zero | forward | backward | step | iteration [p20–p80] |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for config in table.configs:
        detail = table.first(config)["config_detail"]
        for variant in table.providers:
            if not table.has(config, variant):
                continue
            cells = [f"{table.get(config, variant, f'{p}_ms_median'):.2f}" for p in PHASES]
            lines.append(f"| {config} ({detail}) | {variant} | {' | '.join(cells)} | "
                         f"{report.spread(table, config, variant, 'iter')} |")
    lines += ["", "Gradient bytes per fp32 parameter per iteration:"]
    lines += [f"- {name}: {note}." for name, note in GRAD_LAYOUT_BYTES.items()]
    return "\n".join(lines) + "\n"
