"""Image classification: epochs of shuffled, augmented images, top-1 accuracy, optionally an average
of the weights and test-time flips (`tokenformer train-vision`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.data import images
from tokenformer.errors import TokenFormerError
from tokenformer.files import ACCURACY_PLOT_FILE
from tokenformer.models.vision import VisionConfig, VisionTokenFormer
from tokenformer.training.config import VisionTrainConfig
from tokenformer.training.distributed import DistEnv, all_reduce_mean, unwrap
from tokenformer.training.metrics import plot_accuracy
from tokenformer.training.registry import TrainingCommand, register
from tokenformer.training.tasks.base import EpochTask, TaskContext


@dataclass
class ImageData:
    """Training and evaluation images: in-memory tensors (IDX) or ImageFolders (read per batch)."""

    train: tuple[torch.Tensor, torch.Tensor] | images.ImageFolder
    test: tuple[torch.Tensor, torch.Tensor] | images.ImageFolder
    num_classes: int

    @property
    def num_train(self) -> int:
        return len(self.train) if isinstance(self.train, images.ImageFolder) else len(self.train[1])


def load_image_data(cfg: VisionTrainConfig, channels: int = 1) -> ImageData:
    """The images of `cfg.data`: an ImageFolder root with train/ and val/ (or test/), else an IDX folder."""
    if cfg.data is None:
        raise TokenFormerError("train-vision needs `data`: an MNIST-style IDX folder or an ImageFolder root "
                               "with train/ and val/ sub-folders")
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "train").is_dir():
        val = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if val is None:
            raise TokenFormerError(f"{root} has train/ but no val/ or test/ folder to evaluate on")
        train, test = images.ImageFolder(root / "train", channels), images.ImageFolder(val, channels)
        if train.classes != test.classes:
            raise TokenFormerError(f"{root}/train and {val} have different class folders")
        if cfg.max_train_samples:
            train.samples = train.samples[:cfg.max_train_samples]
        return ImageData(train, test, len(train.classes))
    x, y = images.load_mnist(root, "train")
    if cfg.max_train_samples:
        x, y = x[:cfg.max_train_samples], y[:cfg.max_train_samples]
    test = images.load_mnist(root, "test")
    return ImageData((x, y), test, int(max(y.max(), test[1].max())) + 1)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches, tta_flip: bool = False, env: DistEnv | None = None
                      ) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over `(images, labels)` batches.

    Under torchrun every rank passes its shard of the test images and all get the accuracy over the
    whole set: the sums are all-reduced. Pass the plain model, not its DDP wrapper: ranks may hold
    different numbers of batches, so the forward passes must not be collective."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        if tta_flip:
            logits = (logits + model(x.flip(-1)).float()) / 2
        totals += torch.stack([(logits.argmax(-1) == y).sum().double(),
                               F.cross_entropy(logits, y, reduction="sum").double(),
                               torch.tensor(len(y), dtype=torch.float64, device=device)])
    model.train(was_training)
    # the means over ranks of sums and of counts have the global ratio
    correct, loss_sum, count = all_reduce_mean(totals, env or DistEnv()).tolist()
    if count == 0:
        raise TokenFormerError("no evaluation images")
    return {"val_accuracy": correct / count, "val_loss": loss_sum / count}


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def augment_generator(seed: int, epoch: int, first: int) -> torch.Generator:
    """The augmentation generator of the slice of images starting at position `first` of `epoch`'s
    order: a function of the position, so each rank's slice is augmented in its own way and a
    resumed run draws the same again."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, first]).generate_state(1)[0]))


class VisionTask(EpochTask):
    """Image classification: epochs of shuffled, augmented images (`drop_last`), top-1 accuracy on
    the test images, optionally an average of the weights (`ema`) and test-time flips (`tta_flip`)."""

    unit = "images"
    sample_noun = "images"
    plot_title = "image classification"
    loss_label = "cross-entropy (nats/image)"
    validation_label = "test"

    def __init__(self, cfg: VisionTrainConfig) -> None:
        data = load_image_data(cfg, channels=1)  # fail on missing data before building a model
        super().__init__(cfg, data.num_train)
        self.data = data
        self.ema_model: nn.Module | None = None
        self._running = torch.zeros(3, dtype=torch.float64)  # this epoch's loss sum, correct, images
        self._running_epoch = 0
        self.name = "train-vision"

    def build_model(self) -> nn.Module:
        return VisionTokenFormer(VisionConfig.resolve(self.cfg.model))

    def prepare(self, model: nn.Module, ctx: TaskContext) -> None:
        cfg, config = self.cfg, model.config
        self.name = type(model).__name__
        channels = config.num_channels
        for split in (self.data.train, self.data.test):
            if isinstance(split, images.ImageFolder):  # read in the model's channel count, not re-listed
                split.channels = channels
        if len(cfg.mean) not in (1, channels) or len(cfg.std) not in (1, channels):
            raise TokenFormerError(f"mean/std give {len(cfg.mean)} values for {channels}-channel images")
        if self.data.num_classes > config.num_classes:
            raise TokenFormerError(f"{cfg.data} has {self.data.num_classes} classes but the model predicts "
                                   f"{config.num_classes}: set num_classes in the model config")
        config.image_mean, config.image_std = list(cfg.mean), list(cfg.std)  # saved with the model
        mean, std = config.normalisation()
        self.train_transform = images.make_transform(True, cfg.augment, mean, std, config.image_size,
                                                     cfg.crop_padding)
        self.test_transform = images.make_transform(False, "none", mean, std, config.image_size)
        # DDP keeps the weights equal on every rank, so every rank's average is the same too
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, index = self.epoch_slice(first, size)
        if epoch != self._running_epoch:  # a new epoch: its running train loss and accuracy start at 0
            self._running_epoch, self._running = epoch, torch.zeros(3, dtype=torch.float64)
        return images.take(self.data.train, index, self.train_transform,
                           augment_generator(self.cfg.seed, epoch, position))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             ctx: TaskContext) -> tuple[torch.Tensor, int]:
        """Cross-entropy (label smoothing as configured); also counts the batch for the running
        train loss and accuracy of the epoch (`log_extras`)."""
        x, y = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        if model.training:
            correct = float((logits.argmax(-1) == y).sum())
            self._running += torch.tensor([float(loss.detach()) * len(y), correct, len(y)], dtype=torch.float64)
        return loss, len(y)

    def after_step(self, model: nn.Module, ctx: TaskContext) -> None:
        if self.ema_model is not None:
            # warm the average up like timm/MoCo: early on it follows the weights closely
            update_ema(self.ema_model, model, min(self.cfg.ema, (1 + ctx.step) / (10 + ctx.step)))

    def log_extras(self, model: nn.Module, ctx: TaskContext) -> dict[str, float]:
        loss_sum, correct, seen = all_reduce_mean(self._running, ctx.env).tolist()
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    def growth_refusal(self) -> str | None:
        if self.cfg.ema:
            return "ema keeps an average of the weights in the shapes before growth; drop ema (or grow_at)"
        return None

    def final_model(self, model: nn.Module) -> nn.Module:
        """The evaluated weights: the average with `ema`, else the model's own."""
        return self.ema_model if self.ema_model is not None else unwrap(model)

    def evaluate(self, model: nn.Module, ctx: TaskContext) -> dict[str, float]:
        env = ctx.env
        test = images.batches_of(self.data.test, self.cfg.eval_batch_size, self.test_transform,
                                 shard=(env.rank, env.world_size))
        return self.add_record(ctx, {**evaluate_accuracy(self.final_model(model), test, self.cfg.tta_flip, env),
                                     **self.log_extras(model, ctx)})

    def describe(self, record: dict[str, Any]) -> str:
        return (f"epoch {record['epoch']}: test accuracy {record['val_accuracy']:.4f}, "
                f"loss {record['val_loss']:.4f}")

    def state(self) -> dict[str, Any]:
        return {**super().state(), "ema": self.ema_model.state_dict() if self.ema_model is not None else None}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        super().load_state(state, path)
        if self.ema_model is not None:
            if state.get("ema") is None:
                raise TokenFormerError(f"{path} was trained without ema, this run asks for it: use a new `save` "
                                       f"directory or the same ema setting")
            self.ema_model.load_state_dict(state["ema"])

    def finish(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any]:
        """Write `model/` (the evaluated weights: the EMA ones when `ema` is on) and accuracy.png."""
        outputs = super().finish(model, ctx)
        if ctx.folder is not None and ctx.env.is_main and self.cfg.plot:
            plot_accuracy({type(unwrap(model)).__name__: self.history}, ctx.folder.output(ACCURACY_PLOT_FILE))
        return {"test_accuracy": self.history[-1]["val_accuracy"] if self.history else None, **outputs}

    @staticmethod
    def report(summary: dict[str, Any]) -> str:
        return (f"test accuracy {100 * summary['test_accuracy']:.2f}% after {summary['epochs']} epochs "
                f"({summary['step']} steps, {summary['wall_time_s']:.0f} s, {summary['num_parameters']:,} parameters)")


register(TrainingCommand(
    "train-vision", VisionTrainConfig, VisionTask, VisionTokenFormer, example="configs/fashion_mnist.yaml",
    help="""Train an image classifier (a vision TokenFormer) and report its top-1 accuracy.

Fields come from the YAML CONFIG, then `--field value` overrides (every field below). The
output directory `save` gets checkpoints, metrics.jsonl, loss_curve.png, accuracy.png and model/
(the evaluated weights, the EMA ones with `ema`); `--resume` continues from its latest checkpoint
exactly. Under `torchrun` the same command trains data-parallel (DDP), `batch_size` the global batch."""))
