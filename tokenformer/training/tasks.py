"""What the training loop trains on: a task supplies the data, the loss, the validation and the
outputs, and the one loop (`tokenformer.training.loop`) does everything else (optimizer, schedule,
checkpoints, exact resume, metrics, progress, torchrun).

A task has these members:

- `name` (the progress bar's label), `unit` and `units_per_sample` (what throughput counts:
  tokens per window, or one image), `tokenizer` (written into every checkpoint, or None),
  `validate_at_start`;
- `build_model()`: the model to train when none is given and there is no `init_from`;
- `prepare(model, env)`: load and check the data against the model (once, after seeding);
- `train_batch(first, size)`: global samples `first .. first + size - 1`, a deterministic
  function of the index: this is what makes resume and any number of ranks exact;
- `loss(model, batch) -> (mean loss, count)`;
- `after_step(model, step)` (e.g. an average of the weights), `log_extras(env)` (more values for
  the metrics lines; collective: every rank calls it at the same steps);
- `evaluate(model, env, step) -> record | None`: the validation metrics (collective), and
  `describe(record)`: the line shown for them;
- `state()` saved in every checkpoint, `load_state(state, path)` when resuming from one;
- `finish(model, save, env) -> dict`: outputs written at the end (rank 0 writes files).

`LanguageModelTask` (`tokenformer train`) and `VisionTask` (`tokenformer train-vision`) are the two.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.data import images
from tokenformer.data.indexed import strip_suffix
from tokenformer.data.tokenizer import check_vocab_fits, load_tokenizer
from tokenformer.data.windows import WindowDataset
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import mean_loss, window_loss
from tokenformer.files import (ACCURACY_PLOT_FILE, FINAL_MODEL_DIR, PREPARE_METADATA_FILE, SPLIT_PREFIXES,
                               TOKENIZER_FILE)
from tokenformer.models.config import resolve_model_config
from tokenformer.models.lm import TokenFormer
from tokenformer.models.pretrained import save_model
from tokenformer.models.vision import VisionTokenFormer, resolve_vision_config
from tokenformer.training.config import TrainConfig, VisionTrainConfig
from tokenformer.training.distributed import DistEnv, all_reduce_mean, unwrap
from tokenformer.training.metrics import plot_accuracy
from tokenformer.training.precision import autocast_context


# ---- language modelling -------------------------------------------------------------------------

@dataclass
class DataSources:
    """Where the tokens come from: indexed-dataset prefixes and the tokenizer that made them."""

    train_prefixes: list[str]
    valid_prefixes: list[str]
    tokenizer: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_data(cfg: TrainConfig) -> DataSources:
    """Read `data_path` (a `tokenformer prepare` directory) or the explicit GPT-NeoX prefixes."""
    if cfg.data_path and cfg.train_data_paths:
        raise TokenFormerError("give either data_path or train_data_paths, not both")
    metadata: dict[str, Any] = {}
    tokenizer = cfg.tokenizer
    if cfg.data_path:
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise FileNotFoundError(f"data_path {root} is not a directory: run `tokenformer prepare --out {root}` "
                                    f"first, or give train_data_paths")
        train = [str(root / SPLIT_PREFIXES["train"])]
        valid = [str(root / SPLIT_PREFIXES["valid"])] if (root / f"{SPLIT_PREFIXES['valid']}.idx").is_file() else []
        if tokenizer is None and (root / TOKENIZER_FILE).is_file():
            tokenizer = str(root / TOKENIZER_FILE)
        if (root / PREPARE_METADATA_FILE).is_file():
            metadata = json.loads((root / PREPARE_METADATA_FILE).read_text())
    elif cfg.train_data_paths:
        train = [strip_suffix(p) for p in cfg.train_data_paths]
        valid = [strip_suffix(p) for p in cfg.valid_data_paths]
    else:
        raise TokenFormerError("no training data: set data_path (a `tokenformer prepare` directory) "
                               "or train_data_paths (indexed-dataset prefixes)")
    for prefix in train + valid:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"indexed dataset {prefix}{suffix} does not exist: check the data "
                                        f"path (give prefixes without .bin/.idx)")
    return DataSources(train, valid, tokenizer, metadata)


def validation_batches(dataset: WindowDataset, eval_iters: int, micro_batch_size: int, env: DistEnv) -> \
        tuple[list[torch.Tensor], list[float]]:
    """This rank's share of the fixed validation set (`eval_iters` micro-batches of the file-order
    windows, fewer if the data are short), padded to the same count on every rank."""
    windows = min(dataset.windows_per_epoch, eval_iters * micro_batch_size)
    starts = list(range(0, windows, micro_batch_size))
    mine = starts[env.rank::env.world_size]
    per_rank = math.ceil(len(starts) / env.world_size)
    batches = [dataset.batch(s, min(micro_batch_size, windows - s)) for s in mine]
    weights = [1.0] * len(batches)
    while len(batches) < per_rank:  # keep collective forwards in step (FSDP2); contributes nothing
        batches.append(dataset.batch(0, min(micro_batch_size, windows)))
        weights.append(0.0)
    return batches, weights


class LanguageModelTask:
    """Next-token prediction on windows of `seq_length + 1` tokens of GPT-NeoX indexed files."""

    name = "train"
    unit = "tokens"
    validate_at_start = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.sources = resolve_data(cfg)  # fail on missing data before building a model
        self.tokenizer = None
        self.seq_length = 0
        self._validation: tuple[list[torch.Tensor], list[float]] | None = None

    def build_model(self) -> nn.Module:
        return TokenFormer(resolve_model_config(self.cfg.model))

    def prepare(self, model: nn.Module, env: DistEnv) -> None:
        cfg = self.cfg
        spec = self.sources.tokenizer
        if spec is None and cfg.init_from and (Path(cfg.init_from) / TOKENIZER_FILE).is_file():
            spec = str(Path(cfg.init_from) / TOKENIZER_FILE)
        self.tokenizer = load_tokenizer(spec) if spec else None
        padded = model.config.padded_vocab_size
        fix = "set the model's vocab_size to at least {n} (e.g. model: {{name: small, vocab_size: {n}}})"
        if self.tokenizer is not None:
            check_vocab_fits(self.tokenizer.vocab_size, padded, fix=fix.format(n=self.tokenizer.vocab_size))
        data_vocab = self.sources.metadata.get("vocab_size")
        if isinstance(data_vocab, int):
            check_vocab_fits(data_vocab, padded, "the prepared data's vocabulary", fix.format(n=data_vocab))
        self.seq_length = cfg.seq_length or model.config.seq_length
        self.train_data = WindowDataset(self.sources.train_prefixes, self.seq_length, seed=cfg.seed,
                                        name="training")
        valid = WindowDataset(self.sources.valid_prefixes, self.seq_length, shuffle=False, name="validation") \
            if self.sources.valid_prefixes and cfg.eval_iters else None
        self._validation = validation_batches(valid, cfg.eval_iters, cfg.train_micro_batch_size_per_gpu, env) \
            if valid is not None else None

    @property
    def units_per_sample(self) -> int:
        return self.seq_length

    def train_batch(self, first: int, size: int) -> torch.Tensor:
        return self.train_data.batch(first, size)  # (size, T + 1)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return window_loss(model, batch)

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def log_extras(self, env: DistEnv) -> dict[str, float]:
        return {}

    def evaluate(self, model: nn.Module, env: DistEnv, step: int) -> dict[str, float] | None:
        if self._validation is None:
            return None
        batches, weights = self._validation
        device = next(model.parameters()).device
        loss = mean_loss(model, batches, self.loss, weights, reduce=lambda t: all_reduce_mean(t, env),
                         autocast=lambda: autocast_context(self.cfg.precision, device))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def describe(self, record: dict[str, Any]) -> str:
        return f"step {record['step']}: validation loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.4g}"

    def state(self) -> dict[str, Any]:
        return {"seq_length": self.seq_length}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("seq_length", self.seq_length) != self.seq_length:
            raise TokenFormerError(f"{path} was trained with seq_length {state['seq_length']}, this run asks "
                                   f"for {self.seq_length}: the data position would not carry over; keep "
                                   f"seq_length or use a new `save` directory")

    def finish(self, model: nn.Module, save: Path | None, env: DistEnv) -> dict[str, Any]:
        return {}


# ---- image classification -----------------------------------------------------------------------

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


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of the `n` training images in `epoch`, from (seed, epoch) alone: the same
    on every rank and after every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def augment_generator(seed: int, epoch: int, first: int) -> torch.Generator:
    """The augmentation generator of the slice of images starting at position `first` of `epoch`'s
    order: a function of the position, so each rank's slice is augmented in its own way and a
    resumed run draws the same again."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, first]).generate_state(1)[0]))


class VisionTask:
    """Image classification: epochs of shuffled, augmented images (`drop_last`), top-1 accuracy on
    the test images, optionally an average of the weights (`ema`) and test-time flips (`tta_flip`)."""

    unit = "images"
    units_per_sample = 1
    tokenizer = None
    validate_at_start = False

    def __init__(self, cfg: VisionTrainConfig) -> None:
        self.cfg = cfg
        self.data = load_image_data(cfg, channels=1)  # fail on missing data before building a model
        self.steps_per_epoch = self.data.num_train // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise TokenFormerError(f"{self.data.num_train} training images make no batch of {cfg.batch_size}")
        self.history: list[dict[str, Any]] = []
        self.ema_model: nn.Module | None = None
        self._order: tuple[int, torch.Tensor] | None = None
        self._running = torch.zeros(3, dtype=torch.float64)  # this epoch's loss sum, correct, images
        self._running_epoch = 0
        self.name = "train-vision"

    def build_model(self) -> nn.Module:
        return VisionTokenFormer(resolve_vision_config(self.cfg.model))

    def prepare(self, model: nn.Module, env: DistEnv) -> None:
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
        mean = cfg.mean * channels if len(cfg.mean) == 1 else cfg.mean
        std = cfg.std * channels if len(cfg.std) == 1 else cfg.std
        self.train_transform = images.make_transform(True, cfg.augment, mean, std, config.image_size,
                                                     cfg.crop_padding)
        self.test_transform = images.make_transform(False, "none", mean, std, config.image_size)
        # DDP keeps the weights equal on every rank, so every rank's average is the same too
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.batch_size

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(first, self.samples_per_epoch)
        if epoch != self._running_epoch:  # a new epoch: its running train loss and accuracy start at 0
            self._running_epoch, self._running = epoch, torch.zeros(3, dtype=torch.float64)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.data.num_train))
        index = self._order[1][position:position + size]
        return images.take(self.data.train, index, self.train_transform,
                           augment_generator(self.cfg.seed, epoch, position))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Cross-entropy (label smoothing as configured); also counts the batch for the running
        train loss and accuracy of the epoch (`log_extras`)."""
        x, y = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        if model.training:
            correct = float((logits.argmax(-1) == y).sum())
            self._running += torch.tensor([float(loss.detach()) * len(y), correct, len(y)], dtype=torch.float64)
        return loss, len(y)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.ema_model is not None:
            # warm the average up like timm/MoCo: early on it follows the weights closely
            update_ema(self.ema_model, model, min(self.cfg.ema, (1 + step) / (10 + step)))

    def log_extras(self, env: DistEnv) -> dict[str, float]:
        loss_sum, correct, seen = all_reduce_mean(self._running, env).tolist()
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    def evaluated_model(self, model: nn.Module) -> nn.Module:
        return self.ema_model if self.ema_model is not None else unwrap(model)

    def evaluate(self, model: nn.Module, env: DistEnv, step: int) -> dict[str, float]:
        test = images.batches_of(self.data.test, self.cfg.eval_batch_size, self.test_transform,
                                 shard=(env.rank, env.world_size))
        record = {"epoch": step // self.steps_per_epoch,
                  **evaluate_accuracy(self.evaluated_model(model), test, self.cfg.tta_flip, env),
                  **self.log_extras(env)}
        self.history.append(record)
        return record

    def describe(self, record: dict[str, Any]) -> str:
        return (f"epoch {record['epoch']}: test accuracy {record['val_accuracy']:.4f}, "
                f"loss {record['val_loss']:.4f}")

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "ema": self.ema_model.state_dict() if self.ema_model is not None else None}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        self.history = list(state.get("history", []))
        if self.ema_model is not None:
            if state.get("ema") is None:
                raise TokenFormerError(f"{path} was trained without ema, this run asks for it: use a new `save` "
                                       f"directory or the same ema setting")
            self.ema_model.load_state_dict(state["ema"])

    def finish(self, model: nn.Module, save: Path | None, env: DistEnv) -> dict[str, Any]:
        """Write `model/` (the evaluated weights: the EMA ones when `ema` is on) and accuracy.png."""
        evaluated = self.evaluated_model(model)
        if save is not None and env.is_main:
            save_model(evaluated, save / FINAL_MODEL_DIR)
            if self.cfg.plot:
                plot_accuracy({type(unwrap(model)).__name__: self.history}, save / ACCURACY_PLOT_FILE)
        return {"test_accuracy": self.history[-1]["val_accuracy"] if self.history else None,
                "history": self.history, "epochs": self.cfg.epochs,
                "num_parameters": sum(p.numel() for p in evaluated.parameters())}
