"""Ahead-of-time compile of every specialization the Triton launcher can launch, for sm_80 and
sm_90, without a GPU; then check its PTX: 128-bit loads and stores (the grad's included) and
64-bit address math. Works with Triton 3.6 and later (ASTSource(fn, signature, constexprs,
attrs) with string signature keys).

The compiles run in child processes (one per architecture, in parallel): tests/conftest.py turns
on TRITON_INTERPRET without a GPU, and a process that imported triton in interpreter mode holds
interpreted functions (its own standard library's included) that cannot be compiled."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
DTYPES = ("fp32", "fp64", "bf16", "fp16")
SPECS = [(arch, name, has_max) for arch in ARCHS for name in DTYPES for has_max in (False, True)]
ELEMENT_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2}


def _spec_id(spec):
    arch, name, has_max = spec
    return f"sm{arch}-{name}-{'amsgrad' if has_max else 'adam'}"


def _import_triton_adam():
    try:
        return importlib.import_module("fused_adam.kernels.triton_adam")
    except ImportError:
        # Not installed: use the source tree (kernels/ ships as fused_adam.kernels).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("kernels.triton_adam")


def _signature(kernel, name):
    """The launcher's argument types, by name, in the kernel's order."""
    buffer = "*" + name
    types = {
        "param_ptr": buffer, "exp_avg_ptr": buffer, "exp_avg_sq_ptr": buffer,
        "max_exp_avg_sq_ptr": buffer, "chunk_table_ptr": "*i64", "segment_starts_ptr": "*i64",
        "segment_lengths_ptr": "*i64", "segment_groups_ptr": "*i64", "steps_ptr": "*fp32",
        "grad_addresses_ptr": "*i64", "group_table_ptr": "*fp64", "inv_grad_scale_ptr": "*fp32",
        "inv_grad_scale": "fp32", "found_inf_ptr": "*fp32",
        "HAS_MAX_EXP_AVG_SQ": "constexpr", "BLOCK_SIZE": "constexpr",
    }
    assert sorted(kernel.arg_names) == sorted(types), "kernel arguments changed: update _signature"
    return {arg: types[arg] for arg in kernel.arg_names}


def _compile_arch(arch, out_dir):
    """Child process: compile every specialization for one architecture into out_dir."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton_adam = _import_triton_adam()
    kernel = triton_adam._adam_kernel
    meta = {}
    for spec in SPECS:
        if spec[0] != arch:
            continue
        _, name, has_max = spec
        block_size, options = triton_adam._launch_config(getattr(torch, {
            "fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}[name]))
        signature = _signature(kernel, name)
        # What the JIT specializes at launch: every tensor argument is 16-byte aligned (the
        # launcher asserts it for the arena buffers; torch allocations always are).
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={"HAS_MAX_EXP_AVG_SQ": has_max, "BLOCK_SIZE": block_size},
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        Path(out_dir, _spec_id(spec) + ".ptx").write_text(compiled.asm["ptx"])
        meta[_spec_id(spec)] = dict(block_size=block_size, num_warps=options["num_warps"])
    Path(out_dir, f"meta-sm{arch}.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("triton_ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='aot_child')"
            "['_compile_arch'](int(sys.argv[2]), sys.argv[3])")
    children = [subprocess.Popen([sys.executable, "-c", code, __file__, str(arch), str(out_dir)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
                for arch in ARCHS]
    for arch, child in zip(ARCHS, children):
        output, _ = child.communicate(timeout=600)
        assert child.returncode == 0, f"sm_{arch} compile failed:\n{output[-4000:]}"
    meta = {}
    for arch in ARCHS:
        meta.update(json.loads(Path(out_dir, f"meta-sm{arch}.json").read_text()))

    def get(spec):
        spec_id = _spec_id(spec)
        ptx = Path(out_dir, spec_id + ".ptx").read_text()
        return ptx, meta[spec_id]["block_size"], meta[spec_id]["num_warps"]
    return get


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_compiles_without_spills(compiled, spec):
    ptx, _, _ = compiled(spec)
    assert ".entry _adam_kernel" in ptx
    assert "st.local" not in ptx and "ld.local" not in ptx, "registers spill to local memory"


FP32_SPECS = [spec for spec in SPECS if spec[1] == "fp32"]


@pytest.mark.parametrize("spec", FP32_SPECS, ids=_spec_id)
def test_fp32_accesses_are_128_bit(compiled, spec):
    ptx, block_size, num_warps = compiled(spec)
    has_max = spec[2]
    vectors_per_thread = block_size // (32 * num_warps) // 4
    loaded = 4 + has_max        # param, grad, exp_avg, exp_avg_sq (+ max_exp_avg_sq)
    stored = 3 + has_max
    # Only whole chunks can use v4 (the tail chunk is masked per element), so these counts are
    # reached only if every tensor of the whole-chunk path, the grad included, is vectorized:
    # with a scalar grad load there are 2 fewer.
    n_loads = len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32\b", ptx))
    n_stores = len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\.b32\b", ptx))
    assert n_loads >= vectors_per_thread * loaded, f"only {n_loads} ld.global.v4.b32"
    assert n_stores >= vectors_per_thread * stored, f"only {n_stores} st.global.v4.b32"


# A 32-bit index reaches a 64-bit address through sign extension: mul/mad.wide.s32,
# cvt.s64.s32, or shl.b64 32 + shr.s64. Checked against mutants of the kernel: a 32-bit
# program id gives `mad.wide.s32` on the chunk-table address, 32-bit element offsets give
# `shr.s64` before every buffer access.
SIGN_EXTENSION = re.compile(r"\b(?:mul\.wide\.s32|mad\.wide\.s32|cvt\.s64\.s32|shr\.s64)\b")


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_address_math_is_64_bit(compiled, spec):
    ptx, _, _ = compiled(spec)
    assert "%ctaid.x" in ptx
    found = sorted(set(SIGN_EXTENSION.findall(ptx)))
    assert not found, f"32-bit index widened by sign extension: {found}"
    shift = ELEMENT_BYTES[spec[1]].bit_length() - 1
    # Element index to byte offset, on 64-bit registers.
    assert re.search(rf"\bshl\.b64\s+%rd\d+,\s*%rd\d+,\s*{shift};", ptx), \
        f"no 64-bit element-to-byte shift by {shift}"
