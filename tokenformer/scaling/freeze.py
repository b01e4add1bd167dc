"""Training only the parameter tokens added by a growth: the "freeze old" variant of incremental
scaling (the official runs train everything; freezing is said to be more stable but slightly worse)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.scaling.grow import old_slot_counts, pattention_groups


class FrozenOldTokens:
    """Keeps the old parameters of a grown model fixed while its new rows train.

    Masking gradients is not enough with AdamW: decoupled weight decay (`p -= lr * wd * p`) and
    momentum from an earlier state move a row whose gradient is zero. So the old rows are
    snapshotted and copied back after every optimizer step (`restore`, registered as a step
    post-hook when an optimizer is given): bit-identical whatever the optimizer does. Their
    gradients are also zeroed (so gradient clipping measures the trainable rows only). Tensors
    with no new rows (embedding, final norm) get `requires_grad = False`; AdamW skips them.
    """

    def __init__(self, model: nn.Module, old_counts: Mapping[str, int] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        old_counts = dict(old_slot_counts(model.config) if old_counts is None else old_counts)
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._frozen_whole: list[nn.Parameter] = []
        partial: set[int] = set()
        for f, layers in pattention_groups(model).items():
            n_old = old_counts.get(f)
            for name, layer in layers.items():
                if n_old is None or n_old > layer.num_tokens:
                    raise TokenFormerError(
                        f"old count {f}={n_old} does not fit {name} with {layer.num_tokens} tokens")
                if n_old == layer.num_tokens:
                    continue  # nothing new here: frozen whole below
                for param in (layer.key_param_tokens, layer.value_param_tokens):
                    partial.add(id(param))
                    self._snapshots.append((param, param.detach()[:n_old].clone()))
                    self._handles.append(param.register_hook(_zero_rows_hook(n_old)))
        for param in model.parameters():
            if id(param) not in partial and param.requires_grad:
                param.requires_grad_(False)
                self._frozen_whole.append(param)
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the old rows after every step of `optimizer` (one built after freezing, which
        then leaves out the tensors frozen whole)."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the old rows back (call after `optimizer.step()` unless an optimizer was given)."""
        for param, old_rows in self._snapshots:
            param[:old_rows.shape[0]].copy_(old_rows)

    def remove(self) -> None:
        """Unfreeze: drop the hooks and make every frozen tensor trainable again."""
        for handle in self._handles:
            handle.remove()
        for param in self._frozen_whole:
            param.requires_grad_(True)
        self._handles, self._snapshots, self._frozen_whole = [], [], []


def _zero_rows_hook(n_old: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0
        return grad
    return hook


def freeze_old_tokens(model: nn.Module, old_counts: Mapping[str, int] | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> FrozenOldTokens:
    """Train only the rows added by the last growth (`old_counts` default: from the history).

    With `optimizer`, the old rows are restored after each of its steps; without, call
    `.restore()` after each step yourself. `.remove()` undoes everything.
    """
    return FrozenOldTokens(model, old_counts, optimizer)
