"""`tokenformer convert`: the official checkpoint layout <-> ours, and sharded FSDP2 checkpoints
into ordinary ones (`tokenformer.models.official`, `tokenformer.training.distributed`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tokenformer.data.tokenizer import check_vocab_fits, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_path
from tokenformer.models.config import resolve_model_config
from tokenformer.models.lm import TokenFormer
from tokenformer.models.official import OFFICIAL_REPOS, download_official, export_official, load_official
from tokenformer.training.distributed import export_sharded, is_sharded_checkpoint


def arguments(parser: argparse.ArgumentParser) -> None:
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


def main(args: argparse.Namespace) -> None:
    """Convert between the official checkpoint layout and ours.

    official -> ours: `tokenformer convert pytorch_model.bin OUT_DIR --config 150M_eval.yml
    --tokenizer tokenizer.json` writes config.json + model.safetensors (+ tokenizer.json).
    ours -> official: `tokenformer convert CKPT_DIR pytorch_model.bin` writes the GPT-NeoX layout.
    sharded -> ours: `tokenformer convert SAVE/step_N OUT_DIR` consolidates the FSDP2 shards
    (`sharded/`, written by any number of ranks) into one ordinary checkpoint directory."""
    source, output = Path(args.source), Path(args.output)
    if source.is_dir() and is_sharded_checkpoint(source) and output.suffix not in (".bin", ".pt"):
        export_sharded(source, output)
        print(f"wrote {output} (consolidated from the sharded checkpoint {source})")
        return
    if source.is_dir():
        dtype = getattr(torch, args.dtype or "float16")
        model = TokenFormer.from_pretrained(source)
        with atomic_path(output) as tmp:
            torch.save(export_official(model, dtype=dtype), tmp)
        print(f"wrote {output} ({model.num_parameters():,} parameters, {args.dtype or 'float16'}, official layout)")
        return
    if not source.exists() and args.source in OFFICIAL_REPOS:
        source, config = download_official(args.source)
    elif args.config is None:
        raise TokenFormerError("an official checkpoint needs --config (its .yml, or a preset name)")
    else:
        config = resolve_model_config(args.config)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tokenizer is not None:
        check_vocab_fits(tokenizer.vocab_size, config.padded_vocab_size, fix="is it the right tokenizer?")
    model = load_official(source, config, dtype=getattr(torch, args.dtype or "float32"))
    model.save_pretrained(output, tokenizer=tokenizer)
    print(f"wrote {output} ({model.num_parameters():,} parameters)")
