"""Benchmarks for fused_adam: `python -m bench` (the step benchmark against torch's Adam and a
measured roofline), `train`, `accuracy`, `report` and `gpu` (see `bench/__main__.py`), a
pytest-benchmark suite (`pytest bench/ --benchmark-only`) and, in `bench/studies/`, the studies
behind the design (`breakdown` and `grad-layout` run as commands too).

One harness: `timing.interleave` times every command's subjects, `results` is the one row schema
they all write, `report` writes each command's tables and plot from rows, `system.run_metadata`
says where and when a run was made; `memory` decides what fits.
"""
