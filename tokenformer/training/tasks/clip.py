"""Contrastive image-text training (`tokenformer train-clip`): epochs of shuffled image-caption
pairs, the symmetric InfoNCE over the global batch (`training.contrastive`), retrieval recall and,
on Fashion-MNIST, zero-shot accuracy from held-out prompt templates.

Data are image-text samples (`tokenformer.data.image_text`: tar shards or a captions table) or a
Fashion-MNIST IDX folder, whose images get a caption from a training template per draw (a function
of the seed and the sample's position in the epoch, so resume and any rank count stay exact).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from tokenformer.console import rounded
from tokenformer.data import images
from tokenformer.data.image_text import ImageTextSamples, open_image_text, take_image_text
from tokenformer.data.prepare import train_bpe
from tokenformer.data.prompts import (FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES,
                                      fashion_mnist_captions, format_prompts)
from tokenformer.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.retrieval import encode_dataset, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from tokenformer.files import TOKENIZER_FILE
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer, tokenize_captions
from tokenformer.training.config import ClipTrainConfig
from tokenformer.training.contrastive import clamp_logit_scale, clip_loss, contrastive_loss, gather_rows
from tokenformer.training.distributed import DistEnv, unwrap
from tokenformer.training.registry import TrainingCommand, register
from tokenformer.training.tasks.base import EpochTask, TaskContext
from tokenformer.training.tasks.vision import augment_generator

# Fashion-MNIST validation captions are drawn once, from a stream of their own: a seed of two
# numbers is never one of the training draws' three.
VAL_CAPTION_STREAM = 1


@dataclass
class PairData:
    """The pairs of a run: image-text samples, or Fashion-MNIST `(images uint8 (N, 1, 28, 28),
    labels (N,))` with its `classnames` (captioned from templates)."""

    train: ImageTextSamples | tuple[torch.Tensor, torch.Tensor]
    val: ImageTextSamples | tuple[torch.Tensor, torch.Tensor] | None
    num_train: int
    num_val: int
    classnames: list[str] | None = None

    @property
    def labelled(self) -> bool:
        return self.classnames is not None


def is_idx_folder(path: Path) -> bool:
    """Whether `path` holds MNIST-style training files (the names `images.load_mnist` reads)."""
    return path.is_dir() and any(path.glob("train-images*idx3*ubyte*"))


def load_pair_data(cfg: ClipTrainConfig) -> PairData:
    """The training and validation pairs of `cfg.data` / `cfg.val_data` (see the module docstring)."""
    if cfg.data is None:
        raise TokenFormerError("train-clip needs `data`: image-text samples (e.g. `tokenformer make-scenes` "
                               "OUT/train) or a Fashion-MNIST IDX folder")
    root = Path(cfg.data)
    if is_idx_folder(root):
        x, y = images.load_mnist(root, "train")
        if cfg.classes:
            keep = torch.isin(y, torch.tensor(cfg.classes))
            x, y = x[keep], y[keep]
        test = images.load_mnist(root, "test")
        n_val = min(len(test[1]), cfg.max_val_samples or len(test[1]))
        n_train = min(len(y), cfg.max_train_samples or len(y))
        return PairData((x, y), test, n_train, n_val, list(FASHION_MNIST_CLASSES))
    if cfg.classes:
        raise TokenFormerError("classes selects Fashion-MNIST labels; image-text data have none: drop `classes`")
    train = open_image_text(cfg.data)
    val = open_image_text(cfg.val_data) if cfg.val_data else None
    n_val = 0 if val is None else min(len(val), cfg.max_val_samples or len(val))
    return PairData(train, val, min(len(train), cfg.max_train_samples or len(train)), n_val)


def caption_rng(seed: int, epoch: int, first: int) -> np.random.Generator:
    """The template draws of the pairs starting at position `first` of `epoch`: a function of the
    position, as the augmentation's (`augment_generator`)."""
    return np.random.default_rng([seed, epoch, first])


def model_config(cfg: ClipTrainConfig, tokenizer: Tokenizer | None = None) -> CLIPConfig:
    """The `CLIPConfig` of `cfg.model` with the text vocabulary of the run's tokenizer: `bpe_vocab_size`
    for a trained BPE (which may stop short of it: the shape must not depend on the captions), else
    the tokenizer's size (`tokenizer`, or the one `cfg.tokenizer` names). What a model trained with
    `train_clip(cfg, model)` must be built with, whatever its class."""
    config = CLIPConfig.resolve(cfg.model)
    if cfg.tokenizer == "bpe":
        vocab = cfg.bpe_vocab_size
    else:
        vocab = (tokenizer or load_tokenizer(cfg.tokenizer)).vocab_size
    return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=vocab))


class ClipTask(EpochTask):
    """Contrastive training of a `CLIPTokenFormer` (or any model with its interface) on image-caption
    pairs; validation loss, recall@1/5/10 and, for Fashion-MNIST, zero-shot accuracy."""

    unit = "images"
    sample_noun = "pairs"
    plot_title = "contrastive image-text training"
    loss_label = "contrastive loss (nats/pair)"

    def __init__(self, cfg: ClipTrainConfig) -> None:
        data = load_pair_data(cfg)  # fail on missing data before building a model
        super().__init__(cfg, data.num_train)
        self.data = data
        self.tokenizer = self.resolve_tokenizer()
        self.context_length = 0
        self.name = "train-clip"

    def training_captions(self) -> list[str]:
        """The captions training can see (the BPE is trained on them): with `classes`, the prompts of
        those classes only, so that a held-out class's name is no part of training at all."""
        if self.data.labelled:
            seen = [name for label, name in enumerate(self.data.classnames)
                    if not self.cfg.classes or label in self.cfg.classes]
            return [prompt for prompts in format_prompts(seen, TRAIN_TEMPLATES) for prompt in prompts]
        return self.data.train.captions[:self.data.num_train]

    def resolve_tokenizer(self) -> Tokenizer:
        """`bpe`: a byte-level BPE trained on the training captions (deterministic: every rank trains
        the same one); else `byte` or a tokenizer.json."""
        spec = self.cfg.tokenizer
        return train_bpe(self.training_captions(), self.cfg.bpe_vocab_size) if spec == "bpe" else load_tokenizer(spec)

    def build_model(self) -> nn.Module:
        return CLIPTokenFormer(model_config(self.cfg, self.tokenizer))

    def prepare(self, model: nn.Module, ctx: TaskContext) -> None:
        cfg, config = self.cfg, model.config
        self.name, self.context_length = type(model).__name__, config.text.seq_length
        channels, size = config.vision.num_channels, config.vision.image_size
        for split in (self.data.train, self.data.val):
            if isinstance(split, ImageTextSamples):
                split.channels = channels
        if self.data.labelled and channels != 1:
            raise TokenFormerError(f"Fashion-MNIST images are grey but the model takes {channels} channels: "
                                   f"use a 1-channel model (preset tiny-28)")
        if len(cfg.mean) not in (1, channels) or len(cfg.std) not in (1, channels):
            raise TokenFormerError(f"mean/std give {len(cfg.mean)} values for {channels}-channel images")
        text = config.text
        check_vocab_fits(self.tokenizer.vocab_size, getattr(text, "padded_vocab_size", text.vocab_size),
                         fix="raise the model's text vocab_size or use a smaller tokenizer")
        config.vision.image_mean, config.vision.image_std = list(cfg.mean), list(cfg.std)  # saved with the model
        mean, std = config.vision.normalisation()
        self.train_transform = images.make_transform(True, cfg.augment, mean, std, size, cfg.crop_padding)
        self.test_transform = images.make_transform(False, "none", mean, std, size)
        if self.data.labelled:
            labels = self.data.val[1][:self.data.num_val]
            self.val_captions = fashion_mnist_captions(labels, HELD_OUT_TEMPLATES,
                                                       np.random.default_rng([cfg.seed, VAL_CAPTION_STREAM]))

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_captions(self.tokenizer, captions, self.context_length)

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs `first .. first + size - 1` of the global order: images (B, C, H, W), ids (B, L), lengths (B,)."""
        epoch, position, index = self.epoch_slice(first, size)
        generator = augment_generator(self.cfg.seed, epoch, position)
        if self.data.labelled:
            x, labels = images.take(self.data.train, index, self.train_transform, generator)
            captions = fashion_mnist_captions(labels, TRAIN_TEMPLATES, caption_rng(self.cfg.seed, epoch, position))
        else:
            x, captions = take_image_text(self.data.train, index, self.train_transform, generator)
        return (x, *self.tokenize(captions))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...], ctx: TaskContext) -> tuple[torch.Tensor, int]:
        """The symmetric InfoNCE of the micro-batch's pairs, gathered over the ranks: with gradient
        accumulation each micro-batch is a contrastive batch of its own."""
        image_features, text_features, logit_scale = model(*batch)
        return clip_loss(image_features, text_features, logit_scale, ctx.env), len(batch[0])

    def after_step(self, model: nn.Module, ctx: TaskContext) -> None:
        clamp_logit_scale(model)

    def log_extras(self, model: nn.Module, ctx: TaskContext) -> dict[str, float]:
        return {"logit_scale": float(unwrap(model).logit_scale.detach().exp())}

    # ---- evaluation ---------------------------------------------------------------------------

    def val_batches(self, env: DistEnv) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """This rank's contiguous share of the validation pairs, `eval_batch_size` at a time."""
        mine = torch.arange(self.data.num_val).tensor_split(env.world_size)[env.rank]
        for index in mine.split(self.cfg.eval_batch_size):
            if self.data.labelled:
                x, _ = images.take(self.data.val, index, self.test_transform)
                yield x, [self.val_captions[int(i)] for i in index]
            else:
                yield take_image_text(self.data.val, index, self.test_transform)

    def evaluate(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any] | None:
        env = ctx.env
        if self.data.num_val < env.world_size:
            return None  # no validation pairs (or fewer than ranks)
        plain = unwrap(model)  # the ranks' shards differ in size: no collective forward passes
        image_features, text_features = (gather_rows(f, env) for f in encode_dataset(plain, self.tokenizer,
                                                                                     self.val_batches(env)))
        record: dict[str, Any] = {"val_loss": self.val_loss(image_features, text_features, plain)}
        if self.data.labelled:
            record.update(self.zero_shot(plain, image_features))
        else:
            record.update(retrieval_recall(image_features, text_features))
        return self.add_record(ctx, record)

    @torch.no_grad()
    def val_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, model: nn.Module) -> float:
        """The contrastive loss over consecutive validation batches of the training batch size (the
        loss depends on the batch size), averaged; a set smaller than one batch is one batch."""
        size = min(self.cfg.batch_size, len(image_features))
        scale = model.logit_scale.detach().exp()
        losses = [contrastive_loss(image_features[s:s + size], text_features[s:s + size], scale)
                  for s in range(0, len(image_features) - size + 1, size)]
        return float(torch.stack(losses).mean())

    def zero_shot(self, model: nn.Module, image_features: torch.Tensor) -> dict[str, float]:
        """Zero-shot accuracy over all classes with the held-out templates; with `classes`, also on
        the images of the classes left out of training."""
        classifier = zero_shot_classifier(model, self.tokenizer, self.data.classnames, HELD_OUT_TEMPLATES)
        labels = self.data.val[1][:self.data.num_val]
        record = {f"zero_shot_{k}": v for k, v in zero_shot_accuracy(image_features, labels, classifier).items()}
        if self.cfg.classes:
            unseen = ~torch.isin(labels, torch.tensor(self.cfg.classes))
            if bool(unseen.any()):
                accuracy = zero_shot_accuracy(image_features[unseen], labels[unseen], classifier)
                record.update({f"zero_shot_unseen_{k}": v for k, v in accuracy.items()})
        return record

    def describe(self, record: dict[str, Any]) -> str:
        if "zero_shot_top1" in record:
            found = f"zero-shot top-1 {record['zero_shot_top1']:.4f}"
        else:
            found = (f"recall@1 image->text {record['image_to_text_recall@1']:.4f}, "
                     f"text->image {record['text_to_image_recall@1']:.4f}")
        return f"epoch {record['epoch']}: val loss {record['val_loss']:.4f}, {found}"

    # ---- checkpoints and outputs ----------------------------------------------------------------

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        super().load_state(state, path)
        if (Path(path) / TOKENIZER_FILE).is_file():  # the run's own tokenizer, whatever trains today
            self.tokenizer = load_tokenizer(Path(path) / TOKENIZER_FILE)

    @staticmethod
    def report(summary: dict[str, Any]) -> str:
        last = summary["validation"] or {}
        shown = {k: rounded(v, 4) for k, v in last.items()
                 if k.startswith(("val_loss", "zero_shot", "image_to", "text_to"))}
        return (f"trained {summary['epochs']} epochs ({summary['step']} steps, {summary['wall_time_s']:.0f} s, "
                f"{summary['num_parameters']:,} parameters): {json.dumps(shown)}")


register(TrainingCommand(
    "train-clip", ClipTrainConfig, ClipTask, CLIPTokenFormer, example="configs/clip-scenes.yaml",
    help="""Train a CLIP TokenFormer contrastively on image-caption pairs and report its validation metrics.

Fields come from the YAML CONFIG, then `--field value` overrides (every field below). `data` is
image-text samples (`tokenformer make-scenes` OUT/train, WebDataset .tar shards, a captions.csv
folder) or a Fashion-MNIST IDX folder (captioned from prompt templates; zero-shot accuracy with
held-out templates). The output directory `save` gets checkpoints, metrics.jsonl, loss_curve.png
and model/ (with the tokenizer); `--resume` continues exactly. Under `torchrun`: DDP,
`batch_size` the global batch, whose features every rank gathers for the loss."""))
