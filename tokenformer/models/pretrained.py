"""The model directory format (`config.json` + `model.safetensors`, optionally `tokenizer.json`)
and what every model of this package shares: `save_pretrained`, `from_pretrained`, parameter
counts, its Pattentions by name, and the one state-dict check.

`config.json` holds the config's fields plus `model_type`, which says which class reads it back
(`tokenformer.checkpoint.load_model` dispatches on it). Loading reads safetensors only: no code
runs. A transformers directory (`tokenformer convert --format hf`, or `save_pretrained` of
`tokenformer.hf.TokenFormerForCausalLM`) is one too: its config.json adds the keys of
`TRANSFORMERS_KEYS`, which are ignored here.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.files import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, atomic_path, atomic_write_text
from tokenformer.inputs import read_json, read_safetensors, require_file, safetensors_header
from tokenformer.models.config import TRANSFORMERS_KEYS
from tokenformer.models.pattention import Pattention


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    """Raise one clear sentence if `state` lacks a key, has an extra one, or a shape differs."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TokenFormerError(f"{source} is missing tensor {missing[0]!r}{more}: "
                               f"is it a checkpoint of this model shape?")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise TokenFormerError(f"{source} has unexpected tensor {unexpected[0]!r}{more}: "
                               f"is the config right for this checkpoint?")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise TokenFormerError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but the config "
                f"expects {tuple(ref.shape)}: the config does not match this checkpoint")
        if state[key].dtype.is_floating_point != ref.dtype.is_floating_point:
            raise TokenFormerError(
                f"{source}: tensor {key!r} holds {str(state[key].dtype).replace('torch.', '')} values but the model "
                f"takes {str(ref.dtype).replace('torch.', '')}: the file is not weights of this model; write it again")


# torch dtypes of the safetensors dtype names (the header is checked before any tensor is read)
SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
                      "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
                      "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
                      "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}


def header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file holds, as meta tensors of their shape and dtype (nothing read
    but the header): what `check_state_dict` compares before the weights are loaded."""
    return {name: torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]], device="meta")
            for name, entry in safetensors_header(path).items() if name != "__metadata__"}


def write_model_directory(directory: str | Path, state: Mapping[str, torch.Tensor], config_values: dict[str, Any],
                          model_type: str, tokenizer=None) -> Path:
    """Write a model directory; weights first, so `config.json` never points at nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: hand it plain contiguous copies.
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        try:
            save_file(state, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:  # its I/O errors lose their type: give them back, errno and all
            full = "os error 28" in str(e)
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          f"{'no space left' if full else 'could not write'} on the device of {directory}") from None
    if tokenizer is not None:
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            tokenizer.save(tmp)
    values = {**config_values, "model_type": model_type}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(values, indent=2) + "\n")
    return directory


def read_config_values(directory: str | Path, written_by: str = "save_pretrained") -> dict[str, Any]:
    """The mapping in `directory/config.json`, `model_type` included (default "tokenformer")."""
    directory = Path(directory)
    if directory.is_file():
        raise TokenFormerError(f"checkpoint directory {directory} is a file, not a directory: give a directory "
                               f"written by {written_by}")
    values = read_json(directory / CONFIG_FILE, "model config",
                       f"is {directory} a checkpoint directory (written by {written_by})? If it is, it is damaged")
    values.setdefault("model_type", "tokenformer")
    if not isinstance(values["model_type"], str):
        raise TokenFormerError(f"model config {directory / CONFIG_FILE} has model_type {values['model_type']!r}, "
                               f"not a name: the checkpoint directory is damaged")
    return values


def save_model(model: nn.Module, directory: str | Path, tokenizer=None,
               state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """The model directory of any model with a `config` (`to_dict()`) and a `model_type`
    ("tokenformer" if it names none); `state` replaces its own state dict (FSDP2's gathered one)."""
    return write_model_directory(directory, model.state_dict() if state is None else state, model.config.to_dict(),
                                 getattr(model, "model_type", "tokenformer"), tokenizer)


class PartsCheckpointing:
    """`gradient_checkpointing` of a model made of parts (`checkpointed_parts`, attribute names) whose
    blocks honour it each: the training loop sets it on the model it trains, and every part follows."""

    checkpointed_parts: ClassVar[tuple[str, ...]]

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self, self.checkpointed_parts[0]).gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for name in self.checkpointed_parts:
            getattr(self, name).gradient_checkpointing = value


class PretrainedModel(nn.Module):
    """Base of the models here: a `config` with `to_dict` / `from_dict`, a `model_type` naming it in
    `config.json`, and the directory format above."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    written_by: ClassVar[str] = "save_pretrained"

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> Path:
        """Write `config.json` and `model.safetensors` (and the tokenizer, if given) atomically."""
        return save_model(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None):
        """Load a directory written by `save_pretrained` (safetensors only: no code runs).

        The model is built on the meta device and takes the loaded tensors as they are (`assign`),
        so loading costs one copy of the weights.
        """
        directory = Path(directory)
        values = read_config_values(directory, cls.written_by)
        found = values.pop("model_type")
        if found != cls.model_type:
            raise TokenFormerError(f"{directory} holds a {found!r} model, not a {cls.model_type!r} model: load it "
                                   f"with the class that wrote it ({cls.__name__} cannot)")
        weights_path = require_file(directory / WEIGHTS_FILE, "weights file",
                                    f"is {directory} a checkpoint directory (written by {cls.written_by})?")
        try:
            config = cls.config_class.from_dict({k: v for k, v in values.items() if k not in TRANSFORMERS_KEYS})
        except (TokenFormerError, TypeError) as e:  # TypeError: a value of a type no field can take
            raise TokenFormerError(f"model config {directory / CONFIG_FILE}: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(header_tensors(weights_path), model.state_dict(), source=str(weights_path))
        state = read_safetensors(weights_path, device)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pattentions(self) -> dict[str, Pattention]:
        """Every Pattention of the model by module name (e.g. `layers.0.attention.query`)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Pattention)}
