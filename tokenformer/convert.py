"""The official checkpoint layout (GPT-NeoX "sequential" keys) <-> ours, both directions.

Layer `i` lives at `sequential.{i+2}` in the official files, the embedding at `sequential.0` and
the final LayerNorm at `sequential.{L+3}`; inside a layer the names are the same as ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from tokenformer.config import Config
from tokenformer.errors import TokenFormerError
from tokenformer.model import TokenFormer


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


def _resolve_config(config: Config | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    path = Path(config)
    if path.suffix == ".json":
        return Config.from_json(path)
    return Config.from_neox_yaml(path)


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept DeepSpeed-style `module.` prefixes and a `{"module": state}` wrapper."""
    if "module" in state and isinstance(state["module"], Mapping):
        state = state["module"]
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_official(checkpoint: str | Path | Mapping[str, torch.Tensor],
                  config: Config | str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> TokenFormer:
    """A `TokenFormer` from an official `pytorch_model.bin` (path or state dict) and its config.

    `config` is a `Config`, an official `.yml` path, or a `config.json` path. The official file
    may hold fp16 tensors: they are loaded as stored, then cast to `dtype`.
    """
    from tokenformer.checkpoint import torch_load_safe

    config = _resolve_config(config)
    source = "official state dict"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        checkpoint = torch_load_safe(checkpoint, map_location=device)
        if not isinstance(checkpoint, Mapping):
            raise TokenFormerError(f"{source} does not hold a state dict")
    official = _strip_module_prefix(checkpoint)
    mapping = weight_map(config.num_layers)
    with torch.device("meta"):
        model = TokenFormer(config)
    expected_ours = model.state_dict()
    expected = {official_key: expected_ours[ours] for official_key, ours in mapping.items()}
    check_state_dict(official, expected, source=source)
    ours = {mapping[k]: v.to(device=device, dtype=dtype) for k, v in official.items()}
    model.load_state_dict(ours, assign=True)
    return model.eval()


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


# ---- command line -------------------------------------------------------------------------------

def cli_arguments(parser) -> None:
    parser.add_argument("source", help="an official pytorch_model.bin (or a Hub name such as "
                        "Haiyang-W/TokenFormer-150M), or one of our checkpoint directories (a sharded FSDP2 "
                        "training checkpoint step_N/ too)")
    parser.add_argument("output", help="our checkpoint directory (from official or sharded) or a .bin file "
                        "(to official)")
    parser.add_argument("--config", help="official .yml config (or a preset name: 150M, 450M, 900M, 1.5B) "
                        "for an official source; not needed for a Hub name")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to store in the checkpoint directory (the GPT-NeoX-20B one "
                        "for the released models)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written tensors (default: float32 to ours, float16 to official)")


def cli_main(args) -> None:
    """Convert between the official checkpoint layout and ours.

    official -> ours: `tokenformer convert pytorch_model.bin OUT_DIR --config 150M_eval.yml
    --tokenizer tokenizer.json` writes config.json + model.safetensors (+ tokenizer.json).
    ours -> official: `tokenformer convert CKPT_DIR pytorch_model.bin` writes the GPT-NeoX layout.
    sharded -> ours: `tokenformer convert SAVE/step_N OUT_DIR` consolidates the FSDP2 shards
    (`sharded/`, written by any number of ranks) into one ordinary checkpoint directory."""
    from tokenformer.config import PRESETS
    from tokenformer.model import TokenFormer
    from tokenformer.tokenizer import load_tokenizer

    source, output = Path(args.source), Path(args.output)
    from tokenformer.distributed import export_sharded, is_sharded_checkpoint

    if source.is_dir() and is_sharded_checkpoint(source) and output.suffix not in (".bin", ".pt"):
        export_sharded(source, output)
        print(f"wrote {output} (consolidated from the sharded checkpoint {source})")
        return
    if source.is_dir():
        dtype = getattr(torch, args.dtype or "float16")
        model = TokenFormer.from_pretrained(source)
        from tokenformer.checkpoint import atomic_path

        with atomic_path(output) as tmp:
            torch.save(export_official(model, dtype=dtype), tmp)
        print(f"wrote {output} ({model.num_parameters():,} parameters, {args.dtype or 'float16'}, official layout)")
        return
    if not source.exists() and args.source in OFFICIAL_REPOS:
        source, config = download_official(args.source)
    elif args.config is None:
        raise TokenFormerError("an official checkpoint needs --config (its .yml, or a preset name)")
    elif args.config in PRESETS:
        config = Config.from_name(args.config)
    else:
        config = _resolve_config(args.config)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > config.padded_vocab_size:
        raise TokenFormerError(f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                               f"{config.padded_vocab_size}: is it the right tokenizer?")
    model = load_official(source, config, dtype=getattr(torch, args.dtype or "float32"))
    model.save_pretrained(output, tokenizer=tokenizer)
    print(f"wrote {output} ({model.num_parameters():,} parameters)")
