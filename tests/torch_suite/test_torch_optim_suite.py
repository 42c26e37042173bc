"""PyTorch's own optimizer suite (`TestOptimRenewed`, vendored unmodified in
`_upstream_test_optim.py`) run against FusedAdam and FusedAdamW on CPU.

The trade-off that shaped it: the vendored file stays byte-for-byte upstream's, so everything
FusedAdam-specific lives here. Its optim_db entries are torch's own Adam and AdamW entries
(same optim inputs, schedulers, error inputs, tolerances), with the class swapped and only
these changes, each with its reason:

- `differentiable` is dropped from `supported_impls`: FusedAdam refuses `differentiable=True`
  by design (README, Limits). `foreach` and `fused` stay: the constructor accepts and ignores
  them, so the suite's configs with `foreach=`/`fused=` still construct and step FusedAdam.
- Error inputs whose point is a `foreach`/`fused` implementation switch are left out
  (`_INAPPLICABLE_ERRORS`): FusedAdam ignores those flags, so there is nothing to refuse.
- Tests in `SKIPS` cannot apply to a single-implementation optimizer; each says why.

The tests are the vendored file's own: it is imported once with `optim_db` replaced by these
entries and `instantiate_device_type_tests` restricted to CPU, then both are restored. Tests in
the file that construct torch's optimizers directly whatever the optim_db
(`test_adamw_serialization`, `test_step_iteration`, `TestSWAUtils`) are not instantiated.

`FUSED_ADAM_TORCH_SUITE=torch` runs torch's own Adam and AdamW entries through the same
machinery instead: the baseline these counts are compared with (`run.sh --baseline`).
"""
import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest
import torch
import torch.backends

_BACKEND_FLAGS_WERE_FROZEN = torch.backends.flags_frozen()

# These import torch's common_utils, which freezes torch.backends' global flags
# (`disable_global_flags()`): see _unfreeze_backend_flags.
from torch.testing._internal import common_device_type, common_optimizers  # noqa: E402
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import ErrorOptimizerInput, OptimizerInfo

from fused_adam import FusedAdam, FusedAdamW

_UPSTREAM = Path(__file__).with_name("_upstream_test_optim.py")
_BASELINE = os.environ.get("FUSED_ADAM_TORCH_SUITE") == "torch"

# Tests of the vendored file that build torch's optimizers themselves, whatever the optim_db:
# running them here would test torch, not FusedAdam.
_TORCH_ONLY_TESTS = ("test_adamw_serialization", "test_step_iteration")

# Tests that cannot apply to FusedAdam, with the reason. These are the README's list.
SKIPS = {
    "test_foreach_matches_forloop":
        "compares torch's foreach implementation with its for-loop one; FusedAdam has one "
        "implementation and ignores foreach=, so the test would compare FusedAdam with itself",
    "test_fused_matches_forloop":
        "compares torch's fused implementation with its for-loop one; FusedAdam has one "
        "implementation and ignores fused=, so the test would compare FusedAdam with itself",
    "test_fused_error_on_params_on_meta":
        "checks torch's fused kernel's refusal of meta params at the step "
        "(`fused=True` requires floating point Tensors); FusedAdam ignores fused=",
}

# Tests that cannot apply to one of the two, with the reason.
SKIPS_BY_CLASS = {
    "FusedAdamW": {
        "test_step_is_noop_for_zero_grads":
            "with zero grads AdamW's decoupled weight decay still moves the params; the test "
            "lowers lr to 1e-5 for that only when the class is named AdamW, so FusedAdamW "
            "steps at lr 1e-3/1e-2 and moves them (torch's AdamW at those lrs fails it too)",
    },
}

# Error inputs (by their desc) about the foreach/fused switch: FusedAdam ignores both flags.
_INAPPLICABLE_ERRORS = {
    "lr as Tensor doesn't work with foreach & not capturable",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
    "`fused` and `foreach` cannot be `True` together",
    "`fused` does not support `differentiable`",
}


# Error inputs (by their desc) where FusedAdam deliberately raises where torch warns: a parameter
# listed twice in one group (torch warns that this will become an error, and steps it twice).
_DELIBERATE_ERRORS = {
    "a param group cannot have duplicate parameters": (ValueError, "listed again"),
}


def _our_error_inputs(error_inputs_func):
    def optim_error_inputs_func(device, dtype):
        errors = []
        for error in error_inputs_func(device, dtype):
            desc = error.optimizer_error_input.desc
            if desc in _INAPPLICABLE_ERRORS:
                continue
            if desc in _DELIBERATE_ERRORS:
                error_type, error_regex = _DELIBERATE_ERRORS[desc]
                error = ErrorOptimizerInput(error.optimizer_error_input, error_on=error.error_on,
                                            error_type=error_type, error_regex=error_regex)
            errors.append(error)
        return errors
    return optim_error_inputs_func


def _fused_entry(optim_cls, torch_info):
    """torch's OptimizerInfo for Adam or AdamW, made to describe `optim_cls`."""
    skips = tuple(DecorateInfo(unittest.skip(reason), "TestOptimRenewed", test_name)
                  for test_name, reason in {**SKIPS,
                                            **SKIPS_BY_CLASS.get(optim_cls.__name__, {})}.items())
    return OptimizerInfo(
        optim_cls,
        optim_inputs_func=torch_info.optim_inputs_func,
        scheduler_inputs=torch_info.scheduler_inputs,
        supported_impls=tuple(impl for impl in torch_info.supported_impls
                              if impl != "differentiable"),
        not_og_supported_flags=torch_info.not_og_supported_flags,
        supports_sparse=torch_info.supports_sparse,
        has_capturable_arg=torch_info.has_capturable_arg,
        only_supports_sparse_grads=torch_info.only_supports_sparse_grads,
        metadata_for_sparse=torch_info.metadata_for_sparse,
        supports_complex=torch_info.supports_complex,
        step_requires_closure=torch_info.step_requires_closure,
        supports_param_groups=torch_info.supports_param_groups,
        supports_multiple_devices=torch_info.supports_multiple_devices,
        decorators=(*torch_info.decorators, *skips),
        optim_error_inputs_func=_our_error_inputs(
            torch_info.optim_error_inputs_func),
        supports_fused_on=torch_info.supports_fused_on,
    )


def _optim_db_of_torch():
    return common_optimizers.optim_db


def _optim_db():
    torch_db = {info.name: info for info in _optim_db_of_torch()}
    if _BASELINE:
        return [torch_db["Adam"], torch_db["AdamW"]]
    return [_fused_entry(FusedAdam, torch_db["Adam"]),
            _fused_entry(FusedAdamW, torch_db["AdamW"])]


def _unfreeze_backend_flags():
    """Undo what importing torch's common_utils did to the whole process: after
    `torch.backends.disable_global_flags()`, `torch.backends.cudnn.benchmark = ...` raises, and
    the other test modules of `pytest tests` run in this process (Lightning's Trainer sets that
    flag when given `benchmark=` or `deterministic=`)."""
    if not _BACKEND_FLAGS_WERE_FROZEN:  # the flag is a global of torch/backends/__init__.py
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


def _load_upstream():
    """Import the vendored file with our optim_db and CPU-only instantiation; return its
    CPU test class."""
    real_optim_db = common_optimizers.optim_db
    real_instantiate = common_device_type.instantiate_device_type_tests

    def instantiate_on_cpu(generic_test_class, scope, **kwargs):
        if generic_test_class.__name__ != "TestOptimRenewed":
            return  # TestSWAUtils: torch's SWA utilities, not an optimizer of ours
        for name in _TORCH_ONLY_TESTS:
            delattr(generic_test_class, name)
        real_instantiate(generic_test_class, scope, only_for=("cpu",))

    # Its sibling modules in torch's test/optim/ are not shipped with the wheel; the names it
    # imports from them are only re-exported (TestSWAUtils goes to instantiate_on_cpu).
    stubs = {
        "optim": {},
        "optim.test_lrscheduler": {"TestLRScheduler": None},
        "optim.test_optim": {"TestDifferentiableOptimizer": None},
        "optim.test_swa_utils": {"TestSWAUtils": type("TestSWAUtils", (), {})},
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    module_name = "fused_adam_torch_suite_upstream"
    spec = importlib.util.spec_from_file_location(module_name, _UPSTREAM)
    upstream = importlib.util.module_from_spec(spec)
    common_optimizers.optim_db = _optim_db()
    common_device_type.instantiate_device_type_tests = instantiate_on_cpu
    try:
        sys.modules[module_name] = upstream
        spec.loader.exec_module(upstream)
    finally:
        common_optimizers.optim_db = real_optim_db
        common_device_type.instantiate_device_type_tests = real_instantiate
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _unfreeze_backend_flags()
    return upstream.TestOptimRenewedCPU


try:
    TestOptimRenewedCPU = _load_upstream()
except ImportError as error:  # a torch whose testing internals predate the vendored file
    pytest.skip(f"torch {torch.__version__}'s testing internals cannot run the vendored "
                f"test_optim.py (written against torch 2.13): {error}", allow_module_level=True)


# In place of the skipped foreach/fused-vs-for-loop tests: the same harness
# (`_compare_between`: 7 steps, a layer frozen for two of them, one step without grads, a
# zero-size last param), comparing FusedAdam with torch's for-loop Adam instead of torch's
# implementations with each other. 16-bit tolerances are the ones torch's optim_db grants its
# own fused kernels against the for-loop (5e-3); float32 and float64 use assertEqual's defaults.
_COMPARE_TOLERANCES = {torch.bfloat16: dict(atol=5e-3, rtol=5e-3),
                       torch.float16: dict(atol=5e-3, rtol=5e-3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("optim_cls, torch_cls", [(FusedAdam, torch.optim.Adam),
                                                  (FusedAdamW, torch.optim.AdamW)],
                         ids=["FusedAdam", "FusedAdamW"])
def test_matches_torch_forloop(optim_cls, torch_cls, dtype):
    case = TestOptimRenewedCPU("test_errors_FusedAdam_cpu_float32")  # for its assertEqual
    torch_info = {info.name: info for info in _optim_db_of_torch()}[torch_cls.__name__]
    for optim_input in torch_info.optim_inputs_func(device="cpu", dtype=dtype):
        models, optimizers = [], []
        for cls, flags in ((torch_cls, {"foreach": False}), (optim_cls, {})):
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                        torch.nn.Linear(3, 1), torch.nn.Sigmoid()).to(dtype)
            empty_param = torch.empty((), dtype=dtype, requires_grad=True)
            empty_param.grad = torch.rand_like(empty_param)
            optimizers.append(cls([*model.parameters(), empty_param], **optim_input.kwargs,
                                  **flags))
            models.append(model)
        inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        case._compare_between(inputs, models, optimizers, _COMPARE_TOLERANCES.get(dtype))
