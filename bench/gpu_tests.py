"""pytest plugin for `python -m bench gpu`: run only the tests that need a GPU.

    python -m pytest tests -p bench.gpu_tests

The CPU suite is CI's job; on the GPU machine only what CI cannot run is worth its time. A test
needs a GPU when it carries a `skipif` whose reason names CUDA or a GPU (the convention of
`tests/`: `pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")`,
at module or test level); every other test is deselected.
"""
import re

_GPU_REASON = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def needs_gpu(item):
    return any(_GPU_REASON.search(str(mark.kwargs.get("reason", "")))
               for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_gpu(item)]
    dropped = [item for item in items if not needs_gpu(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
