"""The file layout of model, training and data directories, and how files are written: crash-safe
(reading them goes through `tokenformer.inputs`).

Every file is written under a temporary name in the same folder, flushed to disk, then renamed
over the old one (`os.replace` is atomic on POSIX and Windows): a crash at any moment leaves
either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# a model directory (`save_pretrained`, `tokenformer convert`, every training checkpoint)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# a training run's `save` directory and its checkpoints `step_NNNNNNNN/`
LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer.pt"
SHARDED_DIR = "sharded"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_FILE = "adapter.safetensors"  # beside the weights of a token-tuning run's checkpoints
LOSS_PLOT_FILE = "loss_curve.png"
ACCURACY_PLOT_FILE = "accuracy.png"
FINAL_MODEL_DIR = "model"
# a prepared dataset directory (`tokenformer prepare`)
PREPARE_METADATA_FILE = "prepare.json"
SPLIT_PREFIXES = {"train": "train_text_document", "valid": "valid_text_document"}


def training_checkpoints(run: str | Path) -> list[Path]:
    """A training run's complete checkpoints (`step_N/` folders holding their `trainer.pt`), oldest first."""
    run = Path(run)
    if not run.is_dir():
        return []
    return sorted(p for p in run.glob("step_*") if p.is_dir() and (p / TRAINER_STATE_FILE).is_file())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600), and some writers replace it: give it the mode open() gives
        tmp_path.chmod(0o666 & ~current_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then the directory itself."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
