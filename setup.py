import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# One source for the version: the package's own __version__.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "fused_adam" / "__init__.py").read_text(),
                    re.M).group(1)

setup(
    name="fused-adam",
    version=VERSION,
    description=("Fused Adam/AdamW for PyTorch: one pass over flat buffers (Triton on GPU, "
                 "Numba on CPU)"),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder ships as fused_adam.kernels: a top-level module named
    # `kernels` would collide with other packages.
    packages=["fused_adam", "fused_adam.kernels"],
    package_dir={"fused_adam": "fused_adam", "fused_adam.kernels": "kernels"},
    install_requires=["torch>=2.4", "numba>=0.59", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        # matplotlib and tqdm: the tests run the benchmark commands end to end. The libraries
        # people train with: tests/test_integrations.py runs FusedAdam inside each of them.
        # kernels (PyPI's, which transformers imports): tests/test_import_names.py checks that
        # the checkout's kernels/ folder never shadows it. expecttest: torch's own test helpers
        # (torch.testing._internal.common_utils) import it; tests/torch_suite runs torch's suite.
        "test": ["pytest", "hypothesis", "triton>=3.6", "psutil", "matplotlib", "tqdm",
                 "safetensors>=0.4", "accelerate>=1.0", "transformers>=4.46", "lightning>=2.0",
                 "kernels", "expecttest"],
        # bitsandbytes and torchao: `python -m bench accuracy`'s third-party 8-bit AdamWs (both
        # run on CPU; tried with bitsandbytes 0.50.2, torchao 0.18.0, torch 2.13); the command
        # reports them as skipped when they are not installed.
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "triton>=3.6", "bitsandbytes",
                  "torchao"],
    },
)
