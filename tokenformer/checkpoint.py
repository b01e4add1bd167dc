"""Checkpoint directories of any model of this package, told apart by the `model_type` in their
`config.json`; and the trainer state (`trainer.pt`) a training checkpoint holds beside its weights.

A new model joins by adding its class to `MODEL_CLASSES`: then `load_model`, `tokenformer grow`,
`shrink` and `train --init-from` all read its directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokenformer.errors import TokenFormerError
from tokenformer.files import TOKENIZER_FILE, TRAINER_STATE_FILE, atomic_copy
from tokenformer.inputs import torch_load_safe
from tokenformer.models.captioner import Captioner
from tokenformer.models.clip import CLIPTokenFormer
from tokenformer.models.lm import TokenFormer
from tokenformer.models.pretrained import PretrainedModel, read_config_values
from tokenformer.models.vision import VisionTokenFormer

MODEL_CLASSES: dict[str, type[PretrainedModel]] = {cls.model_type: cls for cls in (TokenFormer, VisionTokenFormer,
                                                                                   Captioner, CLIPTokenFormer)}


def model_type_of(directory: str | Path) -> str:
    """The `model_type` a checkpoint directory declares ("tokenformer" when it names none)."""
    return read_config_values(directory)["model_type"]


def load_model(directory: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> PretrainedModel:
    """The model of any checkpoint directory, built by the class its `model_type` names."""
    model_type = model_type_of(directory)
    if model_type not in MODEL_CLASSES:
        raise TokenFormerError(
            f"{directory} holds a {model_type!r} model, which this package cannot load: give a checkpoint "
            f"of type {', '.join(map(repr, MODEL_CLASSES))}")
    return MODEL_CLASSES[model_type].from_pretrained(directory, device=device, dtype=dtype)


def read_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    """The trainer state saved beside `directory`'s weights (`trainer.pt`), or None if there is none."""
    path = Path(directory) / TRAINER_STATE_FILE
    return torch_load_safe(path) if path.is_file() else None


def copy_tokenizer(source: str | Path, directory: str | Path) -> bool:
    """Copy `source/tokenizer.json` into `directory` if there is one; returns whether it was there."""
    path = Path(source) / TOKENIZER_FILE
    if path.is_file():
        atomic_copy(path, Path(directory) / TOKENIZER_FILE)
        return True
    return False
