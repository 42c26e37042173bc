"""Which kernel steps an arena: the one place that decides.

An explicit `backend=` wins, then `FUSED_ADAM_BACKEND` in the environment, then the device:
Triton for CUDA (and ROCm) tensors, Numba for CPU tensors of the dtypes it compiles, the plain
torch reference for anything else. A backend that cannot run is refused when the optimizer is
built, in one line that says why, never at the first step.
"""
import importlib
import importlib.util
import os

from fused_adam.kernels.contract import PARAM_DTYPES

BACKENDS = ("numba", "triton", "torch")
ENVIRONMENT_VARIABLE = "FUSED_ADAM_BACKEND"
_MODULES = {"numba": "numba_adam", "triton": "triton_adam", "torch": "reference"}


def _why_not(backend, device, dtype):
    """None if `backend` can step (device, dtype) tensors here, else the reason."""
    if backend == "torch":
        return None
    if backend == "numba":
        if device.type != "cpu":
            return f"the numba backend runs on CPU tensors, not {device.type}"
        if dtype not in PARAM_DTYPES:
            return ("the numba backend supports float32, float64, bfloat16 and float16 "
                    f"parameters, not {dtype}")
        if importlib.util.find_spec("numba") is None:
            return "the numba backend needs numba: pip install numba"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs triton: pip install triton"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on cuda tensors, not {device.type}"
        if dtype not in PARAM_DTYPES:
            return f"the triton backend does not support {dtype} parameters"
        return None
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def _detected(device, dtype):
    preferred = {"cuda": "triton", "cpu": "numba"}.get(device.type, "torch")
    return preferred if _why_not(preferred, device, dtype) is None else "torch"


def backend_name(requested, device, dtype):
    """The backend for (device, dtype) tensors; raises ValueError if the requested one can't run."""
    name = requested or os.environ.get(ENVIRONMENT_VARIABLE) or _detected(device, dtype)
    reason = _why_not(name, device, dtype)
    if reason is not None:
        source = "backend=" if requested else f"{ENVIRONMENT_VARIABLE}="
        raise ValueError(f"FusedAdam: {source}{name!r} cannot step these parameters: {reason}")
    return name


def load_backend(name):
    """The module of backend `name`: its `adam_step` launcher and what it needs of gradients
    (`GRADS`, `GRAD_ADDRESS_ALIGNMENT`), imported on first use: numba and triton are slow to
    import, triton optional."""
    return importlib.import_module(f"fused_adam.kernels.{_MODULES[name]}")
