from pathlib import Path

from setuptools import setup

setup(
    name="fused-adam",
    version="0.1.0",
    description="Fused Adam/AdamW for PyTorch: one pass over flat buffers (Triton on GPU, Numba on CPU)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The top-level kernels/ folder ships as fused_adam.kernels: a top-level module named
    # `kernels` would collide with other packages.
    packages=["fused_adam", "fused_adam.kernels"],
    package_dir={"fused_adam": "fused_adam", "fused_adam.kernels": "kernels"},
    install_requires=["torch>=2.4", "numba>=0.59", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        # matplotlib and tqdm: the tests run a benchmark command (bench breakdown) end to end.
        "test": ["pytest", "hypothesis", "triton>=3.6", "psutil", "matplotlib", "tqdm"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark", "triton>=3.6"],
    },
)
