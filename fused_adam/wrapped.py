"""The FusedAdam inside whatever wraps it, for the calls users make on the wrapper.

Training libraries hand user code a wrapper, not the optimizer: accelerate an
`AcceleratedOptimizer` (`.optimizer`), Lightning a `LightningOptimizer` (`._optimizer`),
torch's `ZeroRedundancyOptimizer` a sharding optimizer whose `.optim` steps this rank's share of
the parameters (its norm is then a share too: the process group completes it).
"""
from fused_adam.optimizer import FusedAdam

# Attribute names under which known wrappers keep the optimizer they wrap.
_WRAPPED_AS = ("optim", "optimizer", "_optimizer")


def fused_optimizer_of(optimizer):
    """(the FusedAdam inside `optimizer`, the process group its norm must be summed over or
    None); raises TypeError if there is none."""
    inner, process_group = optimizer, None
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(inner, FusedAdam):
            return inner, process_group
        if type(inner).__name__ == "ZeroRedundancyOptimizer":
            process_group = inner.process_group
        inner = next((getattr(inner, name) for name in _WRAPPED_AS
                      if getattr(inner, name, None) is not None), None)
        if inner is None:
            break
    raise TypeError(f"{type(optimizer).__name__} is not a FusedAdam and wraps none")


def clip_grad_norm_(optimizer, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """`FusedAdam.clip_grad_norm` on `optimizer` or on the FusedAdam a wrapper holds (see the
    module docstring): torch's `clip_grad_norm_` over the optimizer's parameters, one read of
    the gradients, the scaling left to the step's kernel. Returns the total norm. `foreach` is
    torch's, accepted and ignored."""
    fused, process_group = fused_optimizer_of(optimizer)
    return fused.clip_grad_norm(max_norm, norm_type, error_if_nonfinite,
                                process_group=process_group)
