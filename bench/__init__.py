"""Benchmarks for fused_adam: `python -m bench` (step benchmark against torch's Adam and a
measured roofline), `python -m bench train`, `python -m bench grad-layout`, and a
pytest-benchmark suite (`pytest bench/ --benchmark-only`). See `bench/__main__.py`."""
