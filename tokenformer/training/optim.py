"""The optimizer side of training: AdamW with the official weight-decay groups, the learning-rate
schedule (GPT-NeoX/Megatron shape), and gradient clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenformer.optimizer_state import plain_name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on every matrix (Pattention key/value tokens, the embedding), none on
    vectors (the final LayerNorm's weight and bias; the per-layer norms have no parameters).
    Plain parameter names ride along (`param_names`), so that an optimizer state can be matched by
    name after growth, under another wrapper or another parallelism (`tokenformer.optimizer_state`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append((plain_name(name), p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with `cfg`'s hyperparameters (lr, weight_decay, adam_beta1/2, adam_eps: the fields of
    `TrainConfig`) and the weight-decay groups of `parameter_groups`."""
    groups = parameter_groups(model, cfg.weight_decay)
    # fused/foreach kernels differ in rounding from the loop; foreach is the default on CPU and GPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule in optimizer steps: linear warmup, then decay to `min_lr`."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str = "cosine"  # cosine, linear or constant


def lr_at(iteration: int, schedule: Schedule) -> float:
    """Learning rate of optimizer step `iteration` (1-based), the GPT-NeoX/Megatron schedule shape:
    `lr * iteration / warmup` during warmup (the first step already learns), then decay from lr to
    min_lr over the remaining `decay_iters - warmup` steps (cosine:
    `min + (lr - min) * (1 + cos(pi * progress)) / 2`, or linear), then min_lr."""
    s = schedule
    if s.warmup_iters > 0 and iteration <= s.warmup_iters:
        return s.lr * iteration / s.warmup_iters
    if s.decay_style == "constant":
        return s.lr
    if iteration >= s.decay_iters:
        return s.min_lr
    progress = (iteration - s.warmup_iters) / max(1, s.decay_iters - s.warmup_iters)
    if s.decay_style == "linear":
        return s.lr - (s.lr - s.min_lr) * progress
    return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (0: measure only); returns the norm before."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)
