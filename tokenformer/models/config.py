"""Model configuration: the `Config` dataclass, its named presets, and readers for JSON and the
official GPT-NeoX `.yml` files.

Field names are the official ones (`num_layers`, `qkv_slot_num`, ...) so that a value read from an
official config lands in the field of the same name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from tokenformer.errors import TokenFormerError
from tokenformer.files import CONFIG_FILE
from tokenformer.inputs import read_json, read_yaml, require_memory
from tokenformer.options import Bounds, check_number

NORM_ACTIVATION_TYPES = ("l2_norm_gelu", "gelu_l2_norm", "softmax")

# Keys transformers writes into config.json beside the model's fields (the integration's and its own
# generic ones); they say nothing about the model's shape or numerics, so this package's loader
# skips them. Any other unknown key is still an error, so that a typo is not silently dropped.
TRANSFORMERS_KEYS = (
    "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "tie_word_embeddings",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "_name_or_path",
)


def check_declared_fields(config: Any, what: str) -> None:
    """Every field of a config dataclass has its declared type, and a number lies in its declared
    range (`field_bounds`; integers at least 1 and floats finite and above 0 unless declared
    otherwise): a string, NaN, a negative count or a bool where a number belongs is one sentence."""
    hints = typing.get_type_hints(type(config))
    bounds = getattr(config, "field_bounds", {})
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None and type(None) in kinds:
            continue
        kinds = tuple(k for k in kinds if k is not type(None))
        if len(kinds) != 1:
            continue  # a nested part (CLIP's and the captioner's towers): its own config checks it
        kind, name = kinds[0], f"{what} field {f.name}"
        if kind in (int, float):
            check_number(name, value, bounds.get(f.name, Bounds(minimum=1) if kind is int else Bounds(above=0)),
                         integer=kind is int)
            if isinstance(value, float) and not math.isfinite(value):
                raise TokenFormerError(f"{name} must be a finite number, got {value!r}")
        elif kind in (bool, str) and not isinstance(value, kind):
            raise TokenFormerError(f"{name} must be {'true or false' if kind is bool else 'a string'}, got {value!r}")
        elif typing.get_origin(kind) is list:
            if not isinstance(value, list):
                raise TokenFormerError(f"{name} must be a list, got {value!r}")
            item = (typing.get_args(kind) or (Any,))[0]
            if item is float:
                for v in value:
                    check_number(f"every value of {name}", v, bounds.get(f.name, Bounds(minimum=-1e6, maximum=1e6)))


def check_block_fields(config: Any, what: str) -> None:
    """The checks every config of TokenFormer blocks needs (language or vision): the declared
    fields (`check_declared_fields`), the heads divide the width, the normalisation is known, and
    the model fits the machine's memory."""
    check_declared_fields(config, what)
    if config.hidden_size % config.num_attention_heads:
        raise TokenFormerError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
            f"{config.num_attention_heads}: choose a head count that divides it")
    if config.norm_activation_type not in NORM_ACTIVATION_TYPES:
        raise TokenFormerError(
            f"unknown norm_activation_type {config.norm_activation_type!r}: "
            f"use one of {', '.join(NORM_ACTIVATION_TYPES)}")
    require_memory(config.memory_bytes, f"a model of this {what} ({config.num_parameters:,} parameters)")


PresetConfigT = TypeVar("PresetConfigT", bound="PresetConfig")


class PresetConfig:
    """`from_name` and `from_dict` for a config dataclass with named presets (`Config`,
    `VisionConfig`). The preset lookup, the unknown-field check and the construction are the same
    for every such config, so they live here once; a subclass states only what differs: its preset
    table, what its error messages call it and which derived values it reads back."""

    # What errors call this kind of config and its presets: "unknown {config_label} field(s) ...",
    # "unknown {preset_label} '42M' ...".
    config_label: ClassVar[str]
    preset_label: ClassVar[str]
    # Values `to_dict` writes although they follow from the fields (the LM's `padded_vocab_size`):
    # `from_dict` accepts and drops them, so that a saved config reads back; the class recomputes them.
    derived_fields: ClassVar[tuple[str, ...]] = ()
    # Fields that hold a nested part's config (CLIP's and the captioner's `vision` and `text`): an
    # override that is a mapping changes single fields of the preset's part, not the whole part.
    part_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """The preset table. A method, not an attribute, because the table is written below the
        class whose fields it names."""
        raise NotImplementedError

    @classmethod
    def from_name(cls: type[PresetConfigT], name: str, **overrides: Any) -> PresetConfigT:
        """A named preset (see `presets()`), with optional field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise TokenFormerError(
                f"unknown {cls.preset_label} {name!r}: valid presets are {', '.join(presets)}")
        preset = presets[name]
        for part in cls.part_fields:
            if isinstance(overrides.get(part), dict) and isinstance(preset.get(part), dict):
                overrides[part] = {**preset[part], **overrides[part]}
        return cls.from_dict({**preset, "name": name, **overrides})

    @classmethod
    def resolve(cls: type[PresetConfigT], spec: Any) -> PresetConfigT:
        """A config from a preset name, a mapping of fields (`name: PRESET` starts from that preset
        and the other keys override its fields), or a config itself: what a run config's `model`
        field may hold."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls.from_name(spec)
        if isinstance(spec, dict):
            values = dict(spec)
            if values.get("name") in cls.presets():
                return cls.from_name(values.pop("name"), **values)
            return cls.from_dict(values)
        raise TokenFormerError(f"model must be a {cls.preset_label} name ({', '.join(cls.presets())}) or a "
                               f"mapping of {cls.config_label} fields, got {spec!r}")

    @classmethod
    def from_dict(cls: type[PresetConfigT], values: dict[str, Any]) -> PresetConfigT:
        """Build from a mapping of fields (a preset, a JSON file); an unknown key is an error that
        lists the valid fields, so a typo is not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(cls.derived_fields))
        if unknown:
            raise TokenFormerError(
                f"unknown {cls.config_label} field(s) {', '.join(unknown)}: "
                f"valid fields are {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if k in known})


class LanguageModelShape:
    """The derived shape of a GPT-NeoX-style language model config, from its fields `vocab_size`,
    `make_vocab_size_divisible_by`, `hidden_size`, `num_attention_heads` and `rotary_pct`."""

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of `make_vocab_size_divisible_by` (50277 -> 50304)."""
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)


@dataclass
class Config(LanguageModelShape, PresetConfig):
    """Shape and numerics of a TokenFormer language model.

    `*_scale_num` replace the slot count `n` inside the normalisation (`sqrt(n)` or `* n`) of the
    corresponding Pattentions; `None` means "use the slot count", as the official code does. Growing
    a model exactly sets them to the pre-growth counts (see `tokenformer.scaling`).
    """

    # ranges of the fields other than counts (at least 1) and floats (finite, above 0)
    field_bounds: ClassVar[dict[str, Bounds]] = {"rotary_pct": Bounds(minimum=0, maximum=1),
                                                 "init_method_std": Bounds(minimum=0)}

    name: str = "custom"
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    qkv_slot_num: int = 768
    proj_slot_num: int = 768
    ffn_slot_num: int = 3072
    norm_activation_type: str = "l2_norm_gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000
    seq_length: int = 2048
    vocab_size: int = 50277
    make_vocab_size_divisible_by: int = 128
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    qkv_scale_num: int | None = None
    proj_scale_num: int | None = None
    ffn_scale_num: int | None = None
    # Numerics-neutral: keep one score-sized tensor per Pattention for the backward instead of two
    # (recomputes an element-wise GELU; see tokenformer.pattention.L2NormGeluPattention).
    pattention_memory_lean: bool = False
    growth_history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived fields (and those of LanguageModelShape) --------------------------------------

    @property
    def memory_bytes(self) -> int:
        """float32 bytes of the weights and of one full-length sequence's key/value cache."""
        return 4 * (self.num_parameters + 2 * self.num_layers * self.seq_length * self.hidden_size)

    @property
    def num_parameters(self) -> int:
        """Parameter count computed from the shapes alone (tied embedding counted once)."""
        h = self.hidden_size
        per_layer = 2 * h * (3 * self.qkv_slot_num + self.proj_slot_num + self.ffn_slot_num)
        return self.padded_vocab_size * h + self.num_layers * per_layer + 2 * h

    # ---- checks -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise `TokenFormerError` with one clear sentence if the configuration cannot work."""
        check_block_fields(self, "config")
        if self.rotary_dim % 2:
            raise TokenFormerError(
                f"rotary dims per head (head_dim {self.head_dim} x rotary_pct {self.rotary_pct}) "
                f"= {self.rotary_dim} must be even")

    # ---- constructors -----------------------------------------------------------------------

    # `from_name` and `from_dict` come from PresetConfig; these are what it needs to know.
    config_label = "config"
    preset_label = "preset"
    derived_fields = ("padded_vocab_size",)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["padded_vocab_size"] = self.padded_vocab_size
        return values

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "Config":
        """Read a config from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            return cls.from_file_values(read_json(path, "config file", "give a config.json of model fields"), path)
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenFormerError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(values)

    @classmethod
    def from_file_values(cls, values: dict[str, Any], path: Path) -> "Config":
        """`from_dict` of values read from the file `path`, whose name any error then carries. A model
        directory's config.json (its `model_type`, and a transformers directory's own keys) reads too."""
        model_type = values.get("model_type", "tokenformer")
        if model_type != "tokenformer":
            raise TokenFormerError(f"config file {path} is the config of a {model_type!r} model, not of a TokenFormer "
                                   f"language model: give a language model's config")
        values = {k: v for k, v in values.items() if k != "model_type" and k not in TRANSFORMERS_KEYS}
        try:
            return cls.from_dict(values)
        except (TokenFormerError, TypeError) as e:  # TypeError: a value of a type no field can take
            raise TokenFormerError(f"config file {path}: {e}") from None

    @classmethod
    def from_neox_yaml(cls, path: str | Path) -> "Config":
        """Read the model fields of an official GPT-NeoX/TokenFormer `.yml` config.

        GPT-NeoX accepts both `num-layers` and `num_layers`; so do we. Training and parallelism
        keys are ignored. The released files are JSON-like YAML with `#` comments.
        """
        path = Path(path)
        raw = read_yaml(path, "GPT-NeoX config", "give the official .yml of the model (e.g. 150M_eval.yml)")
        neox = {str(k).replace("-", "_"): v for k, v in raw.items()}
        if "num_layers" not in neox or "hidden_size" not in neox:
            raise TokenFormerError(f"{path} has no num_layers/hidden_size: is it a model config?")
        for key, expected in (("pos_emb", "rotary"), ("norm", "layernorm_nonparam"),
                              ("final_norm", "layernorm"), ("gpt_j_residual", False),
                              ("no_weight_tying", False)):
            if key in neox and neox[key] != expected:
                raise TokenFormerError(
                    f"{path} sets {key}={neox[key]!r}; only {expected!r} (the released TokenFormer) is supported")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in neox.items() if k in known}
        values.setdefault("name", path.stem)
        values.setdefault("qkv_slot_num", neox["hidden_size"])
        values.setdefault("proj_slot_num", neox["hidden_size"])
        if not isinstance(neox["hidden_size"], int) or isinstance(neox["hidden_size"], bool):
            raise TokenFormerError(f"GPT-NeoX config {path} has hidden_size {neox['hidden_size']!r}, not an integer")
        values.setdefault("ffn_slot_num", 4 * neox["hidden_size"])
        return cls.from_file_values(values, path)


# Released TokenFormer models (Pile, seq 2048) and the incremental-scaling shapes (OpenWebText2,
# seq 1024), then small shapes for tests and CPU training.
PRESETS: dict[str, dict[str, Any]] = {
    "150M": dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                 qkv_slot_num=768, proj_slot_num=768, ffn_slot_num=3072),
    "450M": dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                 qkv_slot_num=1024, proj_slot_num=1024, ffn_slot_num=4096),
    "900M": dict(num_layers=32, hidden_size=1280, num_attention_heads=16,
                 qkv_slot_num=1280, proj_slot_num=1280, ffn_slot_num=5120),
    "1.5B": dict(num_layers=40, hidden_size=1536, num_attention_heads=16,
                 qkv_slot_num=1536, proj_slot_num=1536, ffn_slot_num=6144),
    "354M": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=1024,
                 qkv_slot_num=768, proj_slot_num=768, ffn_slot_num=3072),
    "757M": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=1024,
                 qkv_slot_num=1792, proj_slot_num=1792, ffn_slot_num=7168),
    # Small shapes: byte-level vocabulary (257 tokens) unless overridden.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                 qkv_slot_num=32, proj_slot_num=32, ffn_slot_num=128, vocab_size=257),
    "small": dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128,
                  qkv_slot_num=128, proj_slot_num=128, ffn_slot_num=512, vocab_size=257),
    "base-cpu": dict(num_layers=6, hidden_size=256, num_attention_heads=8, seq_length=256,
                     qkv_slot_num=256, proj_slot_num=256, ffn_slot_num=1024, vocab_size=257),
}


def resolve_model_config(spec: Any) -> Config:
    """A model `Config` from a preset name, a .json/.yml path (a model directory's config.json too, or
    the directory itself), or a mapping of fields (with `name: PRESET` to start from a preset)."""
    if isinstance(spec, (Config, dict)):
        return Config.resolve(spec)
    spec = str(spec)
    if spec in PRESETS:
        return Config.from_name(spec)
    path = Path(spec)
    if path.is_dir() and (path / CONFIG_FILE).is_file():  # a model directory: its config
        path = path / CONFIG_FILE
    if path.suffix == ".json":
        return Config.from_json(path)
    if path.suffix in (".yml", ".yaml"):
        return Config.from_neox_yaml(path)
    raise TokenFormerError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a .json/.yml "
                           f"config file")
