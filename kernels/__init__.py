"""fused_adam's kernels, no optimizer logic: the contract every backend reads (`contract`), the
stored formats' codecs (`codecs`), the plain-torch oracle (`reference`), Numba for CPUs
(`numba_adam`, on the threads `cpu_threads` picks), Triton for GPUs (`triton_adam`).

This folder sits at the top of the checkout and installs as `fused_adam.kernels` (setup.py's
package_dir). Whatever runs from a checkout (`python -m pytest`, `python -m bench`, setup.py
itself) has the checkout first on sys.path, where this folder would also be found as a top-level
`kernels` and shadow the PyPI package of that name: transformers imports it, and its egg_info
plugin runs inside setup.py. Imported under that name, this file hands the name to the next
`kernels` on sys.path, or to none, and defines nothing of its own.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest_of_path = [entry for entry in sys.path
                     if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest_of_path)
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the checkout's kernels/ folder is fused_adam.kernels)",
            name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    # Replaced before it runs, so that its own `import kernels.x` finds it; the import system
    # returns whatever sys.modules holds once this file has run.
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
