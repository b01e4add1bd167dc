"""`tokenformer grow` and `tokenformer shrink`: checkpoints with more or fewer parameter tokens
(`tokenformer.scaling`). Both can report the mean next-token loss before and after, on windows of
the same data, with the one loss of `tokenformer.evaluation.scoring`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tokenformer.checkpoint import checkpoint_tokenizer, copy_tokenizer, load_model, resolve_checkpoint
from tokenformer.data.documents import token_documents
from tokenformer.data.tokenizer import check_vocab_fits
from tokenformer.data.windows import token_windows
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import mean_loss
from tokenformer.files import TRAINER_STATE_FILE
from tokenformer.options import MAX_SEED, number
from tokenformer.threads import add_threads_option, use_threads
from tokenformer.scaling.grow import MODES, grow_checkpoint, slot_counts
from tokenformer.scaling.shrink import SHRINK_SCALES, shrink

DATA_HELP = ("a `tokenformer prepare` directory (its valid split), an indexed dataset prefix, a .jsonl(.gz/.zst) "
             "file with a 'text' field per line, or a .txt file")


def _slot_arguments(parser: argparse.ArgumentParser, example: str, factor: Callable[[str], float]) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint to read: a model directory, a training run's `save` folder (its latest "
                        "checkpoint) or an official .bin")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    for group in ("qkv", "proj", "ffn"):
        parser.add_argument(f"--{group}-slot-num", type=number(int, minimum=1), default=None,
                            help=f"new {group} token count (default: unchanged)")
    parser.add_argument("--factor", type=factor, default=None,
                        help=f"multiply all three token counts by this factor instead (e.g. {example})")
    parser.add_argument("--seq-length", type=number(int, minimum=1), default=None,
                        help="tokens per window of --data (default: the model's seq_length, at most 512)")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=4, help="windows per forward pass (default 4)")
    add_threads_option(parser)


def _slot_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(qkv_slot_num=args.qkv_slot_num, proj_slot_num=args.proj_slot_num,
                ffn_slot_num=args.ffn_slot_num, factor=args.factor)


def _describe(model: nn.Module) -> str:
    if hasattr(model, "towers"):  # CLIP: the counts of each tower
        towers = "; ".join(f"{name} {_slot_text(tower.config)}" for name, tower in model.towers().items())
        return f"{model.num_parameters():,} parameters ({towers})"
    return f"{model.num_parameters():,} parameters ({_slot_text(model.config)})"


def _slot_text(config) -> str:
    counts = slot_counts(config)
    return f"qkv {counts['qkv_slot_num']}, proj {counts['proj_slot_num']}, ffn {counts['ffn_slot_num']} tokens"


def _data_windows(model: nn.Module, checkpoint: Path, data: Path, seq_length: int | None,
                  max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Windows (N, T + 1) of `data` for a language model's loss (those covering its first
    `max_tokens` tokens, or all), and T."""
    if getattr(model, "model_type", "tokenformer") != "tokenformer":
        raise TokenFormerError(f"--data scores a language model on text, not a {model.model_type!r} model; call "
                               f"tokenformer.shrink with batches of its own inputs")
    # --seq-length and --data-tokens are positive: their argparse types say so
    tokenizer = checkpoint_tokenizer(checkpoint)
    check_vocab_fits(tokenizer.vocab_size, model.config.padded_vocab_size, "the checkpoint's tokenizer")
    length = seq_length or min(model.config.seq_length, 512)
    documents = (ids for ids, _ in token_documents(data, tokenizer))
    max_windows = None if max_tokens is None else math.ceil(max_tokens / length)
    return token_windows(documents, tokenizer.eos_id, length, max_windows), length


def grow_arguments(parser: argparse.ArgumentParser) -> None:
    _slot_arguments(parser, "2", number(float, above=1))  # growing adds tokens, never removes them
    parser.add_argument("--mode", choices=MODES, default="exact",
                        help="exact: zero new keys and a pinned n, the same function (default); "
                             "official: random new rows as the official code, not function-preserving")
    parser.add_argument("--value-std", type=number(float, minimum=0), default=None,
                        help="std of the new value tokens (default: the model's init std, 2/num_layers/sqrt(hidden))")
    parser.add_argument("--seed", type=number(int, minimum=0, maximum=MAX_SEED), default=0,
                        help="seed of the new random rows (default 0)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"also print the loss before and after growing on these documents: {DATA_HELP}")
    parser.add_argument("--data-tokens", type=number(int, minimum=1), default=32768,
                        help="score the windows that cover the first N tokens of --data (default 32768)")


def grow_main(args: argparse.Namespace) -> None:
    """Grow a checkpoint by appending parameter tokens to every Pattention.

    `--mode exact` (default) keeps the model's function: new keys are zero and the normalisation's n
    stays at the old count. `--mode official` initialises the new rows randomly as the official
    code does. The tokenizer is copied; the growth is recorded in config.json (growth_history).
    A training checkpoint's optimizer state is mapped to the grown shapes (trainer.pt), for
    `tokenformer train --init-from OUT --init-from-optimizer --init-from-schedule continue`.
    With `--data`, the mean next-token loss before and after on the same windows is printed."""
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(args.checkpoint)
    use_threads(args.num_threads, model.num_parameters())
    model, grown = grow_checkpoint(args.checkpoint, args.out, model, mode=args.mode, value_std=args.value_std,
                                   seed=args.seed, **_slot_kwargs(args))
    print(f"old: {_describe(model)}")
    print(f"new: {_describe(grown)}  ({args.mode} growth, written to {args.out})")
    if (Path(args.out) / TRAINER_STATE_FILE).is_file():
        print(f"optimizer state and training step carried over ({TRAINER_STATE_FILE})")
    if args.data is not None:
        windows, length = _data_windows(model, args.checkpoint, args.data, args.seq_length, args.data_tokens)
        before, after = (mean_loss(m, windows.split(args.batch_size)) for m in (model, grown))
        print(f"validation loss on {args.data} ({len(windows)} windows of {length} tokens): before growing "
              f"{before:.6f}, after {after:.6f} (difference {after - before:+.2e})")


def shrink_arguments(parser: argparse.ArgumentParser) -> None:
    _slot_arguments(parser, "0.5", number(float, above=0, below=1))  # shrinking removes tokens
    parser.add_argument("--data", required=True, type=Path, help=f"calibration and validation text: {DATA_HELP}")
    parser.add_argument("--calibration-windows", type=number(int, minimum=1), default=8,
                        help="windows from the start of the data used to score the tokens (default 8)")
    parser.add_argument("--validation-windows", type=number(int, minimum=1), default=8,
                        help="windows from the end of the data, held out, for the loss before/after (default 8)")
    parser.add_argument("--scale", choices=SHRINK_SCALES, default="calibrated",
                        help="n of the normalisation afterwards: calibrated (default) keeps the kept tokens' "
                             "weights on average, pinned keeps the old n, count uses the new token count")


def shrink_main(args: argparse.Namespace) -> None:
    """Shrink a checkpoint by removing the parameter tokens that matter least.

    Every Pattention's tokens are scored by their mean |normalised weight| on the first
    `--calibration-windows` windows of `--data`; the top ones are kept and the normalisation's n is
    set so that their weights stay the same on average (`--scale`). The mean next-token loss on the
    last `--validation-windows` windows (held out) is printed before and after. The tokenizer is copied."""
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(args.checkpoint)
    use_threads(args.num_threads, model.num_parameters())
    windows, length = _data_windows(model, args.checkpoint, args.data, args.seq_length)
    needed = args.calibration_windows + args.validation_windows
    if len(windows) < needed:
        raise TokenFormerError(f"{args.data} gives {len(windows)} windows of {length + 1} tokens but "
                               f"{needed} are needed: give more data or fewer/shorter windows")
    calibration = windows[:args.calibration_windows, :-1].split(args.batch_size)
    validation = windows[len(windows) - args.validation_windows:].split(args.batch_size)
    shrunk = shrink(model, calibration=calibration, scale=args.scale, **_slot_kwargs(args))
    before, after = mean_loss(model, validation), mean_loss(shrunk, validation)
    shrunk.save_pretrained(args.out)
    copy_tokenizer(args.checkpoint, args.out)
    print(f"old: {_describe(model)}")
    print(f"new: {_describe(shrunk)}  (written to {args.out})")
    print(f"validation loss ({args.validation_windows} windows of {length} tokens): "
          f"before {before:.4f} (ppl {math.exp(before):.2f}), after {after:.4f} (ppl {math.exp(after):.2f})")
