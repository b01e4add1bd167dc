"""The optimizer side of training: AdamW with the official weight-decay groups, the learning-rate
schedule (GPT-NeoX/Megatron shape, or warmup-stable-decay), and gradient clipping."""

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


WSD_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule in optimizer steps: linear warmup, then decay to `min_lr`.

    `wsd` (warmup-stable-decay) holds `lr` after the warmup and decays only over the last
    `decay_fraction` of the `decay_iters` steps, in `decay_shape`; `rewarm_at` lists steps after
    which the lr ramps up again, linearly over `rewarm_iters` steps (growth inside a run)."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str = "cosine"  # cosine, linear, constant or wsd
    decay_fraction: float = 0.2  # wsd only
    decay_shape: str = "1-sqrt"  # wsd only: linear, cosine or 1-sqrt
    rewarm_at: tuple[int, ...] = ()
    rewarm_iters: int = 0

    @property
    def stable_until(self) -> int:
        """wsd: the last step at the peak lr; the decay takes the steps after it up to `decay_iters`."""
        return self.decay_iters - int(round(self.decay_fraction * self.decay_iters))


def decayed(lr: float, min_lr: float, progress: float, shape: str) -> float:
    """The lr a fraction `progress` (0 to 1) into a decay from `lr` to `min_lr` of `shape`:
    linear `lr - (lr - min) p`, cosine `min + (lr - min) (1 + cos(pi p)) / 2`, 1-sqrt
    `min + (lr - min) (1 - sqrt(p))`."""
    if shape == "linear":
        return lr - (lr - min_lr) * progress
    if shape == "1-sqrt":
        return min_lr + (lr - min_lr) * (1.0 - math.sqrt(progress))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(iteration: int, schedule: Schedule) -> float:
    """Learning rate of optimizer step `iteration` (1-based), the GPT-NeoX/Megatron schedule shape:
    `lr * iteration / warmup` during warmup (the first step already learns), then decay from lr to
    min_lr over the remaining `decay_iters - warmup` steps (cosine or linear, see `decayed`), then
    min_lr. `wsd`: lr until `stable_until`, then the decay of `decay_shape` to min_lr at
    `decay_iters`. A re-warm after step g scales the lr of steps g+1 .. g+rewarm_iters by
    `(iteration - g) / rewarm_iters`."""
    lr = _scheduled(iteration, schedule)
    for grown in schedule.rewarm_at:
        if grown < iteration <= grown + schedule.rewarm_iters:
            lr *= (iteration - grown) / schedule.rewarm_iters
    return lr


def _scheduled(iteration: int, schedule: Schedule) -> float:
    s = schedule
    if s.warmup_iters > 0 and iteration <= s.warmup_iters:
        return s.lr * iteration / s.warmup_iters
    if s.decay_style == "constant":
        return s.lr
    if iteration >= s.decay_iters:
        return s.min_lr
    if s.decay_style == "wsd":
        start = max(s.stable_until, s.warmup_iters)
        if iteration <= start:
            return s.lr
        return decayed(s.lr, s.min_lr, (iteration - start) / (s.decay_iters - start), s.decay_shape)
    progress = (iteration - s.warmup_iters) / max(1, s.decay_iters - s.warmup_iters)
    return decayed(s.lr, s.min_lr, progress, s.decay_style)


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
