"""FusedAdam / FusedAdamW inside the libraries people train with: safetensors, accelerate,
transformers and lightning. Each library is optional: its tests skip when it is not installed.

What these libraries need from an optimizer that re-homes the parameters (and its states) into
flat arenas: the model still saves and loads with safetensors, which treats tensors sharing one
storage as tied and keeps one of them (or refuses when none covers the storage); a checkpoint
resumes to the same numbers as an uninterrupted run; and the numbers are torch's. "The same run"
(resume against uninterrupted) is asserted bit for bit; FusedAdamW against torch's AdamW
(foreach=False) within `TOLERANCES`.

Everything is built from configs, nothing is downloaded (HF_HUB_OFFLINE is set before any
Hugging Face library is imported), and every model has a few thousand parameters at most.
"""
import glob
import os

import pytest
import torch

import fused_adam
from helpers import TOLERANCES, assert_close, reloaded

# Read by huggingface_hub when it is imported: in the fixtures below, after this line.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

EXACT = dict(rtol=0, atol=0)
FP32 = TOLERANCES[torch.float32]
LR = 1e-2


# What each library gets: an optimizer class and its keyword arguments (transformers' Trainer
# takes them as `optimizer_cls_and_kwargs`).
FUSED = (fused_adam.FusedAdamW, dict(lr=LR, backend="numba"))
TORCH = (torch.optim.AdamW, dict(lr=LR, foreach=False))
OPTIMIZERS = [pytest.param(FUSED, id="fused"), pytest.param(TORCH, id="torch")]


def build(spec, params):
    optimizer_cls, options = spec
    return optimizer_cls(params, **options)


@pytest.fixture(scope="module")
def safetensors():
    pytest.importorskip("safetensors")
    import safetensors.torch
    return safetensors


@pytest.fixture(scope="module")
def accelerate():
    return pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lightning():
    return pytest.importorskip("lightning")


# ------------------------------------------------------------------------------------------------
# Shared pieces


def tiny_mlp(seed=0):
    """A few Linear and LayerNorm params plus BatchNorm buffers (state_dict entries that no
    optimizer holds). No bias before the BatchNorm: its gradient would be zero up to rounding,
    which Adam scales up to full steps, so two correct optimizers would part ways there."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
        torch.nn.Linear(8, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))


def batch(step):
    generator = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(5, 4, generator=generator), torch.randn(5, 2, generator=generator)


def mlp_loss(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean()


def train_mlp(model, optimizer, steps, *, first_step=0, backward=None):
    losses = []
    for step in range(first_step, first_step + steps):
        optimizer.zero_grad()
        loss = mlp_loss(model, step)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def unwrapped(optimizer):
    """The torch optimizer inside a library's wrapper (accelerate's AcceleratedOptimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def assert_tensors(actual, expected, *, what, tolerance=EXACT):
    """Two {name: tensor} mappings hold the same names and values."""
    assert sorted(actual) == sorted(expected), \
        f"{what}: missing {sorted(set(expected) - set(actual))}, " \
        f"unexpected {sorted(set(actual) - set(expected))}"
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, \
            f"{what} {name}: dtype {actual[name].dtype} != {expected[name].dtype}"
        assert_close(actual[name], expected[name], what=f"{what} {name}", **tolerance)


def assert_optimizer_states(actual, expected, *, what, tolerance=EXACT):
    """Two optimizers' state_dicts: the same groups (hyperparameters and parameter order) and
    every state tensor of every parameter."""
    actual, expected = unwrapped(actual).state_dict(), unwrapped(expected).state_dict()
    assert len(actual["param_groups"]) == len(expected["param_groups"]), what
    for index, (ours, theirs) in enumerate(zip(actual["param_groups"], expected["param_groups"])):
        for key in ("params", "lr", "betas", "eps", "weight_decay"):
            assert ours[key] == theirs[key], \
                f"{what} group {index} {key}: {ours[key]} != {theirs[key]}"
    assert sorted(actual["state"]) == sorted(expected["state"]), f"{what}: params with state"
    for index, theirs in expected["state"].items():
        ours = actual["state"][index]
        assert sorted(ours) == sorted(theirs), f"{what} param {index}: state keys"
        for key in theirs:
            assert_close(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key]),
                         what=f"{what} param {index} state {key}", **tolerance)


def assert_losses(actual, expected, *, what, tolerance):
    assert len(actual) == len(expected), f"{what}: {len(actual)} losses != {len(expected)}"
    assert_close(torch.tensor(actual, dtype=torch.float64),
                 torch.tensor(expected, dtype=torch.float64), what=what, **tolerance)


def detached_state_dict(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_saved_model(saved, model, *, what):
    """A saved transformers model: every state_dict tensor, bit for bit, except a tied weight
    (the same Parameter under a second name), which is saved once."""
    state = model.state_dict()
    for name in set(state) - set(saved):
        assert any(state[name].data_ptr() == state[kept].data_ptr() for kept in saved), \
            f"{what}: {name} is neither saved nor tied to a saved tensor"
    assert_tensors(saved, {name: state[name].detach().clone() for name in saved}, what=what)


# ------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_save_model_load_model_round_trips_every_tensor(safetensors, tmp_path):
    """save_model refuses a state_dict where no tensor covers its storage; with FusedAdamW every
    param must be its own storage, so it saves every tensor, and load_model writes the values
    into the params the optimizer steps: training continues as if never saved."""
    model = tiny_mlp()
    optimizer = build(FUSED, model.parameters())
    train_mlp(model, optimizer, 3)
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_model(model, path)
    saved = detached_state_dict(model)
    assert_tensors(safetensors.torch.load_file(path), saved, what="file")

    fresh = tiny_mlp(seed=1)
    fresh_optimizer = build(FUSED, fresh.parameters())
    missing, unexpected = safetensors.torch.load_model(fresh, path)
    assert not missing and not unexpected, (missing, unexpected)
    assert_tensors(detached_state_dict(fresh), saved, what="loaded model")

    fresh_optimizer.load_state_dict(reloaded(optimizer.state_dict()))
    train_mlp(model, optimizer, 3, first_step=3)
    train_mlp(fresh, fresh_optimizer, 3, first_step=3)
    assert_tensors(detached_state_dict(fresh), detached_state_dict(model),
                   what="after 3 more steps")


def test_safetensors_save_file_round_trips_model_and_optimizer_tensors(safetensors, tmp_path):
    """save_file(model.state_dict()) and the optimizer's state tensors through save_file."""
    model = tiny_mlp()
    optimizer = build(FUSED, model.parameters())
    train_mlp(model, optimizer, 3)
    saved = detached_state_dict(model)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    assert_tensors(safetensors.torch.load_file(str(tmp_path / "model.safetensors")), saved,
                   what="model file")

    states = {f"{index}.{key}": value for index, state in optimizer.state_dict()["state"].items()
              for key, value in state.items()}
    expected = {name: value.detach().clone() for name, value in states.items()}
    safetensors.torch.save_file(states, str(tmp_path / "optimizer.safetensors"))
    assert_tensors(safetensors.torch.load_file(str(tmp_path / "optimizer.safetensors")), expected,
                   what="optimizer file")


# ------------------------------------------------------------------------------------------------
# accelerate


@pytest.fixture
def fresh_accelerator(accelerate):
    """Accelerator() as a new process would make it (accelerate keeps process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    def make(**options):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return accelerate.Accelerator(cpu=True, **options)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_run(make_accelerator, spec, steps, *, first_step=0, save_to=None,
                   load_from=None):
    """Prepare a tiny model and its optimizer, optionally load_state, train, optionally
    save_state. Returns (accelerator, model, optimizer, losses)."""
    accelerator = make_accelerator()
    model = tiny_mlp(seed=0 if load_from is None else 1)
    model, optimizer = accelerator.prepare(model, build(spec, model.parameters()))
    if load_from is not None:
        accelerator.load_state(load_from)
    losses = train_mlp(model, optimizer, steps, first_step=first_step,
                       backward=accelerator.backward)
    if save_to is not None:
        accelerator.save_state(save_to)
    return accelerator, model, optimizer, losses


@pytest.mark.parametrize("spec", OPTIMIZERS)
def test_accelerate_save_state_writes_every_model_tensor(fresh_accelerator, spec,
                                                         safetensors, tmp_path, caplog):
    """save_state's default (safetensors) drops tensors that share a storage ("Removed shared
    tensor ... while saving"): every model tensor must be in model.safetensors."""
    _, model, _, _ = accelerate_run(fresh_accelerator, spec, 3, save_to=str(tmp_path))
    assert_tensors(safetensors.torch.load_file(str(tmp_path / "model.safetensors")),
                   detached_state_dict(model), what="model.safetensors")
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]


@pytest.mark.parametrize("spec", OPTIMIZERS)
def test_accelerate_load_state_resumes_bit_identically(fresh_accelerator, spec, tmp_path):
    """3 steps, save_state, a fresh accelerator, model and optimizer, load_state, 3 steps: the
    same params, optimizer states and losses as 6 steps uninterrupted."""
    _, straight, straight_optimizer, straight_losses = accelerate_run(
        fresh_accelerator, spec, 6)
    _, _, _, first_losses = accelerate_run(fresh_accelerator, spec, 3,
                                           save_to=str(tmp_path))
    _, resumed, resumed_optimizer, resumed_losses = accelerate_run(
        fresh_accelerator, spec, 3, first_step=3, load_from=str(tmp_path))
    assert_losses(first_losses + resumed_losses, straight_losses, what="losses", tolerance=EXACT)
    assert_tensors(detached_state_dict(resumed), detached_state_dict(straight), what="model")
    assert_optimizer_states(resumed_optimizer, straight_optimizer, what="optimizer")


def test_accelerate_fused_adamw_matches_torch_adamw(fresh_accelerator):
    _, ours, our_optimizer, our_losses = accelerate_run(fresh_accelerator, FUSED, 20)
    _, theirs, their_optimizer, their_losses = accelerate_run(fresh_accelerator, TORCH, 20)
    assert_losses(our_losses, their_losses, what="losses", tolerance=FP32)
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(our_optimizer, their_optimizer, what="optimizer", tolerance=FP32)


@pytest.mark.parametrize("spec", OPTIMIZERS)
def test_accelerate_save_model_writes_every_tensor(fresh_accelerator, spec, safetensors,
                                                   tmp_path):
    accelerator, model, _, _ = accelerate_run(fresh_accelerator, spec, 3)
    accelerator.save_model(model, str(tmp_path))
    assert_tensors(safetensors.torch.load_file(str(tmp_path / "model.safetensors")),
                   detached_state_dict(model), what="model.safetensors")


# ------------------------------------------------------------------------------------------------
# transformers

TRAINER_STEPS, TRAINER_SAVE_STEPS = 8, 4


def tiny_llama(transformers, seed=0):
    """Tied embeddings, RMSNorm, no biases and no dropout. Not GPT-2 for training: GPT-2's
    attention key bias has a zero gradient (softmax ignores a constant added to every logit), so
    Adam turns its rounding noise into full steps and any two correct optimizers disagree there."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(transformers, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class TokenDataset(torch.utils.data.Dataset):
    """16 random sequences of 16 tokens: 4 batches of 4, so 8 steps are 2 epochs."""

    def __init__(self):
        self.tokens = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return dict(input_ids=self.tokens[index], labels=self.tokens[index])


def trainer_run(transformers, spec, output_dir, *, resume_from=None, pass_instance=False):
    """Trainer on a tiny Llama with grad clipping (Trainer's default). The optimizer is given as
    `optimizer_cls_and_kwargs` (Trainer then makes two param groups, weight decay 0.1 and 0) or,
    with `pass_instance`, built here over model.parameters() and passed in `optimizers=`.
    Returns (trainer, model, losses)."""
    model = tiny_llama(transformers)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=TRAINER_STEPS,
        save_steps=TRAINER_SAVE_STEPS, logging_steps=1, weight_decay=0.1, learning_rate=LR,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    if pass_instance:
        optimizer_options = dict(optimizers=(build(spec, model.parameters()), None))
    else:
        optimizer_options = dict(optimizer_cls_and_kwargs=spec)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(),
                                   **optimizer_options)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, model, losses


@pytest.fixture(scope="module")
def trainer_runs(transformers, tmp_path_factory):
    """Uninterrupted Trainer runs (checkpointing every 4 steps), each run once for the tests
    below: runs[(spec, pass_instance)] = (trainer, model, losses, output_dir)."""
    root = tmp_path_factory.mktemp("trainer")
    runs = {}

    def run(spec, pass_instance=False):
        key = (spec[0].__name__, pass_instance)
        if key not in runs:
            output_dir = root / f"{key[0]}-{pass_instance}"
            runs[key] = (*trainer_run(transformers, spec, output_dir, pass_instance=pass_instance),
                         output_dir)
        return runs[key]

    return run


def test_trainer_fused_adamw_matches_torch_adamw(trainer_runs):
    ours_trainer, ours, our_losses, _ = trainer_runs(FUSED)
    theirs_trainer, theirs, their_losses, _ = trainer_runs(TORCH)
    assert len(our_losses) == TRAINER_STEPS
    assert_losses(our_losses, their_losses, what="loss curve", tolerance=FP32)
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(ours_trainer.optimizer, theirs_trainer.optimizer, what="optimizer",
                            tolerance=FP32)


@pytest.mark.parametrize("pass_instance", [False, True],
                         ids=["optimizer_cls_and_kwargs", "optimizers"])
def test_trainer_resume_from_checkpoint_is_bit_identical(transformers, trainer_runs,
                                                         pass_instance, tmp_path):
    """resume_from_checkpoint=checkpoint-4 of an uninterrupted run (saved with safetensors, the
    default) in a fresh Trainer, model and optimizer ends where the uninterrupted run ended, bit
    for bit; the checkpoint written at its end holds every model tensor."""
    straight_trainer, straight, straight_losses, straight_dir = trainer_runs(FUSED, pass_instance)
    checkpoint = straight_dir / f"checkpoint-{TRAINER_SAVE_STEPS}"
    trainer, resumed, losses = trainer_run(transformers, FUSED, tmp_path,
                                           resume_from=checkpoint, pass_instance=pass_instance)
    assert trainer.state.global_step == TRAINER_STEPS
    assert_losses(losses, straight_losses, what="loss curve", tolerance=EXACT)
    assert_tensors(detached_state_dict(resumed), detached_state_dict(straight), what="model")
    assert_optimizer_states(trainer.optimizer, straight_trainer.optimizer, what="optimizer")

    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / f"checkpoint-{TRAINER_STEPS}" / "model.safetensors"))
    assert_saved_model(saved, resumed, what="checkpoint model.safetensors")


def test_save_pretrained_from_pretrained_round_trips_every_tensor(transformers, tmp_path):
    model = tiny_gpt2(transformers)
    optimizer = build(FUSED, model.parameters())
    for step in range(3):
        optimizer.zero_grad()
        tokens = TokenDataset().tokens[4 * step: 4 * step + 4]
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    model.save_pretrained(str(tmp_path))  # safetensors by default
    from safetensors.torch import load_file
    assert_saved_model(load_file(str(tmp_path / "model.safetensors")), model, what="saved file")
    loaded = type(model).from_pretrained(str(tmp_path))
    assert_tensors(detached_state_dict(loaded), detached_state_dict(model), what="reloaded")


# ------------------------------------------------------------------------------------------------
# lightning

LIGHTNING_STEPS, LIGHTNING_SAVE_STEPS = 8, 4


def lightning_module(lightning, spec, *, bases=None, methods=None):
    """A LightningModule training `tiny_mlp` with the optimizer of `spec`: its classes are
    `bases` (default: LightningModule alone), `methods` ({name: function}) added to it."""
    class TinyModule(*(bases or (lightning.LightningModule,))):
        """The batch is drawn from the global step, not from the dataloader: resumed from the
        checkpoint written at the end of epoch 0, Lightning 2.6 runs one more step in epoch 0
        (batch_idx 4, the dataloader restarted) before epoch 1, so a plain dataloader's batches
        would not line up with the uninterrupted run's. These tests are about the optimizer."""

        def __init__(self):
            super().__init__()
            self.net = tiny_mlp()
            self.losses = []

        def training_step(self, batch, batch_index):
            loss = mlp_loss(self.net, self.global_step)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return build(spec, self.parameters())

    for name, method in (methods or {}).items():
        setattr(TinyModule, name, method)
    return TinyModule()


def lightning_fit(lightning, spec, max_steps, root_dir, *, ckpt_path=None):
    module = lightning_module(lightning, spec)
    trainer = lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root_dir))
    steps = torch.utils.data.DataLoader(torch.arange(16), batch_size=4)
    trainer.fit(module, steps, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer, module


@pytest.fixture(scope="module")
def lightning_runs(lightning, tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    return dict(fused=lightning_fit(lightning, FUSED, LIGHTNING_STEPS, root / "fused"),
                torch=lightning_fit(lightning, TORCH, LIGHTNING_STEPS, root / "torch"))


def test_lightning_fused_adamw_matches_torch_adamw(lightning_runs):
    ours_trainer, ours = lightning_runs["fused"]
    theirs_trainer, theirs = lightning_runs["torch"]
    assert len(ours.losses) == LIGHTNING_STEPS
    assert_losses(ours.losses, theirs.losses, what="loss curve", tolerance=FP32)
    assert_tensors(detached_state_dict(ours), detached_state_dict(theirs), what="model",
                   tolerance=FP32)
    assert_optimizer_states(ours_trainer.optimizers[0], theirs_trainer.optimizers[0],
                            what="optimizer", tolerance=FP32)


def test_lightning_resume_from_checkpoint_is_bit_identical(lightning, lightning_runs, tmp_path):
    """fit for 4 steps (the ModelCheckpoint callback writes a .ckpt), then a fresh Trainer and
    module fit(ckpt_path=...) to 8 steps: the uninterrupted run's numbers, bit for bit."""
    straight_trainer, straight = lightning_runs["fused"]
    _, first = lightning_fit(lightning, FUSED, LIGHTNING_SAVE_STEPS, tmp_path / "first")
    checkpoints = glob.glob(str(tmp_path / "first" / "**" / "*.ckpt"), recursive=True)
    assert len(checkpoints) == 1, checkpoints
    trainer, resumed = lightning_fit(lightning, FUSED, LIGHTNING_STEPS, tmp_path / "resumed",
                                     ckpt_path=checkpoints[0])
    assert trainer.global_step == LIGHTNING_STEPS
    assert_losses(first.losses + resumed.losses, straight.losses, what="loss curve",
                  tolerance=EXACT)
    assert_tensors(detached_state_dict(resumed), detached_state_dict(straight), what="model")
    assert_optimizer_states(trainer.optimizers[0], straight_trainer.optimizers[0],
                            what="optimizer")
