"""Scoring a language model: the one mean next-token loss, and the log-probability of token windows.

`mean_loss` is what every loss report of the package computes (validation during training, the
before/after of `grow --data` and `shrink`): the token-weighted mean next-token cross-entropy over
(B, T + 1) windows. `score_windows` scores `(context, continuation)` pairs, the context cut on the
left to the model's length: lm-evaluation-harness requests (`tokenformer.evaluation.lm_eval`) and
the sliding windows of `perplexity`, which scores each document on its own after an end-of-text
token (the lm-eval `loglikelihood_rolling` convention).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from tokenformer.console import progress_bar
from tokenformer.errors import TokenFormerError

PAD_ID = 0  # right padding, as the official adapter does; padded positions are never scored


# ---- the mean next-token loss -------------------------------------------------------------------

def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
                    num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; logits (B, T, V), targets (B, T); targets -100 are
    not scored.

    `vocab_size` scores over the first `vocab_size` logits only (the padding rows of the embedding are
    no tokens); by default over all of them, as the official training does. `num_items` divides the
    summed loss instead of the count of scored targets (gradient accumulation over batches of unequal
    counts: transformers' `num_items_in_batch`).
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    flat_logits, flat_targets = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if num_items is None:
        loss = F.cross_entropy(flat_logits, flat_targets)
    else:
        loss = F.cross_entropy(flat_logits, flat_targets, reduction="sum") / num_items
    # vocabulary-sharded logits (token parallelism, inside `loss_parallel`): the loss is replicated
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def window_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of (B, T + 1) windows and the number of predicted tokens."""
    logits = model(batch[:, :-1])  # (B, T, V)
    return next_token_loss(logits, batch[:, 1:]), batch[:, 1:].numel()


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or a tuple/list/dict of tensors, moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: Callable = window_loss,
              weights: Sequence[float] | None = None,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean loss over `batches`, weighted by what each predicts (tokens for a language model).

    `loss_fn(model, batch) -> (mean loss, count)`; the default takes (B, T + 1) token windows.
    `weights` scale each batch's share (0 for a batch that only keeps ranks in step). Under torchrun
    every rank passes its own batches and `reduce` averages the (loss sum, count) totals over the
    ranks, so that all get the global mean. `autocast` is the precision context of the forward.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count
    for i, batch in enumerate(batches):
        weight = 1.0 if weights is None else float(weights[i])
        with autocast():
            loss, count = loss_fn(model, to_device(batch, device))
        total += torch.stack([loss.double() * count * weight,
                              torch.tensor(count * weight, dtype=torch.float64, device=device)])
    model.train(was_training)
    if reduce is not None:
        total = reduce(total)  # the mean of sums over the mean of counts is the global ratio
    if total[1] == 0:
        raise TokenFormerError("no samples to evaluate the loss on")
    return float(total[0] / total[1])


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
    bar = progress_bar(len(inputs), desc=progress or "", unit="window", enabled=progress is not None)
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
               progress: bool = True, total_documents: int | None = None) -> Perplexity:
    """Score `documents`, each `(token ids, UTF-8 byte count of its text)`, one by one.

    Each document is scored on its own with `sliding_windows` (so no document sees another).
    Windows of consecutive documents are gathered a few batches at a time, so that batches of
    short documents stay full and the progress bar moves (in documents, out of `total_documents`).
    """
    context = context or model.config.seq_length
    if context > model.config.seq_length:
        raise TokenFormerError(
            f"context {context} is longer than the model's seq_length {model.config.seq_length}")
    total, tokens, n_bytes, n_docs = 0.0, 0, 0, 0
    bar = progress_bar(total_documents, desc="perplexity", unit="doc", enabled=progress)
    group: list[tuple[list[int], list[int]]] = []
    pending = 0  # documents read but not yet scored

    def flush() -> None:
        nonlocal total, pending
        total += sum(score for score, _ in score_windows(model, group, batch_size, context))
        bar.update(pending)
        group.clear()
        pending = 0

    for ids, size in documents:
        pending += 1
        if len(ids) == 0:
            continue
        group.extend(sliding_windows(ids, prefix_id, context, stride))
        tokens += len(ids)
        n_bytes += size
        n_docs += 1
        if len(group) >= 4 * batch_size:
            flush()
    if group or pending:
        flush()
    bar.close()
    if tokens == 0:
        raise TokenFormerError("the data holds no tokens to score")
    loss = -total / tokens
    return Perplexity(loss=loss, perplexity=math.exp(min(loss, 700.0)),  # exp(700) ~ 1e304: no overflow
                      bits_per_byte=-total / math.log(2) / n_bytes if n_bytes else float("nan"),
                      tokens=tokens, bytes=n_bytes, documents=n_docs, total_log_likelihood=total)


