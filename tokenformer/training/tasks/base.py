"""The contract between the one training loop and a task, as code: `Task` (its members and their
defaults) and `EpochTask` (what every task that passes over its samples in epochs shares).

The loop (`tokenformer.training.loop`) owns the optimizer, schedule, precision, accumulation,
checkpoints, exact resume, metrics, progress and torchrun; a task supplies the data, the loss, the
validation and the outputs. Every hook that needs the run gets a `TaskContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.models.pretrained import save_model
from tokenformer.training.distributed import DistEnv, unwrap
from tokenformer.training.run_folder import RunFolder


@dataclass
class TaskContext:
    """What a task's hooks may ask of the run: this process (`env`: rank, world size, device), the
    run folder (None without `save`) and the optimizer step the run is at."""

    env: DistEnv
    folder: RunFolder | None = None
    step: int = 0


class Task:
    """A task: what the loop trains on. Override `build_model`, `train_batch` and `loss`; the other
    members have defaults that do nothing.

    Class attributes: `name` (the progress bar's label), `unit` and `units_per_sample` (what
    throughput counts: tokens per window, one image, ...), `tokenizer` (written into every
    checkpoint, or None), `validate_at_start`, `loss_terms_vary` (the loss's term count differs
    between batches, e.g. caption tokens: the loop then weights each micro-batch by its count, so
    that a step minimises the mean over every term of its global batch, however it is split),
    `steps_per_epoch` (an epoch task's; None counts in steps), and the labels of the loss plot:
    `plot_title`, `loss_label` (the loss with its units), `validation_label` (the held-out set's name).
    """

    name: str = "train"
    unit: str = "samples"
    units_per_sample: int = 1
    tokenizer: Any = None
    validate_at_start: bool = False
    loss_terms_vary: ClassVar[bool] = False
    steps_per_epoch: int | None = None
    plot_title: str = "training"
    loss_label: str = "loss"
    validation_label: str = "validation"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        """The model to train when none is given and there is no `init_from`."""
        raise NotImplementedError(f"{type(self).__name__} builds no model: give one, or init_from")

    def prepare(self, model: nn.Module, ctx: TaskContext) -> None:
        """Load and check the data against the model (once, after seeding, before wrapping)."""

    def train_batch(self, first: int, size: int) -> Any:
        """Global samples `first .. first + size - 1`: a deterministic function of the index, which
        is what makes resume and any number of ranks exact."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, ctx: TaskContext) -> tuple[torch.Tensor, int]:
        """The mean loss of `batch` and the number of terms it averages."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, ctx: TaskContext) -> None:
        """After every optimizer step (`ctx.step`), on the plain model (e.g. an average of the weights)."""

    def log_extras(self, model: nn.Module, ctx: TaskContext) -> dict[str, float]:
        """More values for the metrics lines (collective: every rank calls it at the same steps)."""
        return {}

    def evaluate(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any] | None:
        """The validation record at `ctx.step` (collective), with `val_loss`; None: nothing to validate."""
        return None

    def describe(self, record: dict[str, Any]) -> str:
        """The line shown for a validation record."""
        return f"step {record['step']}: {self.validation_label} loss {record['val_loss']:.4f}"

    def growth_refusal(self) -> str | None:
        """Why this task cannot grow its model inside the run (`grow_at`), or None: it can."""
        return None

    def state(self) -> dict[str, Any]:
        """Saved in every checkpoint."""
        return {}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        """When resuming from checkpoint `path`."""

    def finish(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any]:
        """Outputs written at the end (rank 0 writes files), merged into the run's summary."""
        return {}

    @staticmethod
    def report(summary: dict[str, Any]) -> str:
        """What the command prints at the end, from the run's summary."""
        return f"trained to step {summary['step']} ({summary['wall_time_s']:.1f} s)"


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled order of the `n` training samples in `epoch`, from (seed, epoch) alone: the same
    on every rank and after every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class EpochTask(Task):
    """A task that passes over `num_train` samples once an epoch, in a shuffled order of its own per
    epoch (`drop_last`): it owns the steps per epoch, the order, the history of validation records
    (saved with every checkpoint) and the final `model/` (with the tokenizer, if any).

    `cfg` has `batch_size` (the global batch), `epochs` and `seed`; `sample_noun` names the samples
    in messages."""

    sample_noun = "samples"

    def __init__(self, cfg: Any, num_train: int) -> None:
        super().__init__(cfg)
        self.num_train = num_train
        self.steps_per_epoch = num_train // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise TokenFormerError(f"{num_train} training {self.sample_noun} make no batch of {cfg.batch_size}: "
                                   f"lower batch_size")
        self.history: list[dict[str, Any]] = []
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.cfg.batch_size

    def epoch_slice(self, first: int, size: int) -> tuple[int, int, torch.Tensor]:
        """(epoch, position in it, the sample indices) of global samples `first .. first + size - 1`."""
        epoch, position = divmod(first, self.samples_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.num_train))
        return epoch, position, self._order[1][position:position + size]

    def add_record(self, ctx: TaskContext, values: dict[str, Any]) -> dict[str, Any]:
        """`values` as the validation record of the epoch `ctx.step` ends, kept in the history."""
        record = {"epoch": ctx.step // self.steps_per_epoch, **values}
        self.history.append(record)
        return record

    def describe(self, record: dict[str, Any]) -> str:
        return f"epoch {record['epoch']}: {self.validation_label} loss {record['val_loss']:.4f}"

    def state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        self.history = list(state.get("history", []))

    def final_model(self, model: nn.Module) -> nn.Module:
        """The weights `model/` holds (the plain model; a task with an average of the weights says so)."""
        return unwrap(model)

    def finish(self, model: nn.Module, ctx: TaskContext) -> dict[str, Any]:
        """Write `model/` (rank 0) and return the history, the epochs and the parameter count."""
        final = self.final_model(model)
        if ctx.folder is not None and ctx.env.is_main:
            save_model(final, ctx.folder.final_model, self.tokenizer)
        return {"history": self.history, "epochs": self.cfg.epochs,
                "num_parameters": sum(p.numel() for p in final.parameters())}
