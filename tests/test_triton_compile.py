"""Ahead-of-time compile of every specialization the Triton launcher can launch, for sm_80 and
sm_90, without a GPU: each param dtype with each moment dtype and master copy an arena can have,
with and without amsgrad, and with 8-bit moments. Then check its PTX (vector loads and stores, the
grad's included: 128-bit for every 4- and 8-byte stream; 16-bit stores rounded to nearest even; no
layout shuffle through shared memory; 64-bit address math) and its SASS (no spill per element).
Works with Triton 3.6 and later (ASTSource(fn, signature, constexprs, attrs) with string signature
keys).

The compiles run in child processes (one per architecture, in parallel): tests/conftest.py turns
on TRITON_INTERPRET without a GPU, and a process that imported triton in interpreter mode holds
interpreted functions (its own standard library's included) that cannot be compiled."""

import importlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402  (after the skip: triton is optional)

ARCHS = (80, 90)
DTYPES = ("fp32", "fp64", "bf16", "fp16")
TORCH_DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16",
                "int8": "int8", "int16": "int16"}
ELEMENT_BYTES = {"fp32": 4, "fp64": 8, "bf16": 2, "fp16": 2, "int8": 1, "uint8": 1, "int16": 2}
# A spec's master: False (none), True (an fp32 copy), or a compact one (bf16 params plus a
# remainder of this dtype, `master_weights="bf16+16"` or `"bf16+8"`).
COMPACT = {"bf16+16": "int16", "bf16+8": "int8"}


def _refused(dtype, master_weights):
    """Whether FusedAdam refuses `master_weights` for params of `dtype` (compact masters for
    fp16 params), asked of the optimizer itself."""
    import warnings

    import torch
    from fused_adam import FusedAdam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "master_weights does nothing here" (fp32, fp64)
        try:
            FusedAdam([torch.zeros(1, dtype=dtype, requires_grad=True)], backend="torch",
                      master_weights=master_weights)
        except ValueError:
            return True
    return False


def _launchable():
    """(param dtype, state dtype, master) of every arena FusedAdam can build: each param dtype
    with each `state_dtype` the optimizer accepts (None, fp32, bf16, int8: 8-bit moments) and
    each `master_weights` (False, True, "bf16+16", "bf16+8") it does not refuse, resolved by
    the Arena itself, so that a change there shows up here."""
    import torch
    from fused_adam.arena import Arena

    names = {getattr(torch, torch_name): name for name, torch_name in TORCH_DTYPES.items()}
    combos = []
    for name in DTYPES:
        dtype = getattr(torch, TORCH_DTYPES[name])
        for master_weights in (False, True, *COMPACT):
            if _refused(dtype, master_weights):
                continue
            for state_dtype in (None, torch.float32, torch.bfloat16, torch.int8):
                arena = Arena("cpu", dtype, [], state_dtype=state_dtype,
                              master_weights=master_weights)
                if arena.remainder_dtype is not None:
                    master = {COMPACT[key]: key for key in COMPACT}[names[arena.remainder_dtype]]
                else:
                    master = arena.has_master
                combo = (name, names[arena.state_dtype], master)
                if combo not in combos:
                    combos.append(combo)
    return combos


# (arch, param dtype, state dtype, master, has max_exp_avg_sq): 24 per architecture with no or
# an fp32 master, 5 of 8-bit moments (state "int8": int8 and uint8 codes; no amsgrad, no fp64),
# and 10 with a compact master (bf16 params with fp32 or bf16 moments, with and without
# amsgrad, or 8-bit moments; each with an int16 or an int8 remainder).
SPECS = [(arch, *combo, has_max)
         for arch in ARCHS for combo in _launchable() for has_max in (False, True)
         if not (combo[1] == "int8" and has_max)]
QUANTIZED_SPECS = [spec for spec in SPECS if spec[2] == "int8"]
COMPACT_SPECS = [spec for spec in SPECS if spec[3] in COMPACT]


def _spec_id(spec):
    arch, name, state, master, has_max = spec
    master = {False: "", True: "-master", "bf16+16": "-master16", "bf16+8": "-master8"}[master]
    return f"sm{arch}-{name}{master}-{state}states-{'amsgrad' if has_max else 'adam'}"


def _streams(spec):
    """(dtype name, loaded, stored) of every buffer the whole-chunk path moves."""
    _, name, state, master, has_max = spec
    # The params are read unless an fp32 master stands in for them (a compact one is joined
    # from them).
    streams = [(name, master is not True, True), (name, True, False)]  # param, grad
    if master is True:
        streams.append(("fp32", True, True))
    elif master:
        streams.append((COMPACT[master], True, True))  # the remainder
    if state == "int8":
        streams += [("int8", True, True), ("uint8", True, True)]  # the codes
    else:
        streams += [(state, True, True)] * (2 + has_max)  # exp_avg, exp_avg_sq (+ max)
    return streams


def _kernel_arguments(triton_adam, spec):
    """What the launcher passes its kernel for an arena of this spec (tiny CPU tensors of
    the right dtypes stand in for the buffers): its own `kernel_for` and `kernel_arguments`,
    the one source of the kernel and its signature, and the launch options."""
    import torch
    from fused_adam.kernels.contract import (
        EXP_AVG_CODES, EXP_AVG_SQ_CODES, GROUP_COLUMNS, QUANT_BLOCK, ArenaRecord,
    )

    _, name, state, master, has_max = spec
    param_dtype, state_dtype = (getattr(torch, TORCH_DTYPES[n]) for n in (name, state))
    zeros = lambda dtype: torch.zeros(QUANT_BLOCK, dtype=dtype)  # noqa: E731
    one = torch.tensor([16], dtype=torch.int64)
    quantized = state == "int8"
    arena = ArenaRecord(
        params=zeros(param_dtype),
        exp_avg=zeros(EXP_AVG_CODES if quantized else state_dtype),
        exp_avg_sq=zeros(EXP_AVG_SQ_CODES if quantized else state_dtype),
        segment_starts=torch.zeros(1, dtype=torch.int64), segment_lengths=one,
        segment_groups=torch.zeros(1, dtype=torch.int64), steps=torch.zeros(1),
        master_params=zeros(torch.float32) if master is True else None,
        master_remainder=(zeros(getattr(torch, TORCH_DTYPES[COMPACT[master]]))
                          if master in COMPACT else None),
        max_exp_avg_sq=zeros(state_dtype) if has_max else None,
        exp_avg_absmax=torch.zeros(1) if quantized else None,
        exp_avg_sq_absmax=torch.zeros(1) if quantized else None)
    arguments, _, options = triton_adam.kernel_arguments(
        arena, grads=torch.zeros(1, dtype=torch.int64),
        group_table=torch.zeros(1, GROUP_COLUMNS, dtype=torch.float64),
        inv_grad_scale_ptr=torch.ones(()), inv_grad_scale=1.0, found_inf_ptr=torch.zeros(()),
        clip_factor_ptr=torch.ones((), dtype=torch.float64))
    return triton_adam.kernel_for(arena), arguments, options


# The gradient-norm kernel: (arch, grad dtype, norm type) for each reduction it specializes.
NORM_TYPES = {"l2": 2.0, "linf": float("inf"), "l1": 1.0, "lp": 3.0}
POWER_SPECS = [(arch, name, norm) for arch in ARCHS for name in DTYPES for norm in NORM_TYPES]


def _power_spec_id(spec):
    arch, name, norm = spec
    return f"sm{arch}-{name}-{norm}"


def _power_sum_arguments(triton_adam, spec):
    """`_power_sum_kernel`'s arguments from the launcher's own `power_sum_arguments`."""
    import torch
    from fused_adam.kernels.contract import ArenaRecord

    _, name, norm = spec
    dtype = getattr(torch, TORCH_DTYPES[name])
    zeros = lambda dtype: torch.zeros(64, dtype=dtype)  # noqa: E731
    arena = ArenaRecord(
        params=zeros(dtype), exp_avg=zeros(dtype), exp_avg_sq=zeros(dtype),
        segment_starts=torch.zeros(1, dtype=torch.int64),
        segment_lengths=torch.tensor([16], dtype=torch.int64),
        segment_groups=torch.zeros(1, dtype=torch.int64), steps=torch.zeros(1))
    arguments, _, options = triton_adam.power_sum_arguments(
        arena, grads=torch.zeros(1, dtype=torch.int64), norm_type=NORM_TYPES[norm],
        partials=torch.zeros(1, dtype=torch.float64))
    return arguments, options


_TYPE_NAMES = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16",
               "int64": "i64", "int8": "i8", "uint8": "u8", "int16": "i16"}


def _signature(kernel, arguments):
    """ASTSource's signature and constexprs for the launcher's `arguments`: a tensor is a
    pointer to its dtype, a float an fp32 scalar (as the JIT types a Python float), a
    constexpr parameter or a None (which the JIT specializes as one) a constexpr."""
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif hasattr(value, "dtype"):
            signature[param.name] = "*" + _TYPE_NAMES[str(value.dtype).removeprefix("torch.")]
        else:
            assert isinstance(value, float), f"{param.name}: {value!r}"
            signature[param.name] = "fp32"
    return signature, constexprs


def _compile_arch(arch, out_dir):
    """Child process: compile every specialization for one architecture into out_dir."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton_adam = importlib.import_module("fused_adam.kernels.triton_adam")
    meta = {}
    for spec in SPECS:
        if spec[0] != arch:
            continue
        kernel, arguments, options = _kernel_arguments(triton_adam, spec)
        signature, constexprs = _signature(kernel, arguments)
        block_size = constexprs["BLOCK_SIZE"]
        # What the JIT specializes at launch: every tensor argument is 16-byte aligned (the
        # launcher asserts it for the arena buffers; torch allocations always are).
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        Path(out_dir, _spec_id(spec) + ".ptx").write_text(compiled.asm["ptx"])
        cubin = Path(out_dir, _spec_id(spec) + ".cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        meta[_spec_id(spec)] = dict(block_size=block_size, num_warps=options["num_warps"],
                                    kernel=kernel.fn.__name__, resources=_resource_usage(cubin))
    for spec in POWER_SPECS:
        if spec[0] != arch:
            continue
        arguments, options = _power_sum_arguments(triton_adam, spec)
        signature, constexprs = _signature(triton_adam._power_sum_kernel, arguments)
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, ty in enumerate(signature.values()) if ty.startswith("*")}
        src = ASTSource(fn=triton_adam._power_sum_kernel, signature=signature,
                        constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        Path(out_dir, _power_spec_id(spec) + ".ptx").write_text(compiled.asm["ptx"])
        meta[_power_spec_id(spec)] = dict(block_size=constexprs["BLOCK_SIZE"],
                                          num_warps=options["num_warps"])
    Path(out_dir, f"meta-sm{arch}.json").write_text(json.dumps(meta))


def _resource_usage(cubin):
    """The kernel's registers, stack bytes and local-memory instructions, read from its SASS
    with the cuobjdump Triton ships (ptxas decides spills: the PTX cannot show them); {}
    where this Triton has no cuobjdump."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no CUDA tools beside this Triton
        return {}
    usage = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    resources = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    resources["spill_stores"] = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
    resources["spill_loads"] = len(re.findall(r"\bLDL(?:\.\w+)*\s", sass))
    return resources


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
        spec_id = _spec_id(spec) if len(spec) == 5 else _power_spec_id(spec)
        return Path(out_dir, spec_id + ".ptx").read_text(), meta[spec_id]
    return get


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_compiles_without_spills(compiled, spec):
    ptx, meta = compiled(spec)
    kernel = "_adam_q8_kernel" if spec[2] == "int8" else "_adam_kernel"
    assert meta["kernel"] == kernel and f".entry {kernel}" in ptx
    assert "st.local" not in ptx and "ld.local" not in ptx, "registers spill to local memory"
    resources = meta["resources"]
    if not resources:
        pytest.skip("no cuobjdump beside this Triton to read the SASS")
    # ptxas may settle at 64 registers by sending one scalar to the stack (a value live across
    # the calls into the slow paths of IEEE division and fp64 exp2/log2): one STL and one LDL
    # a program. ptxas 12.9 (Triton 3.9) does it in one or two of the 48 kernels, which ones
    # changing with unrelated edits of the kernel; Triton 3.6's in none. What must never
    # happen is a spill per element: one STL per element of the unrolled block, at least 4
    # a thread in every kernel here.
    assert resources["LOCAL"] == 0 and resources["STACK"] <= 8, \
        f"registers spill to local memory: {resources}"
    assert resources["spill_stores"] <= 1 and resources["spill_loads"] <= 1, \
        f"registers spill to local memory: {resources}"


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_no_round_trip_through_shared_memory(compiled, spec):
    """A convert_layout between two register layouts goes through shared memory with a
    barrier; the kernel is written (one contiguity for every stream) so that none is needed.
    8-bit moments: see test_quantized_kernel_moves_only_absmax_through_shared_memory."""
    if spec[2] == "int8":
        pytest.skip("8-bit moments exchange each block's absmax through shared memory")
    ptx, _ = compiled(spec)
    assert "bar.sync" not in ptx and "st.shared" not in ptx, "layout conversion in the kernel"


def _expected_vectors(spec, block_size, num_warps):
    """{(ld or st, PTX vector type): count} of the whole-chunk path when every stream moves
    as many elements per access as fit 128 bits of the widest stream: 128-bit accesses for
    4- and 8-byte streams always, for 2-byte ones when no wider stream is in the kernel,
    64-bit (v2.b32) beside 4-byte streams."""
    elements = block_size // (32 * num_warps)  # per thread
    streams = _streams(spec)
    per_access = 16 // max(ELEMENT_BYTES[name] for name, _, _ in streams)
    expected = Counter()
    for name, loaded, stored in streams:
        if ELEMENT_BYTES[name] == 1:
            continue  # 32- or 64-bit: test_whole_chunks_move_bytes_in_words
        bits = per_access * ELEMENT_BYTES[name] * 8
        vector = "v2.b64" if name == "fp64" else {128: "v4.b32", 64: "v2.b32"}[bits]
        for op, moves in (("ld", loaded), ("st", stored)):
            if moves:
                expected[op, vector] += elements // per_access
    return expected


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_whole_chunks_use_vector_accesses(compiled, spec):
    ptx, meta = compiled(spec)
    # Only whole chunks can be vectorized (the tail chunk is masked per element), so these
    # counts are reached only if every tensor of the whole-chunk path, the grad included, is:
    # with a scalar grad load there are 2 fewer 128-bit loads in the fp32 kernel.
    for (op, vector), count in _expected_vectors(spec, meta["block_size"],
                                                 meta["num_warps"]).items():
        found = len(re.findall(rf"\b{op}\.global(?:\.\w+)*\.{re.escape(vector)}\b", ptx))
        assert found >= count, f"only {found} {op}.global.{vector}, expected {count}"


def _stored_16_bit(spec, block_size, num_warps):
    """{"bf16" or "f16": fp32 values per thread the whole-chunk path rounds and stores}: not
    the params beside a compact master, split from it by integer operations."""
    elements = block_size // (32 * num_warps)
    stored = Counter()
    for index, (name, _, stores) in enumerate(_streams(spec)):
        if index == 0 and spec[3] in COMPACT:
            continue
        if stores and name in ("bf16", "fp16"):
            stored[{"bf16": "bf16", "fp16": "f16"}[name]] += elements
    return stored


# 1-byte streams: 8-bit moments' codes, bf16+8's int8 remainder. A thread holds ACCESS
# contiguous elements of every stream (128 bits of the widest one), so the bytes move 4 (beside
# fp32 params, master or moments) or 8 (beside 2-byte streams alone) to an instruction: b32 or
# v2.b32. 128-bit byte accesses would need 16 bytes a thread; Triton's coalescing gives every
# load of a tile the widest vector any of them allows but caps each store at 128 bits (4 fp32,
# 8 bf16), so the wider streams' stores would take another layout than the loads and every
# result would go through shared memory (see the contiguity note in `_adam_kernel`).
_BYTE_VECTOR = {32: "b32", 64: "v2.b32"}
BYTE_SPECS = [spec for spec in SPECS if any(ELEMENT_BYTES[name] == 1
                                            for name, _, _ in _streams(spec))]


def _unpredicated(op, vector, ptx):
    """Global accesses `op` of exactly `vector` (b32 is not v4.b32) without a guard predicate:
    the whole-chunk path's (the tail chunk's are predicated by its mask, and stores of a
    replicated value by the lane that stores it)."""
    return len(re.findall(rf"^\s*{op}\.global(?:\.(?!v\d)\w+)*\.{re.escape(vector)}\s",
                          ptx, re.M))


@pytest.mark.parametrize("spec", BYTE_SPECS, ids=_spec_id)
def test_whole_chunks_move_bytes_in_words(compiled, spec):
    """Whole chunks move the 1-byte streams (int8 and uint8 codes, an int8 remainder) ACCESS to
    an instruction (32-bit beside 4-byte streams, 64-bit beside 2-byte streams alone), and only
    the tail chunk, masked per element, moves single bytes."""
    ptx, meta = compiled(spec)
    elements = meta["block_size"] // (32 * meta["num_warps"])  # per thread
    per_access = 16 // max(ELEMENT_BYTES[name] for name, _, _ in _streams(spec))
    vector = _BYTE_VECTOR[per_access * 8]
    byte_streams = sum(ELEMENT_BYTES[name] == 1 for name, _, _ in _streams(spec))
    expected = byte_streams * elements // per_access
    # Stores exactly: no other unpredicated store has this width (the 2- and 4-byte streams'
    # are 64- or 128-bit).
    stores = _unpredicated("st", vector, ptx)
    assert stores == expected, f"{stores} st.global.{vector} of bytes, expected {expected}"
    # Loads at least: a few scalar loads of the prelude and the absmax are b32 too.
    loads = _unpredicated("ld", vector, ptx)
    assert loads >= expected, f"{loads} ld.global.{vector}, expected {expected} of bytes"
    for op in ("ld", "st"):
        single = len(re.findall(rf"\b{op}\.global(?:\.\w+)*\.b8\b", ptx))
        assert single == byte_streams * elements, \
            f"{single} {op}.global.b8, expected {byte_streams * elements} (the tail chunk's only)"


@pytest.mark.parametrize("spec", QUANTIZED_SPECS, ids=_spec_id)
def test_quantized_kernel_moves_only_absmax_through_shared_memory(compiled, spec):
    """A block is one warp's ([SPLIT, BLOCKS, WIDTH] tile of `_adam_q8_kernel`), so its absmax
    reduces within threads and then across lanes (one redux.sync.max.s32 on sm_80 and later:
    the absmax is an integer max), with no tile through shared memory.
    What does go through it: each new absmax, from the warp that reduced it to the 1-D layout
    Triton gives the store of a [BLOCKS] vector; one st.shared and one ld.shared per moment in
    each of the two paths (whole chunk, tail)."""
    ptx, _ = compiled(spec)
    assert re.search(r"\bredux\.sync\.max\.s32\b", ptx), "no warp reduction"
    for op in ("st", "ld"):
        found = re.findall(rf"\b{op}\.shared(?:\.\w+)*", ptx)
        assert len(found) <= 4, f"{len(found)} {op}.shared: a tile goes through shared memory"


# torch's own FMAs, and no other: its CPU kernels (GCC) and CUDA kernels (nvcc) fuse the L2
# term (add with alpha), lerp (either branch) and addcmul, and round every other product and
# sum apart. Per element and path (whole chunk, tail) four fma.rn.f32 (lerp's two branches
# are both compiled, one taken at run time); a contraction of any other pair would add more.
_TORCH_FMAS = 4


def _assert_only_torchs_fmas(ptx, meta):
    per_thread = meta["block_size"] // (32 * meta["num_warps"])
    found = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
    assert found == _TORCH_FMAS * per_thread * 2, (
        f"{found} fma.rn.f32, torch's are {_TORCH_FMAS} per element and path "
        f"({per_thread} elements a thread): contracted where torch rounds twice")


@pytest.mark.parametrize("spec", QUANTIZED_SPECS, ids=_spec_id)
def test_quantized_kernel_rounds_as_the_contract(compiled, spec):
    """IEEE division and square roots (the interpreter's and torch's), the absmax an integer
    max over the magnitudes' bits (NaN above everything: no max.f32, which drops NaN),
    `_rint`'s two additions of +-2^23 (0f4B000000, 0fCB000000) not folded away, and torch's
    FMAs only."""
    ptx, meta = compiled(spec)
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    approximate = re.findall(r"\b(?:div\.(?:full|approx)|sqrt\.approx|rcp\.approx)(?:\.ftz)?"
                             r"\.f32\b", ptx)
    assert not approximate, f"approximate math: {sorted(set(approximate))}"
    assert re.search(r"\bmax\.s32\b", ptx) and not re.search(r"\bmax(?:\.\w+)*\.f32\b", ptx), \
        "the absmax is not the integer max of the magnitudes' bits"
    up = re.findall(r"\badd\.rn\.f32\s+(%\w+),\s*%\w+,\s*0f4B000000;", ptx)
    down = re.findall(r"\b(?:add\.rn\.f32\s+%\w+,\s*(%\w+),\s*0fCB000000|"
                      r"sub\.rn\.f32\s+%\w+,\s*(%\w+),\s*0f4B000000);", ptx)
    rounded = {register for pair in down for register in pair if register}
    assert up and set(up) <= rounded, "rint's x + 2^23 - 2^23 was folded"
    _assert_only_torchs_fmas(ptx, meta)


@pytest.mark.parametrize("spec", [spec for spec in SPECS if spec[1] != "fp64"
                                  and spec[2] != "int8"], ids=_spec_id)
def test_fp32_math_rounds_as_the_contract(compiled, spec):
    """`_adam_kernel`'s fp32 math (8-bit moments: see the test above): IEEE division and square
    roots, as the interpreter's and torch's, and torch's FMAs only."""
    ptx, meta = compiled(spec)
    assert re.search(r"\bdiv\.rn\.f32\b", ptx) and re.search(r"\bsqrt\.rn\.f32\b", ptx)
    approximate = re.findall(r"\b(?:div\.(?:full|approx)|sqrt\.approx|rcp\.approx)(?:\.ftz)?"
                             r"\.f32\b", ptx)
    assert not approximate, f"approximate math: {sorted(set(approximate))}"
    _assert_only_torchs_fmas(ptx, meta)


@pytest.mark.parametrize("spec", COMPACT_SPECS, ids=_spec_id)
def test_compact_master_splits_with_integer_operations(compiled, spec):
    """The master is split as the contract says, on its bits: (bits + 0x8000) >> 16 for every
    element a thread steps, in the whole chunk and in the tail (add.s32 32768: ties away from
    zero, where a cvt.rn would round them to even), and for bf16+8 the remainder's
    (r + 0x80) >> 8 (an arithmetic shift) clamped to 127. No fp32 -> bf16 conversion where
    the moments are not bf16: the params are never rounded by cvt."""
    ptx, meta = compiled(spec)
    elements = meta["block_size"] // (32 * meta["num_warps"])  # per thread
    _, _, state, master, _ = spec
    found = len(re.findall(r"\badd\.s32\s+%r\d+,\s*%r\d+,\s*32768;", ptx))
    assert found == 2 * elements, f"{found} add.s32 32768, expected {2 * elements}"
    if master == "bf16+8":
        for pattern in (r"shr\.s32\s+%r\d+,\s*%r\d+,\s*8;",
                        r"min\.s32\s+%r\d+,\s*%r\d+,\s*127;"):
            found = len(re.findall(rf"\b{pattern}", ptx))
            assert found == 2 * elements, f"{found} {pattern}, expected {2 * elements}"
    if state != "bf16":
        rounded = re.findall(r"\bcvt(?:\.\w+)*\.bf16(?:x2)?\.f32\b", ptx)
        assert not rounded, f"a param rounded by {sorted(set(rounded))}"


@pytest.mark.parametrize("spec", [spec for spec in SPECS if spec[1] in ("bf16", "fp16")
                                  or spec[2] == "bf16"], ids=_spec_id)
def test_compiled_16_bit_stores_round_to_nearest_even(compiled, spec):
    """Compiled, every fp32 -> bf16/fp16 rounding is a cvt.rn (two values per instruction
    in whole chunks); the interpreter's rounding is checked by the test below."""
    ptx, meta = compiled(spec)
    other_rounding = re.findall(r"\bcvt\.r[zmp]\w*\.b?f16\w*\.f32\b", ptx)
    assert not other_rounding, f"not rounded to nearest even: {sorted(set(other_rounding))}"
    for kind, values in _stored_16_bit(spec, meta["block_size"], meta["num_warps"]).items():
        found = len(re.findall(rf"\bcvt\.rn\.{kind}x2\.f32\b", ptx))
        assert found >= values // 2, f"only {found} cvt.rn.{kind}x2.f32, expected {values // 2}"


_store_rounded = importlib.import_module("fused_adam.kernels.triton_adam")._store_rounded


@triton.jit
def _store_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    _store_rounded(y_ptr + offsets, tl.load(x_ptr + offsets), None)


# Ties, values that round up into the next binade and to infinity, signed zeros, subnormals,
# NaNs whose rounding bias would carry (0x7FFFFFFF is the NaN NVIDIA GPUs produce).
_EDGE_BITS = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3F7FFFFF, 0x7F7FFFFF,
              0x7F7F8000, 0xFF7F8000, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000,
              0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x7F800001, 0x7FFFFFFF,
              0xFFFFFFFF, 0x7FC00000]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_interpreted_16_bit_stores_round_to_nearest_even(dtype_name):
    """`_store_rounded` as the kernel runs it here: under Triton's interpreter, which truncates
    fp32 -> bf16 itself, the kernel rounds with integer ops; bit for bit torch's rounding, and
    NaN stays NaN."""
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the interpreter's path; compiled code is checked above")
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (4096 - len(_EDGE_BITS),), generator=generator)
    bits = torch.cat([torch.tensor(_EDGE_BITS, dtype=torch.int64), random_bits])
    x = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits
    dtype = getattr(torch, TORCH_DTYPES[dtype_name])
    y = torch.empty(x.numel(), dtype=dtype)
    _store_kernel[(1,)](x, y, N=x.numel())
    expected = x.to(dtype)
    nan = x.isnan()
    assert y[nan].isnan().all(), "a NaN was not stored as NaN"
    wrong = torch.nonzero(y[~nan].view(torch.int16) != expected[~nan].view(torch.int16))
    assert wrong.numel() == 0, (
        f"{wrong.numel()} values rounded unlike torch; first: fp32 bits "
        f"{int(bits[~nan][wrong[0, 0]]) & 0xFFFFFFFF:#010x} -> {y[~nan][wrong[0, 0]].item()!r}, "
        f"torch {expected[~nan][wrong[0, 0]].item()!r}")


# A 32-bit index reaches a 64-bit address through sign extension: mul/mad.wide.s32,
# cvt.s64.s32, or shl.b64 32 + shr.s64. Checked against mutants of the kernel: a 32-bit
# program id gives `mad.wide.s32` on the chunk-table address, 32-bit element offsets give
# `shr.s64` before every buffer access.
SIGN_EXTENSION = re.compile(r"\b(?:mul\.wide\.s32|mad\.wide\.s32|cvt\.s64\.s32|shr\.s64)\b")


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_address_math_is_64_bit(compiled, spec):
    ptx, _ = compiled(spec)
    assert "%ctaid.x" in ptx
    found = sorted(set(SIGN_EXTENSION.findall(ptx)))
    assert not found, f"32-bit index widened by sign extension: {found}"
    # Element index to byte offset, on 64-bit registers, for every element size moved.
    sizes = {ELEMENT_BYTES[name] for name, _, _ in _streams(spec)}
    if spec[2] == "int8":
        sizes |= {4}  # fp32 absmax
    sizes -= {1}  # a code's or an int8 remainder's index is its byte offset
    for size in sorted(sizes):
        shift = size.bit_length() - 1
        assert re.search(rf"\bshl\.b64\s+%rd\d+,\s*%rd\d+,\s*{shift};", ptx), \
            f"no 64-bit element-to-byte shift by {shift}"


@pytest.mark.parametrize("spec", POWER_SPECS, ids=_power_spec_id)
def test_gradient_norm_reads_whole_chunks_with_128_bit_loads(compiled, spec):
    """The norm kernel reads 4 B a parameter (fp32): at the bus's speed only if its whole-chunk
    loads are 128-bit like the step's, with 64-bit addressing and nothing spilled."""
    ptx, meta = compiled(spec)
    _, name, _ = spec
    assert ".entry _power_sum_kernel" in ptx
    assert "st.local" not in ptx and "ld.local" not in ptx, "registers spill to local memory"
    per_thread = meta["block_size"] // (32 * meta["num_warps"])
    per_access = 16 // ELEMENT_BYTES[name]
    vector = "v2.b64" if name == "fp64" else "v4.b32"
    found = len(re.findall(rf"\bld\.global(?:\.\w+)*\.{re.escape(vector)}\b", ptx))
    assert found >= per_thread // per_access, \
        f"only {found} ld.global.{vector}, expected {per_thread // per_access}"
    assert not SIGN_EXTENSION.findall(ptx), "32-bit index widened by sign extension"
