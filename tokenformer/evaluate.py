"""Evaluation: perplexity on token data with a sliding window, and the zero-shot tasks of the paper
through lm-evaluation-harness (`tokenformer evaluate`).

Both paths score token windows with one function, `score_windows`: a window is a
`(context, continuation)` pair of token lists, and its score is the log-probability of the
continuation given the context, with the context cut on the left to the model's length. The
harness adapter (`tokenformer.lm_eval_adapter`) feeds it the harness's requests; the perplexity
path feeds it sliding windows over documents.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from tokenformer.errors import TokenFormerError

PAD_ID = 0  # right padding, as the official adapter does; padded positions are never scored

# The official zero-shot list (spec section 6), in the order of the published table.
OFFICIAL_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")

# Which lm-eval metric each published column is: accuracy, except length-normalised accuracy
# for HellaSwag and ARC-Challenge (the convention of the TokenFormer and Mamba tables).
TABLE_METRICS = {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc",
                 "arc_easy": "acc", "arc_challenge": "acc_norm", "winogrande": "acc"}

# Published zero-shot results (spec section 6), in percent; LAMBADA perplexity as `lambada_ppl`.
# Parameter counts: TokenFormer exact (spec section 2), Pythia nominal.
PUBLISHED = {
    "Pythia-160M": dict(parameters=160e6, pile_ppl=29.64, lambada_ppl=37.25, lambada_openai=35.4,
                        hellaswag=30.3, piqa=62.3, arc_easy=43.6, arc_challenge=23.6, winogrande=51.3, avg=40.1),
    "TokenFormer-150M": dict(parameters=151_881_216, pile_ppl=10.45, lambada_ppl=16.38, lambada_openai=45.0,
                             hellaswag=35.5, piqa=64.9, arc_easy=47.3, arc_challenge=24.9, winogrande=50.4, avg=44.7),
    "Pythia-410M": dict(parameters=410e6, pile_ppl=9.95, lambada_ppl=10.84, lambada_openai=51.4,
                        hellaswag=40.6, piqa=66.9, arc_easy=52.1, arc_challenge=24.6, winogrande=53.8, avg=48.2),
    "TokenFormer-450M": dict(parameters=454_166_528, pile_ppl=8.28, lambada_ppl=7.69, lambada_openai=57.3,
                             hellaswag=47.5, piqa=69.5, arc_easy=56.2, arc_challenge=26.7, winogrande=54.6, avg=52.0),
    "Pythia-1B": dict(parameters=1.0e9, pile_ppl=7.82, lambada_ppl=7.92, lambada_openai=56.1,
                      hellaswag=47.2, piqa=70.7, arc_easy=57.0, arc_challenge=27.1, winogrande=53.5, avg=51.9),
    "TokenFormer-900M": dict(parameters=903_252_480, pile_ppl=7.38, lambada_ppl=5.46, lambada_openai=64.0,
                             hellaswag=55.3, piqa=72.4, arc_easy=59.9, arc_challenge=30.6, winogrande=56.4, avg=56.4),
    "TokenFormer-1.5B": dict(parameters=1_587_219_456, pile_ppl=6.91, lambada_ppl=5.24, lambada_openai=64.7,
                             hellaswag=60.0, piqa=74.8, arc_easy=64.8, arc_challenge=32.0, winogrande=59.7, avg=59.3),
}


# ---- scoring windows ----------------------------------------------------------------------------

@torch.no_grad()
def score_windows(model, windows: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                  max_length: int | None = None, progress: str | None = None) -> list[tuple[float, bool]]:
    """`(log p(continuation | context), is_greedy)` for every `(context, continuation)` window.

    The model reads `(context + continuation)[:-1]`, cut on the left to its last `max_length`
    tokens (default: the model's seq_length), and the last `len(continuation)` predictions are
    scored. Log-softmax runs over the padded vocabulary, in float32. Windows are run longest
    first in batches of `batch_size`, right-padded with token 0; results come back in input order.
    `is_greedy` says whether greedy decoding would have produced the whole continuation.
    """
    max_length = max_length or model.config.seq_length
    inputs, targets = [], []
    for context, continuation in windows:
        if not continuation:
            raise TokenFormerError("a window has an empty continuation: there is nothing to score")
        if len(continuation) > max_length:
            raise TokenFormerError(
                f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                f"{max_length} tokens: shorten it or raise max_length")
        tokens = (list(context) + list(continuation))[-(max_length + 1):]  # left truncation
        if len(tokens) < 2:
            raise TokenFormerError("a window needs at least one context token before its continuation")
        inputs.append(tokens[:-1])
        targets.append(list(continuation))

    # Longest first: the first batch is the largest, so running out of memory happens at once.
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
    device = model.word_embeddings.weight.device
    results: list[tuple[float, bool] | None] = [None] * len(inputs)
    bar = _progress_bar(len(inputs), progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(inputs[batch[0]])
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)  # (B, T) right-padded
        for row, i in enumerate(batch):
            ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
        logits = model(ids.to(device))  # (B, T, padded_vocab)
        for row, i in enumerate(batch):
            n, k = len(inputs[i]), len(targets[i])
            log_probs = F.log_softmax(logits[row, n - k:n].float(), dim=-1)  # (k, padded_vocab)
            target = torch.tensor(targets[i], device=device)
            total = log_probs.gather(-1, target[:, None]).double().sum().item()
            greedy = bool((log_probs.argmax(dim=-1) == target).all())
            results[i] = (total, greedy)
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def _progress_bar(total: int, description: str | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="window", disable=description is None)


# ---- perplexity -----------------------------------------------------------------------------------

def sliding_windows(tokens: Sequence[int], prefix_id: int, context: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Windows that score every token of a document exactly once, each with up to `context` tokens.

    The document is conditioned on `prefix_id` (the end-of-text token: "a document starts here").
    The first window scores the first `context` tokens; every later window scores the next
    `stride` tokens, reading the `context` tokens just before its last one (so even the last
    window has a full context). `stride == context` gives the windows of lm-eval's
    `loglikelihood_rolling`; a smaller stride gives every token more context, at more cost.
    """
    stride = stride or context
    if not 1 <= stride <= context:
        raise TokenFormerError(f"stride must be between 1 and the context length {context}, got {stride}")
    sequence = [prefix_id] + list(tokens)  # sequence[j] is predicted from sequence[:j]
    windows = []
    scored = 0  # sequence[1:scored + 1] are done
    while scored < len(tokens):
        end = min(scored + (stride if scored else context), len(tokens))  # last target: sequence[end]
        start = max(0, end - context)  # the model reads sequence[start:end]
        windows.append((sequence[start:scored + 1], sequence[scored + 1:end + 1]))
        scored = end
    return windows


@dataclass
class Perplexity:
    """Totals over every scored token: mean loss in nats/token, perplexity, bits per UTF-8 byte."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int
    total_log_likelihood: float


def perplexity(model, documents: Iterable[tuple[Sequence[int], int]], prefix_id: int,
               context: int | None = None, stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> Perplexity:
    """Score `documents`, each `(token ids, UTF-8 byte count of its text)`, one by one.

    Each document is scored on its own with `sliding_windows` (so no document sees another).
    Windows of consecutive documents are gathered a few batches at a time, so that batches of
    short documents stay full and the progress bar moves.
    """
    from tqdm import tqdm

    context = context or model.config.seq_length
    if context > model.config.seq_length:
        raise TokenFormerError(
            f"context {context} is longer than the model's seq_length {model.config.seq_length}")
    total, tokens, n_bytes, n_docs = 0.0, 0, 0, 0
    bar = tqdm(desc="perplexity", unit="tok", disable=not progress)
    group: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        nonlocal total
        total += sum(score for score, _ in score_windows(model, group, batch_size, context))
        bar.update(sum(len(continuation) for _, continuation in group))
        group.clear()

    for ids, size in documents:
        if len(ids) == 0:
            continue
        group.extend(sliding_windows(ids, prefix_id, context, stride))
        tokens += len(ids)
        n_bytes += size
        n_docs += 1
        if len(group) >= 4 * batch_size:
            flush()
    if group:
        flush()
    bar.close()
    if tokens == 0:
        raise TokenFormerError("the data holds no tokens to score")
    loss = -total / tokens
    return Perplexity(loss=loss, perplexity=math.exp(min(loss, 700.0)),  # exp(700) ~ 1e304: no overflow
                      bits_per_byte=-total / math.log(2) / n_bytes if n_bytes else float("nan"),
                      tokens=tokens, bytes=n_bytes, documents=n_docs, total_log_likelihood=total)


# ---- data for perplexity --------------------------------------------------------------------------

def read_jsonl_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The `text_field` of every line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise TokenFormerError(f"{path} line {number} is not valid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                raise TokenFormerError(
                    f"{path} line {number} has no {text_field!r} field: name the text field with --text-field")
            yield str(record[text_field])


def resolve_indexed_prefix(path: Path) -> str | None:
    """The indexed-dataset prefix that `path` names, or None: a directory from `tokenformer prepare`
    (its valid split), `PREFIX`, `PREFIX.bin`/`.idx`, or `PREFIX` standing for `PREFIX_text_document`."""
    from tokenformer.indexed_dataset import strip_suffix

    if path.is_dir():
        candidates = [path / "valid_text_document"]
    else:
        prefix = strip_suffix(path)
        candidates = [Path(prefix), Path(prefix + "_text_document")]
    for prefix in candidates:
        if Path(f"{prefix}.idx").is_file():
            return str(prefix)
    return None


def load_documents(path: str | Path, tokenizer, text_field: str = "text",
                   limit: int | None = None) -> Iterator[tuple[list[int], int]]:
    """`(token ids, UTF-8 bytes of the text)` per document of a JSONL file, a text file (one
    document) or an indexed dataset.

    JSONL and text files are encoded with `tokenizer`. Indexed documents are used as stored (a trailing
    end-of-text token, as GPT-NeoX's preprocessing appends, is scored too); their byte count is
    that of the decoded text without end-of-text tokens. The path is checked at once; the
    documents are read as they are consumed.
    """
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        return _jsonl_documents(path, tokenizer, text_field, limit)
    if path.name.endswith((".txt", ".txt.gz")):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        return iter([(tokenizer.encode(text), len(text.encode("utf-8")))])
    prefix = resolve_indexed_prefix(path)
    if prefix is None:
        raise FileNotFoundError(
            f"{path} is neither a .jsonl or .txt file, an indexed dataset prefix (PREFIX.bin + PREFIX.idx) "
            f"nor a directory written by `tokenformer prepare`")
    from tokenformer.indexed_dataset import IndexedDataset

    _check_data_tokenizer(Path(prefix).parent, tokenizer)
    return _indexed_documents(IndexedDataset(prefix), tokenizer, limit)


def _jsonl_documents(path: Path, tokenizer, text_field: str, limit: int | None):
    for i, text in enumerate(read_jsonl_texts(path, text_field)):
        if limit is not None and i >= limit:
            return
        yield tokenizer.encode(text), len(text.encode("utf-8"))


def _indexed_documents(dataset, tokenizer, limit: int | None):
    doc_starts = dataset.doc_idx  # document d is items doc_starts[d] .. doc_starts[d + 1]
    for d in range(len(doc_starts) - 1):
        if limit is not None and d >= limit:
            return
        ids = [int(t) for i in range(int(doc_starts[d]), int(doc_starts[d + 1])) for t in dataset[i]]
        text = tokenizer.decode(t for t in ids if t != tokenizer.eos_id)
        yield ids, len(text.encode("utf-8"))


def _check_data_tokenizer(directory: Path, tokenizer) -> None:
    """Refuse data tokenized with another vocabulary than the model's (the scores would be noise)."""
    from tokenformer.tokenizer import load_tokenizer

    if not (directory / "tokenizer.json").is_file():
        return
    data_tokenizer = load_tokenizer(directory)
    if data_tokenizer.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise TokenFormerError(
            f"the data in {directory} was tokenized with another tokenizer than the checkpoint's: "
            f"prepare it again with the checkpoint's tokenizer.json")


# ---- the published table --------------------------------------------------------------------------

def nearest_published(parameters: int) -> tuple[str, str]:
    """The published TokenFormer and Pythia models closest in size (by ratio of parameter counts)."""
    def closest(family: str) -> str:
        names = [n for n in PUBLISHED if n.startswith(family)]
        return min(names, key=lambda n: abs(math.log(PUBLISHED[n]["parameters"] / parameters)))

    return closest("TokenFormer"), closest("Pythia")


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from lm-eval's `results["results"]` (the `,none` filter only)."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name == "none" and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                scores.setdefault(task, {})[metric] = float(value)
    return scores


def comparison_table(scores: dict[str, dict[str, float]], parameters: int) -> str:
    """A Markdown table: our metric per task beside the published numbers of the nearest sizes."""
    ours_tf, ours_pythia = nearest_published(parameters)
    header = (f"| task | metric | ours ({_human(parameters)} params) | {ours_tf} | {ours_pythia} |\n"
              f"| --- | --- | --- | --- | --- |\n")
    rows, accuracies = [], []
    tasks = [t for t in OFFICIAL_TASKS if t in scores] + sorted(t for t in scores if t not in OFFICIAL_TASKS)
    for task in tasks:
        metrics = scores[task]
        if task == "lambada_openai" and "perplexity" in metrics:
            rows.append(f"| {task} | perplexity | {metrics['perplexity']:.2f} | "
                        f"{PUBLISHED[ours_tf]['lambada_ppl']:.2f} | {PUBLISHED[ours_pythia]['lambada_ppl']:.2f} |")
        metric = TABLE_METRICS.get(task) or ("acc" if "acc" in metrics else next(iter(metrics), None))
        if metric is None or metric not in metrics:
            continue
        value = 100 * metrics[metric] if metric.startswith("acc") else metrics[metric]
        if task in TABLE_METRICS:
            accuracies.append(value)
        rows.append(f"| {task} | {metric} | {value:.1f} | {_published(ours_tf, task)} | {_published(ours_pythia, task)} |")
        if len(accuracies) == len(OFFICIAL_TASKS) and task == OFFICIAL_TASKS[-1]:
            rows.append(f"| average | acc | {sum(accuracies) / len(accuracies):.1f} | "
                        f"{PUBLISHED[ours_tf]['avg']:.1f} | {PUBLISHED[ours_pythia]['avg']:.1f} |")
    return header + "\n".join(rows) + "\n"


def _published(model: str, task: str) -> str:
    value = PUBLISHED[model].get(task)
    return "-" if value is None else f"{value:.1f}"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# ---- zero-shot tasks through lm-evaluation-harness ------------------------------------------------

def require_lm_eval():
    """Import lm-eval, or explain in one sentence how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise TokenFormerError(
            'lm-evaluation-harness is not installed: pip install "tokenformer[eval]"') from None
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = (), builtin_tasks: bool = True):
    """lm-eval's `TaskManager` over its own tasks and the `include_path` folders, after checking
    that every folder exists and every task is known.

    `builtin_tasks=False` skips indexing lm-eval's own task tree (about 10 s), for runs that use
    only local tasks.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"task folder {folder} (--include-path) does not exist")
    manager = TaskManager(include_path=[str(p) for p in include_path] or None, include_defaults=builtin_tasks)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = "in lm-eval or --include-path" if builtin_tasks else "in --include-path"
        raise TokenFormerError(
            f"unknown task {', '.join(unknown)}: there is no task of that name {where} "
            f"(`lm_eval ls tasks` lists lm-eval's own)")
    return manager


def run_tasks(lm, tasks: Sequence[str], manager, limit: int | float | None = None,
              num_fewshot: int = 0) -> dict:
    """Run lm-eval `tasks` (from `manager`, see `task_manager`) on an adapter `lm` (a
    `TokenFormerLM`); lm-eval's results dict, without per-sample logs."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=False, bootstrap_iters=0)


# ---- command line ---------------------------------------------------------------------------------

def cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--tasks", default=",".join(OFFICIAL_TASKS),
                        help=f"comma-separated lm-eval tasks (default: the paper's list, {','.join(OFFICIAL_TASKS)})")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAML files to add (repeatable)")
    parser.add_argument("--no-builtin-tasks", action="store_true",
                        help="use only the tasks of --include-path (skips indexing lm-eval's own tasks, ~10 s)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per question (default 0, as published)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N examples of each task (or N documents of --data): for quick checks")
    parser.add_argument("--data", type=Path, default=None,
                        help="perplexity mode: a .jsonl(.gz) file, a .txt file (one document), an indexed dataset prefix, "
                             "or a directory from `tokenformer prepare` (its valid split)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in --data (default text)")
    parser.add_argument("--stride", type=int, default=None,
                        help="perplexity mode: new tokens scored per window (default: the context, "
                             "i.e. disjoint windows; smaller gives each token more context)")
    parser.add_argument("--context", type=int, default=None,
                        help="perplexity mode: tokens the model reads per window (default: its seq_length)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows or requests per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations dtype (default float32); scores are always float32")
    parser.add_argument("--output", type=Path, default=Path("eval_results.json"),
                        help="where to write the results JSON (default eval_results.json)")


def cli_main(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint: zero-shot lm-eval tasks (default: the paper's six), or perplexity on `--data`.

    Tasks: prints a Markdown table of our scores beside the published TokenFormer and Pythia
    numbers of the nearest size, and writes lm-eval's results to --output. Needs the `eval` extra
    (pip install "tokenformer[eval]"); the tasks' data is downloaded by lm-eval on first use.

    Perplexity (`--data`): every document is scored on its own after an end-of-text token, with a
    sliding window (--context, --stride); prints loss (nats/token), perplexity and bits per UTF-8
    byte of the text.
    """
    from tokenformer.model import TokenFormer
    from tokenformer.tokenizer import load_tokenizer

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no config.json: give a directory written by save_pretrained or `tokenformer convert`")
    for name, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--stride", args.stride),
                        ("--context", args.context)):
        if value is not None and value < 1:
            raise TokenFormerError(f"{name} must be a positive integer, got {value}")
    if args.num_fewshot < 0:
        raise TokenFormerError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if args.data is None:  # check the tasks before spending time on loading the model
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise TokenFormerError("--tasks is empty: name at least one lm-eval task")
        manager = task_manager(tasks, args.include_path, builtin_tasks=not args.no_builtin_tasks)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TokenFormerError(f"--device {args.device} asked for, but CUDA is not available here: use --device cpu")
    model = TokenFormer.from_pretrained(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(checkpoint)
    parameters = model.num_parameters()

    if args.data is not None:
        documents = load_documents(args.data, tokenizer, args.text_field, args.limit)
        result = perplexity(model, documents, tokenizer.eos_id, context=args.context, stride=args.stride,
                            batch_size=args.batch_size)
        report = dict(checkpoint=str(checkpoint), parameters=parameters, data=str(args.data),
                      context=args.context or model.config.seq_length,
                      stride=args.stride or args.context or model.config.seq_length, **asdict(result))
        _write_json(args.output, report)
        print(f"| data | documents | tokens | loss (nats/token) | perplexity | bits per byte |\n"
              f"| --- | --- | --- | --- | --- | --- |\n"
              f"| {args.data} | {result.documents} | {result.tokens} | {result.loss:.4f} | "
              f"{result.perplexity:.3f} | {result.bits_per_byte:.4f} |")
        print(f"wrote {args.output}")
        return

    from tokenformer.lm_eval_adapter import TokenFormerLM

    lm = TokenFormerLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    results = run_tasks(lm, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot)
    scores = task_scores(results["results"])
    table = comparison_table(scores, parameters)
    report = dict(checkpoint=str(checkpoint), parameters=parameters, tasks=tasks, num_fewshot=args.num_fewshot,
                  limit=args.limit, scores=scores, published=dict(zip(("tokenformer", "pythia"),
                                                                      nearest_published(parameters))),
                  table=table, lm_eval=_plain(results))
    _write_json(args.output, report)
    sys.stdout.write(table)
    print(f"wrote {args.output}")


def lm_eval_cli() -> None:
    """`tokenformer-lm-eval`: lm-eval's command line with the `tokenformer` model registered
    (see `tokenformer.lm_eval_adapter`); without lm-eval, one line naming the extra to install."""
    try:
        require_lm_eval()
    except TokenFormerError as e:
        print(f"tokenformer-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    from tokenformer.lm_eval_adapter import main

    main()


def _plain(results: dict) -> dict:
    """lm-eval's results with only JSON-friendly values (it holds numpy numbers and functions)."""
    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=str))


def _write_json(path: Path, value: dict) -> None:
    from tokenformer.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
