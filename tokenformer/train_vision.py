"""Training an image classifier (the vision TokenFormer, or any model taking (B, C, H, W) images):
`tokenformer train-vision CONFIG.yaml [--field value ...]`.

Epoch-based: every epoch is one shuffled pass over the training images in mini-batches
(`drop_last`), augmented on the fly (`tokenformer.vision_data`); top-1 accuracy on the test or
validation images is measured every `eval_interval` epochs. AdamW with linear warmup then cosine
decay, optional label smoothing, an exponential moving average of the weights (`ema`) and
test-time horizontal flips (`tta_flip`).

Output directory (`save`): `step_NNNNNNNN/` checkpoints (model directory + `trainer.pt`) at epoch
ends, `latest`, `metrics.jsonl` (train loss lines and `val_accuracy` lines), `accuracy.png`, and
`model/`: the evaluated weights (the EMA ones when `ema` is on), loadable with
`VisionTokenFormer.from_pretrained`. `resume: true` continues from the latest checkpoint exactly
(data order, augmentation and EMA included).

Under `torchrun --nproc_per_node N -m tokenformer train-vision ...` the same command trains with
DDP (data parallel; not FSDP2: these models fit on any device): `batch_size` is the global batch,
each rank takes its slice of every global batch of one shuffled order, augments it with its own
generator, and evaluates its shard of the test images (the counts are summed over ranks). Rank 0
alone writes the output directory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer import vision_data as vd
from tokenformer.errors import TokenFormerError
from tokenformer.train import METRICS_FILE, PLOT_FILE as LOSS_PLOT_FILE, RunConfig, _help

ACCURACY_PLOT_FILE = "accuracy.png"
FINAL_MODEL_DIR = "model"


@dataclass
class VisionTrainConfig(RunConfig):
    """Everything an image-classification run needs (optimizer field names as in the LM trainer)."""

    command = "train-vision"

    model: Any = _help("vision preset name (tiny-28, small-28, fmnist-28, B/16, L/16) or a mapping of "
                       "VisionConfig fields (with `name: PRESET` to start from a preset)", default="fmnist-28")
    data: str = _help("an MNIST-style IDX folder (train-images-idx3-ubyte.gz, t10k-...) or an ImageFolder "
                      "root with train/ and val/ sub-folders", default="../shared/data/fashion-mnist")
    mean: list[float] = _help("per-channel mean subtracted after scaling pixels to [0, 1]",
                              default_factory=lambda: [0.5])
    std: list[float] = _help("per-channel std divided by", default_factory=lambda: [0.5])
    augment: str = _help("training augmentation: none, flip (horizontal), crop (random crop with "
                         "padding), crop-flip (both), inception (random resized crop + flip, for ImageNet)",
                         default="crop-flip")
    crop_padding: int = _help("padding of the random crop (pixels)", default=2)
    label_smoothing: float = _help("label smoothing of the cross-entropy", default=0.0)
    max_train_samples: int | None = _help("use only the first N training images (quick runs)", default=None)
    # schedule
    epochs: int = _help("passes over the training images", default=10)
    batch_size: int = _help("images per optimizer step (under torchrun: over all ranks together)", default=128)
    eval_batch_size: int = _help("images per forward pass in evaluation", default=1000)
    lr: float = _help("peak learning rate", default=1e-3)
    min_lr: float = _help("learning rate at the end of the decay", default=1e-5)
    warmup_epochs: float = _help("linear warmup length in epochs", default=1.0)
    lr_decay_style: str = _help("cosine, linear or constant", default="cosine")
    weight_decay: float = _help("AdamW weight decay on matrices (Pattention tokens, embeddings)", default=0.05)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    clip_grad: float = _help("clip the global gradient norm to this (0 = no clipping)", default=1.0)
    ema: float = _help("decay of an exponential moving average of the weights, evaluated instead of the "
                       "raw ones (0 = off; e.g. 0.999)", default=0.0)
    tta_flip: bool = _help("evaluate on each image and its mirror image, averaging the logits", default=False)
    seed: int = _help("seed of the initialisation, data order and augmentation", default=0)
    # evaluation, checkpoints, logging
    eval_interval: int = _help("measure test accuracy every this many epochs (and after the last)", default=1)
    save: str | None = _help("output directory: checkpoints, metrics.jsonl, accuracy.png, model/", default=None)
    save_interval: int = _help("write a checkpoint every this many epochs (and after the last)", default=1)
    keep_last_n: int = _help("checkpoints kept (older ones are deleted)", default=2)
    resume: bool = _help("continue from the latest checkpoint in `save`", default=False)
    log_interval: int = _help("write a train-loss metrics line every this many steps", default=50)
    plot: bool = _help("write accuracy.png (extra: plot)", default=True)
    progress: bool = _help("show a progress bar", default=True)
    num_threads: int | None = _help("CPU threads (default: torch's choice)", default=None)
    device: str = _help("auto, cpu, cuda, ... (under torchrun: one rank per GPU or CPU process, data-parallel "
                        "with DDP; FSDP2 is not supported here)", default="auto")

    def __post_init__(self) -> None:
        if self.augment is None:  # the shared CLI conversion reads `--augment none` as null
            self.augment = "none"
        self.validate()

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_interval", "save_interval",
                     "keep_last_n", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TokenFormerError(f"train-vision config field {name} must be a positive integer, got {value!r}")
        if self.augment not in vd.AUGMENTATIONS:
            raise TokenFormerError(f"unknown augment {self.augment!r}: use one of {', '.join(vd.AUGMENTATIONS)}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise TokenFormerError(f"unknown lr_decay_style {self.lr_decay_style!r}: use cosine, linear or constant")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.ema < 1.0:
            raise TokenFormerError("label_smoothing and ema must be in [0, 1)")
        if len(self.mean) != len(self.std):
            raise TokenFormerError(f"mean {self.mean} and std {self.std} need one value per channel each")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")


# ---- the model and the data --------------------------------------------------------------------

def resolve_vision_config(spec: Any):
    """A `VisionConfig` from a preset name or a mapping of fields (`name` picks the preset)."""
    from tokenformer.vision import VISION_PRESETS, VisionConfig

    if isinstance(spec, str):
        return VisionConfig.from_name(spec)
    if isinstance(spec, dict):
        values = dict(spec)
        name = values.pop("name", None)
        if name in VISION_PRESETS:
            return VisionConfig.from_name(name, **values)
        return VisionConfig.from_dict({**values, **({"name": name} if name else {})})
    raise TokenFormerError(f"model must be a vision preset name or a mapping of VisionConfig fields, got {spec!r}")


@dataclass
class ImageData:
    """Training and evaluation images: in-memory tensors (IDX) or ImageFolders (read per batch)."""

    train: tuple[torch.Tensor, torch.Tensor] | vd.ImageFolder
    test: tuple[torch.Tensor, torch.Tensor] | vd.ImageFolder
    num_classes: int

    def train_batches(self, batch_size: int, transform, generator, shard: tuple[int, int] = (0, 1),
                      augment_generator=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of each global batch of one shuffled epoch (see `vd.batch_indices`)."""
        return _batches(self.train, batch_size, transform, shuffle=True, generator=generator, drop_last=True,
                        shard=shard, augment_generator=augment_generator)

    def test_batches(self, batch_size: int, transform, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self.test, batch_size, transform, shard=shard)

    @property
    def num_train(self) -> int:
        return len(self.train) if isinstance(self.train, vd.ImageFolder) else len(self.train[1])


def _batches(split: tuple[torch.Tensor, torch.Tensor] | vd.ImageFolder, batch_size: int, transform,
             **options: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`vd.folder_batches` of an ImageFolder, `vd.batches` of in-memory (images, labels)."""
    if isinstance(split, vd.ImageFolder):
        return vd.folder_batches(split, batch_size, transform, **options)
    return vd.batches(*split, batch_size, transform, **options)


def load_image_data(cfg: VisionTrainConfig, channels: int) -> ImageData:
    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "train").is_dir():
        val = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if val is None:
            raise TokenFormerError(f"{root} has train/ but no val/ or test/ folder to evaluate on")
        train, test = vd.ImageFolder(root / "train", channels), vd.ImageFolder(val, channels)
        if train.classes != test.classes:
            raise TokenFormerError(f"{root}/train and {val} have different class folders")
        if cfg.max_train_samples:
            train.samples = train.samples[:cfg.max_train_samples]
        return ImageData(train, test, len(train.classes))
    x, y = vd.load_mnist(root, "train")
    if cfg.max_train_samples:
        x, y = x[:cfg.max_train_samples], y[:cfg.max_train_samples]
    test = vd.load_mnist(root, "test")
    return ImageData((x, y), test, int(max(y.max(), test[1].max())) + 1)


# ---- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches, tta_flip: bool = False, env=None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over `(images, labels)` batches.

    Under torchrun every rank passes its shard of the test images (`ImageData.test_batches` with
    `shard`) and all get the accuracy over the whole set: the sums are all-reduced. Pass the plain
    model, not its DDP wrapper: ranks may hold different numbers of batches, so the forward passes
    must not be collective."""
    from tokenformer.distributed import DistEnv, all_reduce_mean

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


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class Schedule:
    """The learning-rate schedule in steps, in the fields `lr_at` reads."""

    lr: float
    min_lr: float
    lr_decay_style: str
    num_warmup_iters: int
    decay_iters: int


class RunningStats:
    """The running train loss and accuracy of one epoch; reading them averages over the ranks (a
    collective: every rank reads at the same steps)."""

    def __init__(self) -> None:
        self.totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        correct = int((logits.argmax(-1) == labels).sum())
        self.totals += torch.tensor([loss * len(labels), correct, len(labels)], dtype=torch.float64)

    def read(self, env) -> tuple[float, float]:
        from tokenformer.distributed import all_reduce_mean

        loss_sum, correct, seen = all_reduce_mean(self.totals, env).tolist()
        return loss_sum / max(seen, 1), correct / max(seen, 1)


def epoch_generators(seed: int, epoch: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """The generators of one epoch: of the order, then of this rank's augmentation.

    The order's comes from (seed, epoch) alone, so every rank draws the same order and takes a
    disjoint slice of each global batch, and a resumed run sees the same order. Rank 0 (and one
    process) augments with that generator after the order, exactly as before data parallelism;
    rank r > 0 augments with its own, seeded from (seed, epoch, rank): different on each rank,
    the same again on resume.
    """
    order = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if rank == 0:
        return order, order
    import numpy as np

    augment_seed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    return order, torch.Generator().manual_seed(augment_seed)


def train_vision(cfg: VisionTrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Train `model` (default: a `VisionTokenFormer` of `cfg.model`) and return the results:
    final and per-epoch accuracy, wall time, parameter count.

    Under torchrun the model is wrapped in DDP and `batch_size` stays the global batch: rank r of
    N trains on its slice of `batch_size / N` images of every global batch; rank 0 writes the
    checkpoints, metrics, plots and `model/`."""
    from tokenformer.train import run_distributed

    return run_distributed(cfg.device, cfg.save, lambda env: _train_vision(cfg, model, env))


def _images_for(cfg: VisionTrainConfig, vision_config) -> tuple[ImageData, vd.Transform, vd.Transform]:
    """The images and the train and test transforms for a model of `vision_config`, checked against it."""
    channels = vision_config.num_channels
    if len(cfg.mean) not in (1, channels):
        raise TokenFormerError(f"mean/std give {len(cfg.mean)} values for {channels}-channel images")
    mean = cfg.mean * channels if len(cfg.mean) == 1 else cfg.mean
    std = cfg.std * channels if len(cfg.std) == 1 else cfg.std
    data = load_image_data(cfg, channels)
    if data.num_classes > vision_config.num_classes:
        raise TokenFormerError(f"{cfg.data} has {data.num_classes} classes but the model predicts "
                               f"{vision_config.num_classes}: set num_classes in the model config")
    size = vision_config.image_size
    train_transform = vd.make_transform(True, cfg.augment, mean, std, size, cfg.crop_padding)
    test_transform = vd.make_transform(False, "none", mean, std, size)
    return data, train_transform, test_transform


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    lr: float, cfg: VisionTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step at `lr` on this rank's images; returns the loss and the logits."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(x)
    # the mean over this rank's slice; DDP averages the gradients over the ranks, which makes them
    # those of the mean over the global batch (the slices are equal in size)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return loss, logits


def _train_vision(cfg: VisionTrainConfig, model: nn.Module | None, env) -> dict[str, Any]:
    from tokenformer.distributed import barrier, maybe_fail, wrap_model
    from tokenformer.train import (CheckpointManager, MetricsLogger, _note, _progress_bar, build_optimizer,
                                   capture_rng, lr_at, plot_loss_curve, restore_rng)
    from tokenformer.vision import VisionTokenFormer

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.batch_size % env.world_size:
        raise TokenFormerError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                               f"{env.world_size} ranks: use a multiple of {env.world_size}")
    device = env.device
    torch.manual_seed(cfg.seed)
    if model is None:
        model = VisionTokenFormer(resolve_vision_config(cfg.model))
    model = model.to(device).train()
    data, train_transform, test_transform = _images_for(cfg, model.config)
    steps_per_epoch = data.num_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise TokenFormerError(f"{data.num_train} training images make no batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    schedule = Schedule(cfg.lr, cfg.min_lr, cfg.lr_decay_style,
                        int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
    optimizer = build_optimizer(model, cfg)
    # DDP keeps the weights equal on every rank, so every rank's average is the same too
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema else None
    plain = model
    model = wrap_model(model, env, "ddp")

    save = Path(cfg.save) if cfg.save else None
    manager = CheckpointManager(save, cfg.keep_last_n, env) if save else None
    start_epoch, step, history, elapsed_before = 0, 0, [], 0.0
    resume_from = None
    if manager is not None:
        manager.remove_leftovers()
        barrier(env)  # no rank looks for the latest checkpoint while rank 0 clears leftovers
        resume_from = manager.latest() if cfg.resume else None
    if resume_from is not None:  # every rank reads the checkpoint rank 0 wrote
        state = manager.load(resume_from, model, optimizer)
        start_epoch, step = state["epoch"], state["step"]
        history, elapsed_before = state["history"], state["elapsed"]
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
        restore_rng(state["rng"])
    metrics = MetricsLogger(save / METRICS_FILE if save and env.is_main else None,
                            resume_step=step if resume_from is not None else None)
    if save and env.is_main:
        from tokenformer.checkpoint import atomic_write_text

        atomic_write_text(save / "train_vision_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    progress = _progress_bar(cfg, env, step, total=total_steps, desc=type(plain).__name__)
    start = time.perf_counter()
    evaluated = ema_model if ema_model is not None else plain
    shard = (env.rank, env.world_size)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            generator, augment_generator = epoch_generators(cfg.seed, epoch, env.rank)
            running, batches_done = RunningStats(), 0
            interval_start, interval_images = time.perf_counter(), 0  # throughput since the last log line
            for x, y in data.train_batches(cfg.batch_size, train_transform, generator, shard, augment_generator):
                step += 1
                batches_done += 1
                lr = lr_at(step, schedule)
                x, y = x.to(device), y.to(device)
                loss, logits = _optimizer_step(model, optimizer, x, y, lr, cfg)
                maybe_fail(step, env)  # TOKENFORMER_FAIL_AT_STEP: a rank failure drill, as in `train`
                if ema_model is not None:
                    # warm the average up like timm/MoCo: early on it follows the weights closely
                    update_ema(ema_model, plain, min(cfg.ema, (1 + step) / (10 + step)))
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TokenFormerError(f"the loss became {loss_value} at step {step}: lower lr or "
                                           f"turn clip_grad on")
                running.add(loss_value, logits, y)
                interval_images += cfg.batch_size
                progress.update(1)
                if step % cfg.log_interval == 0:
                    train_loss, train_accuracy = running.read(env)
                    now = time.perf_counter()
                    images_per_s = interval_images / max(now - interval_start, 1e-9)  # over all ranks
                    interval_start, interval_images = now, 0
                    metrics.log({"step": step, "epoch": epoch + batches_done * cfg.batch_size / data.num_train,
                                 "loss": train_loss, "train_accuracy": train_accuracy, "lr": lr,
                                 "images_per_s": images_per_s})
                    progress.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", acc=f"{train_accuracy:.3f}",
                                         refresh=False)
            last = epoch + 1 == cfg.epochs
            if (epoch + 1) % cfg.eval_interval == 0 or last:
                result = evaluate_accuracy(evaluated, data.test_batches(cfg.eval_batch_size, test_transform, shard),
                                           cfg.tta_flip, env)
                train_loss, train_accuracy = running.read(env)
                record = {"step": step, "epoch": epoch + 1, **result, "train_loss": train_loss,
                          "train_accuracy": train_accuracy, "elapsed": elapsed_before + time.perf_counter() - start}
                history.append(record)
                metrics.log(record)
                if env.is_main:
                    _note(f"epoch {epoch + 1}: test accuracy {result['val_accuracy']:.4f}, "
                          f"loss {result['val_loss']:.4f} ({record['elapsed']:.0f} s)", cfg.progress)
            if manager is not None and ((epoch + 1) % cfg.save_interval == 0 or last):
                trainer_state = {"epoch": epoch + 1, "history": history, "rng": capture_rng(),
                                 "elapsed": elapsed_before + time.perf_counter() - start,
                                 "ema": ema_model.state_dict() if ema_model is not None else None}
                manager.save(step, model, optimizer, trainer_state)
    finally:
        progress.close()
        metrics.close()
    wall = elapsed_before + time.perf_counter() - start
    if save and env.is_main:
        from tokenformer.checkpoint import save_model_directory

        save_model_directory(evaluated, save / FINAL_MODEL_DIR)
        if cfg.plot:
            plot_accuracy({type(plain).__name__: history}, save / ACCURACY_PLOT_FILE)
            plot_loss_curve(save / METRICS_FILE, save / LOSS_PLOT_FILE)
    barrier(env)  # every rank returns once the outputs exist
    return {"test_accuracy": history[-1]["val_accuracy"] if history else None, "history": history,
            "wall_time_s": wall, "epochs": cfg.epochs, "steps": step,
            "num_parameters": sum(p.numel() for p in plain.parameters())}


def plot_accuracy(histories: dict[str, list[dict[str, Any]]], png_path: str | Path,
                  title: str = "test accuracy") -> Path | None:
    """Accuracy against epoch for one or more runs, as a PNG; None without matplotlib (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from tokenformer.checkpoint import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, history in histories.items():
        points = [(r["epoch"], 100 * r["val_accuracy"]) for r in history]
        if points:
            ax.plot(*zip(*points), "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


# ---- command line -------------------------------------------------------------------------------

def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [CONFIG.yaml] [--field value ...]"
    parser.add_argument("config", nargs="?", help="YAML file of train-vision config fields (configs/fashion_mnist.yaml)")
    for f in dataclasses.fields(VisionTrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", dest=f"field_{f.name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{f.metadata['help']} (default {default})")
    # after CONFIG argparse stops: the LM trainer's parser reads the remaining --field value pairs
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="more --field value overrides after CONFIG")


def cli_main(args: argparse.Namespace) -> None:
    """Train an image classifier (a vision TokenFormer) and report its top-1 accuracy.

    Fields come from the YAML CONFIG, then `--field value` overrides (every field below). The
    output directory `save` gets checkpoints, metrics.jsonl, accuracy.png and model/."""
    from tokenformer.train import parse_overrides

    overrides = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
    overrides.update(parse_overrides(args.overrides or []))
    cfg = (VisionTrainConfig.from_yaml(args.config, overrides) if args.config
           else VisionTrainConfig.from_dict(overrides))
    result = train_vision(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"test accuracy {100 * result['test_accuracy']:.2f}% after {result['epochs']} epochs "
          f"({result['steps']} steps, {result['wall_time_s']:.0f} s, {result['num_parameters']:,} parameters)")
