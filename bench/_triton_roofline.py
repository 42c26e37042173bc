"""The GPU roofline kernel: Adam's memory traffic (read p, g, m, v; write p, m, v) with no math,
in Triton. Imported only on CUDA, so that a CPU run never pays for importing Triton.

Launch shape as fused_adam's Triton kernel (2048 fp32 per program, 8 warps: each thread moves
32 B of every tensor as two 128-bit accesses), so the two differ only in arithmetic; never
autotuned, since the kernel updates its buffers in place.
"""
import triton
import triton.language as tl

BLOCK_SIZE = 2048
NUM_WARPS = 8


@triton.jit
def _no_math_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_elements,
                    BLOCK_SIZE: tl.constexpr):
    """p, m, v <- m, v, p + g"""
    # int64 before any offset math: 2^30 elements x 4 B overflows int32 byte offsets.
    start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
    offsets = start + tl.arange(0, BLOCK_SIZE)
    offsets = tl.max_contiguous(tl.multiple_of(offsets, BLOCK_SIZE), BLOCK_SIZE)
    mask = offsets < n_elements
    p = tl.load(param_ptr + offsets, mask=mask)
    g = tl.load(grad_ptr + offsets, mask=mask)
    m = tl.load(exp_avg_ptr + offsets, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    tl.store(param_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_ptr + offsets, v, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, p + g, mask=mask)


def no_math_step(param, grad, exp_avg, exp_avg_sq):
    for t in (grad, exp_avg, exp_avg_sq):
        assert t.is_contiguous() and t.numel() == param.numel() and t.dtype == param.dtype
    assert param.is_contiguous()
    n = param.numel()
    _no_math_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        param, grad, exp_avg, exp_avg_sq, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
