"""The fused clip where users clip (fused_adam.integrations), with the real libraries on tiny
models: the transformers Trainer (`TrainingArguments(max_grad_norm=...)`), a user loop calling
accelerate's `accelerator.clip_grad_norm_`, and Lightning's `Trainer(gradient_clip_val=...)` in
32-bit and bf16-mixed precision.

Each run with FusedAdamW and the one line of glue is compared with torch's AdamW(foreach=False)
and the library's own (torch's) clip, same seeds: params within `TOLERANCES[float32]`. Each also
asserts that the fused clip is what ran: `FusedAdam.clip_grad_norm` is spied on, and must be
called once a step, return torch's norm of the same gradients (within 1e-6 relative), leave
p.grad unclipped (its norm is still above max_norm after the call, where torch's clip would
have brought it down to max_norm), and the norm must exceed max_norm at every step (the clip
clips). Without the glue the libraries clip with torch's function and the spy sees no call.

The transformers and accelerate runs use the tiny Llama of test_integrations, not GPT-2: GPT-2's
attention key bias has a zero gradient up to rounding, which Adam turns into full steps, so any
two correct optimizers part ways there (see tiny_llama's docstring).
"""
import subprocess
import sys

import pytest
import torch

import fused_adam.integrations
from fused_adam import FusedAdam
from helpers import TOLERANCES
from test_integrations import (  # noqa: F401 (fixtures)
    FUSED, TORCH, TokenDataset, accelerate, assert_losses, assert_optimizer_states,
    assert_tensors, build, detached_state_dict, fresh_accelerator, lightning, lightning_module,
    tiny_llama, transformers)

FP32 = TOLERANCES[torch.float32]
EXACT = dict(rtol=0, atol=0)
STEPS = 6


def _relative(a, b):
    a, b = float(a), float(b)
    return abs(a - b) / abs(b) if b else abs(a)


@pytest.fixture
def fused_clips(monkeypatch):
    """Every call of FusedAdam.clip_grad_norm: dict(norm=what it returned, torch=torch's norm of
    the same gradients, after=the gradients' norm once it returned, max_norm)."""
    calls = []
    original = FusedAdam.clip_grad_norm

    def spy(self, max_norm, norm_type=2.0, error_if_nonfinite=False, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        expected = torch.nn.utils.get_total_norm(grads, norm_type)
        norm = original(self, max_norm, norm_type, error_if_nonfinite, **kwargs)
        calls.append(dict(norm=norm, torch=expected, max_norm=max_norm,
                          after=torch.nn.utils.get_total_norm(grads, norm_type)))
        return norm

    monkeypatch.setattr(FusedAdam, "clip_grad_norm", spy)
    monkeypatch.setattr(FusedAdam, "clip_grad_norm_", spy)
    return calls


@pytest.fixture
def torch_clips(monkeypatch):
    """The norms torch's clip clipped with, as the libraries call it: `clip_grad_norm_` (Lightning,
    accelerate before 1.13), or `get_total_norm` then `clip_grads_with_norm_` (accelerate's
    DTensor-aware clip since then, which Trainer reaches through it). One entry per outermost
    call: torch's `clip_grad_norm_` is itself built on the other two in recent torch."""
    norms = []
    depth = [0]

    def spying(original, norm_of):
        def spy(*args, **kwargs):
            depth[0] += 1
            try:
                result = original(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                norms.append(norm_of(result, args, kwargs))
            return result
        return spy

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spying(
        torch.nn.utils.clip_grad_norm_, lambda result, args, kwargs: result))
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", spying(
            torch.nn.utils.clip_grads_with_norm_,
            lambda result, args, kwargs: kwargs.get("total_norm", args[2] if len(args) > 2
                                                    else None)))
    return norms


def assert_norms_as_torchs(calls, torch_norms):
    """The fused clips' norms against the torch run's: the first (the same params and
    gradients) within 1e-6 relative, the rest within fp32 tolerance (the params have parted by
    fp32 rounding since)."""
    ours = [float(call["norm"]) for call in calls]
    theirs = [float(norm) for norm in torch_norms]
    assert len(ours) == len(theirs), f"{len(ours)} fused clips, {len(theirs)} torch clips"
    assert _relative(ours[0], theirs[0]) <= 1e-6, f"first norm {ours[0]!r} vs {theirs[0]!r}"
    assert_losses(ours, theirs, what="grad norms", tolerance=FP32)


def assert_fused_clips(calls, steps, max_norm):
    """One fused clip a step, each returning torch's norm, clipping, leaving p.grad as it was."""
    assert len(calls) == steps, f"FusedAdam.clip_grad_norm ran {len(calls)} times, not {steps}"
    for step, call in enumerate(calls):
        assert call["max_norm"] == max_norm
        assert _relative(call["norm"], call["torch"]) <= 1e-6, \
            f"step {step}: norm {float(call['norm'])!r} vs torch's {float(call['torch'])!r}"
        assert float(call["norm"]) > max_norm, f"step {step}: the norm does not exceed max_norm"
        assert torch.equal(call["after"], call["torch"]), f"step {step}: p.grad was changed"


def test_importing_fused_adam_imports_no_training_library():
    code = ("import sys, fused_adam, fused_adam.integrations; "
            "print([m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------------------
# transformers Trainer

TRAINER_MAX_NORM = 0.5


def trainer_run(transformers, spec, output_dir, *, fused_clipping):
    """6 steps of a tiny Llama with `max_grad_norm=0.5`, the grad norm logged every step.
    Returns (trainer, model, losses, logged grad norms)."""
    model = tiny_llama(transformers)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=STEPS,
        max_grad_norm=TRAINER_MAX_NORM, logging_steps=1, save_strategy="no", weight_decay=0.1,
        learning_rate=FUSED[1]["lr"], report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(),
                                   optimizer_cls_and_kwargs=spec)
    if fused_clipping:
        fused_adam.integrations.use_fused_clipping(trainer)  # the one line
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return (trainer, model, [entry["loss"] for entry in logged],
            [entry["grad_norm"] for entry in logged])


def test_trainer_max_grad_norm_runs_the_fused_clip(transformers, fused_clips, torch_clips,
                                                   tmp_path):
    """Trainer clips through `self.accelerator.clip_grad_norm_(model.parameters(), ...)`
    (transformers/trainer.py, Trainer._clip_grad_norm): after `use_fused_clipping(trainer)` that
    is the fused clip, with the Trainer's two param groups (weight decay 0.1 and 0). The logged
    grad_norm is the fused clip's norm."""
    ours_trainer, ours, our_losses, our_norms = trainer_run(
        transformers, FUSED, tmp_path / "fused", fused_clipping=True)
    assert_fused_clips(fused_clips, STEPS, TRAINER_MAX_NORM)
    assert not torch_clips, "torch's clip ran too"
    assert our_norms == [float(call["norm"]) for call in fused_clips]
    assert len(ours_trainer.optimizer.param_groups) == 2

    theirs_trainer, theirs, their_losses, their_norms = trainer_run(
        transformers, TORCH, tmp_path / "torch", fused_clipping=False)
    assert their_norms == [float(norm) for norm in torch_clips]
    assert_norms_as_torchs(fused_clips, torch_clips)
    assert_losses(our_losses, their_losses, what="loss curve", tolerance=FP32)
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(ours_trainer.optimizer, theirs_trainer.optimizer, what="optimizer",
                            tolerance=FP32)


def test_use_fused_clipping_follows_a_recreated_accelerator(transformers, tmp_path):
    """hyperparameter_search makes the Trainer's accelerator anew (create_accelerator_and_
    postprocess): the new one is switched over too."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_llama(transformers), args=args)
    fused_adam.integrations.use_fused_clipping(trainer)
    first = trainer.accelerator
    trainer.create_accelerator_and_postprocess()
    assert trainer.accelerator is not first
    for accelerator in (first, trainer.accelerator):
        assert getattr(accelerator.clip_grad_norm_, "_fused_adam_patched", False)


# ------------------------------------------------------------------------------------------------
# accelerate

ACCELERATE_MAX_NORM = 0.5


def accelerate_run(transformers, make_accelerator, spec, *, fused_clipping, clip_params=None,
                   accumulate=1):
    """A user loop: tiny Llama, `accelerator.clip_grad_norm_(model.parameters(), 0.5)` each step.
    `clip_params(model)` picks other parameters to clip. With `accumulate`, each step is that
    many micro-batches under `accelerator.accumulate(model)`, clipped after each backward (as
    a loop that forgets `if accelerator.sync_gradients:` does). Returns (model, optimizer,
    norms)."""
    accelerator = make_accelerator(gradient_accumulation_steps=accumulate)
    if fused_clipping:
        accelerator = fused_adam.integrations.use_fused_clipping(accelerator)  # the one line
    model = tiny_llama(transformers)
    model, optimizer = accelerator.prepare(model, build(spec, model.parameters()))
    tokens = TokenDataset().tokens
    norms = []
    for micro_step in range(STEPS * accumulate):
        with accelerator.accumulate(model):
            batch = tokens[4 * (micro_step % 4): 4 * (micro_step % 4) + 4]
            accelerator.backward(model(input_ids=batch, labels=batch).loss)
            parameters = model.parameters() if clip_params is None else clip_params(model)
            norms.append(accelerator.clip_grad_norm_(parameters, ACCELERATE_MAX_NORM))
            optimizer.step()
            optimizer.zero_grad()
    return model, optimizer, norms


def test_accelerate_clip_grad_norm_runs_the_fused_clip(transformers, fresh_accelerator,
                                                       fused_clips, torch_clips):
    ours, our_optimizer, our_norms = accelerate_run(transformers, fresh_accelerator, FUSED,
                                                    fused_clipping=True)
    assert_fused_clips(fused_clips, STEPS, ACCELERATE_MAX_NORM)
    assert not torch_clips, "torch's clip ran too"
    assert [float(n) for n in our_norms] == [float(call["norm"]) for call in fused_clips]
    theirs, their_optimizer, _ = accelerate_run(transformers, fresh_accelerator, TORCH,
                                                fused_clipping=False)
    assert_norms_as_torchs(fused_clips, torch_clips)
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(our_optimizer, their_optimizer, what="optimizer", tolerance=FP32)


def test_accelerate_clip_between_micro_batches_is_accelerates(transformers, fresh_accelerator,
                                                              fused_clips, torch_clips):
    """Clipped after every micro-batch of an accumulated step: torch's clip scales the partial
    gradients, which the next backward adds to, and a factor pending for the step cannot say
    that; so the glue leaves those clips to accelerate and takes the last one, at
    sync_gradients. The run is torch's AdamW with accelerate's clip throughout."""
    ours, our_optimizer, _ = accelerate_run(transformers, fresh_accelerator, FUSED,
                                            fused_clipping=True, accumulate=2)
    assert_fused_clips(fused_clips, STEPS, ACCELERATE_MAX_NORM)
    assert len(torch_clips) == STEPS
    theirs, their_optimizer, _ = accelerate_run(transformers, fresh_accelerator, TORCH,
                                                fused_clipping=False, accumulate=2)
    assert_norms_as_torchs(fused_clips, torch_clips[STEPS + 1::2])
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(our_optimizer, their_optimizer, what="optimizer", tolerance=FP32)


def test_use_fused_clipping_refuses_what_holds_no_accelerator():
    with pytest.raises(TypeError, match="holds none"):
        fused_adam.integrations.use_fused_clipping(torch.nn.Linear(2, 2))


def test_accelerate_falls_back_where_the_norms_differ(transformers, fresh_accelerator,
                                                      fused_clips):
    """Clipping a subset of the parameters (here: all but the embedding) is accelerate's own
    clip, bit for bit as without the glue; so is any optimizer that is no FusedAdam."""
    def some(model):
        return [p for name, p in model.named_parameters() if "embed" not in name]

    patched, _, patched_norms = accelerate_run(transformers, fresh_accelerator, FUSED,
                                               fused_clipping=True, clip_params=some)
    plain, _, plain_norms = accelerate_run(transformers, fresh_accelerator, FUSED,
                                           fused_clipping=False, clip_params=some)
    assert not fused_clips
    assert torch.equal(torch.stack(patched_norms), torch.stack(plain_norms))
    assert_tensors(detached_state_dict(patched), detached_state_dict(plain), what="model")

    patched, _, patched_norms = accelerate_run(transformers, fresh_accelerator, TORCH,
                                               fused_clipping=True)
    plain, _, plain_norms = accelerate_run(transformers, fresh_accelerator, TORCH,
                                           fused_clipping=False)
    assert torch.equal(torch.stack(patched_norms), torch.stack(plain_norms))
    assert_tensors(detached_state_dict(patched), detached_state_dict(plain), what="model")


# ------------------------------------------------------------------------------------------------
# Lightning

LIGHTNING_MAX_NORM = 0.2


def lightning_fit(lightning, spec, *, fused_clipping, precision="32-true",
                  algorithm=None, manual_torch_clip=False):
    """6 steps of test_integrations' tiny MLP under `Trainer(gradient_clip_val=0.2)`. With
    `manual_torch_clip`, the module's configure_gradient_clipping calls torch's clip_grad_norm_
    over the optimizer's params itself (what Lightning's clip would do, without its refusal).
    precision="16-mixed-scaler": fp16 autocast and a GradScaler on the CPU, through Lightning's
    MixedPrecision plugin (Trainer(precision="16-mixed") on a CPU falls back to bf16-mixed)."""
    plugins = None
    if precision == "16-mixed-scaler":
        from lightning.pytorch.plugins.precision import MixedPrecision
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        precision, plugins = None, [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    bases = ((fused_adam.integrations.FusedGradientClipping, lightning.LightningModule)
             if fused_clipping else (lightning.LightningModule,))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(
            [p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)

    module = lightning_module(lightning, spec, bases=bases, methods=dict(
        configure_gradient_clipping=configure_gradient_clipping) if manual_torch_clip else None)
    trainer = lightning.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, precision=precision,
        plugins=plugins,
        gradient_clip_val=LIGHTNING_MAX_NORM, gradient_clip_algorithm=algorithm,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.arange(4 * STEPS), batch_size=4))
    assert trainer.global_step == STEPS
    return trainer, module


def assert_same_lightning_runs(ours, theirs, tolerance):
    (ours_trainer, ours_module), (theirs_trainer, theirs_module) = ours, theirs
    assert_losses(ours_module.losses, theirs_module.losses, what="loss curve",
                  tolerance=tolerance)
    assert_tensors(detached_state_dict(ours_module), detached_state_dict(theirs_module),
                   what="model", tolerance=tolerance)
    assert_optimizer_states(ours_trainer.optimizers[0], theirs_trainer.optimizers[0],
                            what="optimizer", tolerance=tolerance)


def test_lightning_gradient_clip_val_runs_the_fused_clip(lightning, fused_clips, torch_clips):
    ours = lightning_fit(lightning, FUSED, fused_clipping=True)
    assert_fused_clips(fused_clips, STEPS, LIGHTNING_MAX_NORM)
    assert not torch_clips, "torch's clip ran too"
    theirs = lightning_fit(lightning, TORCH, fused_clipping=False)
    assert_norms_as_torchs(fused_clips, torch_clips)
    assert_same_lightning_runs(ours, theirs, FP32)


def test_lightning_16_mixed_with_a_grad_scaler_unscales_before_the_fused_clip(
        lightning, fused_clips, torch_clips):
    """Under a GradScaler Lightning unscales before clipping only for optimizers that do not
    unscale in their step (MixedPrecision.optimizer_step): the mixin unscales, so the norm is
    that of the true gradients, and the scaler's step then hands FusedAdamW no scale. Without
    the mixin Lightning refuses to clip."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        lightning_fit(lightning, FUSED, fused_clipping=False, precision="16-mixed-scaler")
    ours = lightning_fit(lightning, FUSED, fused_clipping=True, precision="16-mixed-scaler")
    assert_fused_clips(fused_clips, STEPS, LIGHTNING_MAX_NORM)
    assert not torch_clips, "torch's clip ran too"
    theirs = lightning_fit(lightning, TORCH, fused_clipping=False, precision="16-mixed-scaler")
    assert_norms_as_torchs(fused_clips, torch_clips)
    assert_same_lightning_runs(ours, theirs, FP32)


def test_lightning_bf16_mixed_runs_the_fused_clip(lightning, fused_clips, torch_clips):
    """Lightning refuses to clip for any optimizer that unscales in its step, even under
    bf16-mixed where no scaler exists (MixedPrecision.clip_gradients, lightning/pytorch/plugins/
    precision/amp.py): without the mixin FusedAdamW raises there. With it, the fused clip runs,
    and the run matches FusedAdamW with torch's clip_grad_norm_ called in
    configure_gradient_clipping within fp32 tolerance: the clip is the only difference, the
    same kernel steps both. Against torch's AdamW (foreach=False) with Lightning's own clip in
    bf16-mixed, too, within fp32 tolerance: after each step the params differ by fp32 rounding
    only, so the bf16 casts autocast makes of them (8 bits of mantissa) agree unless a param
    lies within an fp32 ulp of a bf16 rounding boundary, which this run's do not (a run where
    one did would differ by a bf16 ulp in one activation, and this test would say where)."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        lightning_fit(lightning, FUSED, fused_clipping=False, precision="bf16-mixed")
    ours = lightning_fit(lightning, FUSED, fused_clipping=True, precision="bf16-mixed")
    assert_fused_clips(fused_clips, STEPS, LIGHTNING_MAX_NORM)
    assert not torch_clips, "torch's clip ran too"
    manual = lightning_fit(lightning, FUSED, fused_clipping=False, precision="bf16-mixed",
                           manual_torch_clip=True)
    assert_norms_as_torchs(fused_clips, torch_clips)
    assert_same_lightning_runs(ours, manual, FP32)
    theirs = lightning_fit(lightning, TORCH, fused_clipping=False, precision="bf16-mixed")
    assert_norms_as_torchs(fused_clips, torch_clips[STEPS:])
    assert_same_lightning_runs(ours, theirs, FP32)


def test_lightning_precision_plugins_that_clip_their_own_way_keep_it(lightning):
    """The mixin takes over only where Lightning's clip is torch's clip_grad_norm_ over the
    optimizer's params: FSDP's plugin (which refuses, each rank holding shards) and DeepSpeed's
    (whose engine clips) keep their own."""
    from lightning.pytorch.plugins.precision import (
        DeepSpeedPrecision, DoublePrecision, FSDPPrecision, HalfPrecision, MixedPrecision,
        Precision)
    from fused_adam.integrations import _clips_with_torch
    assert _clips_with_torch(Precision())
    assert _clips_with_torch(MixedPrecision("bf16-mixed", "cpu"))
    assert _clips_with_torch(DoublePrecision())
    assert _clips_with_torch(HalfPrecision())
    assert not _clips_with_torch(FSDPPrecision("bf16-mixed"))
    assert not _clips_with_torch(DeepSpeedPrecision("bf16-mixed"))


def test_lightning_clip_by_value_is_lightnings(lightning, fused_clips):
    """gradient_clip_algorithm="value" goes to Lightning's clip_grad_value_, bit for bit."""
    ours = lightning_fit(lightning, FUSED, fused_clipping=True, algorithm="value")
    plain = lightning_fit(lightning, FUSED, fused_clipping=False, algorithm="value")
    assert not fused_clips
    assert_same_lightning_runs(ours, plain, EXACT)
