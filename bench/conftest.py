"""pytest settings for the pytest-benchmark suite in bench/.

Benchmarks take a while and assert nothing about correctness, so they run only when bench/ is
named on the command line (`pytest bench/ --benchmark-only`); a bare `pytest` from the repo root
that wanders in here skips them instead of spending minutes timing optimizers.
"""
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent


def _bench_requested(config):
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == BENCH_DIR or BENCH_DIR in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _bench_requested(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run with: pytest bench/ --benchmark-only")
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
