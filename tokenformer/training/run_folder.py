"""The layout of a training run's folder (`save`), in one place:

    SAVE/train_config.json          the loop's config (steps), as the run used it
    SAVE/<command>_config.json      the command's own config, where it is another (train_vision_config.json, ...)
    SAVE/metrics.jsonl              one JSON line per logged step and per validation
    SAVE/loss_curve.png             the loss against the step, drawn from metrics.jsonl
    SAVE/step_NNNNNNNN/, SAVE/latest the checkpoints (`training.checkpointing.CheckpointManager`)
    SAVE/model/                     an epoch task's final model (with its tokenizer)
    SAVE/<output>                   a task's own outputs (accuracy.png, captions.jsonl, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenformer.files import FINAL_MODEL_DIR, LOSS_PLOT_FILE, METRICS_FILE, TRAIN_CONFIG_FILE, atomic_write_text
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.distributed import DistEnv


@dataclass(frozen=True)
class RunFolder:
    """The paths of the run folder `root` (see the module docstring)."""

    root: Path

    @classmethod
    def of(cls, save: str | Path | None) -> RunFolder | None:
        return cls(Path(save)) if save else None

    def checkpoints(self, keep_last_n: int = 3, env: DistEnv | None = None) -> CheckpointManager:
        """The checkpoints `step_NNNNNNNN/` and `latest` (written by rank 0 of `env`, `keep_last_n` kept)."""
        return CheckpointManager(self.root, keep_last_n, env)

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT_FILE

    @property
    def loop_config(self) -> Path:
        return self.root / TRAIN_CONFIG_FILE

    def command_config(self, command: str) -> Path:
        """`train_config.json` for `train` (whose config is the loop's), `train_vision_config.json` ..."""
        return self.root / f"{command.replace('-', '_')}_config.json"

    @property
    def final_model(self) -> Path:
        return self.root / FINAL_MODEL_DIR

    def output(self, name: str) -> Path:
        """A task's own output file `name`."""
        return self.root / name

    def write_configs(self, command: str, command_config: dict[str, Any], loop_config: dict[str, Any]) -> None:
        """The command's config and, where it is another file, the loop's (rank 0 calls this)."""
        atomic_write_text(self.loop_config, json.dumps(loop_config, indent=2) + "\n")
        if self.command_config(command) != self.loop_config:
            atomic_write_text(self.command_config(command), json.dumps(command_config, indent=2) + "\n")
