"""fused_adam: Adam and AdamW for PyTorch whose whole step is one pass over flat buffers."""
# Imported now, not with the first optimizer: a process forked from here on must know it is a
# child (see fused_adam.kernels.cpu_threads).
from fused_adam.kernels import cpu_threads  # noqa: F401
from fused_adam.compressed import dequantized_state_dict, master_params
from fused_adam.optimizer import FusedAdam, FusedAdamW
from fused_adam.wrapped import clip_grad_norm_

__all__ = ["FusedAdam", "FusedAdamW", "clip_grad_norm_", "dequantized_state_dict",
           "master_params"]
__version__ = "0.1.0"
