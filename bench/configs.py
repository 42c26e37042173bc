"""The benchmark's built-in configs: lists of parameter shapes, nothing else.

Three shapes of workload bracket what an Adam step sees in practice: GPT-2-small's 148 tensors
(a real model: a few huge matrices, many small vectors), 800 small tensors (where a per-tensor
cost dominates and fusion matters most) and one large tensor (pure streaming, the bandwidth
ceiling). Quick mode keeps the *structure* of each config (same tensor count and kinds) and cuts
the sizes, so that `python -m bench --quick` finishes in a minute on a 2-core CPU; its numbers
are for checking the machinery, not for quoting.
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
GPT2_QUICK = dict(n_layer=12, n_embd=256, vocab_size=8192, n_ctx=256)

# 2^27 fp32 elements is 512 MiB a buffer, 2 GiB per optimizer with its grad and moments: as big
# as a 2-core CPU box holds for five providers side by side. A GPU gets 2^30 (4 GiB a buffer).
LARGE_ELEMENTS = {"cpu": 1 << 27, "cuda": 1 << 30}
LARGE_QUICK_ELEMENTS = 1 << 24

CONFIG_NAMES = ("gpt2-small", "small-800", "large")


def _gpt2(quick):
    hp = GPT2_QUICK if quick else GPT2_SMALL
    detail = ("GPT-2-small's 148 shapes" if not quick else
              "quick: GPT-2's 148 shapes at n_embd={n_embd}, vocab {vocab_size}, "
              "n_ctx {n_ctx}".format(**hp))
    return Config("gpt2-small", gpt2_shapes(**hp), detail)


def _small_800(quick):
    # Already small (1.7 M parameters), so quick mode keeps it whole.
    return Config("small-800", ((64, 64), (64,)) * 400, "400 x (64x64 weight, 64 bias)")


def _large(quick, device_type):
    n = LARGE_QUICK_ELEMENTS if quick else LARGE_ELEMENTS.get(device_type, 1 << 27)
    detail = f"one tensor of 2^{n.bit_length() - 1} elements" + (" (quick)" if quick else "")
    return Config("large", ((n,),), detail)


def get_configs(names=None, *, quick=False, device_type="cpu"):
    """The configs called `names` (all by default), sized for `device_type` and `quick`."""
    builders = {
        "gpt2-small": lambda: _gpt2(quick),
        "small-800": lambda: _small_800(quick),
        "large": lambda: _large(quick, device_type),
    }
    names = list(names or CONFIG_NAMES)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; choose from {list(CONFIG_NAMES)}")
    return [builders[n]() for n in names]
