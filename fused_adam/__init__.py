"""fused_adam: Adam and AdamW for PyTorch whose whole step is one pass over flat buffers."""
from fused_adam.optimizer import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW"]
__version__ = "0.1.0"
