"""Training a TokenFormer: one loop for one process and for `torchrun`, with the official recipe.

The recipe of the released models is the default: AdamW (lr 6e-4, betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on the Pattention tokens and the embedding, none on the final LayerNorm), linear
warmup then cosine decay to `min_lr`, gradient clipping 1.0. Data are GPT-NeoX indexed files read
memory-mapped; samples are windows of `seq_length + 1` tokens over the concatenated documents.

Pieces meant for reuse (the vision trainer, growth experiments): `TrainConfig`, `build_optimizer`,
`lr_at`, `WindowDataset`, `evaluate_loss`, `MetricsLogger`, `plot_loss_curve`,
`CheckpointManager`, and `train(config, model=None)` itself.

A checkpoint is a folder `SAVE/step_00000100/` holding an ordinary model directory
(`config.json`, `model.safetensors`, `tokenizer.json`: `tokenformer generate --checkpoint` works
on it) plus `trainer.pt` (optimizer, schedule position, RNG states, data position) and, under
FSDP2, `sharded/` (torch.distributed.checkpoint). `SAVE/latest` names the newest complete one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.errors import TokenFormerError

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
TRAIN_PREFIX, VALID_PREFIX = "train_text_document", "valid_text_document"
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer.pt"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its `--help` text (the CLI lists every field)."""
    return field(metadata={"help": text}, **kwargs)


# ---- configuration ------------------------------------------------------------------------------

RunConfigT = TypeVar("RunConfigT", bound="RunConfig")


class RunConfig:
    """Reading a run config (`TrainConfig`, `VisionTrainConfig`) from YAML and the command line.
    One implementation, so that `tokenformer train` and `tokenformer train-vision` accept the same
    spellings and convert values alike; a subclass states only its `command`, which names it in
    errors ("unknown train-vision config field ...")."""

    command: ClassVar[str]

    @classmethod
    def from_dict(cls: type[RunConfigT], values: dict[str, Any]) -> RunConfigT:
        """Build from a mapping (YAML, CLI); `-` in keys counts as `_`; values are converted to the
        field's type (YAML reads `6e-4` as a string); an unknown key is an error naming the nearest."""
        return config_from_mapping(cls, values, cls.command)

    @classmethod
    def from_yaml(cls: type[RunConfigT], path: str | Path,
                  overrides: dict[str, Any] | None = None) -> RunConfigT:
        """Read the fields in a YAML file; `overrides` (the command line's `--field value`) win."""
        values = read_yaml_mapping(path, f"{cls.command} config")
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run needs. Field names are GPT-NeoX's where GPT-NeoX has the field."""

    command = "train"

    # model
    model: Any = _help("preset name (tiny, small, base-cpu, 150M, ...), a Config .json / official .yml "
                       "path, or a mapping of Config fields (with `name: PRESET` to start from a preset)",
                       default="small")
    init_from: str | None = _help("start from this checkpoint directory's weights (e.g. a grown model); "
                                  "see init_from_optimizer, init_from_schedule, freeze_old", default=None)
    init_from_optimizer: bool = _help("carry init_from's AdamW state (a training checkpoint, or `tokenformer "
                                      "grow` of one: new tokens start with zero moments) instead of a fresh "
                                      "optimizer", default=False)
    init_from_schedule: str = _help("restart: fresh warmup and decay over train_iters (official); continue: "
                                    "step, lr schedule and data position go on from init_from's step "
                                    "(train_iters counts the whole schedule)", default="restart")
    freeze_old: bool = _help("train only the parameter tokens added by init_from's last growth",
                             default=False)
    # data
    data_path: str | None = _help("directory written by `tokenformer prepare` (train/valid indexed files "
                                  "and tokenizer.json)", default=None)
    train_data_paths: list[str] = _help("GPT-NeoX style: indexed-dataset prefixes to train on "
                                        "(concatenated), instead of data_path", default_factory=list)
    valid_data_paths: list[str] = _help("GPT-NeoX style: indexed-dataset prefixes to validate on",
                                        default_factory=list)
    tokenizer: str | None = _help("tokenizer saved with the checkpoints ('byte' or a tokenizer.json); "
                                  "default: the one in data_path", default=None)
    seq_length: int | None = _help("tokens per training window (default: the model's seq_length)",
                                   default=None)
    # batch
    train_micro_batch_size_per_gpu: int = _help("windows per forward/backward on each process", default=4)
    gradient_accumulation_steps: int = _help("micro-batches accumulated per optimizer step", default=1)
    train_iters: int = _help("optimizer steps", default=1000)
    # optimizer and schedule (the official recipe)
    lr: float = _help("peak learning rate", default=6e-4)
    min_lr: float = _help("learning rate at the end of the decay", default=6e-5)
    warmup: float = _help("linear warmup as a fraction of lr_decay_iters (used when warmup_iters is unset)",
                          default=0.01)
    warmup_iters: int | None = _help("linear warmup steps (overrides warmup)", default=None)
    lr_decay_style: str = _help("cosine, linear or constant", default="cosine")
    lr_decay_iters: int | None = _help("steps over which the lr decays to min_lr (default train_iters)",
                                       default=None)
    weight_decay: float = _help("AdamW weight decay on Pattention tokens and the embedding", default=0.1)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.95)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    clip_grad: float = _help("clip the global gradient norm to this (0 = no clipping)", default=1.0)
    # numerics
    precision: str = _help("fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast + loss scaling, GPU only)",
                           default="fp32")
    checkpoint_activations: bool = _help("recompute each block in the backward pass to save memory",
                                         default=False)
    compile: bool = _help("compile each block with torch.compile (in place: checkpoints keep their names)",
                          default=False)
    seed: int = _help("seed of the initialisation and of the data order", default=1234)
    # evaluation, checkpoints, logging
    eval_interval: int = _help("validate every this many steps (and at the start and the end)", default=100)
    eval_iters: int = _help("validation micro-batches (fixed windows, the same every time)", default=10)
    save: str | None = _help("output directory: checkpoints, metrics.jsonl, loss_curve.png", default=None)
    save_interval: int = _help("write a checkpoint every this many steps (and at the end)", default=100)
    keep_last_n: int = _help("checkpoints kept (older ones are deleted)", default=3)
    resume: bool = _help("continue from the latest checkpoint in `save` (start fresh if there is none)",
                         default=False)
    log_interval: int = _help("write a metrics line every this many steps", default=10)
    tensorboard_dir: str | None = _help("also log to TensorBoard here (extra: tensorboard)", default=None)
    wandb_project: str | None = _help("also log to this Weights & Biases project (extra: wandb)",
                                      default=None)
    plot: bool = _help("write loss_curve.png beside the checkpoints (extra: plot)", default=True)
    progress: bool = _help("show a progress bar (rank 0 only)", default=True)
    # hardware
    device: str = _help("auto, cpu, cuda, cuda:1, ...", default="auto")
    parallelism: str = _help("under torchrun: ddp (replicated) or fsdp2 (sharded)", default="ddp")
    num_threads: int | None = _help("CPU threads per process (default: torch's choice)", default=None)

    def __post_init__(self) -> None:
        self.validate()

    # ---- checks and derived values ----------------------------------------------------------

    def validate(self) -> None:
        for name in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_iters",
                     "eval_interval", "save_interval", "keep_last_n", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TokenFormerError(f"train config field {name} must be a positive integer, got {value!r}")
        for name in ("seq_length", "lr_decay_iters", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise TokenFormerError(f"train config field {name} must be a positive integer, got {value!r}")
        if self.eval_iters < 0 or (self.warmup_iters is not None and self.warmup_iters < 0):
            raise TokenFormerError("eval_iters and warmup_iters cannot be negative")
        if not 0.0 <= self.warmup <= 1.0:
            raise TokenFormerError(f"warmup is a fraction of the decay steps in [0, 1], got {self.warmup}")
        if self.precision not in PRECISIONS:
            raise TokenFormerError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TokenFormerError(
                f"unknown lr_decay_style {self.lr_decay_style!r}: use one of {', '.join(LR_DECAY_STYLES)}")
        if self.parallelism not in ("ddp", "fsdp2", "fsdp"):
            raise TokenFormerError(f"unknown parallelism {self.parallelism!r}: use ddp or fsdp2")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TokenFormerError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.resume and not self.save:
            raise TokenFormerError("resume needs `save`: the directory whose latest checkpoint to continue")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def num_warmup_iters(self) -> int:
        if self.warmup_iters is not None:
            return self.warmup_iters
        return int(round(self.warmup * self.decay_iters))

    # ---- reading and writing ----------------------------------------------------------------

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def config_from_mapping(config_class: type, values: dict[str, Any], command: str) -> Any:
    """`config_class(**values)` for a run config read from YAML or the command line of `command`:
    `-` in keys counts as `_`, values are converted to the field's type, and an unknown key is an
    error naming the nearest field."""
    known = [f.name for f in dataclasses.fields(config_class)]
    converted = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TokenFormerError(f"unknown {command} config field {key!r}{hint}; "
                                   f"`tokenformer {command} --help` lists the fields")
        converted[name] = _convert(name, value, config_class)
    return config_class(**converted)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping of fields in a YAML config file (`what` names it in errors)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TokenFormerError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TokenFormerError(f"{path} must hold a mapping of {what} fields")
    return values


def _field_type(name: str, config_class: type | None = None) -> Any:
    """The type of field `name` of `config_class` (default TrainConfig), with `X | None` reduced to `X`."""
    hint = typing.get_type_hints(config_class or TrainConfig)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _convert(name: str, value: Any, config_class: type | None = None) -> Any:
    """Turn a YAML or command-line value into the type of field `name` (of `TrainConfig`, or of
    another config dataclass such as the vision trainer's)."""
    target = _field_type(name, config_class)
    if value is None or target is Any:
        if isinstance(value, str) and name == "model" and value.lstrip().startswith("{"):
            import yaml

            return yaml.safe_load(value)
        return value
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            if isinstance(value, str) and value.strip().lower() in ("none", "null"):
                return None
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError(value)
            return int(number)
        if target is float:
            return float(value)
        if target is str:
            return None if isinstance(value, str) and value.lower() in ("none", "null") else str(value)
        if typing.get_origin(target) is list:
            item = (typing.get_args(target) or (str,))[0]
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):  # `--mean [0.5,0.5]`
                    text = text[1:-1]
                value = [part.strip() for part in text.split(",") if part.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [item(v) for v in value]
    except (TypeError, ValueError):
        raise TokenFormerError(f"train config field {name} expects {getattr(target, '__name__', target)}, "
                               f"got {value!r}") from None
    return value


def resolve_model_config(spec: Any):
    """A model `Config` from a preset name, a .json/.yml path, or a mapping of fields."""
    from tokenformer.config import PRESETS, Config

    if isinstance(spec, dict):
        values = dict(spec)
        name = values.get("name")
        if name in PRESETS:
            return Config.from_name(values.pop("name"), **values)
        return Config.from_dict(values)
    spec = str(spec)
    if spec in PRESETS:
        return Config.from_name(spec)
    path = Path(spec)
    if path.suffix == ".json":
        return Config.from_json(path)
    if path.suffix in (".yml", ".yaml"):
        return Config.from_neox_yaml(path)
    raise TokenFormerError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a .json/.yml "
                           f"config file")


# ---- data ---------------------------------------------------------------------------------------

@dataclass
class DataSources:
    """Where the tokens come from: indexed-dataset prefixes and the tokenizer that made them."""

    train_prefixes: list[str]
    valid_prefixes: list[str]
    tokenizer: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_data(cfg: TrainConfig) -> DataSources:
    """Read `data_path` (a `tokenformer prepare` directory) or the explicit GPT-NeoX prefixes."""
    from tokenformer.indexed_dataset import strip_suffix

    if cfg.data_path and cfg.train_data_paths:
        raise TokenFormerError("give either data_path or train_data_paths, not both")
    metadata: dict[str, Any] = {}
    tokenizer = cfg.tokenizer
    if cfg.data_path:
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise FileNotFoundError(f"data_path {root} is not a directory: run `tokenformer prepare --out {root}` "
                                    f"first, or give train_data_paths")
        train = [str(root / TRAIN_PREFIX)]
        valid = [str(root / VALID_PREFIX)] if (root / f"{VALID_PREFIX}.idx").is_file() else []
        if tokenizer is None and (root / "tokenizer.json").is_file():
            tokenizer = str(root / "tokenizer.json")
        if (root / "prepare.json").is_file():
            metadata = json.loads((root / "prepare.json").read_text())
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


class WindowDataset:
    """Windows of `seq_length + 1` tokens over the concatenated documents of indexed datasets.

    GPT-NeoX style: documents are concatenated (end-of-text tokens already inside them) and cut
    into windows that overlap by one token (the last target of a window is the first input of the
    next). With `shuffle`, every epoch concatenates the documents in a fresh order and visits the
    windows in a fresh order, both drawn from `(seed, epoch)` alone: sample `i` of the global order
    is the same on every machine and after every resume. Reading is memory-mapped; the cost per
    epoch is two permutations over documents and windows.
    """

    def __init__(self, prefixes: Sequence[str], seq_length: int, seed: int = 0, shuffle: bool = True,
                 name: str = "training") -> None:
        from tokenformer.indexed_dataset import IndexedDataset

        self.datasets = [IndexedDataset(p) for p in prefixes]
        self.seq_length = seq_length
        self.seed = seed
        self.shuffle = shuffle
        # documents are numbered across datasets; dataset i holds numbers first[i] .. first[i+1]-1
        self._first_doc = np.cumsum([0] + [len(d) for d in self.datasets])
        # sizes stay int32 (memory-mapped when there is one dataset): the Pile has ~200M documents
        self._doc_size = self.datasets[0].sizes if len(self.datasets) == 1 else \
            np.concatenate([d.sizes for d in self.datasets]) if self.datasets else np.zeros(0, dtype=np.int32)
        self.num_tokens = int(self._doc_size.sum(dtype=np.int64))
        if self.num_tokens == 0:
            raise TokenFormerError(f"the {name} data {', '.join(prefixes)} hold no tokens: the corpus is empty")
        # overlapping by one token: n windows need n * seq_length + 1 tokens
        self.windows_per_epoch = (self.num_tokens - 1) // seq_length
        if self.windows_per_epoch == 0:
            raise TokenFormerError(
                f"the {name} data hold {self.num_tokens} tokens, fewer than one window of seq_length + 1 = "
                f"{seq_length + 1}: use more text or a shorter seq_length")
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order, cumulative token offsets in that order, and window order of `epoch`."""
        if epoch not in self._epoch_cache:
            num_docs = len(self._doc_size)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                doc_order = _compact(rng.permutation(num_docs))
                window_order = _compact(rng.permutation(self.windows_per_epoch))
            else:
                doc_order = np.arange(num_docs)
                window_order = np.arange(self.windows_per_epoch)
            offsets = np.zeros(num_docs + 1, dtype=np.int64)
            np.cumsum(self._doc_size[doc_order], out=offsets[1:], dtype=np.int64)
            self._epoch_cache = {epoch: (doc_order, offsets, window_order)}  # one epoch at a time
        return self._epoch_cache[epoch]

    def window(self, index: int) -> np.ndarray:
        """Sample `index` of the global order (it runs on through epochs): `seq_length + 1` ids."""
        epoch, within = divmod(index, self.windows_per_epoch)
        doc_order, offsets, window_order = self._epoch(epoch)
        start = int(window_order[within]) * self.seq_length
        end = start + self.seq_length + 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        filled = 0
        position = int(np.searchsorted(offsets, start, side="right")) - 1
        while filled < out.size:
            doc = int(doc_order[position])
            dataset = int(np.searchsorted(self._first_doc, doc, side="right")) - 1
            tokens = self.datasets[dataset][doc - int(self._first_doc[dataset])]
            lo = start + filled - int(offsets[position])
            piece = tokens[lo:lo + (end - start - filled)]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            position += 1
        return out

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Samples `first .. first + size - 1` as a (size, seq_length + 1) int64 tensor."""
        return torch.from_numpy(np.stack([self.window(first + i) for i in range(size)]))


def _compact(indices: np.ndarray) -> np.ndarray:
    """int32 when the values fit: halves the per-epoch orders of a Pile-sized corpus."""
    return indices.astype(np.int32) if indices.size < 2**31 else indices


def micro_batch_start(consumed_samples: int, micro_step: int, rank: int, world_size: int,
                      micro_batch_size: int) -> int:
    """First global sample of this rank's micro-batch: rank r of N takes every N-th micro-batch of
    the global order, so a step's global batch is the same whatever N (for a fixed
    micro_batch_size x gradient_accumulation_steps x N)."""
    return consumed_samples + (micro_step * world_size + rank) * micro_batch_size


# ---- optimisation -------------------------------------------------------------------------------

def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on every matrix (Pattention key/value tokens, the embedding), none on
    vectors (the final LayerNorm's weight and bias; the per-layer norms have no parameters).
    Parameter names ride along so that `grow_optimizer_state` can match them after growth."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")  # DDP's wrapper: the plain model's names everywhere
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the official hyperparameters and weight-decay groups (see `parameter_groups`)."""
    groups = parameter_groups(model, cfg.weight_decay)
    # fused/foreach kernels differ in rounding from the loop; foreach is the default on CPU and GPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `iteration` (1-based), the GPT-NeoX/Megatron schedule shape:
    `lr * iteration / warmup` during warmup (the first step already learns), then decay from lr to
    min_lr over the remaining `lr_decay_iters - warmup` steps (cosine:
    `min + (lr - min) * (1 + cos(pi * progress)) / 2`, or linear), then min_lr."""
    warmup, decay = cfg.num_warmup_iters, cfg.decay_iters
    if warmup > 0 and iteration <= warmup:
        return cfg.lr * iteration / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if iteration >= decay:
        return cfg.min_lr
    progress = (iteration - warmup) / max(1, decay - warmup)
    if cfg.lr_decay_style == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---- evaluation ---------------------------------------------------------------------------------

def language_model_batch_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of (B, T + 1) windows and the number of predicted tokens."""
    logits = model(batch[:, :-1])  # (B, T, V)
    return language_model_loss(logits, batch[:, 1:]), batch[:, 1:].numel()


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[Any], precision: str = "fp32", env=None,
                  weights: Sequence[float] | None = None, loss_fn=language_model_batch_loss) -> float:
    """Mean loss over `batches`, weighted by what each predicts (tokens for a language model).

    `loss_fn(model, batch) -> (mean loss, count)`; the default takes (B, T + 1) token windows.
    Under torchrun every rank passes its own batches (the same number on each: FSDP2 forwards are
    collective; give a repeated batch `weight` 0 to even them out) and all get the global mean.
    """
    from tokenformer.distributed import DistEnv, all_reduce_mean

    env = env or DistEnv()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count
    for i, batch in enumerate(batches):
        weight = 1.0 if weights is None else float(weights[i])
        with autocast_context(precision, device):
            loss, count = loss_fn(model, to_device(batch, device))
        total += torch.stack([loss.double() * count * weight,
                              torch.tensor(count * weight, dtype=torch.float64, device=device)])
    model.train(was_training)
    # the mean of sums over the mean of counts is the global ratio
    total = all_reduce_mean(total, env)
    if total[1] == 0:
        raise TokenFormerError("no validation samples to evaluate")
    return float(total[0] / total[1])


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or a tuple/list/dict of tensors, moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def validation_batches(dataset: WindowDataset, eval_iters: int, micro_batch_size: int, env) -> \
        tuple[list[torch.Tensor], list[float]]:
    """This rank's share of the fixed validation set (`eval_iters` micro-batches of the file-order
    windows, fewer if the data are short), padded to the same count on every rank."""
    windows = min(dataset.windows_per_epoch, eval_iters * micro_batch_size)
    starts = list(range(0, windows, micro_batch_size))
    mine = starts[env.rank::env.world_size]
    per_rank = math.ceil(len(starts) / env.world_size)
    batches = [dataset.batch(s, min(micro_batch_size, windows - s)) for s in mine]
    weights = [1.0] * len(batches)
    while len(batches) < per_rank:  # keep collective forwards in step; contributes nothing
        batches.append(dataset.batch(0, min(micro_batch_size, windows)))
        weights.append(0.0)
    return batches, weights


# ---- metrics ------------------------------------------------------------------------------------

class MetricsLogger:
    """Metrics as JSON lines (`{"step": .., "loss": ..}` or `{"step": .., "val_loss": ..}`), mirrored to
    TensorBoard and W&B when asked. On resume, records after the resumed step (from a run that
    crashed past its last checkpoint) are dropped so that the file reads as one run."""

    def __init__(self, path: str | Path | None, resume_step: int | None = None,
                 tensorboard_dir: str | None = None, wandb_project: str | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.path = Path(path) if path else None
        self._tb = self._wandb = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            elif self.path.is_file():
                from tokenformer.checkpoint import atomic_write_text

                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TokenFormerError("tensorboard_dir is set but TensorBoard is not installed: "
                                       "pip install 'tokenformer[tensorboard]'") from None
            self._tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise TokenFormerError("wandb_project is set but W&B is not installed: "
                                       "pip install 'tokenformer[wandb]'") from None
            self._wandb = wandb.init(project=wandb_project, config=run_config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Train and validation loss against step, from a metrics JSONL file, as a PNG (atomically).
    Returns None when matplotlib (extra `plot`) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from tokenformer.checkpoint import atomic_path

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("TokenFormer training")
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


# ---- checkpoints --------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """Complete, crash-safe training checkpoints in `directory`, newest named by `latest`.

    A checkpoint is written into a hidden temporary folder, flushed, then renamed to
    `step_NNNNNNNN` (one atomic rename), and only then does `latest` (rewritten atomically) point
    at it. A crash at any moment leaves the previous checkpoint and a `latest` naming it; the
    leftover temporary folder is removed by the next run. The oldest are pruned to `keep_last_n`.
    """

    def __init__(self, directory: str | Path, keep_last_n: int = 3, env=None) -> None:
        from tokenformer.distributed import DistEnv

        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.env = env or DistEnv()

    @staticmethod
    def name_of(step: int) -> str:
        return f"step_{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob("step_*") if p.is_dir() and (p / TRAINER_STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.directory / LATEST_FILE
        if pointer.is_file():
            path = self.directory / pointer.read_text().strip()
            if (path / TRAINER_STATE_FILE).is_file():
                return path
        found = self.checkpoints()  # a pointer lost to an old crash: fall back to the newest
        return found[-1] if found else None

    def remove_leftovers(self) -> None:
        if self.env.is_main and self.directory.is_dir():
            for path in self.directory.glob(".tmp-step_*"):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], tokenizer=None, sharded: bool = False) -> Path:
        """Write checkpoint `step` (every rank calls this; rank 0 writes the files)."""
        from tokenformer.distributed import barrier, save_sharded

        name = self.name_of(step)
        tmp, final = self.directory / f".tmp-{name}", self.directory / name
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        if sharded:
            save_sharded(tmp / "sharded", model, optimizer)
            state = _full_model_state(model)
            optimizer_state = None
        else:
            state = None
            optimizer_state = optimizer.state_dict() if self.env.is_main else None
        if self.env.is_main:
            self._write_model(tmp, model, tokenizer, state)
            self._write_trainer_state(tmp, {**trainer_state, "optimizer": optimizer_state, "step": step})
            _fsync_tree(tmp)
            if final.exists():  # a rerun over an old directory: replace it, keeping the swap atomic
                stale = self.directory / f".tmp-{name}-old"
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.directory)
            from tokenformer.checkpoint import atomic_write_text

            atomic_write_text(self.directory / LATEST_FILE, name + "\n")
            self.prune()
        barrier(self.env)
        return final

    def _write_model(self, directory: Path, model: nn.Module, tokenizer, state: dict | None) -> None:
        from tokenformer.checkpoint import save_model_directory
        from tokenformer.distributed import unwrap

        plain = unwrap(model)
        if state is not None:  # FSDP2: the gathered full state, saved through a stand-in module
            plain = _StateHolder(state, plain.config, getattr(plain, "model_type", "tokenformer"))
        save_model_directory(plain, directory, tokenizer=tokenizer)

    def _write_trainer_state(self, directory: Path, state: dict[str, Any]) -> None:
        torch.save(state, directory / TRAINER_STATE_FILE)

    def prune(self) -> None:
        found = self.checkpoints()
        latest = self.latest()
        for path in found[:-self.keep_last_n]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             sharded: bool = False) -> dict[str, Any]:
        """Restore model (and optimizer) in place; return the trainer state (step, data, rng, ...)."""
        from safetensors.torch import load_file

        from tokenformer.checkpoint import torch_load_safe
        from tokenformer.distributed import load_sharded, unwrap
        from tokenformer.model import WEIGHTS_FILE

        path = Path(path)
        state = torch_load_safe(path / TRAINER_STATE_FILE)
        if not sharded and optimizer is not None and state.get("optimizer") is None \
                and (path / "sharded").is_dir():
            sharded = True  # an FSDP2 checkpoint resumed by one process or DDP: DCP reshards it
        if sharded and (path / "sharded").is_dir():
            load_sharded(path / "sharded", model, optimizer)
            return state
        if sharded:  # a one-process or DDP checkpoint (full state) resumed under FSDP2
            from tokenformer.distributed import load_full_into_sharded

            weights = load_file(str(path / WEIGHTS_FILE))
            load_full_into_sharded(model, optimizer, weights, state.get("optimizer"), source=str(path))
            return state
        plain = unwrap(model)
        weights = load_file(str(path / WEIGHTS_FILE), device=str(next(plain.parameters()).device))
        try:
            plain.load_state_dict(weights)
        except RuntimeError as e:
            lines = str(e).splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise TokenFormerError(f"{path} holds a model of another shape than this run's ({detail}): resume "
                                   f"with the same model config, or use a new `save` directory") from None
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state


class _StateHolder:
    """Just enough of a model for `save_model_directory`: a state dict, a config, a model type."""

    def __init__(self, state: dict[str, torch.Tensor], config, model_type: str) -> None:
        self._state, self.config, self.model_type = state, config, model_type

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU of rank 0; collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- the training loop --------------------------------------------------------------------------

def load_initial_model(cfg: TrainConfig, model: nn.Module | None = None) -> nn.Module:
    """The model a run starts from: the one passed in, `init_from`'s weights, or a fresh one.

    `init_from` loads any checkpoint directory (e.g. a model grown by `tokenformer grow`); by default
    the optimizer and schedule start fresh, as the official incremental-scaling runs do
    (`warm_start` carries them instead).
    """
    if model is not None:
        return model
    if cfg.init_from:
        from tokenformer.scaling import load_checkpoint

        return load_checkpoint(cfg.init_from).train()
    from tokenformer.model import TokenFormer

    return TokenFormer(resolve_model_config(cfg.model))


def _load_tokenizer(spec: str | None, cfg: TrainConfig):
    from tokenformer.tokenizer import load_tokenizer

    if spec is None and cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file():
        spec = str(Path(cfg.init_from) / "tokenizer.json")
    return load_tokenizer(spec) if spec else None


def _check_vocab(model: nn.Module, tokenizer, sources: DataSources) -> None:
    padded = model.config.padded_vocab_size
    if tokenizer is not None and tokenizer.vocab_size > padded:
        raise TokenFormerError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds {padded}: set "
            f"the model's vocab_size to at least {tokenizer.vocab_size} (e.g. model: {{name: small, "
            f"vocab_size: {tokenizer.vocab_size}}})")
    data_vocab = sources.metadata.get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > padded:
        raise TokenFormerError(f"the data were prepared with a vocabulary of {data_vocab} tokens but the model "
                               f"holds {padded}: set the model's vocab_size to at least {data_vocab}")


class LanguageModelTask:
    """What `train` needs to know about the data and the loss of language modelling.

    `train(cfg, model, task=...)` accepts any object with these members, so another trainer (images
    and a classification loss) reuses the loop, checkpoints, resume, metrics and torchrun support:

    - `prepare(model)`: load data and check them against the model (called once, after seeding);
    - `train_batch(first, size)`: global samples `first .. first + size - 1` (a deterministic function
      of the index: this is what makes resume and any number of ranks exact);
    - `validation_batches(micro_batch_size, env)`: this rank's fixed validation batches and weights;
    - `loss(model, batch) -> (mean loss, count)`; `units_per_sample` (tokens here) for throughput;
    - `validation_metrics(loss)`: the record logged after each validation;
    - `state()` saved in every checkpoint, `check_resume(state)` before continuing from one;
    - `tokenizer`: written into every checkpoint directory (or None).
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.sources = resolve_data(cfg)  # fail on missing data before building a model
        self.tokenizer = None
        self.seq_length = 0

    def prepare(self, model: nn.Module) -> None:
        cfg = self.cfg
        self.tokenizer = _load_tokenizer(self.sources.tokenizer, cfg)
        _check_vocab(model, self.tokenizer, self.sources)
        self.seq_length = cfg.seq_length or model.config.seq_length
        self.train_data = WindowDataset(self.sources.train_prefixes, self.seq_length, seed=cfg.seed,
                                        name="training")
        self.valid_data = WindowDataset(self.sources.valid_prefixes, self.seq_length, shuffle=False,
                                        name="validation") if self.sources.valid_prefixes and cfg.eval_iters else None

    @property
    def units_per_sample(self) -> int:
        return self.seq_length

    def train_batch(self, first: int, size: int) -> torch.Tensor:
        return self.train_data.batch(first, size)  # (size, T + 1)

    def validation_batches(self, micro_batch_size: int, env) -> tuple[list[torch.Tensor], list[float]]:
        if self.valid_data is None:
            return [], []
        return validation_batches(self.valid_data, self.cfg.eval_iters, micro_batch_size, env)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        return language_model_batch_loss(model, batch)

    def validation_metrics(self, loss: float) -> dict[str, float]:
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def state(self) -> dict[str, Any]:
        return {"seq_length": self.seq_length}

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        if state.get("seq_length", self.seq_length) != self.seq_length:
            raise TokenFormerError(f"{path} was trained with seq_length {state['seq_length']}, this run asks "
                                   f"for {self.seq_length}: the data position would not carry over; keep "
                                   f"seq_length or use a new `save` directory")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, model: nn.Module | None = None, task=None) -> dict[str, Any]:
    """Train `model` (or the one `config` describes) and return a summary: steps, final train and
    validation loss, tokens seen, last checkpoint, metrics and plot paths, per-step losses.

    `task` supplies data and loss (default `LanguageModelTask(config)`; see it for the interface)."""
    return run_distributed(config.device, config.save, lambda env: _train(config, model, env, task))


def run_distributed(device: str, save: str | None, body: Callable[[Any], Any]) -> Any:
    """`body(env)` inside the process group torchrun set up (or alone outside torchrun): the shell
    every trainer runs in. A rank's error becomes one sentence naming the rank and the checkpoint in
    `save` to resume from (a bug keeps its traceback); the group is left at the end unless the caller
    had joined it already."""
    from tokenformer.distributed import describe_rank_failure, init_distributed, shutdown

    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    env = init_distributed(device)
    try:
        return body(env)
    except Exception as error:
        if not env.distributed:
            raise
        latest = CheckpointManager(save).latest() if save else None
        described = describe_rank_failure(error, env, latest)
        if described is None:
            raise
        raise described from error
    finally:
        if env.distributed and not was_initialised:
            shutdown()


def _train(cfg: TrainConfig, model: nn.Module | None, env, task) -> dict[str, Any]:
    from tokenformer import warm_start
    from tokenformer.distributed import (all_reduce_mean, barrier, gradient_sync, maybe_fail, resume_batch_note,
                                         unwrap,
                                         wrap_model)

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.precision == "fp16" and env.device.type != "cuda":
        raise TokenFormerError("precision fp16 needs a CUDA GPU (its loss scaling is a GPU feature): "
                               "use bf16 or fp32 on the CPU")
    sharded = env.distributed and cfg.parallelism in ("fsdp2", "fsdp")
    task = task or LanguageModelTask(cfg)
    _seed_everything(cfg.seed)
    model = load_initial_model(cfg, model)
    task.prepare(model)

    model.to(env.device).train()
    model.gradient_checkpointing = cfg.checkpoint_activations
    if cfg.compile:
        # Block by block and in place (nn.Module.compile): parameter names stay those of the
        # checkpoints, and FSDP2 can still shard each block afterwards.
        for block in getattr(model, "layers", []):
            block.compile()
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) \
        if env.device.type == "cuda" else None
    warm = warm_start.prepare_model(cfg, model)  # init_from options; freezes before the optimizer sees it
    model = wrap_model(model, env, "fsdp" if sharded else "ddp", param_dtype=param_dtype if sharded else None)
    optimizer = build_optimizer(unwrap(model), cfg)  # names without DDP's `module.` prefix
    warm = warm_start.start_optimizer(cfg, warm, optimizer, sharded=sharded)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    manager = CheckpointManager(cfg.save, cfg.keep_last_n, env) if cfg.save else None
    step, consumed_samples, resumed_from = warm.step, warm.consumed_samples, None
    if manager is not None:
        manager.remove_leftovers()
        barrier(env)
        latest = manager.latest() if cfg.resume else None
        if latest is not None:
            state = manager.load(latest, model, optimizer, sharded=sharded)
            task.check_resume(state.get("task", {}), latest)
            step, consumed_samples = int(state["step"]), int(state["consumed_samples"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"])
            resumed_from = latest
            note = resume_batch_note(state, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps,
                                     env.world_size)
            if note and env.is_main:
                print(f"warning: {note}", file=sys.stderr)
        elif cfg.resume and env.is_main:
            print(f"no checkpoint in {cfg.save}: starting from scratch", file=sys.stderr)
        if env.is_main:
            Path(cfg.save).mkdir(parents=True, exist_ok=True)
            from tokenformer.checkpoint import atomic_write_text

            atomic_write_text(Path(cfg.save) / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics_path = Path(cfg.save) / METRICS_FILE if cfg.save else None
    logger = MetricsLogger(metrics_path if env.is_main else None,
                           resume_step=step if resumed_from is not None else None,
                           tensorboard_dir=cfg.tensorboard_dir if env.is_main else None,
                           wandb_project=cfg.wandb_project if env.is_main else None,
                           run_config=cfg.to_dict())

    micro, accumulation, world = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, env.world_size
    units_per_step = micro * accumulation * world * task.units_per_sample
    valid_batches, valid_weights = task.validation_batches(micro, env)

    def validate(at_step: int) -> float | None:
        if not valid_batches:
            return None
        loss = evaluate_loss(model, valid_batches, cfg.precision, env, valid_weights, loss_fn=task.loss)
        record = task.validation_metrics(loss)
        logger.log({"step": at_step, **record})
        if env.is_main:
            shown = ", ".join(f"{k.removeprefix('val_')} {v:.4g}" for k, v in record.items())
            _note(f"step {at_step}: validation {shown}", cfg.progress)
        return loss

    def save_checkpoint(at_step: int) -> Path | None:
        if manager is None:
            return None
        state = {"consumed_samples": consumed_samples, "task": task.state(), "rng": capture_rng(),
                 "scheduler": {"iteration": at_step, "lr": lr_at(max(at_step, 1), cfg)},
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "train_config": json.dumps(cfg.to_dict()), "world_size": world}
        path = manager.save(at_step, model, optimizer, state, tokenizer=task.tokenizer, sharded=sharded)
        if env.is_main and cfg.plot and metrics_path is not None:
            plot_loss_curve(metrics_path, Path(cfg.save) / PLOT_FILE)
        return path

    first_val = validate(step) if resumed_from is None else None
    losses: dict[int, float] = {}
    last_checkpoint = resumed_from
    last_val = first_val
    start_step, start_time = step, time.perf_counter()
    progress = _progress_bar(cfg, env, step)
    interval_time, interval_tokens = time.perf_counter(), 0
    try:
        while step < cfg.train_iters:
            iteration = step + 1
            lr = lr_at(iteration, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=env.device)
            for micro_step in range(accumulation):
                first = micro_batch_start(consumed_samples, micro_step, env.rank, world, micro)
                batch = to_device(task.train_batch(first, micro), env.device)
                with gradient_sync(model, sync=micro_step == accumulation - 1):
                    with autocast_context(cfg.precision, env.device):
                        loss, _ = task.loss(model, batch)
                    scaled = loss / accumulation
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.detach()
            consumed_samples += micro * accumulation * world
            step_loss = float(all_reduce_mean(loss_sum / accumulation, env))
            if not math.isfinite(step_loss):
                kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else \
                    "no checkpoint was written yet"
                raise TokenFormerError(f"the training loss became {step_loss} at step {iteration}; {kept}: "
                                       f"lower lr, raise warmup or use fp32/bf16")
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = _clip_gradients(model, cfg.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step = iteration
            maybe_fail(step, env)
            losses[step] = step_loss
            interval_tokens += units_per_step
            progress.update(1)
            if step % cfg.log_interval == 0 or step == cfg.train_iters:
                now = time.perf_counter()
                tokens_per_s = interval_tokens / max(now - interval_time, 1e-9)
                interval_time, interval_tokens = now, 0
                logger.log({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens": consumed_samples * task.units_per_sample, "tokens_per_s": tokens_per_s})
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                     refresh=False)
            if step % cfg.eval_interval == 0 or step == cfg.train_iters:
                last_val = validate(step)
            if step % cfg.save_interval == 0 or step == cfg.train_iters:
                last_checkpoint = save_checkpoint(step) or last_checkpoint
    finally:
        progress.close()
        logger.close()
    elapsed = time.perf_counter() - start_time
    plot_path = Path(cfg.save) / PLOT_FILE if cfg.save and (Path(cfg.save) / PLOT_FILE).is_file() else None
    return {"step": step, "train_loss": losses.get(step), "val_loss_initial": first_val, "val_loss": last_val,
            "val_ppl": math.exp(min(last_val, 50.0)) if last_val is not None else None,
            "tokens_seen": consumed_samples * task.units_per_sample, "checkpoint": str(last_checkpoint) if last_checkpoint
            else None, "metrics": str(metrics_path) if metrics_path else None,
            "plot": str(plot_path) if plot_path else None, "losses": losses, "wall_time_s": elapsed,
            "tokens_per_s": (step - start_step) * units_per_step / max(elapsed, 1e-9),
            "resumed_from": str(resumed_from) if resumed_from else None}


def _clip_gradients(model: nn.Module, max_norm: float) -> float:
    parameters = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress_bar(cfg: TrainConfig, env, step: int, total: int | None = None, desc: str = "train"):
    if not (cfg.progress and env.is_main):
        return _NoProgress()
    from tqdm.auto import tqdm

    # tqdm's rate is steps/s; its ETA is what the bar is for. tokens/s is in the postfix.
    return tqdm(total=total or cfg.train_iters, initial=step, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=0.5)


def _note(message: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message)
    else:
        print(message)


# ---- command line -------------------------------------------------------------------------------

def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """`--field value`, `--field=value` and bare `--flag` (true) into a dict; `-` counts as `_`."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise TokenFormerError(f"unexpected argument {token!r}: overrides are --field value")
        key, _, value = token[2:].partition("=")
        if not _:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [CONFIG.yaml] [--field value ...]"
    parser.add_argument("config", nargs="?", help="YAML file of train config fields (see configs/)")
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        kwargs: dict[str, Any] = dict(dest=f"field_{f.name}", default=argparse.SUPPRESS, metavar="VALUE",
                                      help=f"{f.metadata['help']} (default {default})")
        if _field_type(f.name) is bool:
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*names, **kwargs)
    # everything after CONFIG: argparse stops there, we read `--field value` pairs ourselves
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="more --field value overrides after CONFIG (same fields as above)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
    values.update(parse_overrides(args.overrides or []))
    if args.config:
        return TrainConfig.from_yaml(args.config, values)
    return TrainConfig.from_dict(values)


def cli_main(args: argparse.Namespace) -> None:
    """Train a TokenFormer: `tokenformer train CONFIG.yaml [--field value ...]`.

    CONFIG is a YAML file of the fields below (see configs/); every field can be set or overridden
    on the command line as `--field value` (`--train_iters 10` or `--train-iters 10`). Data come
    from `data_path` (a `tokenformer prepare` directory) or GPT-NeoX prefixes (`train_data_paths`).
    Checkpoints, metrics.jsonl and loss_curve.png go to `save`; `--resume` continues from the latest
    checkpoint there, with the same losses as an uninterrupted run. Under `torchrun` the same
    command trains with DDP or FSDP2 (`--parallelism`)."""
    cfg = config_from_args(args)
    if cfg.save and not cfg.resume and CheckpointManager(cfg.save).checkpoints():
        # a fresh run there would mix its checkpoints with the old run's, and prune the old ones
        raise TokenFormerError(f"{cfg.save} already holds checkpoints of a run: pass --resume to continue it, "
                               f"or choose another `save` directory")
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    before, after = summary["val_loss_initial"], summary["val_loss"]
    lines = [f"trained to step {summary['step']}: {summary['tokens_seen']:,} tokens, "
             f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_time_s']:.1f} s"]
    if summary["train_loss"] is not None:
        lines.append(f"final training loss {summary['train_loss']:.4f}")
    if after is not None:
        lines.append(f"validation loss {'' if before is None else f'{before:.4f} -> '}{after:.4f} "
                     f"(perplexity {summary['val_ppl']:.2f})")
    if summary["checkpoint"]:
        lines.append(f"checkpoint {summary['checkpoint']}")
    if summary["plot"]:
        lines.append(f"loss curve {summary['plot']}")
    print("\n".join(lines))
