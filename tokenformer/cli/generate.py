"""`tokenformer generate`: text from a checkpoint with the KV cache (`tokenformer.generate`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tokenformer.checkpoint import checkpoint_tokenizer, load_model, model_type_of, resolve_checkpoint
from tokenformer.cli.caption import caption_main
from tokenformer.console import progress_bar
from tokenformer.data.tokenizer import check_vocab_fits
from tokenformer.decode import Decoder
from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_write_text
from tokenformer.generate import generate_batch, generate_text
from tokenformer.inputs import read_text
from tokenformer.options import MAX_SEED, number
from tokenformer.models.captioner import Captioner
from tokenformer.models.lm import TokenFormer
from tokenformer.threads import add_threads_option, use_threads
from tokenformer.training.distributed import resolve_device

DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


MAX_NEW_TOKENS = 10**6  # a continuation is held in memory (--output-file) and generated one token a step


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint: a model directory (config.json, model.safetensors, tokenizer.json), a training run's "
                        "`save` folder (its latest checkpoint), or an official .bin (with --tokenizer)")
    parser.add_argument("--prompt", help="text to continue; streamed to the terminal")
    parser.add_argument("--input-file", type=Path,
                        help="official mode: one prompt per line; the continuations go to --output-file")
    parser.add_argument("--output-file", type=Path,
                        help="JSONL file for --input-file results: {\"context\", \"text\"} per line")
    parser.add_argument("--image", type=Path, action="append",
                        help="with a captioner checkpoint: an image to caption (repeat for more; one caption a line)")
    parser.add_argument("--tokenizer", help="override the checkpoint's tokenizer ('byte' or a tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=number(int, minimum=0, maximum=MAX_NEW_TOKENS), default=None,
                        help="tokens to generate (default 100; past the model's context the window slides, "
                        "except for --batch-size above 1, whose default stays below the context)")
    parser.add_argument("--temperature", type=number(float, minimum=0), default=0.0,
                        help="0 = greedy (default); higher = more random sampling")
    parser.add_argument("--top-k", type=number(int, minimum=1), default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=number(float, above=0, maximum=1), default=None,
                        help="sample only from the smallest set of tokens whose probability reaches p")
    parser.add_argument("--seed", type=number(int, minimum=0, maximum=MAX_SEED), default=None,
                        help="random seed for sampling (reproducible output)")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=1,
                        help="--input-file mode: prompts generated together, left-padded (default 1; greedy "
                        "output is the same at any batch size)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        type=lambda name: DTYPE_ALIASES.get(name, name),
                        help="weights and activations dtype: float32 (fp32, default), bfloat16 (bf16), float16 (fp16)")
    parser.add_argument("--static-cache", action="store_true",
                        help="decode with tokenformer.decode.Decoder: weights in the decode layout, a static KV cache")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token step (implies --static-cache; the first call compiles)")
    parser.add_argument("--int8", action="store_true",
                        help="int8 key/value parameter tokens and head (implies --static-cache; on CPU pair it "
                        "with --dtype bf16, the dtype the int8 kernel is fast for)")
    add_threads_option(parser)


def main(args: argparse.Namespace) -> None:
    """Generate text from a checkpoint: `--prompt` streams one continuation to the terminal;
    `--input-file`/`--output-file` continue every line of a file (the official generation mode).
    With a captioner checkpoint (`tokenformer train-captioner`), `--image PATH` (repeatable) prints
    one caption per image."""
    if args.image is not None or model_type_of(args.checkpoint) == Captioner.model_type:
        return caption_main(args)
    if (args.prompt is None) == (args.input_file is None):
        raise TokenFormerError("give exactly one of --prompt or --input-file")
    if args.input_file is not None and args.output_file is None:
        raise TokenFormerError("--input-file needs --output-file to write the continuations to")
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, device=resolve_device(args.device), dtype=getattr(torch, args.dtype),
                       expect=TokenFormer)
    use_threads(args.num_threads, model.num_parameters())
    if args.static_cache or args.compile or args.int8:
        if args.input_file is not None and args.batch_size > 1:
            raise TokenFormerError("--static-cache, --compile and --int8 decode one prompt at a time: "
                                   "use --batch-size 1 with them, or drop them")
        if args.compile:
            print("compiling the one-token step (torch.compile): the first token waits, about 20 s on a CPU",
                  file=sys.stderr)
        model = Decoder(model, int8=args.int8, compile=args.compile)
    tokenizer = checkpoint_tokenizer(checkpoint, args.tokenizer)
    check_vocab_fits(tokenizer.vocab_size, model.config.padded_vocab_size,
                     fix="give the checkpoint's own tokenizer (--tokenizer)")
    if args.max_new_tokens is None:
        batched = args.input_file is not None and args.batch_size > 1
        args.max_new_tokens = min(100, model.config.seq_length - 1) if batched else 100
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        sys.stdout.write(args.prompt)
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                      on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()), **sampling)
        sys.stdout.write("\n")
        return
    text = read_text(args.input_file, "input file", "give a UTF-8 text file of one prompt per line")
    prompts = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    lines = []
    bar = progress_bar(len(prompts), desc="generating", unit="prompt")
    for start in range(0, len(prompts), args.batch_size):
        group = prompts[start:start + args.batch_size]
        if len(group) == 1:  # one prompt: exactly what --prompt gives it (sampling too)
            texts = [generate_text(model, tokenizer, group[0], args.max_new_tokens, **sampling)]
        else:
            new = generate_batch(model, [tokenizer.encode(p) for p in group],
                                 args.max_new_tokens, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size,
                                 pad_id=tokenizer.eos_id, **sampling)
            texts = [tokenizer.decode(ids) for ids in new]
        lines += [json.dumps({"context": p, "text": t}) + "\n" for p, t in zip(group, texts)]
        bar.update(len(group))
    bar.close()
    atomic_write_text(args.output_file, "".join(lines))
    print(f"wrote {len(prompts)} continuations to {args.output_file}")
