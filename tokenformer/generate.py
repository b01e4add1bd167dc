"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p), streaming.

The prompt is run once (prefill); each new token then costs one position (decode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from tokenformer.errors import TokenFormerError


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, seed: int | None = None,
                    vocab_size: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one (stops after `max_new_tokens` or at `eos_id`, not yielded).

    `vocab_size` masks the padding rows of the embedding so that only real tokens are produced.
    """
    if not prompt:
        raise TokenFormerError("the prompt is empty: give at least one token")
    config = model.config
    if max_new_tokens >= config.seq_length:
        raise TokenFormerError(
            f"max_new_tokens {max_new_tokens} must be below the model's context {config.seq_length}")
    prompt = prompt[-(config.seq_length - max_new_tokens):]  # keep the end of a long prompt
    device = model.word_embeddings.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.allocate_cache(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[:, -1]  # (1, V)
    for step in range(max_new_tokens):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        token_id = int(token.item())
        if eos_id is not None and token_id == eos_id:
            return
        yield token_id
        if step + 1 < max_new_tokens:  # the last token needs no forward pass of its own
            logits = model(token[:, None], cache=cache)[:, -1]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100,
                  on_text: Callable[[str], None] | None = None, **sampling) -> str:
    """Continue `prompt`; `on_text` receives each newly decodable piece (for streaming)."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    printed = ""
    for token in generate_tokens(model, ids, max_new_tokens, eos_id=tokenizer.eos_id,
                                 vocab_size=tokenizer.vocab_size, **sampling):
        new.append(token)
        if on_text is not None:
            text = tokenizer.decode(new)
            # Hold back a trailing partial UTF-8 character until its remaining bytes arrive.
            if not text.endswith("\ufffd"):
                on_text(text[len(printed):])
                printed = text
    text = tokenizer.decode(new)
    if on_text is not None and len(text) > len(printed):
        on_text(text[len(printed):])
    return text


# ---- command line -------------------------------------------------------------------------------

def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", help="text to continue; streamed to the terminal")
    parser.add_argument("--input-file", type=Path,
                        help="official mode: one prompt per line; the continuations go to --output-file")
    parser.add_argument("--output-file", type=Path,
                        help="JSONL file for --input-file results: {\"context\", \"text\"} per line")
    parser.add_argument("--tokenizer", help="override the checkpoint's tokenizer ('byte' or a tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); higher = more random sampling")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample only from the smallest set of tokens whose probability reaches p")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations dtype (default float32)")


def cli_main(args: argparse.Namespace) -> None:
    """Generate text from a checkpoint: `--prompt` streams one continuation to the terminal;
    `--input-file`/`--output-file` continue every line of a file (the official generation mode)."""
    import json

    from tokenformer.model import TokenFormer
    from tokenformer.tokenizer import load_tokenizer

    if (args.prompt is None) == (args.input_file is None):
        raise TokenFormerError("give exactly one of --prompt or --input-file")
    if args.input_file is not None and args.output_file is None:
        raise TokenFormerError("--input-file needs --output-file to write the continuations to")
    model = TokenFormer.from_pretrained(args.checkpoint, device=args.device,
                                        dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(args.tokenizer or Path(args.checkpoint))
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise TokenFormerError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.padded_vocab_size}")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        sys.stdout.write(args.prompt)
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                      on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()), **sampling)
        sys.stdout.write("\n")
        return
    if not args.input_file.is_file():
        raise FileNotFoundError(f"input file {args.input_file} does not exist")
    prompts = [line.rstrip("\n") for line in args.input_file.read_text().splitlines() if line.strip()]
    from tqdm import tqdm

    with open(args.output_file, "w") as out:
        for prompt in tqdm(prompts, desc="generating", unit="prompt"):
            text = generate_text(model, tokenizer, prompt, args.max_new_tokens, **sampling)
            out.write(json.dumps({"context": prompt, "text": text}) + "\n")
    print(f"wrote {len(prompts)} continuations to {args.output_file}")
