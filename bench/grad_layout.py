"""`python -m bench grad-layout`: where should gradients live? DESIGN.md's measurement.

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
import json
from pathlib import Path

import numpy as np
import torch

from bench import configs, system
from bench.model import GPT, DeepLinear
from bench.providers import LR, cheap_loss, make_params
from bench.timing import summarize, timed

VARIANTS = ("torch-fused", "fused_adam grads-in-place", "fused_adam flat-grads")
PHASES = ("zero", "forward", "backward", "step")
BYTES_NOTE = {
    "torch-fused": "backward writes a fresh grad (4 B), step reads it (4 B)",
    "fused_adam grads-in-place": "backward writes a fresh grad (4 B), step reads it in place (4 B)",
    "fused_adam flat-grads": "zero_() writes 4 B, backward adds into the view (read 4 B, write "
                             "4 B; plus the fresh product it adds), step reads 4 B",
}
ROUNDS = {False: (2, 10), True: (1, 5)}  # quick -> (warmup, timed)
_ALIGN = 16  # elements: 64 B, as the arena aligns segments (kernels read grads 128 bits at once)



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



def _measure(variants, device, warmup, iters):
    samples = {v.name: {phase: [] for phase in PHASES} for v in variants}
    for round_index in range(warmup + iters):
        shift = round_index % len(variants)
        for v in variants[shift:] + variants[:shift]:
            _, t_zero = timed(v.zero, device)
            loss, t_forward = timed(v.workload.loss, device)
            _, t_backward = timed(loss.backward, device)
            _, t_step = timed(v.optimizer.step, device)
            v.check()
            if round_index >= warmup:
                for phase, t in zip(PHASES, (t_zero, t_forward, t_backward, t_step)):
                    samples[v.name][phase].append(t)
    return samples


def run(args):
    from tqdm import tqdm

    device = torch.device(args.device)
    warmup, iters = ROUNDS[args.quick]
    warmup = max(1, args.warmup if args.warmup is not None else warmup)
    iters = args.iters if args.iters is not None else iters
    meta = dict(device=device.type, device_name=system.device_name(device),
                hardware=system.hardware_sentence(device), git_sha=system.git_sha(),
                quick=bool(args.quick), **system.versions())
    rows = []
    for config_name in tqdm(args.configs or ("gpt2-small", "small-800"), desc="grad-layout"):
        # One workload (own parameters) per variant: fused_adam moves p.data into its arena.
        variants = [Variant(name, Workload(config_name, args.quick, args.cheap_loss, device,
                                           args.seed)) for name in VARIANTS]
        detail = variants[0].workload.detail
        n_params = sum(p.numel() for p in variants[0].workload.params)
        samples = _measure(variants, device, warmup, iters)
        for name, phases in samples.items():
            total = np.sum([phases[p] for p in PHASES], axis=0)
            for metric, values in [(f"{p}_ms", phases[p]) for p in PHASES] + [("iter_ms", total)]:
                s = summarize(values)
                for q in ("median", "p20", "p80"):
                    rows.append(dict(provider=name, config=config_name, config_detail=detail,
                                     n_params=n_params, metric=f"{metric}_{q}", value=s[q],
                                     unit="ms", samples=s["n"], **meta))
        del variants
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_layout.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = _markdown(rows, warmup, iters)
    (out / "grad_layout.md").write_text(md)
    print(md)
    print(f"wrote {out / 'grad_layout.json'}\nwrote {out / 'grad_layout.md'}")
    return rows


def _markdown(rows, warmup, iters):
    first = rows[0]
    value = {(r["config"], r["provider"], r["metric"]): r["value"] for r in rows}
    lines = [f"# Gradient layout: whole iteration, {first['device_name']} ({first['device']})", ""]
    if first["quick"]:
        lines += ["**Quick mode**: scaled-down GPT-2 and few rounds.", ""]
    lines += [f"Hardware: {first['hardware']} torch {first['torch']}, numba {first['numba']}, "
              f"git {first['git_sha']}. Medians of {iters} rounds after {warmup} warm-up, the "
              "variants interleaved; ms.", "",
              "| config | variant | zero | forward | backward | step | iteration [p20–p80] |",
              "|---|---|---:|---:|---:|---:|---:|"]
    configs_seen = list(dict.fromkeys(r["config"] for r in rows))
    for config in configs_seen:
        detail = next(r["config_detail"] for r in rows if r["config"] == config)
        for name in VARIANTS:
            cells = [f"{value[(config, name, f'{p}_ms_median')]:.2f}" for p in PHASES]
            it = [value[(config, name, f"iter_ms_{q}")] for q in ("median", "p20", "p80")]
            lines.append(f"| {config} ({detail}) | {name} | {' | '.join(cells)} | "
                         f"{it[0]:.2f} [{it[1]:.2f}–{it[2]:.2f}] |")
    lines += ["", "Gradient bytes per fp32 parameter per iteration:"]
    lines += [f"- {name}: {note}." for name, note in BYTES_NOTE.items()]
    return "\n".join(lines) + "\n"
