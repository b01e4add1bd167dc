"""The run configs of the training loop: `TrainConfig` (`tokenformer train`, in steps, field names
as GPT-NeoX's where GPT-NeoX has the field) and `VisionTrainConfig` (`tokenformer train-vision`, in
epochs, which `loop_config` turns into a `TrainConfig` for the same loop).

The defaults of `TrainConfig` are the recipe of the released models: AdamW (lr 6e-4, betas
0.9/0.95, eps 1e-8, weight decay 0.1 on the Pattention tokens and the embedding, none on the final
LayerNorm), linear warmup then cosine decay to `min_lr`, gradient clipping 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenformer.data.images import AUGMENTATIONS
from tokenformer.data.tokenizer import BYTE_VOCAB_SIZE
from tokenformer.errors import TokenFormerError
from tokenformer.options import RunConfig, option
from tokenformer.training.distributed import PARALLELISMS
from tokenformer.training.optim import Schedule

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
INIT_FROM_SCHEDULES = ("restart", "continue")


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run needs. Field names are GPT-NeoX's where GPT-NeoX has the field."""

    command = "train"

    # model
    model: Any = option("preset name (tiny, small, base-cpu, 150M, ...), a Config .json / official .yml "
                       "path, or a mapping of Config fields (with `name: PRESET` to start from a preset)",
                       default="small")
    init_from: str | None = option("start from this checkpoint directory's weights (e.g. a grown model); "
                                  "see init_from_optimizer, init_from_schedule, freeze_old, tune_tokens", default=None)
    init_from_optimizer: bool = option("carry init_from's AdamW state (a training checkpoint, or `tokenformer "
                                      "grow` of one: new tokens start with zero moments) instead of a fresh "
                                      "optimizer", default=False)
    init_from_schedule: str = option("restart: fresh warmup and decay over train_iters (official); continue: "
                                    "step, lr schedule and data position go on from init_from's step "
                                    "(train_iters counts the whole schedule)", default="restart")
    freeze_old: bool = option("train only the parameter tokens added by init_from's last growth",
                             default=False)
    tune_tokens: int = option("token tuning: freeze init_from's model, append this many parameter tokens to "
                             "every Pattention (exact: the run starts at its logits) and train only those; "
                             "every checkpoint holds them as adapter.safetensors (0 = off)", minimum=0, default=0)
    # data
    data_path: str | None = option("directory written by `tokenformer prepare` (train/valid indexed files "
                                  "and tokenizer.json)", default=None)
    train_data_paths: list[str] = option("GPT-NeoX style: indexed-dataset prefixes to train on "
                                        "(concatenated), instead of data_path", default_factory=list)
    valid_data_paths: list[str] = option("GPT-NeoX style: indexed-dataset prefixes to validate on",
                                        default_factory=list)
    tokenizer: str | None = option("tokenizer saved with the checkpoints ('byte' or a tokenizer.json); "
                                  "default: the one in data_path", default=None)
    seq_length: int | None = option("tokens per training window (default: the model's seq_length)",
                                   minimum=1, default=None)
    # batch
    train_micro_batch_size_per_gpu: int = option("windows per forward/backward on each process", minimum=1, default=4)
    gradient_accumulation_steps: int = option("micro-batches accumulated per optimizer step", minimum=1, default=1)
    train_iters: int = option("optimizer steps", minimum=1, default=1000)
    # optimizer and schedule (the official recipe)
    lr: float = option("peak learning rate", minimum=0, default=6e-4)
    min_lr: float = option("learning rate at the end of the decay", minimum=0, default=6e-5)
    warmup: float = option("linear warmup as a fraction of lr_decay_iters (used when warmup_iters is unset)",
                          minimum=0, maximum=1, default=0.01)
    warmup_iters: int | None = option("linear warmup steps (overrides warmup)", minimum=0, default=None)
    lr_decay_style: str = option("cosine, linear or constant", default="cosine")
    lr_decay_iters: int | None = option("steps over which the lr decays to min_lr (default train_iters)",
                                       minimum=1, default=None)
    weight_decay: float = option("AdamW weight decay on Pattention tokens and the embedding", minimum=0, default=0.1)
    adam_beta1: float = option("AdamW beta1", minimum=0, below=1, default=0.9)
    adam_beta2: float = option("AdamW beta2", minimum=0, below=1, default=0.95)
    adam_eps: float = option("AdamW epsilon", above=0, default=1e-8)
    clip_grad: float = option("clip the global gradient norm to this (0 = no clipping)", minimum=0, default=1.0)
    # numerics
    precision: str = option("fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast + loss scaling, GPU only)",
                           default="fp32")
    checkpoint_activations: bool = option("recompute each block in the backward pass to save memory",
                                         default=False)
    compile: bool = option("compile each block with torch.compile (in place: checkpoints keep their names)",
                          default=False)
    seed: int = option("seed of the initialisation and of the data order", default=1234)
    # evaluation, checkpoints, logging
    eval_interval: int = option("validate every this many steps (and at the start and the end)", minimum=1, default=100)
    eval_iters: int = option("validation micro-batches (fixed windows, the same every time)", minimum=0, default=10)
    save: str | None = option("output directory: checkpoints, metrics.jsonl, loss_curve.png", default=None)
    save_interval: int = option("write a checkpoint every this many steps (and at the end)", minimum=1, default=100)
    keep_last_n: int = option("checkpoints kept (older ones are deleted)", minimum=1, default=3)
    resume: bool = option("continue from the latest checkpoint in `save` (start fresh if there is none)",
                         default=False)
    log_interval: int = option("write a metrics line every this many steps", minimum=1, default=10)
    tensorboard_dir: str | None = option("also log to TensorBoard here (extra: tensorboard)", default=None)
    wandb_project: str | None = option("also log to this Weights & Biases project (extra: wandb)",
                                      default=None)
    plot: bool = option("write loss_curve.png beside the checkpoints (extra: plot)", default=True)
    progress: bool = option("show a progress bar (rank 0 only)", default=True)
    # hardware
    device: str = option("auto, cpu, cuda, cuda:1, ...", default="auto")
    parallelism: str = option("under torchrun: ddp (replicated) or fsdp2 (sharded)", default="ddp")
    num_threads: int | None = option("CPU threads per process (default: torch's choice)", minimum=1,
                                    default=None)

    def __post_init__(self) -> None:
        self.validate()

    # ---- checks and derived values ----------------------------------------------------------

    def validate(self) -> None:
        self.check_bounds()  # the ranges declared with the fields
        if self.precision not in PRECISIONS:
            raise TokenFormerError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TokenFormerError(
                f"unknown lr_decay_style {self.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        if self.parallelism not in PARALLELISMS:
            raise TokenFormerError(f"unknown parallelism {self.parallelism!r}: use {' or '.join(PARALLELISMS)}")
        if self.min_lr > self.lr:
            raise TokenFormerError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")
        if self.init_from_schedule not in INIT_FROM_SCHEDULES:
            raise TokenFormerError(f"unknown init_from_schedule {self.init_from_schedule!r}: use restart or continue")

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule: `warmup_iters` (else `warmup` x the decay steps) of linear
        warmup, then `lr_decay_style` decay to `min_lr` at `lr_decay_iters` (else `train_iters`)."""
        decay = self.lr_decay_iters or self.train_iters
        warmup = self.warmup_iters if self.warmup_iters is not None else int(round(self.warmup * decay))
        return Schedule(self.lr, self.min_lr, warmup, decay, self.lr_decay_style)


@dataclass
class VisionTrainConfig(RunConfig):
    """Everything an image-classification run needs (optimizer field names as in the LM trainer)."""

    command = "train-vision"

    model: Any = option("vision preset name (tiny-28, small-28, fmnist-28, B/16, L/16) or a mapping of "
                       "VisionConfig fields (with `name: PRESET` to start from a preset)", default="fmnist-28")
    data: str | None = option("an MNIST-style IDX folder (train-images-idx3-ubyte.gz, t10k-...) or an ImageFolder "
                              "root with train/ and val/ sub-folders", default=None)
    mean: list[float] = option("per-channel mean subtracted after scaling pixels to [0, 1]",
                              default_factory=lambda: [0.5])
    std: list[float] = option("per-channel std divided by", default_factory=lambda: [0.5])
    augment: str = option("training augmentation: none, flip (horizontal), crop (random crop with "
                         "padding), crop-flip (both), inception (random resized crop + flip, for ImageNet)",
                         default="crop-flip")
    crop_padding: int = option("padding of the random crop (pixels)", minimum=0, default=2)
    label_smoothing: float = option("label smoothing of the cross-entropy", minimum=0, below=1, default=0.0)
    max_train_samples: int | None = option("use only the first N training images (quick runs)", minimum=1, default=None)
    # schedule
    epochs: int = option("passes over the training images", minimum=1, default=10)
    batch_size: int = option("images per optimizer step (under torchrun: over all ranks together)", minimum=1,
                             default=128)
    eval_batch_size: int = option("images per forward pass in evaluation", minimum=1, default=1000)
    lr: float = option("peak learning rate", minimum=0, default=1e-3)
    min_lr: float = option("learning rate at the end of the decay", minimum=0, default=1e-5)
    warmup_epochs: float = option("linear warmup length in epochs", minimum=0, default=1.0)
    lr_decay_style: str = option("cosine, linear or constant", default="cosine")
    weight_decay: float = option("AdamW weight decay on matrices (Pattention tokens, embeddings)", minimum=0,
                                 default=0.05)
    adam_beta1: float = option("AdamW beta1", minimum=0, below=1, default=0.9)
    adam_beta2: float = option("AdamW beta2", minimum=0, below=1, default=0.999)
    adam_eps: float = option("AdamW epsilon", above=0, default=1e-8)
    clip_grad: float = option("clip the global gradient norm to this (0 = no clipping)", minimum=0, default=1.0)
    ema: float = option("decay of an exponential moving average of the weights, evaluated instead of the "
                       "raw ones (0 = off; e.g. 0.999)", minimum=0, below=1, default=0.0)
    tta_flip: bool = option("evaluate on each image and its mirror image, averaging the logits", default=False)
    seed: int = option("seed of the initialisation, data order and augmentation", default=0)
    # evaluation, checkpoints, logging
    eval_interval: int = option("measure test accuracy every this many epochs (and after the last)", minimum=1,
                                default=1)
    save: str | None = option("output directory: checkpoints, metrics.jsonl, accuracy.png, model/", default=None)
    save_interval: int = option("write a checkpoint every this many epochs (and after the last)", minimum=1, default=1)
    keep_last_n: int = option("checkpoints kept (older ones are deleted)", minimum=1, default=2)
    resume: bool = option("continue from the latest checkpoint in `save`", default=False)
    log_interval: int = option("write a train-loss metrics line every this many steps", minimum=1, default=50)
    plot: bool = option("write accuracy.png (extra: plot)", default=True)
    progress: bool = option("show a progress bar", default=True)
    num_threads: int | None = option("CPU threads (default: torch's choice)", minimum=1, default=None)
    device: str = option("auto, cpu, cuda, ... (under torchrun: one rank per GPU or CPU process, data-parallel "
                        "with DDP; FSDP2 is not supported here)", default="auto")

    def __post_init__(self) -> None:
        if self.augment is None:  # the shared CLI conversion reads `--augment none` as null
            self.augment = "none"
        self.validate()

    def validate(self) -> None:
        self.check_bounds()  # the ranges declared with the fields
        if self.augment not in AUGMENTATIONS:
            raise TokenFormerError(f"unknown augment {self.augment!r}: use one of {', '.join(AUGMENTATIONS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TokenFormerError(
                f"unknown lr_decay_style {self.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        if len(self.mean) != len(self.std):
            raise TokenFormerError(f"mean {self.mean} and std {self.std} need one value per channel each")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")

    def loop_config(self, steps_per_epoch: int, world_size: int) -> TrainConfig:
        """The same run in the terms of the one training loop (`epoch_loop_config`)."""
        return epoch_loop_config(self, steps_per_epoch, world_size)


def epoch_loop_config(cfg: Any, steps_per_epoch: int, world_size: int, **extra: Any) -> TrainConfig:
    """An epoch-based run config (`VisionTrainConfig`, `CaptionTrainConfig`) in the terms of the one
    training loop: steps instead of epochs, the global batch as one micro-batch per rank; the
    optimizer, logging and hardware fields carry over by name, `extra` adds `TrainConfig` fields."""
    if cfg.batch_size % world_size:
        raise TokenFormerError(f"batch_size {cfg.batch_size} (the global batch) does not split evenly over "
                               f"{world_size} ranks: use a multiple of {world_size}")
    return TrainConfig(
        model=cfg.model, train_micro_batch_size_per_gpu=cfg.batch_size // world_size,
        train_iters=cfg.epochs * steps_per_epoch, lr=cfg.lr, min_lr=cfg.min_lr,
        warmup_iters=int(round(cfg.warmup_epochs * steps_per_epoch)), lr_decay_style=cfg.lr_decay_style,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, seed=cfg.seed,
        eval_interval=cfg.eval_interval * steps_per_epoch, save=cfg.save,
        save_interval=cfg.save_interval * steps_per_epoch, keep_last_n=cfg.keep_last_n,
        resume=cfg.resume, log_interval=cfg.log_interval, plot=cfg.plot, progress=cfg.progress,
        device=cfg.device, parallelism="ddp", num_threads=cfg.num_threads, **extra)



@dataclass
class CaptionTrainConfig(RunConfig):
    """Everything an image-captioning run needs (`tokenformer train-captioner`; in epochs, as
    train-vision)."""

    command = "train-captioner"

    model: Any = option("captioner preset name (tiny, B/16-150M) or a mapping of CaptionerConfig fields (`name: "
                       "PRESET`, then `vision:` / `text:` mappings override single fields of its parts)",
                       default="tiny")
    init_from: str | None = option("start from this captioner checkpoint directory's weights (e.g. a grown one)",
                                  default=None)
    vision_from: str | None = option("with lm_from: start from a trained image tower (a train-vision model "
                                    "directory) and a trained language model, with a fresh projector", default=None)
    lm_from: str | None = option("with vision_from: the trained language model's directory (its tokenizer "
                                "is used unless `tokenizer` names another)", default=None)
    data: str | None = option("training image-text samples (a folder of .tar shards, e.g. `tokenformer make-scenes` "
                              "OUT/train)", default=None)
    val_data: str | None = option("validation image-text samples (e.g. OUT/val); scene attributes in them add "
                                  "attribute accuracy", default=None)
    tokenizer: str | None = option("bpe (a byte-level BPE trained on the training captions), byte, or a "
                                  "tokenizer.json path; default: lm_from's or init_from's tokenizer, else bpe; "
                                  "saved with every checkpoint", default=None)
    bpe_vocab_size: int = option("vocabulary of the BPE trained on the captions (tokenizer bpe)",
                                 minimum=BYTE_VOCAB_SIZE, default=320)
    max_train_samples: int | None = option("use only the first N training samples (quick runs)", minimum=1,
                                           default=None)
    # schedule
    epochs: int = option("passes over the training samples", minimum=1, default=10)
    batch_size: int = option("samples per optimizer step (under torchrun: over all ranks together)", minimum=1,
                             default=64)
    eval_batch_size: int = option("samples per forward pass in evaluation", minimum=1, default=250)
    lr: float = option("peak learning rate", minimum=0, default=1e-3)
    min_lr: float = option("learning rate at the end of the decay", minimum=0, default=1e-5)
    warmup_epochs: float = option("linear warmup length in epochs", minimum=0, default=0.5)
    lr_decay_style: str = option("cosine, linear or constant", default="cosine")
    weight_decay: float = option("AdamW weight decay on matrices (Pattention tokens, embeddings)", minimum=0,
                                 default=0.05)
    adam_beta1: float = option("AdamW beta1", minimum=0, below=1, default=0.9)
    adam_beta2: float = option("AdamW beta2", minimum=0, below=1, default=0.98)
    adam_eps: float = option("AdamW epsilon", above=0, default=1e-8)
    clip_grad: float = option("clip the global gradient norm to this (0 = no clipping)", minimum=0, default=1.0)
    seed: int = option("seed of the initialisation and the data order", default=0)
    # evaluation, checkpoints, logging
    caption_samples: int = option("validation samples captioned greedily at every evaluation (the first N; "
                                  "0 = none)", minimum=0, default=200)
    max_new_tokens: int = option("longest generated caption, in tokens (at most what the language model's "
                                 "seq_length leaves after the image prefix)", minimum=1, default=64)
    eval_interval: int = option("validate every this many epochs (and after the last)", minimum=1, default=1)
    save: str | None = option("output directory: checkpoints, metrics.jsonl, loss_curve.png, captions.jsonl, "
                              "model/", default=None)
    save_interval: int = option("write a checkpoint every this many epochs (and after the last)", minimum=1, default=1)
    keep_last_n: int = option("checkpoints kept (older ones are deleted)", minimum=1, default=2)
    resume: bool = option("continue from the latest checkpoint in `save`", default=False)
    log_interval: int = option("write a train-loss metrics line every this many steps", minimum=1, default=50)
    plot: bool = option("write loss_curve.png (extra: plot)", default=True)
    progress: bool = option("show a progress bar", default=True)
    num_threads: int | None = option("CPU threads (default: torch's choice)", minimum=1, default=None)
    device: str = option("auto, cpu, cuda, ... (under torchrun: data-parallel with DDP)", default="auto")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_bounds()  # the ranges declared with the fields
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TokenFormerError(
                f"unknown lr_decay_style {self.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        if (self.vision_from is None) != (self.lm_from is None):
            raise TokenFormerError("vision_from and lm_from go together: give both (or neither)")
        if self.init_from and self.vision_from:
            raise TokenFormerError("give either init_from or vision_from/lm_from, not both")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")

    def loop_config(self, steps_per_epoch: int, world_size: int) -> TrainConfig:
        """The same run in the terms of the one training loop (`epoch_loop_config`)."""
        return epoch_loop_config(self, steps_per_epoch, world_size, init_from=self.init_from)


@dataclass
class ClipTrainConfig(RunConfig):
    """Everything a contrastive image-text run needs (`tokenformer train-clip`; in epochs, as
    train-vision; the optimizer defaults are open_clip's)."""

    command = "train-clip"

    model: Any = option("CLIP preset name (tiny, tiny-28, small, B/16) or a mapping of CLIPConfig fields (`name: "
                       "PRESET`, then `vision:` / `text:` mappings override single fields of its towers); the "
                       "text vocabulary follows the tokenizer", default="tiny")
    init_from: str | None = option("start from this CLIP checkpoint directory's weights (e.g. a grown one)",
                                  default=None)
    data: str | None = option("training pairs: image-text samples (.tar shards, a folder of them, a brace pattern, "
                              "or a folder with captions.csv/jsonl; e.g. `tokenformer make-scenes` OUT/train) or a "
                              "Fashion-MNIST IDX folder, captioned from prompt templates", default=None)
    val_data: str | None = option("validation image-text samples (e.g. OUT/val) for the loss and retrieval "
                                  "recall@1/5/10; a Fashion-MNIST `data` validates on its test images", default=None)
    classes: list[int] | None = option("Fashion-MNIST only: train on these labels only (zero-shot on the others "
                                       "is reported apart)", default=None)
    tokenizer: str = option("bpe (a byte-level BPE trained on the training captions), byte, or a tokenizer.json "
                           "path; saved with every checkpoint", default="bpe")
    bpe_vocab_size: int = option("vocabulary of the BPE trained on the captions (tokenizer bpe)",
                                 minimum=BYTE_VOCAB_SIZE, default=512)
    max_train_samples: int | None = option("use only the first N training samples (quick runs)", minimum=1,
                                           default=None)
    max_val_samples: int | None = option("validate on the first N validation samples only", minimum=1, default=None)
    mean: list[float] = option("per-channel mean subtracted after scaling pixels to [0, 1]",
                              default_factory=lambda: [0.5])
    std: list[float] = option("per-channel std divided by", default_factory=lambda: [0.5])
    augment: str = option("training augmentation: none, flip, crop, crop-flip, inception (see train-vision)",
                         default="none")
    crop_padding: int = option("padding of the random crop (pixels)", minimum=0, default=2)
    # schedule
    epochs: int = option("passes over the training pairs", minimum=1, default=10)
    batch_size: int = option("pairs per optimizer step, the contrastive batch: each pair's negatives are the "
                             "others (under torchrun: over all ranks together, gathered for the loss)", minimum=2,
                             default=64)
    eval_batch_size: int = option("pairs per forward pass in evaluation", minimum=1, default=250)
    lr: float = option("peak learning rate", minimum=0, default=1e-3)
    min_lr: float = option("learning rate at the end of the decay", minimum=0, default=1e-5)
    warmup_epochs: float = option("linear warmup length in epochs", minimum=0, default=0.5)
    lr_decay_style: str = option("cosine, linear or constant", default="cosine")
    weight_decay: float = option("AdamW weight decay on matrices (Pattention tokens, embeddings)", minimum=0,
                                 default=0.2)
    adam_beta1: float = option("AdamW beta1", minimum=0, below=1, default=0.9)
    adam_beta2: float = option("AdamW beta2", minimum=0, below=1, default=0.98)
    adam_eps: float = option("AdamW epsilon", above=0, default=1e-6)
    clip_grad: float = option("clip the global gradient norm to this (0 = no clipping)", minimum=0, default=1.0)
    seed: int = option("seed of the initialisation, data order, captions and augmentation", minimum=0, default=0)
    # evaluation, checkpoints, logging
    eval_interval: int = option("validate every this many epochs (and after the last)", minimum=1, default=1)
    save: str | None = option("output directory: checkpoints, metrics.jsonl, loss_curve.png, model/", default=None)
    save_interval: int = option("write a checkpoint every this many epochs (and after the last)", minimum=1, default=1)
    keep_last_n: int = option("checkpoints kept (older ones are deleted)", minimum=1, default=2)
    resume: bool = option("continue from the latest checkpoint in `save`", default=False)
    log_interval: int = option("write a train-loss metrics line every this many steps", minimum=1, default=50)
    plot: bool = option("write loss_curve.png (extra: plot)", default=True)
    progress: bool = option("show a progress bar", default=True)
    num_threads: int | None = option("CPU threads (default: torch's choice)", minimum=1, default=None)
    device: str = option("auto, cpu, cuda, ... (under torchrun: data-parallel with DDP)", default="auto")

    def __post_init__(self) -> None:
        if self.augment is None:  # the shared CLI conversion reads `--augment none` as null
            self.augment = "none"
        self.validate()

    def validate(self) -> None:
        self.check_bounds()  # the ranges declared with the fields (batch_size 2 or more: a pair needs negatives)
        if self.augment not in AUGMENTATIONS:
            raise TokenFormerError(f"unknown augment {self.augment!r}: use one of {', '.join(AUGMENTATIONS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TokenFormerError(
                f"unknown lr_decay_style {self.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        if len(self.mean) != len(self.std):
            raise TokenFormerError(f"mean {self.mean} and std {self.std} need one value per channel each")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")

    def loop_config(self, steps_per_epoch: int, world_size: int) -> TrainConfig:
        """The same run in the terms of the one training loop (`epoch_loop_config`): one micro-batch
        per rank and step, since a contrastive loss cannot be accumulated over micro-batches."""
        return epoch_loop_config(self, steps_per_epoch, world_size, init_from=self.init_from)
