"""Checkpoint directories of any model of this package, told apart by the `model_type` in their
`config.json`; the trainer state (`trainer.pt`) a training checkpoint holds beside its weights; and
`resolve_checkpoint`, the one reading of what a user calls "a checkpoint" (every command's
`--checkpoint` goes through it).

A new model joins by adding its class to `MODEL_CLASSES`: then `load_model`, `tokenformer grow`,
`shrink` and `train --init-from` all read its directories.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from tokenformer.errors import TokenFormerError
from tokenformer.data.tokenizer import Tokenizer, load_tokenizer
from tokenformer.files import (CONFIG_FILE, FINAL_MODEL_DIR, LATEST_FILE, TOKENIZER_FILE, TRAIN_CONFIG_FILE,
                               TRAINER_STATE_FILE, atomic_copy, training_checkpoints)
from tokenformer.inputs import torch_load_safe
from tokenformer.models.captioner import Captioner
from tokenformer.models.clip import CLIPTokenFormer
from tokenformer.models.lm import TokenFormer
from tokenformer.models.official import infer_official_config, load_official
from tokenformer.models.pretrained import PretrainedModel, read_config_values
from tokenformer.models.vision import VisionTokenFormer

MODEL_CLASSES: dict[str, type[PretrainedModel]] = {cls.model_type: cls for cls in (TokenFormer, VisionTokenFormer,
                                                                                   Captioner, CLIPTokenFormer)}


CHECKPOINT_NAME = re.compile(r"step_\d{8,}")  # a training checkpoint's folder in its run's `save` directory
OFFICIAL_SUFFIXES = (".bin", ".pt")  # an official pytorch_model.bin (the GPT-NeoX layout)


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint of a training run's `save` directory: the one its `latest`
    file names, or (a pointer lost to a crash or damaged by hand) the newest `step_N`; None if none."""
    run = Path(run)
    pointer = run / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if CHECKPOINT_NAME.fullmatch(name) and (run / name / TRAINER_STATE_FILE).is_file():
            return run / name
    found = training_checkpoints(run)
    return found[-1] if found else None


def unfinished_since_final_model(run: Path, latest: Path) -> bool:
    """Whether a run's newest checkpoint `latest` comes from training after its `model/` was written:
    `model/` is written once the run reaches its last step (`train_iters` of its `train_config.json`),
    so a newest checkpoint short of that step is a resumed run (more epochs) that has not finished."""
    try:
        planned = json.loads((run / TRAIN_CONFIG_FILE).read_text())["train_iters"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no readable plan: the final model stands
    return isinstance(planned, int) and int(latest.name.removeprefix("step_")) < planned


def resolve_checkpoint(spec: str | Path) -> Path:
    """What a user means by "a checkpoint": a model directory (a training step folder `step_N`, a
    `model/` folder, `convert`'s output, a transformers directory) as it is; a training run's `save`
    folder as its final `model/` if it has one (vision, CLIP, captioner runs) and the run has not been
    resumed past it, else the checkpoint its `latest` file names; an official `.bin` file as it is
    (`load_model` reads it)."""
    path = Path(spec)
    if path.is_file():
        if path.suffix in OFFICIAL_SUFFIXES:
            return path
        raise TokenFormerError(f"checkpoint {path} is a file: give a checkpoint directory, a training run's "
                               f"folder or an official .bin file")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / CONFIG_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if (path / FINAL_MODEL_DIR / CONFIG_FILE).is_file() and (
            latest is None or not unfinished_since_final_model(path, latest)):
        return path / FINAL_MODEL_DIR
    if latest is not None:
        return latest
    raise TokenFormerError(f"{path} holds no {CONFIG_FILE} and no training checkpoint: give a checkpoint directory "
                           f"(written by save_pretrained, `tokenformer convert` or training) or a run's `save` folder")


def model_type_of(checkpoint: str | Path) -> str:
    """The `model_type` a checkpoint declares ("tokenformer" when it names none, and for a .bin)."""
    path = resolve_checkpoint(checkpoint)
    return "tokenformer" if path.is_file() else read_config_values(path)["model_type"]


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, expect: type[PretrainedModel] | None = None) -> PretrainedModel:
    """The model of any checkpoint (`resolve_checkpoint`), built by the class its `model_type` names;
    an official .bin by the released shape its tensors match. `expect` refuses another class."""
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        state = torch_load_safe(path, map_location=device, what="official checkpoint")
        model = load_official(state, infer_official_config(state, path), dtype=dtype or torch.float32, device=device)
    else:
        model_type = model_type_of(path)
        if model_type not in MODEL_CLASSES:
            raise TokenFormerError(
                f"{path} holds a {model_type!r} model, which this package cannot load: give a checkpoint "
                f"of type {', '.join(map(repr, MODEL_CLASSES))}")
        model = MODEL_CLASSES[model_type].from_pretrained(path, device=device, dtype=dtype)
    if expect is not None and not isinstance(model, expect):
        raise TokenFormerError(f"{checkpoint} holds a {model.model_type!r} model, not a {expect.model_type!r} one: "
                               f"give a checkpoint of that kind")
    return model


def checkpoint_tokenizer(checkpoint: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer to use with a checkpoint: `override` if given ('byte' or a tokenizer.json), else
    the one saved in its directory (an official .bin holds none)."""
    if override is not None:
        return load_tokenizer(override)
    path = resolve_checkpoint(checkpoint)
    if path.is_file():
        raise TokenFormerError(f"{path} is an official checkpoint, which holds no tokenizer: give its tokenizer "
                               f"(--tokenizer, the GPT-NeoX-20B tokenizer.json for the released models)")
    return load_tokenizer(path)


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
