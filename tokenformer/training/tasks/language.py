"""Language modelling: next-token prediction on windows of GPT-NeoX indexed files (`tokenformer train`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenformer.data.indexed import strip_suffix
from tokenformer.data.prepare import load_prepared
from tokenformer.data.tokenizer import check_vocab_fits, load_tokenizer
from tokenformer.data.windows import WindowDataset
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import mean_loss, window_loss
from tokenformer.files import PREPARE_METADATA_FILE, SPLIT_PREFIXES, TOKENIZER_FILE
from tokenformer.models.config import PRESETS, resolve_model_config
from tokenformer.models.lm import TokenFormer
from tokenformer.training.config import TrainConfig
from tokenformer.training.distributed import DistEnv, all_reduce_mean
from tokenformer.training.precision import autocast_context
from tokenformer.training.registry import TrainingCommand, register
from tokenformer.training.tasks.base import Task, TaskContext


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
            metadata = load_prepared(root)
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
    mine = starts[env.dp_rank::env.dp_size]  # a token-parallel group shares its batches
    per_rank = math.ceil(len(starts) / env.dp_size)
    batches = [dataset.batch(s, min(micro_batch_size, windows - s)) for s in mine]
    weights = [1.0] * len(batches)
    while len(batches) < per_rank:  # keep collective forwards in step (FSDP2); contributes nothing
        batches.append(dataset.batch(0, min(micro_batch_size, windows)))
        weights.append(0.0)
    return batches, weights


class LanguageModelTask(Task):
    """Next-token prediction on windows of `seq_length + 1` tokens of GPT-NeoX indexed files."""

    name = "train"
    unit = "tokens"
    validate_at_start = True
    plot_title = "language model training"
    loss_label = "loss (nats/token)"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.sources = resolve_data(cfg)  # fail on missing data before building a model
        self.tokenizer = None
        self.seq_length = 0
        self._validation: tuple[list[torch.Tensor], list[float]] | None = None
        self.last_record: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        """The model of `model`; a preset name, or a mapping that names no `vocab_size`, takes the
        vocabulary of the data (prepare.json's, else its tokenizer's): the model's vocabulary is the data's."""
        config, spec = resolve_model_config(self.cfg.model), self.cfg.model
        vocab = self.sources.metadata.get("vocab_size")
        if vocab is None and self.sources.tokenizer:
            vocab = load_tokenizer(self.sources.tokenizer).vocab_size
        takes_data_vocab = (isinstance(spec, str) and spec in PRESETS) or \
            (isinstance(spec, dict) and "vocab_size" not in spec)
        if isinstance(vocab, int) and takes_data_vocab and vocab != config.vocab_size:
            config = dataclasses.replace(config, vocab_size=vocab)
        return TokenFormer(config)

    def prepare(self, model: nn.Module, ctx: TaskContext) -> None:
        cfg, env = self.cfg, ctx.env
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

    def loss(self, model: nn.Module, batch: torch.Tensor, ctx: TaskContext | None = None) -> tuple[torch.Tensor, int]:
        return window_loss(model, batch)

    def evaluate(self, model: nn.Module, ctx: TaskContext) -> dict[str, float] | None:
        if self._validation is None:
            return None
        batches, weights = self._validation
        device = next(model.parameters()).device
        loss = mean_loss(model, batches, self.loss, weights, reduce=lambda t: all_reduce_mean(t, ctx.env),
                         autocast=lambda: autocast_context(self.cfg.precision, device))
        self.last_record = {"val_loss": loss, "val_ppl": perplexity(loss)}
        return self.last_record

    def describe(self, record: dict[str, Any]) -> str:
        return f"step {record['step']}: validation loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.4g}"

    def state(self) -> dict[str, Any]:
        return {"seq_length": self.seq_length}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("seq_length", self.seq_length) != self.seq_length:
            raise TokenFormerError(f"{path} was trained with seq_length {state['seq_length']}, this run asks "
                                   f"for {self.seq_length}: the data position would not carry over; keep "
                                   f"seq_length or use a new `save` directory")

    def finish(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any]:
        last = self.last_record
        return {"val_ppl": last["val_ppl"] if last else None}

    @staticmethod
    def report(summary: dict[str, Any]) -> str:
        before, after = summary["val_loss_initial"], summary["val_loss"]
        lines = [f"trained to step {summary['step']}: {summary['tokens_seen']:,} tokens, "
                 f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_time_s']:.1f} s"]
        if summary["train_loss"] is not None:
            lines.append(f"final training loss {summary['train_loss']:.4f}")
        if after is not None:
            lines.append(f"validation loss {'' if before is None else f'{before:.4f} -> '}{after:.4f} "
                         f"(perplexity {perplexity(after):.2f})")
        if summary["checkpoint"]:
            lines.append(f"checkpoint {summary['checkpoint']}")
        if summary.get("adapter"):
            lines.append(f"adapter {summary['adapter']}")
        if summary["plot"]:
            lines.append(f"loss curve {summary['plot']}")
        return "\n".join(lines)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


register(TrainingCommand(
    "train", TrainConfig, LanguageModelTask, TokenFormer, example="configs/demo.yaml",
    help="""Train a TokenFormer: `tokenformer train CONFIG.yaml [--field value ...]`.

CONFIG is a YAML file of the fields below (see configs/); every field can be set or overridden
on the command line as `--field value` (`--train_iters 10` or `--train-iters 10`). Data come
from `data_path` (a `tokenformer prepare` directory) or GPT-NeoX prefixes (`train_data_paths`).
Checkpoints, metrics.jsonl and loss_curve.png go to `save`; `--resume` continues from the latest
checkpoint there, with the same losses as an uninterrupted run. Under `torchrun` the same
command trains with DDP or FSDP2 (`--parallelism`)."""))
