"""`TokenFormerConfig`: the transformers configuration of a TokenFormer language model.

Its fields are those of `tokenformer.models.config.Config`, under the official names, with the same
defaults (read from `Config`, so that a `config.json` of either kind reads as the other), plus the
token ids and `use_cache` that transformers needs. `attribute_map` gives the names transformers' generic code looks up
(`num_hidden_layers`, `max_position_embeddings`, ...). Saving writes every model field, not only those
that differ from the defaults, and the `auto_map` that lets `trust_remote_code=True` find the classes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_write_text
from tokenformer.models.config import Config

MODEL_TYPE = "tokenformer"
MODELING_FILE = "modeling_tokenformer.py"
# what config.json's `auto_map` names: the classes of the small modeling file written beside it
AUTO_MAP = {"AutoConfig": "modeling_tokenformer.TokenFormerConfig",
            "AutoModel": "modeling_tokenformer.TokenFormerModel",
            "AutoModelForCausalLM": "modeling_tokenformer.TokenFormerForCausalLM",
            "AutoModelForSequenceClassification": "modeling_tokenformer.TokenFormerForSequenceClassification"}
MODELING_SOURCE = '''"""TokenFormer for transformers' `trust_remote_code=True`. The model's code is the tokenformer
package, which must be installed (pip install "tokenformer[hf]"): this file only imports it."""

from tokenformer.hf import (TokenFormerConfig, TokenFormerForCausalLM, TokenFormerForSequenceClassification,
                            TokenFormerModel)

__all__ = ["TokenFormerConfig", "TokenFormerForCausalLM", "TokenFormerForSequenceClassification", "TokenFormerModel"]
'''
NATIVE_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
NATIVE_DEFAULTS = dataclasses.asdict(Config())


class TokenFormerConfig(PretrainedConfig):
    """The fields of `Config` (see there) for transformers. GPT-NeoX-20B's `<|endoftext|>` (0) is the
    default begin, end and padding token; `tokenformer convert --format hf` takes them from the
    model's tokenizer (256 for the byte tokenizer)."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "seq_length",
        "layer_norm_eps": "layernorm_epsilon",
        "initializer_range": "init_method_std",
        "rope_theta": "rotary_emb_base",
        "partial_rotary_factor": "rotary_pct",
    }

    def __init__(self, bos_token_id: int | None = 0, eos_token_id: int | None = 0,
                 pad_token_id: int | None = 0, use_cache: bool = True, **kwargs: Any) -> None:
        # The model fields and their defaults are those of `Config`, read from it: the two cannot drift.
        for name in NATIVE_FIELDS:
            setattr(self, name, copy.deepcopy(kwargs.pop(name, NATIVE_DEFAULTS[name])))
        padded = kwargs.pop("padded_vocab_size", None)  # written beside the fields; it follows from them
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **kwargs)
        self.to_native()  # the checks of Config: one sentence on a bad value
        if padded is not None and padded != self.padded_vocab_size:
            raise TokenFormerError(
                f"config padded_vocab_size {padded} does not follow from vocab_size {self.vocab_size} and "
                f"make_vocab_size_divisible_by {self.make_vocab_size_divisible_by} ({self.padded_vocab_size})")

    # The derived values, computed by the very code of `Config`.
    padded_vocab_size = property(Config.padded_vocab_size.fget, doc=Config.padded_vocab_size.__doc__)
    head_dim = property(Config.head_dim.fget)
    rotary_dim = property(Config.rotary_dim.fget)

    # ---- to and from the native config --------------------------------------------------------

    def to_native(self) -> Config:
        """The same model as a `Config` (what `TokenFormer` and this package's tools take)."""
        return Config(**{name: getattr(self, name) for name in NATIVE_FIELDS})

    @classmethod
    def from_native(cls, config: Config, **token_ids: int | None) -> "TokenFormerConfig":
        """`config` as a transformers config; `token_ids`: bos_token_id, eos_token_id, pad_token_id."""
        return cls(**{name: getattr(config, name) for name in NATIVE_FIELDS}, **token_ids)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        found = config_dict.get("model_type", MODEL_TYPE)
        if found != MODEL_TYPE:
            raise TokenFormerError(
                f"this config.json describes a {found!r} model, not a TokenFormer language model: load it with "
                f"the class of its own model type (AutoModelForCausalLM, or tokenformer.load_model for this "
                f"package's other models)")
        return super().from_dict(config_dict, **kwargs)

    # ---- saving -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["padded_vocab_size"] = self.padded_vocab_size
        values["auto_map"] = dict(AUTO_MAP)
        return values

    def to_diff_dict(self) -> dict[str, Any]:
        """Every model field, not only those off the defaults: config.json states the whole model,
        and readers that do not know these defaults (this package's own loader) read it right."""
        full = self.to_dict()
        diff = super().to_diff_dict()
        model = {name: full[name] for name in (*NATIVE_FIELDS, "padded_vocab_size")}
        return {"model_type": MODEL_TYPE, **model, **{k: v for k, v in diff.items() if k not in model}}

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs: Any) -> None:
        """config.json, and the modeling file its `auto_map` names (written first, so that a push to
        the Hub uploads it too)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / MODELING_FILE, MODELING_SOURCE)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Nothing to do: transformers calls this for code loaded with `trust_remote_code`, to copy the
        defining module into every directory saved later; the code here is the installed package, and
        `save_pretrained` writes the small modeling file that imports it instead."""
