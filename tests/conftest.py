"""Test-wide settings. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter, which reads TRITON_INTERPRET when triton is first imported: so set it here."""
import os
import sys
from pathlib import Path

import torch

# The benchmark package (`bench/`, not installed) is tested too: make it importable under a bare
# `pytest` as well as `python -m pytest` (which puts the working directory on sys.path). Appended,
# so that an installed fused_adam still comes first.
sys.path.append(str(Path(__file__).resolve().parents[1]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
