"""The official checkpoint layout (GPT-NeoX "sequential" keys) <-> ours, both directions.

Layer `i` lives at `sequential.{i+2}` in the official files, the embedding at `sequential.0` and
the final LayerNorm at `sequential.{L+3}`; inside a layer the names are the same as ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from tokenformer.errors import TokenFormerError
from tokenformer.inputs import torch_load_safe
from tokenformer.models.config import Config, resolve_model_config
from tokenformer.models.lm import TokenFormer
from tokenformer.models.pretrained import check_state_dict


def weight_map(num_layers: int) -> dict[str, str]:
    """Official key -> our key, for every tensor of a model with `num_layers` layers."""
    mapping = {"sequential.0.word_embeddings.weight": "word_embeddings.weight",
               f"sequential.{num_layers + 3}.norm.weight": "final_norm.weight",
               f"sequential.{num_layers + 3}.norm.bias": "final_norm.bias"}
    for i in range(num_layers):
        for module in ("attention.query", "attention.key", "attention.value", "attention.proj", "mlp"):
            for tensor in ("key_param_tokens", "value_param_tokens"):
                mapping[f"sequential.{i + 2}.{module}.{tensor}"] = f"layers.{i}.{module}.{tensor}"
    return mapping


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept DeepSpeed-style `module.` prefixes and a `{"module": state}` wrapper."""
    if "module" in state and isinstance(state["module"], Mapping):
        state = state["module"]
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_official(checkpoint: str | Path | Mapping[str, torch.Tensor],
                  config: Config | str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> TokenFormer:
    """A `TokenFormer` from an official `pytorch_model.bin` (path or state dict) and its config.

    `config` is a `Config`, a preset name, an official `.yml` path, or a `config.json` path. The official file
    may hold fp16 tensors: they are loaded as stored, then cast to `dtype`.
    """
    config = resolve_model_config(config)
    source = "official state dict"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        checkpoint = torch_load_safe(checkpoint, map_location=device, what="official checkpoint")
        if not isinstance(checkpoint, Mapping):
            raise TokenFormerError(f"{source} does not hold a state dict")
    official = _strip_module_prefix(checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in official.values()):
        raise TokenFormerError(f"{source} holds other values than tensors: is it an official pytorch_model.bin "
                               f"(not a trainer state or another kind of file)?")
    mapping = weight_map(config.num_layers)
    with torch.device("meta"):
        model = TokenFormer(config)
    expected_ours = model.state_dict()
    expected = {official_key: expected_ours[ours] for official_key, ours in mapping.items()}
    check_state_dict(official, expected, source=source)
    ours = {mapping[k]: v.to(device=device, dtype=dtype) for k, v in official.items()}
    model.load_state_dict(ours, assign=True)
    return model.eval()


RELEASED_PRESETS = ("150M", "450M", "900M", "1.5B", "354M", "757M")


def infer_official_config(state: Mapping[str, torch.Tensor], source: str | Path = "official checkpoint") -> Config:
    """The released model an official state dict is, told from its tensor shapes (the layer count,
    the width, the three token counts and the vocabulary; heads and context are the preset's)."""
    official = _strip_module_prefix(state)
    embedding = official.get("sequential.0.word_embeddings.weight")
    layers = sum(1 for key in official if key.endswith(".attention.query.key_param_tokens"))
    if embedding is None or not layers:
        raise TokenFormerError(f"{source} is not an official TokenFormer checkpoint (no word embeddings or layers)")
    shape = dict(num_layers=layers, hidden_size=int(embedding.shape[1]),
                 qkv_slot_num=int(official["sequential.2.attention.query.key_param_tokens"].shape[0]),
                 proj_slot_num=int(official["sequential.2.attention.proj.key_param_tokens"].shape[0]),
                 ffn_slot_num=int(official["sequential.2.mlp.key_param_tokens"].shape[0]))
    for name in RELEASED_PRESETS:
        config = Config.from_name(name)
        if all(getattr(config, k) == v for k, v in shape.items()) and config.padded_vocab_size == embedding.shape[0]:
            return config
    raise TokenFormerError(f"{source} has the shape {shape}, which is no released model: convert it with its "
                           f"config (tokenformer convert {source} DIR --config ITS.yml)")


def export_official(model: TokenFormer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The official-layout state dict of `model` (what `pytorch_model.bin` holds)."""
    c = model.config
    if any(n is not None for n in (c.qkv_scale_num, c.proj_scale_num, c.ffn_scale_num)):
        raise TokenFormerError(
            "this model pins its normalisation scale (it was grown exactly), which the official "
            "code cannot represent: keep it in this project's checkpoint format")
    inverse = {ours: official for official, ours in weight_map(c.num_layers).items()}
    state = model.state_dict()
    return {inverse[k]: (v if dtype is None else v.to(dtype)) for k, v in state.items()}


# ---- Hugging Face Hub (the released weights) --------------------------------------------------

OFFICIAL_REPOS = {"Haiyang-W/TokenFormer-150M": "150M", "Haiyang-W/TokenFormer-450M": "450M",
                  "Haiyang-W/TokenFormer-900M": "900M", "Haiyang-W/TokenFormer-1-5B": "1.5B"}


def download_official(repo_id: str) -> tuple[Path, Config]:
    """Fetch `pytorch_model.bin` of a released model from the Hub; returns (path, preset config)."""
    if repo_id not in OFFICIAL_REPOS:
        raise TokenFormerError(f"unknown official model {repo_id!r}: use one of {', '.join(OFFICIAL_REPOS)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise TokenFormerError("downloading from the Hub needs the 'hub' extra: pip install 'tokenformer[hub]'") from None
    path = hf_hub_download(repo_id, "pytorch_model.bin")
    return Path(path), Config.from_name(OFFICIAL_REPOS[repo_id])
