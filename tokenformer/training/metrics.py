"""What a training run records: metrics as JSON lines (mirrored to TensorBoard and W&B when
asked), and the plots drawn from them (loss curve, accuracy per epoch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_path, atomic_write_text


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
                kept = [line for line in self.path.read_text(errors="replace").splitlines()
                        if (step := _step_of(line)) is not None and step <= resume_step]
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


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line a killed run left half-written."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _save_plot(png_path: str | Path, draw, xlabel: str, ylabel: str, title: str) -> Path | None:
    """Draw on fresh axes with `draw(ax)` and write a PNG atomically; None without matplotlib
    (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "training",
                    ylabel: str = "loss", validation: str = "validation") -> Path | None:
    """Train and validation loss against step, from a metrics JSONL file, as a PNG; the task names
    the title, the loss with its units and the held-out set. Series of a single point (a run
    shorter than log_interval, one validation) are drawn as markers, not as an invisible line; a
    growth inside the run (`grow_at`) is a dashed vertical line between its two steps."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    grown = [r["grown_after"] for r in records if r.get("event") == "grow"]

    def draw(ax) -> None:
        if train:
            ax.plot(*zip(*train), ".-" if len(train) < 50 else "-", label="train", linewidth=1)
        if valid:
            ax.plot(*zip(*valid), "o-", label=validation)
        for i, step in enumerate(grown):  # growth inside the run: after step `grown_after`
            ax.axvline(step + 0.5, color="grey", linestyle="--", linewidth=1, label="growth" if i == 0 else None)

    return _save_plot(png_path, draw, "step", ylabel, title)


def plot_accuracy(histories: dict[str, Iterable[dict[str, Any]]], png_path: str | Path,
                  title: str = "test accuracy") -> Path | None:
    """Accuracy against epoch for one or more runs (label -> validation records), as a PNG."""
    def draw(ax) -> None:
        for label, history in histories.items():
            points = [(r["epoch"], 100 * r["val_accuracy"]) for r in history]
            if points:
                ax.plot(*zip(*points), "o-", label=label)

    return _save_plot(png_path, draw, "epoch", "top-1 accuracy (%)", title)
