"""`tokenformer evaluate`: zero-shot lm-eval tasks beside the published numbers, or perplexity on
data; and `tokenformer-lm-eval`, lm-eval's own command line with the `tokenformer` model."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from tokenformer.data.documents import count_documents, token_documents
from tokenformer.checkpoint import checkpoint_tokenizer, load_model, resolve_checkpoint
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.published import OFFICIAL_TASKS, comparison_table, nearest_published, task_scores
from tokenformer.evaluation.scoring import perplexity
from tokenformer.files import atomic_write_text
from tokenformer.models.lm import TokenFormer
from tokenformer.options import number
from tokenformer.threads import add_threads_option, use_threads
from tokenformer.training.distributed import resolve_device


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint: a model directory (config.json, model.safetensors, tokenizer.json), a "
                        "training run's `save` folder (its latest checkpoint), or an official .bin (with --tokenizer)")
    parser.add_argument("--tokenizer", default=None,
                        help="override the checkpoint's tokenizer ('byte' or a tokenizer.json; an official .bin needs it)")
    parser.add_argument("--tasks", default=",".join(OFFICIAL_TASKS),
                        help=f"comma-separated lm-eval tasks (default: the paper's list, {','.join(OFFICIAL_TASKS)})")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAML files to add (repeatable)")
    parser.add_argument("--no-builtin-tasks", action="store_true",
                        help="use only the tasks of --include-path (skips indexing lm-eval's own tasks, ~10 s)")
    parser.add_argument("--num-fewshot", type=number(int, minimum=0), default=0, help="few-shot examples per question (default 0, as published)")
    parser.add_argument("--limit", type=number(int, minimum=1), default=None,
                        help="only the first N examples of each task (or N documents of --data): for quick checks")
    parser.add_argument("--data", type=Path, default=None,
                        help="perplexity mode: a .jsonl(.gz) file, a .txt file (one document), an indexed dataset prefix, "
                             "or a directory from `tokenformer prepare` (its valid split)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in --data (default text)")
    parser.add_argument("--stride", type=number(int, minimum=1), default=None,
                        help="perplexity mode: new tokens scored per window (default: the context, "
                             "i.e. disjoint windows; smaller gives each token more context)")
    parser.add_argument("--context", type=number(int, minimum=1), default=None,
                        help="perplexity mode: tokens the model reads per window (default: its seq_length)")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=8, help="windows or requests per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations dtype (default float32); scores are always float32")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the results as JSON to this file (default: print only)")
    add_threads_option(parser)


def main(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint: zero-shot lm-eval tasks (default: the paper's six), or perplexity on `--data`.

    Tasks: prints a Markdown table of our scores beside the published TokenFormer and Pythia
    numbers of the nearest size; `--output` also writes lm-eval's results as JSON. Needs the `eval` extra
    (pip install "tokenformer[eval]"); the tasks' data is downloaded by lm-eval on first use.

    Perplexity (`--data`): every document is scored on its own after an end-of-text token, with a
    sliding window (--context, --stride); prints loss (nats/token), perplexity and bits per UTF-8
    byte of the text.
    """
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.data is None:  # check the tasks before spending time on loading the model
        from tokenformer.evaluation import lm_eval as harness  # the `eval` extra (one sentence without it)

        harness.require_lm_eval()

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise TokenFormerError("--tasks is empty: name at least one lm-eval task")
        manager = harness.task_manager(tasks, args.include_path, builtin_tasks=not args.no_builtin_tasks)
    model = load_model(checkpoint, device=resolve_device(args.device), dtype=getattr(torch, args.dtype),
                       expect=TokenFormer)
    use_threads(args.num_threads, model.num_parameters())
    tokenizer = checkpoint_tokenizer(checkpoint, args.tokenizer)
    parameters = model.num_parameters()

    if args.data is not None:
        documents = token_documents(args.data, tokenizer, args.text_field, args.limit)
        result = perplexity(model, documents, tokenizer.eos_id, context=args.context, stride=args.stride,
                            batch_size=args.batch_size,
                            total_documents=count_documents(args.data, args.text_field, args.limit))
        report = dict(checkpoint=str(checkpoint), parameters=parameters, data=str(args.data),
                      context=args.context or model.config.seq_length,
                      stride=args.stride or args.context or model.config.seq_length, **asdict(result))
        print(f"| data | documents | tokens | loss (nats/token) | perplexity | bits per byte |\n"
              f"| --- | --- | --- | --- | --- | --- |\n"
              f"| {args.data} | {result.documents} | {result.tokens} | {result.loss:.4f} | "
              f"{result.perplexity:.3f} | {result.bits_per_byte:.4f} |")
        _write_json(args.output, report)
        return

    lm = harness.TokenFormerLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    results = harness.run_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot)
    scores = task_scores(results["results"])
    table = comparison_table(scores, parameters)
    report = dict(checkpoint=str(checkpoint), parameters=parameters, tasks=tasks, num_fewshot=args.num_fewshot,
                  limit=args.limit, scores=scores, published=dict(zip(("tokenformer", "pythia"),
                                                                      nearest_published(parameters))),
                  table=table, lm_eval=_plain(results))
    sys.stdout.write(table)
    _write_json(args.output, report)


def lm_eval_main() -> None:
    """`tokenformer-lm-eval`: lm-eval's command line with the `tokenformer` model registered
    (see `tokenformer.evaluation.lm_eval`); without lm-eval, one line naming the extra to install."""
    try:
        from tokenformer.evaluation import lm_eval as harness

        harness.require_lm_eval()
    except TokenFormerError as e:
        print(f"tokenformer-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    harness.main()


def _plain(results: dict) -> dict:
    """lm-eval's results with only JSON-friendly values (it holds numpy numbers and functions)."""
    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=str))


def _write_json(path: Path | None, value: dict) -> None:
    """With --output, the results as JSON there (and a line saying so); without, nothing."""
    if path is not None:
        atomic_write_text(path, json.dumps(value, indent=2) + "\n")
        print(f"wrote {path}")
