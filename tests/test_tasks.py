"""One house for every training command: the loop's options as sections declared once, every loop
feature reaching every task (precision, compile, activation checkpointing, gradient accumulation,
W&B, init_from a grown checkpoint), the task contract, the registry, and a new task as one file."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tests.test_vision import write_toy_mnist
from tokenformer.__main__ import main
from tokenformer.checkpoint import load_model
from tokenformer.data import scenes
from tokenformer.errors import TokenFormerError
from tokenformer.models.captioner import caption_loss
from tokenformer.options import option
from tokenformer.training import config as C
from tokenformer.training import registry
from tokenformer.training.distributed import DistEnv, blocks
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics
from tokenformer.training.tasks.base import EpochTask, TaskContext

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the options: sections declared once, defaults stated once ------------------------------------

def test_every_command_shares_the_sections_and_states_its_differing_defaults_in_the_table():
    commands = registry.training_commands()
    assert list(commands) == ["train", "train-captioner", "train-clip", "train-vision"]
    for name, command in commands.items():
        fields = {f.name: f for f in dataclasses.fields(command.config)}
        for section in C.COMMON_SECTIONS:
            for f in dataclasses.fields(section):
                # the same help text everywhere (CLIP's batch_size is the one field said its own way)
                assert fields[f.name].metadata["help"] == f.metadata["help"], (name, f.name)
                default = C._default_of(fields[f.name])
                if name == "train":
                    assert default == C._default_of(f), f.name  # the sections' defaults are train's
                elif default != C._default_of(f):
                    assert f.name in C.EPOCH_DEFAULTS_TABLE, (name, f.name)  # no difference goes unstated
        if name != "train":
            for field, value in C.epoch_defaults(name).items():
                assert C._default_of(fields[field]) == value, (name, field)
    assert C.VisionTrainConfig().adam_beta2 == 0.999 and C.ClipTrainConfig().adam_eps == 1e-6
    assert C.TrainConfig().adam_beta2 == 0.95 and C.CaptionTrainConfig().keep_last_n == 2


def test_shipped_recipes_still_read_and_refused_fields_are_named():
    configs = Path(__file__).resolve().parents[1] / "configs"
    for path, config in [("fashion_mnist.yaml", C.VisionTrainConfig), ("clip-scenes.yaml", C.ClipTrainConfig),
                         ("captioner-scenes.yaml", C.CaptionTrainConfig), ("demo.yaml", C.TrainConfig)]:
        assert config.from_yaml(configs / path).save  # every field of the recipe is still a field
    with pytest.raises(TokenFormerError, match="train-vision cannot use parallelism 'fsdp2'"):
        C.VisionTrainConfig(parallelism="fsdp2")
    with pytest.raises(TokenFormerError, match="does not split into gradient_accumulation_steps 3"):
        C.CaptionTrainConfig(batch_size=8, gradient_accumulation_steps=3)
    with pytest.raises(TokenFormerError, match="train-clip cannot use tune_tokens 4: token tuning grows one model"):
        C.ClipTrainConfig(tune_tokens=4)
    with pytest.raises(TokenFormerError, match="fewer than 2 pairs per contrastive batch"):
        C.ClipTrainConfig(batch_size=4, gradient_accumulation_steps=4)
    loop = C.VisionTrainConfig(batch_size=16, gradient_accumulation_steps=2, precision="bf16", compile=True,
                               epochs=3, warmup_epochs=0.5).loop_config(steps_per_epoch=5, world_size=2)
    assert (loop.train_micro_batch_size_per_gpu, loop.gradient_accumulation_steps, loop.train_iters,
            loop.warmup_iters, loop.precision, loop.compile) == (4, 2, 15, 2, "bf16", True)


# ---- every loop feature reaches every epoch task -----------------------------------------------------

@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_toy_mnist(root, n_train=16, n_test=8)
    scenes.write_scene_dataset(root / "scenes", train=16, val=4)
    return root


def fields_of(command: str, data: Path, save: Path | None, **changes) -> dict:
    common = dict(epochs=1, batch_size=8, lr=3e-3, progress=False, plot=False, device="cpu", num_threads=1,
                  log_interval=1, save=str(save) if save else None)
    own = {"train-vision": dict(model="tiny-28", data=str(data), augment="none"),  # drawn per micro-batch
           "train-clip": dict(model="tiny-28", data=str(data), tokenizer="byte", max_val_samples=8),
           "train-captioner": dict(data=str(data / "scenes" / "train"), val_data=str(data / "scenes" / "val"),
                                   bpe_vocab_size=280, caption_samples=0)}[command]
    return {**common, **own, **changes}


def first_step_loss_by_hand(command: str, cfg, model: nn.Module, accumulation: int) -> float:
    """The loss of the first step's batch under `model`, from the model's outputs by hand: the
    cross-entropy of the whole batch; the caption loss over all its tokens; CLIP: the mean over the
    micro-batches of the symmetric InfoNCE (each micro-batch its own contrastive batch)."""
    task = registry.command_named(command).task(cfg)
    task.prepare(model, TaskContext(DistEnv()))
    model.eval()  # no dropout here: the same numbers as in training
    with torch.no_grad():
        if command == "train-vision":
            x, y = task.train_batch(0, cfg.batch_size)
            return float(F.cross_entropy(model(x), y))
        if command == "train-captioner":
            x, ids, lengths = task.train_batch(0, cfg.batch_size)
            return float(caption_loss(model, x, ids, lengths, reduction="sum") / (lengths - 1).sum())
        micro, losses = cfg.batch_size // accumulation, []
        for first in range(0, cfg.batch_size, micro):
            image, text, scale = model(*task.train_batch(first, micro))
            logits = scale * image @ text.T  # (B, B): pair i's negatives are the other pairs
            target = torch.arange(micro)
            losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2)
        return float(torch.stack(losses).mean())


@pytest.mark.parametrize("command", ["train-vision", "train-clip", "train-captioner"])
def test_epoch_tasks_take_accumulation_precision_compile_checkpointing_and_a_grown_init_from(
        command, image_data, tmp_path, monkeypatch, capsys):
    config = registry.command_named(command).config
    base = train(config(**fields_of(command, image_data, tmp_path / "base")))
    assert sorted(base["losses"]) == [1, 2]

    # gradient accumulation: two micro-batches of 4 per step
    accumulated = train(config(**fields_of(command, image_data, None, gradient_accumulation_steps=2)))
    if command != "train-clip":  # the same arithmetic as one batch of 8, so the same run
        for step, loss in base["losses"].items():
            assert accumulated["losses"][step] == pytest.approx(loss, abs=1e-5), step

    # init_from a grown checkpoint (exact growth: the same function), with accumulation
    assert main(["grow", "--checkpoint", str(tmp_path / "base" / "model"), "--out", str(tmp_path / "grown"),
                 "--factor", "2", "--mode", "exact"]) == 0
    grown, before = load_model(tmp_path / "grown"), load_model(tmp_path / "base" / "model")
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in before.parameters())
    cfg = config(**fields_of(command, image_data, None, gradient_accumulation_steps=2,
                             init_from=str(tmp_path / "grown")))
    warm = train(cfg)
    expected = first_step_loss_by_hand(command, cfg, before, accumulation=2)
    assert warm["losses"][1] == pytest.approx(expected, abs=1e-5)

    # bf16, compile and activation checkpointing together, from the command line (compile with the
    # eager backend: dynamo captures every block as torch.compile must, without generating code;
    # tests/test_model.py compares the compiled model's numbers with the eager one's)
    compiled, recomputed = [], []
    compile_module, real_checkpoint = torch.nn.Module.compile, torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda module, **kw: (compiled.append(module), compile_module(module, backend="eager")))

    def counting_checkpoint(function, *args, **kwargs):
        recomputed.append(type(function).__name__)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    flags = {**fields_of(command, image_data, tmp_path / "cli", init_from=str(tmp_path / "grown"),
                         gradient_accumulation_steps=2, precision="bf16", compile=True,
                         checkpoint_activations=True)}
    argv = [command] + [token for key, value in flags.items() if value is not None
                        for token in (f"--{key}", str(value))]
    assert main(argv) == 0
    capsys.readouterr()
    assert len(compiled) == len(blocks(grown)) > 0  # every block of every tower
    assert "Block" in recomputed
    lines = [r for r in read_metrics(tmp_path / "cli" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2] and all(math.isfinite(r["loss"]) for r in lines)
    assert lines[0]["loss"] == pytest.approx(expected, rel=3e-2)  # bf16 of the same first step
    saved = json.loads((tmp_path / "cli" / f"{command.replace('-', '_')}_config.json").read_text())
    assert saved["precision"] == "bf16" and saved["gradient_accumulation_steps"] == 2


def test_wandb_mirrors_an_epoch_tasks_metrics(image_data, tmp_path, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda scalars, step: logged.append((step, scalars)), finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(C.VisionTrainConfig(**fields_of("train-vision", image_data, tmp_path / "run", wandb_project="p")))
    steps = [step for step, scalars in logged if "loss" in scalars]
    assert steps == [1, 2] and any("val_accuracy" in scalars for _, scalars in logged)


def test_loss_plot_takes_the_tasks_labels_and_draws_a_single_point(tmp_path, monkeypatch):
    from tokenformer.training import metrics

    drawn = {}

    def capture(png_path, draw, xlabel, ylabel, title):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        draw(ax)
        drawn.update(ylabel=ylabel, title=title, lines={line.get_label(): line for line in ax.get_lines()})
        plt.close(fig)

    monkeypatch.setattr(metrics, "_save_plot", capture)
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 3, "loss": 1.5}) + "\n" + json.dumps({"step": 3, "val_loss": 1.4}) + "\n")
    from tokenformer.training.tasks.vision import VisionTask

    metrics.plot_loss_curve(path, tmp_path / "plot.png", VisionTask.plot_title, VisionTask.loss_label,
                            VisionTask.validation_label)
    assert set(drawn["lines"]) == {"train", "test"} and drawn["ylabel"] == "cross-entropy (nats/image)"
    assert drawn["lines"]["train"].get_marker() not in (None, "None", "")  # one point is still drawn


# ---- a new task: one file (this one) plus a YAML recipe ------------------------------------------------

class LineModel(nn.Module):
    """y = w . x + b, saved like any model here (a config with to_dict, a model_type)."""

    model_type = "toy-line"

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(to_dict=lambda: {"inputs": inputs})
        self.linear = nn.Linear(inputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class LineTask(EpochTask):
    """Fit a line to noiseless points: the loss is the mean squared error."""

    unit = "points"
    sample_noun = "points"
    plot_title, loss_label = "fitting a line", "squared error"

    def __init__(self, cfg) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(cfg.points, 3, generator=generator)  # (N, 3)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25   # (N,)
        super().__init__(cfg, cfg.points)

    def build_model(self) -> nn.Module:
        return LineModel(3)

    def train_batch(self, first: int, size: int):
        _, _, index = self.epoch_slice(first, size)
        return self.x[index], self.y[index]

    def loss(self, model, batch, ctx):
        x, y = batch
        return F.mse_loss(model(x), y), len(y)

    def evaluate(self, model, ctx):
        with torch.no_grad():
            return self.add_record(ctx, {"val_loss": float(F.mse_loss(model(self.x), self.y))})

    @staticmethod
    def report(summary) -> str:
        return f"line fitted: squared error {summary['val_loss']:.6f}"


def test_a_new_task_is_one_file_and_a_recipe_trained_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_COMMANDS", dict(registry._COMMANDS))  # registered for this test only

    @C.command_config("train-line", {"lr": 0.1, "min_lr": 0.01, "warmup_epochs": 0.0, "batch_size": 8})
    class LineTrainConfig(C.EpochConfig):
        points: int = option("training points", minimum=8, default=32)

    registry.register(registry.TrainingCommand("train-line", LineTrainConfig, LineTask, LineModel,
                                               help="Fit a line.\n\nA toy task of the test suite."))
    recipe = tmp_path / "line.yaml"
    recipe.write_text(yaml.safe_dump({"points": 16, "epochs": 20, "save": str(tmp_path / "run"), "plot": False,
                                      "progress": False, "log_interval": 1, "adam_beta2": 0.99}))
    assert main(["train-line", str(recipe), "--gradient_accumulation_steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "line fitted: squared error" in out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    validation = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 40 and len(validation) == 20 and validation[-1] < validation[0] / 10
    saved = json.loads((tmp_path / "run" / "train_line_config.json").read_text())
    assert saved["points"] == 16 and saved["adam_beta2"] == 0.99 and saved["lr"] == 0.1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # the first step's loss by hand: the seeded initial line on the first 8 points of epoch 0's order
    torch.manual_seed(1234)
    model = LineModel(3)
    task = LineTask(LineTrainConfig(points=16))
    x, y = task.train_batch(0, 8)
    with torch.no_grad():
        assert losses[0] == pytest.approx(float(((model(x) - y) ** 2).mean()), rel=1e-6)
    assert "train-line" in main.__globals__["build_parser"]().format_help()


def test_token_tuning_reaches_an_epoch_task(image_data, tmp_path):
    base = C.VisionTrainConfig(**fields_of("train-vision", image_data, tmp_path / "base"))
    train(base)
    cfg = C.VisionTrainConfig(**fields_of("train-vision", image_data, tmp_path / "tuned", tune_tokens=4,
                                          init_from=str(tmp_path / "base" / "model")))
    tuned = train(cfg)
    assert Path(tuned["adapter"]).is_file() and Path(tuned["adapter"]).parent.name == "step_00000002"
    # the tuned model starts at the base's outputs (exact growth), so its first loss is the base's
    expected = first_step_loss_by_hand("train-vision", cfg, load_model(tmp_path / "base" / "model"), 1)
    assert tuned["losses"][1] == pytest.approx(expected, abs=1e-5)


def test_warm_start_choices_reach_an_epoch_task(image_data, tmp_path):
    """freeze_old, init_from_optimizer and init_from_schedule continue on train-vision, from `tokenformer
    grow` of a training checkpoint: the old tokens stay as they were, the schedule goes on."""
    train(C.VisionTrainConfig(**fields_of("train-vision", image_data, tmp_path / "base")))
    assert main(["grow", "--checkpoint", str(tmp_path / "base" / "step_00000002"), "--out", str(tmp_path / "grown"),
                 "--factor", "2"]) == 0
    grown = load_model(tmp_path / "grown")
    summary = train(C.VisionTrainConfig(**fields_of(
        "train-vision", image_data, tmp_path / "run", epochs=2, init_from=str(tmp_path / "grown"), freeze_old=True,
        init_from_optimizer=True, init_from_schedule="continue")))
    assert sorted(summary["losses"]) == [3, 4]  # steps 1-2 were the grown run's
    trained = load_model(tmp_path / "run" / "model")
    before, after = grown.layers[0].mlp.key_param_tokens, trained.layers[0].mlp.key_param_tokens
    old = before.shape[0] // 2  # --factor 2 doubled the tokens
    assert torch.equal(after[:old], before[:old]) and not torch.equal(after[old:], before[old:])
