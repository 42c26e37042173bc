"""Test-wide settings. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter, which reads TRITON_INTERPRET when triton is first imported: so set it here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
