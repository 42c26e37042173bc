"""The fused clip where users clip: accelerate's `Accelerator.clip_grad_norm_` (and so the
transformers `Trainer`, which clips through its accelerator) and Lightning's `Trainer(
gradient_clip_val=...)`, each switched on by one line of user code.

    accelerator = use_fused_clipping(Accelerator(...))      # accelerate
    use_fused_clipping(trainer)                             # transformers.Trainer(..., args)
    class Model(FusedGradientClipping, LightningModule):    # Lightning

The trade-off: each library's own clip is left in place, and the fused one is taken only where
it computes the very same norm (the parameters handed to the clip are exactly those of one
FusedAdam that have a gradient, nothing sharded in a way the library handles itself); anywhere
else the library's clip runs as it would have. A user switching optimizers keeps the one line.

Nothing here imports accelerate, transformers or lightning: the objects passed in carry them.
"""
import functools

from fused_adam.wrapped import clip_grad_norm_, fused_optimizer_of

# accelerate's distributed types under which every rank holds whole gradients (none, or DDP's
# all-reduced ones), so that one FusedAdam's norm is the norm accelerate computes. FSDP,
# DeepSpeed, XLA and Megatron clip in their own ways: they keep accelerate's.
_WHOLE_GRADIENTS = ("NO", "MULTI_")


def use_fused_clipping(target):
    """Make `target.clip_grad_norm_(parameters, max_norm, norm_type)` use the fused clip when
    `parameters`' gradients are exactly those of a FusedAdam that `target` prepared: accelerate's
    unscale (`unscale_gradients()`, as its own clip does), then `FusedAdam.clip_grad_norm`, which
    returns the same norm and leaves p.grad unclipped for the next step to scale. Otherwise (other
    optimizers, a subset of the parameters, FSDP or DeepSpeed, a clip between two backward passes
    of one accumulated step) accelerate's own clip runs.

    `target` is an `accelerate.Accelerator` or anything holding one as `.accelerator`, such as a
    `transformers.Trainer` (whose accelerator is made in `__init__`, and made again by
    `hyperparameter_search`: that one is switched over too). Returns `target`.
    """
    if _is_accelerator(target):
        _patch_accelerator(target)
        return target
    accelerator = getattr(target, "accelerator", None)
    if not _is_accelerator(accelerator):
        raise TypeError(f"use_fused_clipping: {type(target).__name__} is not an accelerate "
                        "Accelerator and holds none as `.accelerator`")
    _patch_accelerator(accelerator)
    recreate = getattr(target, "create_accelerator_and_postprocess", None)
    if recreate is not None and not getattr(recreate, "_fused_adam_patched", False):
        @functools.wraps(recreate)
        def create_accelerator_and_postprocess(*args, **kwargs):
            result = recreate(*args, **kwargs)
            _patch_accelerator(target.accelerator)
            return result
        create_accelerator_and_postprocess._fused_adam_patched = True
        target.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    return target


def _is_accelerator(target):
    return hasattr(target, "clip_grad_norm_") and hasattr(target, "_optimizers")


def _patch_accelerator(accelerator):
    """Wrap this accelerator's `clip_grad_norm_` (the instance's, not the class's); once."""
    original = accelerator.clip_grad_norm_
    if getattr(original, "_fused_adam_patched", False):
        return

    @functools.wraps(original)
    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        parameters = list(parameters)  # often a generator: read here and by the fallback
        fused = _fused_for(accelerator, parameters)
        if fused is None:
            return original(parameters, max_norm, norm_type)
        accelerator.unscale_gradients()
        return fused.clip_grad_norm(max_norm, norm_type)

    clip_grad_norm_._fused_adam_patched = True
    accelerator.clip_grad_norm_ = clip_grad_norm_


def _fused_for(accelerator, parameters):
    """The FusedAdam among the accelerator's prepared optimizers whose clip is accelerate's clip
    of `parameters`, or None."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if not kind.startswith(_WHOLE_GRADIENTS):
        return None
    # Between micro-batches torch's clip scales the partial gradients, which the next backward
    # adds to; a factor pending for the step cannot say that.
    if not accelerator.sync_gradients:
        return None
    with_grads = [p for p in parameters if p.grad is not None]
    wanted = {id(p) for p in with_grads}
    if len(wanted) != len(with_grads):  # a parameter listed twice counts twice in torch's norm
        return None
    for prepared in accelerator._optimizers:
        try:
            fused, process_group = fused_optimizer_of(prepared)
        except TypeError:
            continue
        if process_group is not None:
            continue
        held = {id(p) for group in fused.param_groups for p in group["params"]
                if p.grad is not None}
        if held == wanted:
            return fused
    return None


class FusedGradientClipping:
    """A LightningModule mixin: `Trainer(gradient_clip_val=...)` (the "norm" algorithm, the
    default) clips with the fused clip when the optimizer is, or wraps, a FusedAdam. Put it
    before `LightningModule` in the bases:

        class Model(FusedGradientClipping, LightningModule): ...

    It overrides `configure_gradient_clipping`, Lightning's hook for custom clipping, and
    computes the norm Lightning's `clip_gradients` would (torch's, over the optimizer's
    parameters), leaving the scaling to the step's kernel. It also lifts Lightning's refusal to
    clip for an optimizer that unscales in its step (`precision="16-mixed"` and "bf16-mixed",
    lightning/pytorch/plugins/precision/amp.py): under "16-mixed" it unscales the gradients
    first, which Lightning skips for such optimizers, and the scaler's step then hands the
    optimizer no scale. Clipping by value, and any optimizer that is no FusedAdam, go to
    Lightning's own. A module whose own `configure_gradient_clipping` overrides this one can
    call `self.fused_clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)`.
    """

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        self.fused_clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def fused_clip_gradients(self, optimizer, gradient_clip_val=None,
                             gradient_clip_algorithm=None):
        """Lightning's `clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)`,
        with the fused clip for "norm" on a FusedAdam. Returns the norm, or None where
        Lightning's own clip ran."""
        trainer = self.trainer
        # Resolved as Lightning's `clip_gradients` resolves them.
        max_norm = trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val
        algorithm = (trainer.gradient_clip_algorithm if gradient_clip_algorithm is None
                     else gradient_clip_algorithm) or "norm"
        algorithm = str(getattr(algorithm, "value", algorithm)).lower()
        plugin = trainer.precision_plugin
        if (algorithm != "norm" or not max_norm or max_norm <= 0 or not _is_fused(optimizer)
                or not _clips_with_torch(plugin)):
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)
            return None
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        return clip_grad_norm_(optimizer, max_norm)


# The Lightning precision plugins whose norm clip is torch's clip_grad_norm_ over the optimizer's
# params (the base Precision's), maybe behind MixedPrecision's refusal of fused optimizers.
# FSDPPrecision refuses for a reason that holds here too (each rank holds a shard of flat
# params), DeepSpeedPrecision leaves clipping to the engine: those keep Lightning's own.
_TORCH_CLIP = dict(clip_grad_by_norm=("Precision",), main_params=("Precision",),
                   clip_gradients=("Precision", "MixedPrecision"))


def _clips_with_torch(plugin):
    """Whether `plugin` (a Lightning precision plugin) clips by norm with torch's clip over the
    optimizer's params, told by the classes that define its clipping methods (both packages,
    `lightning` and `pytorch_lightning`, name them alike)."""
    for method, owners in _TORCH_CLIP.items():
        owner = next((cls for cls in type(plugin).__mro__ if method in vars(cls)), None)
        if owner is None or owner.__name__ not in owners:
            return False
    return True


def _is_fused(optimizer):
    try:
        fused_optimizer_of(optimizer)
    except TypeError:
        return False
    return True


__all__ = ["use_fused_clipping", "FusedGradientClipping"]
