"""Crash-safe file writing and the model checkpoint directory (`config.json` + `model.safetensors`).

Every file is written under a temporary name in the same folder, flushed to disk, then renamed
over the old one (`os.replace` is atomic on POSIX and Windows): a crash at any moment leaves
either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


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
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_model_directory(model, directory: str | Path, tokenizer=None) -> Path:
    """Write a model checkpoint directory; weights first, so `config.json` never points at nothing."""
    from safetensors.torch import save_file

    from tokenformer.model import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: hand it plain contiguous copies.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if tokenizer is not None:
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            tokenizer.save(tmp)
    values = model.config.to_dict()
    values["model_type"] = getattr(model, "model_type", "tokenformer")
    atomic_write_text(directory / CONFIG_FILE, json.dumps(values, indent=2) + "\n")
    return directory


def load_model_directory(model_class, config_class, directory: str | Path, model_type: str,
                         device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                         written_by: str = "save_pretrained"):
    """Build `model_class` from a checkpoint directory (safetensors only: no code runs).

    The model is built on the meta device and takes the loaded tensors as they are (`assign`), so
    loading costs one copy of the weights. `model_type` must match the one in `config.json`.
    """
    from safetensors.torch import load_file

    from tokenformer.convert import check_state_dict
    from tokenformer.errors import TokenFormerError
    from tokenformer.model import CONFIG_FILE, WEIGHTS_FILE

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {directory} a checkpoint directory "
                                    f"(written by {written_by})?")
    values = json.loads(config_path.read_text())
    found = values.pop("model_type", "tokenformer")
    if found != model_type:
        raise TokenFormerError(f"{directory} holds a {found!r} model, not a {model_type!r} model: load it "
                               f"with the class that wrote it ({model_class.__name__} cannot)")
    config = config_class.from_dict(values)
    state = load_file(str(weights_path), device=str(device))
    with torch.device("meta"):
        model = model_class(config)
    check_state_dict(state, model.state_dict(), source=str(weights_path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def torch_load_safe(path: str | Path, map_location: str | torch.device = "cpu"):
    """`torch.load` that never executes pickled code (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=_can_mmap(path))
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        from tokenformer.errors import TokenFormerError

        raise TokenFormerError(
            f"{path} cannot be loaded safely as tensors ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"it may be damaged or hold pickled code") from None


def _can_mmap(path: Path) -> bool:
    # The zip-based format can be memory-mapped, the legacy one cannot.
    import zipfile

    return zipfile.is_zipfile(path)
