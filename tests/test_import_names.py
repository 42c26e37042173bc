"""The checkout's top-level `kernels/` folder is `fused_adam.kernels` and nothing else: with the
checkout first on sys.path (as `python -m pytest`, `python -m bench` and setup.py put it), a
top-level `import kernels` still finds the PyPI package of that name, which transformers imports
(issue #20: transformers 5.25 made every integration test fail on a fresh machine)."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_BENCH = ["--quick", "--device", "cpu", "--configs", "small-800", "--providers",
              "fused_adam-numba", "--warmup", "1", "--iters", "1"]


def _pypi_kernels_dir():
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (the test extra installs it)")
    return Path(distribution.locate_file("kernels")).resolve()


def _run_from_checkout(code, *args):
    """`python -c code` in the checkout: like `python -m`, it puts the working directory first
    on sys.path."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_kernels_in_this_process_is_the_pypi_package():
    expected = _pypi_kernels_dir()
    import kernels
    assert Path(kernels.__file__).resolve().parent == expected, kernels.__file__
    import transformers.integrations.hub_kernels  # noqa: F401  (it imports from `kernels`)


def test_kernels_with_the_checkout_first_on_sys_path_is_the_pypi_package():
    expected = _pypi_kernels_dir()
    where = _run_from_checkout(
        "import sys; sys.path.insert(0, sys.argv[1]); import kernels; "
        "import transformers.integrations.hub_kernels; print(kernels.__file__)", str(REPO))
    assert Path(where).resolve().parent == expected, where


def test_kernels_inside_the_benchmark_is_the_pypi_package(tmp_path):
    expected = _pypi_kernels_dir()
    where = _run_from_checkout(
        "import runpy, sys; sys.argv = ['bench', *sys.argv[1:]]; "
        "runpy.run_module('bench', run_name='__main__', alter_sys=True); "
        "import kernels; print(kernels.__file__)", *TINY_BENCH, "--out", str(tmp_path))
    assert Path(where).resolve().parent == expected, where
    assert (tmp_path / "results.json").exists()


def test_the_checkout_kernels_folder_is_fused_adam_kernels_only():
    """Without another `kernels` on the path, the folder is still not a top-level package."""
    code = ("import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if 'site-packages' not"
            " in p]\ntry:\n    import kernels\nexcept ModuleNotFoundError as error:\n"
            "    print('refused:', error.name)\nelse:\n    print('imported', kernels.__file__)")
    assert _run_from_checkout(code, str(REPO)) == "refused: kernels"
    from fused_adam.kernels import contract
    assert Path(contract.__file__).resolve() == REPO / "kernels" / "contract.py"
