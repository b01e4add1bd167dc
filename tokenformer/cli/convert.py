"""`tokenformer convert`: the official checkpoint layout <-> ours, sharded FSDP2 checkpoints into
ordinary ones, and either into a transformers model directory (`tokenformer.models.official`,
`tokenformer.training.distributed`, `tokenformer.hf`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tokenformer.checkpoint import resolve_checkpoint
from tokenformer.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.files import TOKENIZER_FILE, atomic_path
from tokenformer.models.config import resolve_model_config
from tokenformer.models.lm import TokenFormer
from tokenformer.models.official import OFFICIAL_REPOS, download_official, export_official, load_official
from tokenformer.training.distributed import export_sharded, is_sharded_checkpoint


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an official pytorch_model.bin (or a Hub name such as "
                        "Haiyang-W/TokenFormer-150M), or one of our checkpoint directories (a sharded FSDP2 "
                        "training checkpoint step_N/ too)")
    parser.add_argument("output", help="our checkpoint directory (from official or sharded), a .bin file "
                        "(to official), or a transformers model directory (--format hf)")
    parser.add_argument("--format", choices=["native", "official", "hf"], default=None,
                        help="what to write: native (our directory), official (a .bin), or hf (a transformers "
                        "directory for AutoModelForCausalLM, needs the hf extra); default: official from one of "
                        "our directories, native from an official file or a sharded checkpoint")
    parser.add_argument("--config", help="official .yml config, a config.json (a model directory's own too), or "
                        "a preset name (150M, 450M, 900M, 1.5B) for an official source; not needed for a Hub name")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (or 'byte') to store in the output directory (the GPT-NeoX-20B one "
                        "for the released models); --format hf needs one, by default the source directory's")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written tensors (default: float32 to ours, float16 to official)")


def main(args: argparse.Namespace) -> None:
    """Convert between the official checkpoint layout, ours, and transformers'.

    official -> ours: `tokenformer convert pytorch_model.bin OUT_DIR --config 150M_eval.yml
    --tokenizer tokenizer.json` writes config.json + model.safetensors (+ tokenizer.json).
    ours -> official: `tokenformer convert CKPT_DIR pytorch_model.bin` writes the GPT-NeoX layout.
    sharded -> ours: `tokenformer convert SAVE/step_N OUT_DIR` consolidates the FSDP2 shards
    (`sharded/`, written by any number of ranks) into one ordinary checkpoint directory.
    ours or official -> transformers: `tokenformer convert SRC OUT_DIR --format hf` writes a directory
    that AutoModelForCausalLM and AutoTokenizer load (`trust_remote_code=True`, or after
    `import tokenformer.hf`) and this package reads too; needs the hf extra."""
    source, output = Path(args.source), Path(args.output)
    sharded = source.is_dir() and is_sharded_checkpoint(source)
    if source.is_dir() and not sharded:  # a training run's folder: its latest checkpoint
        source = resolve_checkpoint(source)
    kind = _format(args)
    if sharded and kind == "native":
        export_sharded(source, output)
        print(f"wrote {output} (consolidated from the sharded checkpoint {source})")
        return
    if sharded and kind == "hf":
        raise TokenFormerError(f"{source} is a sharded checkpoint: consolidate it first (tokenformer convert {source} "
                               f"DIR), then convert DIR --format hf")
    if kind == "official":
        if not source.is_dir():
            raise FileNotFoundError(f"checkpoint directory {source} does not exist: only our checkpoint directories "
                                    f"convert to the official layout")
        dtype = getattr(torch, args.dtype or "float16")
        model = TokenFormer.from_pretrained(source)
        with atomic_path(output) as tmp:
            torch.save(export_official(model, dtype=dtype), tmp)
        print(f"wrote {output} ({model.num_parameters():,} parameters, {args.dtype or 'float16'}, official layout)")
        return
    if kind == "hf":
        from tokenformer import hf  # the hf extra: one sentence without it

        model, tokenizer = _read_source(args, source)
        if tokenizer is None:
            raise TokenFormerError("--format hf needs the model's tokenizer (for AutoTokenizer): give --tokenizer "
                                   "(its tokenizer.json, or 'byte')")
        hf.save_hf_directory(model, output, tokenizer, dtype=getattr(torch, args.dtype) if args.dtype else None)
        print(f"wrote {output} ({model.num_parameters():,} parameters, transformers format)")
        return
    if source.is_dir():
        raise TokenFormerError(f"{source} is already one of our checkpoint directories: convert it to a .bin "
                               f"(official) or with --format hf")
    model, tokenizer = _read_source(args, source)
    model.save_pretrained(output, tokenizer=tokenizer)
    print(f"wrote {output} ({model.num_parameters():,} parameters)")


def _format(args: argparse.Namespace) -> str:
    """What `args` asks to write: native, official or hf (--format, else from the source)."""
    source = Path(args.source)
    sharded = source.is_dir() and is_sharded_checkpoint(source)
    return args.format or ("native" if sharded and Path(args.output).suffix not in (".bin", ".pt")
                           else "official" if source.is_dir() else "native")


def output_kind(args: argparse.Namespace) -> str:
    """Whether `args.output` is one file (the official layout) or a folder."""
    return "file" if _format(args) == "official" else "dir"


def _read_source(args: argparse.Namespace, source: Path) -> tuple[TokenFormer, Tokenizer | None]:
    """The model of `source` (our directory, an official file or a Hub name) and its tokenizer:
    --tokenizer, else the directory's own (None if there is neither)."""
    if source.is_dir():
        model = TokenFormer.from_pretrained(source, dtype=getattr(torch, args.dtype) if args.dtype else None)
        spec = args.tokenizer or (source if (source / TOKENIZER_FILE).is_file() else None)
    else:
        if not source.exists() and args.source in OFFICIAL_REPOS:
            source, config = download_official(args.source)
        elif args.config is None:
            raise TokenFormerError("an official checkpoint needs --config (its .yml, or a preset name)")
        else:
            config = resolve_model_config(args.config)
        model = None
        spec = args.tokenizer
    tokenizer = load_tokenizer(spec) if spec else None
    padded = model.config.padded_vocab_size if model is not None else config.padded_vocab_size
    if tokenizer is not None:
        check_vocab_fits(tokenizer.vocab_size, padded, fix="is it the right tokenizer?")
    if model is None:
        model = load_official(source, config, dtype=getattr(torch, args.dtype or "float32"))
    return model, tokenizer
