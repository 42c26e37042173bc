"""What the kernel tests on bare `ArenaRecord` records share (test_quantized_kernels.py,
test_compact_master_kernels.py, test_kernels.py's group table): one layout of five segments, two
groups, the gradients of each step, the GradScaler-like scale and clipping factor of odd steps,
a twin for the reference, and the skip of a module that needs Triton's interpreter.

The layout: starts on multiples of QUANT_BLOCK (as 8-bit moments need; the float-moment kernel
only needs 16), reserved space rounded up to whole blocks:
0: 4400 elements, blocks 0-17 (the last holds 48): whole chunks of 2048 and of 4096 elements
   (fp32 and bf16/fp16/8-bit launch configs) and a tail chunk;
1: empty, at 4608 (its gradient is empty): block 18 is padding between segments 0 and 2;
2: 300 elements, blocks 19-20; its tail chunk's rows past block 20 would be segment 3's;
3: one element (block 21), without a gradient in odd steps;
4: 513 elements, blocks 22-24 (the last holds 1): its tail chunk's rows run past the end
   of the buffers (25 blocks).
"""
import pytest
import torch

from fused_adam.kernels import codecs, contract
from fused_adam.kernels.contract import QUANT_BLOCK, ArenaRecord
from helpers import cpu_backends, make_params

LENGTHS = [4400, 0, 300, 1, 513]
STARTS = [0, 4608, 4864, 5376, 5632]
SIZE = 6400
SEGMENT_GROUPS = [0, 1, 1, 0, 1]
N_BLOCKS = SIZE // QUANT_BLOCK

ADAMW = {contract.LR: 1e-2, contract.BETA1: 0.9, contract.BETA2: 0.999, contract.EPS: 1e-8,
         contract.WEIGHT_DECAY: 0.1, contract.DECOUPLED_WD: 1.0}
ADAM = {contract.LR: 3e-3, contract.BETA1: 0.8, contract.BETA2: 0.99, contract.EPS: 1e-6,
        contract.WEIGHT_DECAY: 0.05, contract.MAXIMIZE: 1.0}
ZERO_BETAS = {contract.BETA1: 0.0, contract.BETA2: 0.0}
# Reference's L2 term, grad.add(param, alpha=wd), is one fused multiply-add in torch's
# vectorized CPU kernel (as are its lerp and addcmul): one rounding where the contract (and
# the kernel, compiled without FMA contraction) rounds twice. With zero betas the moments are
# otherwise exact, so the bit-for-bit runs use decoupled weight decay only.
NO_L2 = {contract.WEIGHT_DECAY: 0.0}


def require_triton_interpreter():
    """triton, or a skip of the calling test module: the kernels run on CPU tensors through
    Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU),
    so the module is skipped where triton is not installed or the interpreter is off."""
    triton = pytest.importorskip("triton")
    if "triton" not in cpu_backends():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) for CPU tensors",
                    allow_module_level=True)
    return triton


def group_table(*groups):
    table = torch.zeros(len(groups), contract.GROUP_COLUMNS, dtype=torch.float64)
    for row, group in zip(table, groups):
        for column, value in group.items():
            row[column] = value
    return table


def in_segments():
    """(element mask, block mask) of what the segments cover."""
    elements = torch.zeros(SIZE, dtype=torch.bool)
    blocks = torch.zeros(N_BLOCKS, dtype=torch.bool)
    for start, length in zip(STARTS, LENGTHS):
        elements[start:start + length] = True
        blocks[start // QUANT_BLOCK:-(-(start + length) // QUANT_BLOCK)] = True
    return elements, blocks


def quantize_segments(values, codes, absmax, *, signed):
    """Write the codes and per-block absmax of `values`, segment by segment, into `codes` and
    `absmax` (padding left as it is)."""
    for start, length in zip(STARTS, LENGTHS):
        if length:
            q, s = codecs.quantize(values[start:start + length], signed=signed)
            codes[start:start + length] = q
            absmax[start // QUANT_BLOCK:start // QUANT_BLOCK + s.numel()] = s


def record_and_twin(**buffers):
    """An `ArenaRecord` of `buffers` over the layout's tables, and an identical copy."""
    record = ArenaRecord(
        **buffers, segment_starts=torch.tensor(STARTS), segment_lengths=torch.tensor(LENGTHS),
        segment_groups=torch.tensor(SEGMENT_GROUPS), steps=torch.zeros(len(LENGTHS)))
    twin = ArenaRecord(**{name: None if value is None else value.clone()
                           for name, value in vars(record).items()})
    return record, twin


def addresses(grads):
    # As the optimizer does: 0 is "no gradient", an empty gradient gets any nonzero address.
    return torch.tensor([0 if g is None else (g.data_ptr() or 64) for g in grads])


def step_grads(step, dtype):
    """Step `step`'s gradients, of `dtype`: random, none for segment 3 in odd steps."""
    grads = [g.to(dtype) for g in make_params([(n,) for n in LENGTHS], torch.float64,
                                              seed=100 + step)]
    if step % 2:
        grads[3] = None
    return grads


def scaled_on_odd_steps(grads, step):
    """(grads, launcher options): odd steps with a GradScaler-like scale (gradients times 1024,
    inv_grad_scale 2^-10) and a clipping factor."""
    if not step % 2:
        return grads, {}
    return ([None if g is None else g * 1024 for g in grads],
            dict(inv_grad_scale=2.0 ** -10,
                 clip_factor=torch.tensor([0.75], dtype=torch.float64)))
