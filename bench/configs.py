"""The benchmark's built-in configs: lists of parameter shapes, nothing else.

Three shapes of workload bracket what an Adam step sees in practice: GPT-2-small's 148 tensors
(a real model: a few huge matrices, many small vectors), 800 small tensors (where a per-tensor
cost dominates and fusion matters most) and one large tensor (pure streaming, the bandwidth
ceiling). Quick mode keeps the *structure* of each config (same tensor count and kinds) and cuts
the sizes, so that `python -m bench --quick` finishes in a minute on a 2-core CPU; its numbers
are for checking the machinery, not for quoting.

Each config also has smaller sizes, largest first (`sizes()`): when the memory present cannot
hold a config's dearest pair of subjects, the benchmark runs the largest size that fits and says
so (`bench.memory.plan`).
"""
from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Config:
    name: str
    shapes: tuple  # of tuples of ints, one per parameter tensor
    detail: str  # what the shapes are, in words; says "quick" when scaled down

    @property
    def n_params(self):
        return sum(prod(shape) for shape in self.shapes)

    @property
    def n_tensors(self):
        return len(self.shapes)


def gpt2_shapes(n_layer=12, n_embd=768, vocab_size=50257, n_ctx=1024):
    """GPT-2's parameter shapes in `named_parameters()` order (lm_head is tied to wte).

    Linear weights are (out, in) as in torch's nn.Linear (nanoGPT's layout), so the defaults give
    GPT-2-small: 148 tensors, 124,439,808 parameters.
    """
    shapes = [(vocab_size, n_embd), (n_ctx, n_embd)]
    for _ in range(n_layer):
        shapes += [
            (n_embd,), (n_embd,),                        # ln_1 weight, bias
            (3 * n_embd, n_embd), (3 * n_embd,),         # attn.c_attn
            (n_embd, n_embd), (n_embd,),                 # attn.c_proj
            (n_embd,), (n_embd,),                        # ln_2
            (4 * n_embd, n_embd), (4 * n_embd,),         # mlp.c_fc
            (n_embd, 4 * n_embd), (n_embd,),             # mlp.c_proj
        ]
    shapes += [(n_embd,), (n_embd,)]                     # ln_f
    return tuple(shapes)


# GPT-2-small's hyperparameters, and the cut-down ones quick mode uses (148 tensors still).
GPT2_SMALL = dict(n_layer=12, n_embd=768, vocab_size=50257, n_ctx=1024)
GPT2_HALF = dict(n_layer=12, n_embd=384, vocab_size=50257, n_ctx=1024)
GPT2_QUICK = dict(n_layer=12, n_embd=256, vocab_size=8192, n_ctx=256)

# One large tensor: 2^26 fp32 elements on a CPU (256 MiB a buffer, 8x a 32 MiB L3, so it
# streams from memory; with its grad and moments 1 GiB per optimizer, so that a pair fits in the
# 6 GB the default run keeps to), 2^30 on a GPU (4 GiB a buffer). Smaller sizes follow, for
# machines with less memory.
LARGE_ELEMENTS = {"cpu": (1 << 26, 1 << 25, 1 << 24), "cuda": (1 << 30, 1 << 29, 1 << 28, 1 << 27)}
LARGE_QUICK_ELEMENTS = (1 << 24, 1 << 22)

CONFIG_NAMES = ("gpt2-small", "small-800", "large")


def _gpt2(hp, quick):
    if hp is GPT2_SMALL:
        return Config("gpt2-small", gpt2_shapes(**hp), "GPT-2-small's 148 shapes")
    words = "GPT-2's 148 shapes at n_embd {n_embd}, vocab {vocab_size}, n_ctx {n_ctx}".format(**hp)
    return Config("gpt2-small", gpt2_shapes(**hp), ("quick: " if quick else "") + words)


def _small_800():
    return Config("small-800", ((64, 64), (64,)) * 400, "400 x (64x64 weight, 64 bias)")


def _large(n, quick):
    detail = f"one tensor of 2^{n.bit_length() - 1} elements" + (" (quick)" if quick else "")
    return Config("large", ((n,),), detail)


def sizes(name, *, quick=False, device_type="cpu"):
    """Config `name` at each size it may run at, largest (the default) first."""
    if name == "gpt2-small":
        return tuple(_gpt2(hp, quick) for hp in ((GPT2_QUICK,) if quick else
                                                 (GPT2_SMALL, GPT2_HALF, GPT2_QUICK)))
    if name == "small-800":
        # Already small (1.7 M parameters), so quick mode keeps it whole.
        return (_small_800(),)
    if name == "large":
        counts = LARGE_QUICK_ELEMENTS if quick else LARGE_ELEMENTS.get(device_type,
                                                                       LARGE_ELEMENTS["cpu"])
        return tuple(_large(n, quick) for n in counts)
    raise ValueError(f"unknown config {name!r}; choose from {list(CONFIG_NAMES)}")


def get_configs(names=None, *, quick=False, device_type="cpu"):
    """The configs called `names` (all by default) at their default size for `device_type`."""
    return [sizes(n, quick=quick, device_type=device_type)[0] for n in (names or CONFIG_NAMES)]
