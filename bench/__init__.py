"""Benchmarks for fused_adam: `python -m bench` (the step benchmark against torch's Adam and a
measured roofline), `train`, `grad-layout`, `breakdown`, `report` and `gpu` (see
`bench/__main__.py`), and a pytest-benchmark suite (`pytest bench/ --benchmark-only`).

One harness: `timing.interleave` times every command's subjects, `results` is the one row
schema they all write, `report` makes every table and plot from rows, `system.run_metadata`
says where and when a run was made; `memory` decides what fits.
"""
