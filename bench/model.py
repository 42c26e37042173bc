"""The char GPT that `train` and `accuracy` train: a GPT (nanoGPT's layout, so GPT-2-small's
parameters come out in exactly `configs.gpt2_shapes()`'s 148 shapes; plain torch, no dropout, so
two runs from one seed see the same numbers; weights tied between the token embedding and the
head, so `parameters()` has no duplicate), the standard library's source as its text (it ships
with every Python: no download), the batches, and one training iteration timed phase by phase.
"""
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.timing import timed

MODEL = dict(n_layer=4, n_head=4, n_embd=128, n_ctx=64)
HYPER = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TEXT_BYTES = 4 << 20
PHASES = ("zero_grad", "forward", "backward", "clip", "step")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, `n_layer` pre-LN blocks, final LN, tied head."""

    def __init__(self, vocab_size, n_ctx, n_layer, n_embd, n_head):
        super().__init__()
        self.n_ctx = n_ctx
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        """Mean cross-entropy of predicting `targets` from `idx` (both B x T token ids)."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head: no extra parameter
        # The loss in fp32 whatever the parameters' dtype (bf16 runs included).
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def stdlib_text(max_bytes=TEXT_BYTES):
    """The first `max_bytes` of the standard library's own `*.py` files, in a fixed order
    (top-level modules first, then packages), third-party site-packages excluded."""
    root = Path(os.path.dirname(os.__file__))
    files = sorted(root.glob("*.py")) + sorted(
        p for p in root.glob("*/**/*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    chunks, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunks.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(chunks)[:max_bytes]


class CharData:
    """The text as tokens (the vocabulary is `sorted(set(text))`, each character its index
    there) and the batches' start offsets, drawn once up front from `seed` (so every run trains
    on the same batches)."""

    def __init__(self, iters, batch_size, seed):
        self.text = stdlib_text()
        # numpy does in a fraction of the time what a dict over `sorted(set(text))` would:
        # code points sort as Python's strings do.
        codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
        points, tokens = np.unique(codes, return_inverse=True)
        self.chars = [chr(c) for c in points]
        self.tokens = torch.from_numpy(tokens.astype(np.int64).reshape(-1))
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(len(self.tokens) - MODEL["n_ctx"] - 1, (iters, batch_size),
                                    generator=generator)

    def describe(self, args):
        return (f"data: {len(self.text) / 2**20:.1f} MiB of the standard library's *.py, vocab "
                f"{len(self.chars)} chars; model {MODEL}, batch {args.batch_size}, "
                f"{args.iters} iters")

    def batch(self, i, device):
        """Iteration `i`'s (inputs, targets)."""
        rows = self.starts[i].unsqueeze(1) + torch.arange(MODEL["n_ctx"] + 1)
        chunk = self.tokens[rows].to(device)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def torch_adamw(params, lr):
    """torch's fastest AdamW here: fused where this torch supports it for these params."""
    try:
        return (torch.optim.AdamW(params, lr=lr, fused=True, **HYPER),
                "torch.optim.AdamW(fused=True)")
    except (RuntimeError, ValueError):
        return (torch.optim.AdamW(params, lr=lr, foreach=True, **HYPER),
                "torch.optim.AdamW(foreach=True) (fused unsupported here)")


def iteration(model, optimizer, clip, batch, device):
    """One training iteration (zero_grad, forward, backward, `clip()`, step), each phase timed
    alone: ({phase: seconds, "loss": the loss}, the norm `clip` returned)."""
    _, t_zero = timed(lambda: optimizer.zero_grad(set_to_none=True), device)
    loss, t_forward = timed(lambda: model(*batch), device)
    _, t_backward = timed(loss.backward, device)
    norm, t_clip = timed(clip, device)
    _, t_step = timed(optimizer.step, device)
    return (dict(zip(PHASES, (t_zero, t_forward, t_backward, t_clip, t_step)),
                 loss=loss.float().item()), norm)
