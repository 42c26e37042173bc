"""The kernel contract: what every backend's launcher reads, as plain data. No optimizer logic.

Each backend module (`numba_adam`, `triton_adam`, `reference`) has two launchers:

    adam_step(record, *, grads, group_table, inv_grad_scale=None, found_inf=None,
              clip_factor=None)
    grad_power_sum(record, *, grads, norm_type)

- `record` is an `ArenaRecord`: the flat 1-D buffers of one arena (one device and dtype) and
  the per-segment tables (one segment per parameter), passed positionally. A launcher reads
  nothing else of the optimizer; what it derives from a layout (chunk tables, numpy views) it
  caches itself, keyed by the record, which is replaced whenever the layout changes.
- `grads` comes in the form the backend names in its `GRADS`:
  - `"addresses"`: an int64 tensor beside the segment tables, one entry per segment, the address
    of its gradient (contiguous, of the params' dtype, `segment_lengths[s]` elements, aligned to
    the backend's `GRAD_ADDRESS_ALIGNMENT` bytes), 0 for "no gradient this step";
  - `"tensors"`: a list with one entry per segment, its gradient as a 1-D tensor of
    `segment_lengths[s]` elements of the params' dtype, or None.
- `group_table`: float64 [n_groups, GROUP_COLUMNS], columns below, on the segment tables' device.
- `inv_grad_scale`: None, a float, or a 1-element tensor on the device (GradScaler's 1/scale);
  `found_inf`: None or a 1-element tensor; nonzero means the whole step is skipped.
- `clip_factor`: None or a 1-element float64 tensor on the device, the gradient clipping
  coefficient, already rounded to the dtype torch's `clip_grad_norm_` would compute it in.

For every segment with a gradient (unless `found_inf` is nonzero) a launcher adds 1 to `steps`
and applies, with that segment's step t and group, the update formula (the one statement of it:
the kernels' docstrings refer here):

    g = grad * inv_grad_scale;  g = g * clip_factor;  g = -g (maximize)
    g = fma(p, wd, g) (L2)   or   p = p * (1 - lr * wd) (decoupled)
    m = fma(w, g - m, m) for w = 1 - b1 < 0.5, else fma(w - 1, g - m, g)     (torch's lerp)
    v = fma((1 - b2) * g, g, v * b2)
    v_hat = max(v_max, v), stored as v_max (amsgrad; NaN wins)   else v_hat = v
    p = p + (-(lr / (1 - b1^t)) * m) / (sqrt(v_hat) / sqrt(1 - b2^t) + eps)

in fp32 (fp64 for fp64 params), with p read from and written to `master_params` where there is
one (then `params` is its rounding); every value stored in a narrower dtype is rounded to
nearest even. This is torch's single-tensor (`foreach=False`) step on CPU, rounding for
rounding, so that fp32, fp64, an fp32 master and bf16+16 give torch's bits:
- every scalar (wd, 1 - lr * wd, w = 1 - b1, b2, 1 - b2, lr / (1 - b1^t), sqrt(1 - b2^t),
  eps, the scales) is computed in float64 as torch's Python floats are (b^t is Python's
  `beta ** step`, correctly rounded) and rounded once to the compute dtype; w - 1 is then exact;
- fma(a, b, c) rounds once, exactly where torch's CPU kernels (GCC) and CUDA kernels (nvcc)
  have one: `add(alpha=)`, `lerp`, `addcmul`; every other operation rounds on its own, in the
  order written (no contraction, no reassociation); division and square root are IEEE.
The one difference left is torch's: its CPU `Tensor.sqrt` is MKL's, which rounds about 0.8% of
inputs one ulp low; the compiled kernels take IEEE roots, as torch's `fused=True` does (the
reference backend, plain torch, calls torch's). (The two gradient products round one after the
other, as torch's `GradScaler.unscale_` and then `clip_grad_norm_` do; a factor of 1 is exact.)

8-bit moments (`exp_avg` int8, `exp_avg_sq` uint8, with the fp32 `exp_avg_absmax` and
`exp_avg_sq_absmax` beside them): each moment buffer is cut into blocks of QUANT_BLOCK elements,
every segment starting a block (segment starts are multiples of QUANT_BLOCK in such an arena), so
element i's block is i // QUANT_BLOCK and a parameter's quantization never depends on its
neighbours. A block holds codes q and its absmax s (the largest |value| it held when stored):

    exp_avg:     t = q * float32(1/127);  m = (t * |t|) * s                q in -127..127
    exp_avg_sq:  t = q * float32(1/255);  v = ((t * t) * (t * t)) * s      q in 0..255

a square map for m and a 4th-root one for v, so that sqrt(v), which the step divides by, has
the same square map as m: fine steps near the block's largest values, where most of a block's
values are. A launcher decodes a block's old moments, updates them in fp32 as above (the
parameter steps with the unrounded new moments), takes each moment's new absmax s' (NaN if any
value is NaN) and stores

    exp_avg:     y = m * (1 / s');                      q = sign(y) * L(sqrt(|y|), 127)
    exp_avg_sq:  w = sqrt(v) * (1 / sqrt(s'));          q = L(sqrt(w), 255)
    L(x, top) = min(rint(x * top), top), rint to nearest even, 0 for a NaN x

with 1 / s' and 1 / sqrt(s') taken as 0 where s' is not > 0 (zero, NaN): a NaN stores code 0,
and its block decodes as NaN through s' = NaN. (v's code is taken from sqrt(v), which the step
computes anyway.) amsgrad is not offered with 8-bit moments.

A compact master (bf16 params only): instead of an fp32 copy, `master_remainder` holds what the
bf16 param lacks of the fp32 master, so that the master's bits are

    bf16+16 (int16 r):  (param_bits << 16) + r              exactly the fp32 master
    bf16+8  (int8 r):   (param_bits << 16) + (r << 8)        the master to 16 significant bits

(32-bit integer arithmetic on the bit patterns). The step reads that master, updates it in fp32
and stores it back split: param_bits = (bits + 0x8000) >> 16 (nearest, ties away from zero: an
fp32 exactly halfway between two bf16 values rounds up in magnitude, where torch's rounding goes
to even; NaN stores the bf16 NaN 0x7FC0 and r = 0), r = bits - (param_bits << 16) for bf16+16,
r = min((bits - (param_bits << 16) + 0x80) >> 8, 127) for bf16+8 (arithmetic shift).

`grad_power_sum` reads every gradient once and returns a 0-d float64 tensor on the device, with
no host read on CUDA: the sum over all elements of |g|^p for a finite `norm_type` p > 0, or the
largest |g| for `norm_type` inf (NaN if any gradient element is NaN, as torch's norms). The
optimizer combines arenas (and ranks) and takes the p-th root.
"""
import dataclasses
import weakref
from typing import Optional

import torch

# Columns of the per-group hyperparameter table every kernel reads.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MAXIMIZE, AMSGRAD, DECOUPLED_WD = range(8)
GROUP_COLUMNS = 8

# norm_type values every backend's `grad_power_sum` reduces in one pass (others fall back to
# torch's own norms in the optimizer).
def supported_norm_type(norm_type):
    return norm_type > 0  # finite p > 0, or inf (NaN is not > 0)


# Every segment starts on a multiple of this many elements (64 B for fp32), so that every
# load and store of a kernel can be 128-bit.
SEGMENT_ALIGNMENT = 16

# Parameter dtypes every compiled backend steps (complex params are stepped as their real view).
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Moment dtypes other than the params' own: fp32 or bf16 beside fp32, bf16 or fp16 params.
STATE_DTYPES = (torch.float32, torch.bfloat16)
# 8-bit moments: codes of these dtypes, an fp32 absmax per block of QUANT_BLOCK elements.
QUANTIZED_STATE_DTYPE = torch.int8  # what `state_dtype=` names
EXP_AVG_CODES, EXP_AVG_SQ_CODES = torch.int8, torch.uint8
QUANT_BLOCK = 256
SIGNED_LEVELS, UNSIGNED_LEVELS = 127, 255
# master_weights= values for a compact master of bf16 params, and their remainders' dtypes.
COMPACT_MASTERS = {"bf16+8": torch.int8, "bf16+16": torch.int16}
# Params of these dtypes may keep an fp32 master copy.
MASTER_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True, eq=False)
class ArenaRecord:
    """One arena's buffers and segment tables: the whole of what a launcher reads of it.

    Buffers are 1-D over every segment (padding included): `params` in the params' dtype,
    `master_params` fp32 or None, the moments in one dtype (`exp_avg`, `exp_avg_sq`,
    `max_exp_avg_sq`, the last None until some group asks for amsgrad), or 8-bit moments with
    `exp_avg_absmax` and `exp_avg_sq_absmax`, one fp32 per QUANT_BLOCK elements (else None);
    `master_remainder` (int16 or int8) the compact master of bf16 params (else None). Tables
    have one entry per segment: `segment_starts`, `segment_lengths` (int64 elements),
    `segment_groups` (int64 rows of the group table), `steps` (float32, torch's dtype for
    `state["step"]`).

    Compared and hashed by identity: a new layout is a new record, so a backend's cache keyed
    by the record is dropped with the layout it was derived from.
    """
    params: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    segment_starts: torch.Tensor
    segment_lengths: torch.Tensor
    segment_groups: torch.Tensor
    steps: torch.Tensor
    master_params: Optional[torch.Tensor] = None
    max_exp_avg_sq: Optional[torch.Tensor] = None
    exp_avg_absmax: Optional[torch.Tensor] = None
    exp_avg_sq_absmax: Optional[torch.Tensor] = None
    master_remainder: Optional[torch.Tensor] = None

    @property
    def quantized(self):
        return self.exp_avg_absmax is not None

    @property
    def n_segments(self):
        return self.segment_starts.numel()


class PerLayout:
    """What a backend derives from a layout (`make(record)`: chunk tables, numpy views, host
    copies of the tables), made at a record's first use and dropped with the record."""

    def __init__(self, make):
        self._make = make
        self._cache = weakref.WeakKeyDictionary()  # ArenaRecord -> make(record)

    def __call__(self, record):
        derived = self._cache.get(record)
        if derived is None:
            derived = self._cache[record] = self._make(record)
        return derived
