"""The options of a training run: sections declared once (optimizer, schedule, steps or epochs,
checkpointing, warm start, logging, hardware), composed by each command's config.

A command's config (`TrainConfig` for `tokenformer train`, `VisionTrainConfig`, `ClipTrainConfig`,
`CaptionTrainConfig`, or a new task's own) is a dataclass built by `command_config` from these
sections plus its data and model fields; the fields stay flat (`--lr`, `lr:` in YAML). The
sections' defaults are `train`'s, the recipe of the released models: AdamW (lr 6e-4, betas
0.9/0.95, eps 1e-8, weight decay 0.1 on the Pattention tokens and the embedding, none on the final
LayerNorm), linear warmup then cosine decay to `min_lr`, gradient clipping 1.0. Where a command's
defaults differ, `EPOCH_COMMAND_DEFAULTS` states it once, with the reason.

The one loop reads a `LoopConfig`: the sections in steps. `TrainConfig` is one (it counts in steps);
an epoch command's `loop_config` turns its epochs into steps and carries every other section field
over unchanged, so every loop feature (precision, compile, activation checkpointing, gradient
accumulation, TensorBoard/W&B, init_from) reaches every task. A command that cannot honour a field
says so by name (`refuses`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from tokenformer.data.images import AUGMENTATIONS
from tokenformer.data.tokenizer import BYTE_VOCAB_SIZE
from tokenformer.errors import TokenFormerError
from tokenformer.options import MAX_SEED, RunConfig, option
from tokenformer.parallel.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from tokenformer.training.distributed import PARALLELISMS
from tokenformer.scaling.grow import MODES
from tokenformer.training.growth_schedule import GROW_OPTIMIZERS, GrowthOptions, check_options, growth_steps
from tokenformer.training.optim import WSD_SHAPES, Schedule

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
INIT_FROM_SCHEDULES = ("restart", "continue")


# ---- the sections ---------------------------------------------------------------------------------

@dataclass
class OptimizerOptions:
    """AdamW and gradient clipping (`training.optim`)."""

    lr: float = option("peak learning rate", minimum=0, default=6e-4)
    weight_decay: float = option("AdamW weight decay on matrices (Pattention tokens, embeddings)", minimum=0,
                                 default=0.1)
    adam_beta1: float = option("AdamW beta1", minimum=0, below=1, default=0.9)
    adam_beta2: float = option("AdamW beta2", minimum=0, below=1, default=0.95)
    adam_eps: float = option("AdamW epsilon", above=0, default=1e-8)
    clip_grad: float = option("clip the global gradient norm to this (0 = no clipping)", minimum=0, default=1.0)


@dataclass
class ScheduleOptions:
    """The shape of the learning-rate schedule, and the seed of everything random in the run."""

    min_lr: float = option("learning rate at the end of the decay", minimum=0, default=6e-5)
    lr_decay_style: str = option("cosine, linear, constant, or wsd (warmup-stable-decay: lr held after the warmup, "
                                 "decayed over the last wsd_decay_fraction of the steps)", default="cosine")
    wsd_decay_fraction: float = option("wsd: the share of lr_decay_iters (default train_iters) the final decay "
                                       "takes", above=0, maximum=1, default=0.2)
    wsd_decay_shape: str = option("wsd: the shape of the final decay: linear, cosine or 1-sqrt", default="1-sqrt")
    seed: int = option("seed of the initialisation, the data order and any augmentation", minimum=0,
                       maximum=MAX_SEED, default=1234)


@dataclass
class StepOptions:
    """A run counted in optimizer steps (`tokenformer train`)."""

    train_micro_batch_size_per_gpu: int = option("samples per forward/backward on each process", minimum=1,
                                                 default=4)
    gradient_accumulation_steps: int = option("micro-batches accumulated per optimizer step", minimum=1, default=1)
    train_iters: int = option("optimizer steps", minimum=1, default=1000)
    warmup: float = option("linear warmup as a fraction of lr_decay_iters (used when warmup_iters is unset)",
                           minimum=0, maximum=1, default=0.01)
    warmup_iters: int | None = option("linear warmup steps (overrides warmup)", minimum=0, default=None)
    lr_decay_iters: int | None = option("steps over which the lr decays to min_lr (default train_iters)",
                                        minimum=1, default=None)
    eval_interval: int = option("validate every this many steps (and at the start and the end)", minimum=1,
                                default=100)
    eval_iters: int = option("validation micro-batches (fixed windows, the same every time)", minimum=0, default=10)
    save_interval: int = option("write a checkpoint every this many steps (and at the end)", minimum=1, default=100)


@dataclass
class EpochOptions:
    """A run counted in passes over the training samples (`train-vision`, `train-clip`,
    `train-captioner`); `loop_config` turns it into steps."""

    epochs: int = option("passes over the training samples", minimum=1, default=10)
    batch_size: int = option("samples per optimizer step (under torchrun: over all ranks together)", minimum=1,
                             default=64)
    gradient_accumulation_steps: int = option("micro-batches a step's batch_size is split into, one after the "
                                              "other (saves memory; batch_size must divide evenly)", minimum=1,
                                              default=1)
    eval_batch_size: int = option("samples per forward pass in evaluation", minimum=1, default=250)
    warmup_epochs: float = option("linear warmup length in epochs", minimum=0, default=0.5)
    eval_interval: int = option("validate every this many epochs (and after the last)", minimum=1, default=1)
    save_interval: int = option("write a checkpoint every this many epochs (and after the last)", minimum=1,
                                default=1)


@dataclass
class CheckpointOptions:
    """Where the run's folder is and what stays in it (`training.checkpointing`, `training.run_folder`)."""

    save: str | None = option("output directory: checkpoints, metrics.jsonl, loss_curve.png and the task's "
                              "outputs (model/, ...)", default=None)
    keep_last_n: int = option("checkpoints kept (older ones are deleted)", minimum=1, default=3)
    resume: bool = option("continue from the latest checkpoint in `save` (start fresh if there is none)",
                          default=False)
    overwrite: bool = option("start afresh in a `save` folder holding an earlier run of this command (its own files "
                             "are replaced, anything else kept)", default=False)


@dataclass
class WarmStartOptions:
    """Starting from another run's weights (`training.warm_start`)."""

    init_from: str | None = option("start from this checkpoint directory's weights (e.g. a grown model); "
                                   "see init_from_optimizer, init_from_schedule, freeze_old, tune_tokens",
                                   default=None)
    init_from_optimizer: bool = option("carry init_from's AdamW state (a training checkpoint, or `tokenformer "
                                       "grow` of one: new tokens start with zero moments) instead of a fresh "
                                       "optimizer", default=False)
    init_from_schedule: str = option("restart: fresh warmup and decay over the run (official); continue: step, "
                                     "lr schedule and data position go on from init_from's step (the run's "
                                     "length counts the whole schedule)", default="restart")
    freeze_old: bool = option("train only the parameter tokens added by init_from's last growth", default=False)
    tune_tokens: int = option("token tuning: freeze init_from's model, append this many parameter tokens to "
                              "every Pattention (exact: the run starts at its outputs) and train only those; "
                              "every checkpoint holds them as adapter.safetensors (0 = off)", minimum=0, default=0)


@dataclass
class LoggingOptions:
    """Metrics lines, mirrors and plots (`training.metrics`)."""

    log_interval: int = option("write a train-loss metrics line every this many steps (and at the last)",
                               minimum=1, default=10)
    tensorboard_dir: str | None = option("also log to TensorBoard here (extra: tensorboard)", default=None)
    wandb_project: str | None = option("also log to this Weights & Biases project (extra: wandb)", default=None)
    plot: bool = option("draw loss_curve.png (and the task's own plots) beside the checkpoints (extra: plot)",
                        default=True)
    progress: bool = option("show a progress bar (rank 0 only)", default=True)


@dataclass
class HardwareOptions:
    """Where and in what numerics the run computes (`training.precision`, `training.distributed`)."""

    device: str = option("auto, cpu, cuda, cuda:1, ...", default="auto")
    precision: str = option("fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast + loss scaling, GPU only)",
                            default="fp32")
    compile: bool = option("compile each block with torch.compile (in place: checkpoints keep their names)",
                           default=False)
    checkpoint_activations: bool = option("recompute each block in the backward pass to save memory",
                                          default=False)
    parallelism: str = option("under torchrun: ddp (replicated) or fsdp2 (sharded) over the data-parallel ranks",
                              default="ddp")
    tp_size: int = option("under torchrun: token parallelism, ranks that split every Pattention's parameter "
                          "tokens, the attention heads and the vocabulary (the data-parallel size is the rest; "
                          "more than one data-parallel group needs parallelism fsdp2); language models only",
                          minimum=1, default=1)
    pp_size: int = option("under torchrun: pipeline stages of consecutive blocks (the micro-batches are those of "
                          "gradient_accumulation_steps); language models only", minimum=1, default=1)
    pp_schedule: str = option("pipeline schedule: 1f1b (needs gradient_accumulation_steps >= pp_size) or gpipe",
                              default="1f1b")
    num_threads: int | None = option("CPU threads per process (default: one per 1M parameters, at most one per "
                                     "idle core)", minimum=1, default=None)


# the sections every command has, in the order `--help` lists them (after the command's own fields)
COMMON_SECTIONS = (OptimizerOptions, ScheduleOptions, CheckpointOptions, WarmStartOptions, GrowthOptions,
                   LoggingOptions, HardwareOptions)


# ---- composing a command's config -------------------------------------------------------------------

class TrainingConfig(RunConfig):
    """Base of the training commands' configs: the checks of the sections, written once, and a
    command's `refuses` (field -> why this command cannot honour it: a value other than the field's
    default is an error naming the field)."""

    refuses: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_bounds()  # the ranges declared with the fields
        for name, allowed in (("precision", PRECISIONS), ("lr_decay_style", LR_DECAY_STYLES),
                              ("wsd_decay_shape", WSD_SHAPES), ("grow_mode", MODES), ("grow_optimizer", GROW_OPTIMIZERS),
                              ("parallelism", PARALLELISMS), ("init_from_schedule", INIT_FROM_SCHEDULES),
                              ("pp_schedule", PIPELINE_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise TokenFormerError(f"unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.min_lr > self.lr:
            raise TokenFormerError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")
        check_options(self)
        defaults = {f.name: f for f in dataclasses.fields(self)}
        for name, why in self.refuses.items():
            value = getattr(self, name)
            if value != _default_of(defaults[name]):
                raise TokenFormerError(f"{self.command} cannot use {name} {value!r}: {why}")

    @classmethod
    def listed_fields(cls) -> list[dataclasses.Field]:
        """The command's own fields (model, data, ...) first, then its data sections', then the loop's."""
        loop = {f.name for section in (*COMMON_SECTIONS, StepOptions, EpochOptions)
                for f in dataclasses.fields(section)}
        own = set(vars(cls).get("__annotations__", {})) - set(getattr(cls, "restated", ()))
        return sorted(dataclasses.fields(cls), key=lambda f: 0 if f.name in own else 2 if f.name in loop else 1)


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def command_config(command: str, defaults: Mapping[str, Any] | None = None) -> Callable[[type], type]:
    """Make the decorated class the config dataclass of `command`: its sections come from its bases,
    and `defaults` restates inherited fields with this command's default (help text and range kept,
    unless the class body declares the field again, without a default, to say them its own way)."""
    def make(cls: type) -> type:
        cls.command = command
        cls.restated = frozenset(defaults or ())
        inherited = {f.name: (f, base) for base in reversed(cls.__mro__[1:]) if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in (defaults or {}).items():
            if name not in inherited:
                raise TypeError(f"{command} restates the default of {name!r}, which no section declares")
            f, base = inherited[name]
            own = cls.__dict__.get(name)
            metadata = own.metadata if isinstance(own, dataclasses.Field) else f.metadata
            annotations.setdefault(name, typing.get_type_hints(base)[name])
            if isinstance(value, list):
                setattr(cls, name, dataclasses.field(default_factory=lambda v=value: list(v), metadata=metadata))
            else:
                setattr(cls, name, dataclasses.field(default=value, metadata=metadata))
        cls.__annotations__ = annotations
        return dataclass(cls)
    return make


@dataclass
class LoopConfig(StepOptions, HardwareOptions, LoggingOptions, GrowthOptions, WarmStartOptions, CheckpointOptions,
                 ScheduleOptions, OptimizerOptions, TrainingConfig):
    """What the one training loop reads: the sections, counted in steps."""

    command: ClassVar[str] = "train"

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule: `warmup_iters` (else `warmup` x the decay steps) of linear
        warmup, then `lr_decay_style` decay to `min_lr` at `lr_decay_iters` (else `train_iters`)."""
        decay = self.lr_decay_iters or self.train_iters
        warmup = self.warmup_iters if self.warmup_iters is not None else int(round(self.warmup * decay))
        return Schedule(self.lr, self.min_lr, warmup, decay, self.lr_decay_style, self.wsd_decay_fraction,
                        self.wsd_decay_shape, rewarm_at=tuple(growth_steps(self.grow_at, self.train_iters)),
                        rewarm_iters=self.grow_rewarm)

    def loop_config(self, steps_per_epoch: int, world_size: int) -> LoopConfig:
        return self  # counted in steps already


STEP_FIELDS = frozenset(f.name for f in dataclasses.fields(StepOptions))


@dataclass
class EpochConfig(EpochOptions, HardwareOptions, LoggingOptions, GrowthOptions, WarmStartOptions, CheckpointOptions,
                  ScheduleOptions, OptimizerOptions, TrainingConfig):
    """The sections of a command counted in epochs; `loop_config` says the same run in steps."""

    refuses: ClassVar[dict[str, str]] = {
        "parallelism": "its evaluation runs the plain model on each rank's share of the samples, which FSDP2's "
                       "sharded weights cannot do; use parallelism ddp",
        "tp_size": "token parallelism is planned for the language model only; use data parallelism",
        "pp_size": "pipeline stages are planned for the language model only; use data parallelism"}

    def validate(self) -> None:
        super().validate()
        if self.batch_size % self.gradient_accumulation_steps:
            raise TokenFormerError(f"batch_size {self.batch_size} does not split into gradient_accumulation_steps "
                                   f"{self.gradient_accumulation_steps} equal micro-batches: use a multiple")

    def loop_config(self, steps_per_epoch: int, world_size: int) -> LoopConfig:
        """The same run in the loop's terms: steps instead of epochs, the global `batch_size` split
        over the ranks and the accumulation steps; every other section field as it is."""
        if self.batch_size % world_size:
            raise TokenFormerError(f"batch_size {self.batch_size} (the global batch) does not split evenly over "
                                   f"{world_size} ranks: use a multiple of {world_size}")
        split = world_size * self.gradient_accumulation_steps
        if self.batch_size % split:
            raise TokenFormerError(f"batch_size {self.batch_size} does not split into {world_size} ranks x "
                                   f"{self.gradient_accumulation_steps} accumulation steps: use a multiple of {split}")
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoopConfig)
                  if f.name not in STEP_FIELDS and hasattr(self, f.name)}
        return LoopConfig(**shared, train_micro_batch_size_per_gpu=self.batch_size // split,
                          gradient_accumulation_steps=self.gradient_accumulation_steps,
                          train_iters=self.epochs * steps_per_epoch,
                          warmup_iters=int(round(self.warmup_epochs * steps_per_epoch)),
                          eval_interval=self.eval_interval * steps_per_epoch,
                          save_interval=self.save_interval * steps_per_epoch)


# ---- the commands' defaults -------------------------------------------------------------------------

# Where the epoch commands' defaults differ from the sections' (which are `train`'s, the released
# language models' recipe), stated once. Columns: train-vision, train-clip, train-captioner.
EPOCH_DEFAULTS_TABLE: dict[str, tuple[Any, Any, Any]] = {
    # small models trained from scratch for a few epochs: a higher peak than the LM recipe's 6e-4
    # over a long run, decayed almost to zero
    "lr": (1e-3, 1e-3, 1e-3),
    "min_lr": (1e-5, 1e-5, 1e-5),
    # DeiT's 0.05 (images, and the captioner's recipe, experiments/captioner.md); open_clip's 0.2
    "weight_decay": (0.05, 0.2, 0.05),
    # DeiT's 0.999 for classification; open_clip's 0.98, kept by the captioner's recipe; GPT-NeoX's 0.95 for LMs
    "adam_beta2": (0.999, 0.98, 0.98),
    # open_clip's 1e-6 for contrastive training
    "adam_eps": (1e-8, 1e-6, 1e-8),
    # the seed the experiments' reports were run with (train's 1234 is the GPT-NeoX configs')
    "seed": (0, 0, 0),
    # a checkpoint per epoch: the last two are enough to resume or compare
    "keep_last_n": (2, 2, 2),
    # steps of a few milliseconds: a metrics line every 50 keeps metrics.jsonl readable
    "log_interval": (50, 50, 50),
    # the Fashion-MNIST recipe's batch; the contrastive batch of CLIP and the captioner's recipe
    "batch_size": (128, 64, 64),
    # 28x28 images evaluate a thousand at a time; pairs and captions carry text as well
    "eval_batch_size": (1000, 250, 250),
    # a whole epoch of warmup in the 15-epoch Fashion-MNIST recipe, half in the shorter CLIP/captioner runs
    "warmup_epochs": (1.0, 0.5, 0.5),
}
EPOCH_COMMANDS = ("train-vision", "train-clip", "train-captioner")


def epoch_defaults(command: str) -> dict[str, Any]:
    """`command`'s column of `EPOCH_DEFAULTS_TABLE`."""
    column = EPOCH_COMMANDS.index(command)
    return {name: row[column] for name, row in EPOCH_DEFAULTS_TABLE.items()}


# ---- the commands -----------------------------------------------------------------------------------

@command_config("train")
class TrainConfig(LoopConfig):
    """Everything a language-model run needs (`tokenformer train`, in steps). Field names are
    GPT-NeoX's where GPT-NeoX has the field."""

    model: Any = option("preset name (tiny, small, base-cpu, 150M, ...), a Config .json / official .yml "
                        "path, or a mapping of Config fields (with `name: PRESET` to start from a preset)",
                        default="small")
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


@dataclass
class ImageOptions:
    """How images are normalised and augmented (`tokenformer.data.images`)."""

    mean: list[float] = option("per-channel mean subtracted after scaling pixels to [0, 1]",
                               default_factory=lambda: [0.5])
    std: list[float] = option("per-channel std divided by", default_factory=lambda: [0.5])
    augment: str = option("training augmentation: none, flip (horizontal), crop (random crop with padding), "
                          "crop-flip (both), inception (random resized crop + flip, for ImageNet)", default="none")
    crop_padding: int = option("padding of the random crop (pixels)", minimum=0, default=2)

    def __post_init__(self) -> None:
        if self.augment is None:  # the shared CLI conversion reads `--augment none` as null
            self.augment = "none"
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.augment not in AUGMENTATIONS:
            raise TokenFormerError(f"unknown augment {self.augment!r}: use one of {', '.join(AUGMENTATIONS)}")
        if len(self.mean) != len(self.std):
            raise TokenFormerError(f"mean {self.mean} and std {self.std} need one value per channel each")


@command_config("train-vision", {**epoch_defaults("train-vision"), "augment": "crop-flip"})
class VisionTrainConfig(ImageOptions, EpochConfig):
    """Everything an image-classification run needs (`tokenformer train-vision`, in epochs)."""

    model: Any = option("vision preset name (tiny-28, small-28, fmnist-28, B/16, L/16) or a mapping of "
                        "VisionConfig fields (with `name: PRESET` to start from a preset)", default="fmnist-28")
    data: str | None = option("an MNIST-style IDX folder (train-images-idx3-ubyte.gz, t10k-...) or an ImageFolder "
                              "root with train/ and val/ sub-folders", default=None)
    label_smoothing: float = option("label smoothing of the cross-entropy", minimum=0, below=1, default=0.0)
    max_train_samples: int | None = option("use only the first N training images (quick runs)", minimum=1,
                                           default=None)
    ema: float = option("decay of an exponential moving average of the weights, evaluated instead of the "
                        "raw ones (0 = off; e.g. 0.999)", minimum=0, below=1, default=0.0)
    tta_flip: bool = option("evaluate on each image and its mirror image, averaging the logits", default=False)


@command_config("train-clip", epoch_defaults("train-clip"))
class ClipTrainConfig(ImageOptions, EpochConfig):
    """Everything a contrastive image-text run needs (`tokenformer train-clip`, in epochs). With
    gradient accumulation each micro-batch is a contrastive batch of its own (its pairs' negatives
    are each other), gathered over the ranks."""

    refuses: ClassVar[dict[str, str]] = {
        **EpochConfig.refuses,
        "tune_tokens": "token tuning grows one model by its config's norm, and a CLIP's towers each have their "
                       "own config; grow and train the towers instead",
        "freeze_old": "a CLIP records its growths per tower, where freeze_old reads the model's own "
                      "growth_history; train all its tokens"}

    model: Any = option("CLIP preset name (tiny, tiny-28, small, B/16) or a mapping of CLIPConfig fields (`name: "
                        "PRESET`, then `vision:` / `text:` mappings override single fields of its towers); the "
                        "text vocabulary follows the tokenizer", default="tiny")
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
    # the default is in EPOCH_DEFAULTS_TABLE; a contrastive batch needs two pairs at least
    batch_size: int = option("pairs per optimizer step, the contrastive batch: each pair's negatives are the "
                             "others (under torchrun: over all ranks together, gathered for the loss)", minimum=2)

    def validate(self) -> None:
        super().validate()
        if self.batch_size // self.gradient_accumulation_steps < 2:
            raise TokenFormerError(f"batch_size {self.batch_size} over {self.gradient_accumulation_steps} "
                                   f"accumulation steps leaves fewer than 2 pairs per contrastive batch: a pair "
                                   f"needs negatives; raise batch_size")


@command_config("train-captioner", epoch_defaults("train-captioner"))
class CaptionTrainConfig(EpochConfig):
    """Everything an image-captioning run needs (`tokenformer train-captioner`, in epochs)."""

    model: Any = option("captioner preset name (tiny, B/16-150M) or a mapping of CaptionerConfig fields (`name: "
                        "PRESET`, then `vision:` / `text:` mappings override single fields of its parts)",
                        default="tiny")
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
    caption_samples: int = option("validation samples captioned greedily at every evaluation (the first N; "
                                  "0 = none)", minimum=0, default=200)
    max_new_tokens: int = option("longest generated caption, in tokens (at most what the language model's "
                                 "seq_length leaves after the image prefix)", minimum=1, default=64)

    def validate(self) -> None:
        super().validate()
        if (self.vision_from is None) != (self.lm_from is None):
            raise TokenFormerError("vision_from and lm_from go together: give both (or neither)")
        if self.init_from and self.vision_from:
            raise TokenFormerError("give either init_from or vision_from/lm_from, not both")
