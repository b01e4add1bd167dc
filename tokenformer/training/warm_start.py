"""Starting a training run from another run's weights (`train --init-from DIR`), e.g. a grown model.

The choices, each a field of every training command (`training.config.WarmStartOptions`):

- `init_from_optimizer`: carry the AdamW state (moments, step count) of `DIR` instead of starting
  a fresh optimizer. `DIR` must hold a `trainer.pt` with the optimizer state: a training checkpoint
  (`SAVE/step_N`), or the output of `tokenformer grow` run on one (grow maps the state to the
  grown shapes with `grow_optimizer_state`: old rows keep their moments, new rows start at zero).
- `init_from_schedule`: `restart` (a fresh warmup and decay over `train_iters`, data from the
  start of the order: the official incremental-scaling runs) or `continue` (the step counter,
  the learning-rate schedule and the data position go on from `DIR`'s step, as a resume would:
  `train_iters` then counts the steps of the whole schedule, the source run's included).
- `freeze_old`: train only the parameter tokens added by the last growth (`scaling.freeze`).
- `tune_tokens K`: token tuning (`scaling.tune`): `DIR`'s model gets K new tokens per Pattention
  by exact growth (`tune_model`, before anything else sees the model) and only those train;
  every checkpoint then holds them as an adapter file too.

A lower peak learning rate after growth is just `lr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tokenformer.checkpoint import read_trainer_state, resolve_checkpoint
from tokenformer.errors import TokenFormerError
from tokenformer.files import ADAPTER_FILE
from tokenformer.optimizer_state import plain_name, state_by_name
from tokenformer.scaling.freeze import freeze_old_tokens
from tokenformer.scaling.tune import add_tuning_tokens, save_adapter

def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any],
                                 source: str = "the source") -> int:
    """Copy the per-parameter state (AdamW moments, step) of `state_dict` into `optimizer`, matching
    parameters by name (`param_names` of the groups, as `optim.parameter_groups` writes them).

    Unlike `optimizer.load_state_dict` this works when the two optimizers hold different subsets of
    parameters (freeze_old leaves the embedding out) and keeps `optimizer`'s own hyperparameters
    (lr, weight decay). Returns the number of parameters whose state was carried.
    """
    by_name = state_by_name(state_dict, source=f"the optimizer state of {source}",
                            fix="it was not written by `tokenformer train`, so it cannot be carried over")
    carried = 0
    for group in optimizer.param_groups:
        if "param_names" not in group:
            raise TokenFormerError("the optimizer was built without parameter names: build it with "
                                   "training.optim.build_optimizer so that state can be matched by name")
        for param, name in zip(group["params"], group["param_names"]):
            saved = by_name.get(plain_name(name))
            if saved is None:
                continue
            state = {}
            for key, value in saved.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if value.shape != param.shape:
                        raise TokenFormerError(
                            f"the optimizer state {key!r} of {name} in {source} has shape {tuple(value.shape)} "
                            f"but the parameter has {tuple(param.shape)}: grow the checkpoint with "
                            f"`tokenformer grow`, which maps the optimizer state to the new shapes")
                    value = value.to(device=param.device, dtype=param.dtype if value.is_floating_point()
                                     else value.dtype).clone()
                elif torch.is_tensor(value):
                    value = value.clone()
                state[key] = value
            optimizer.state[param] = state
            carried += 1
    return carried


@dataclass
class WarmStart:
    """Where a run that starts from `init_from` begins: step, data position, frozen rows; and what a
    token-tuning run adds to every checkpoint (`checkpoint_files`) and to its summary (`outputs`)."""

    step: int = 0
    consumed_samples: int = 0
    frozen: Any = None  # scaling.FrozenOldTokens when freeze_old
    carried_parameters: int = 0
    source_step: int | None = None
    tuning: bool = False

    @property
    def checkpoint_files(self) -> list[Callable[[Path, nn.Module, dict | None], None]]:
        """Writers `(checkpoint folder, plain model, full state or None)` of the files beside the
        weights: a token-tuning run's adapter (the tuned tokens alone)."""
        if not self.tuning:
            return []
        return [lambda folder, model, state: save_adapter(model, folder / ADAPTER_FILE, state)]

    def outputs(self, checkpoint: Path | None) -> dict[str, Any]:
        """The summary's `adapter`: the last checkpoint's adapter file of a token-tuning run."""
        return {"adapter": str(checkpoint / ADAPTER_FILE) if self.tuning and checkpoint else None}


def tune_model(cfg, model: nn.Module) -> nn.Module:
    """With `tune_tokens`: the model of init_from with that many new tokens per Pattention (exact
    growth, new values drawn from `seed`); else `model` itself."""
    if not cfg.tune_tokens:
        return model
    if not cfg.init_from:
        raise TokenFormerError("tune_tokens needs init_from: the checkpoint directory of the model to tune")
    for name in ("freeze_old", "init_from_optimizer"):
        if getattr(cfg, name):
            raise TokenFormerError(f"tune_tokens cannot be combined with {name} (the tuned model has new tokens and "
                                   f"trains only those, from a fresh optimizer): drop {name}")
    return add_tuning_tokens(model, cfg.tune_tokens, seed=cfg.seed)


def prepare_model(cfg, model: nn.Module) -> WarmStart:
    """Before the optimizer is built: check the init_from options and freeze the old tokens (those
    of the last growth, or of the base with `tune_tokens`)."""
    wants = [name for name, on in (("freeze_old", cfg.freeze_old), ("init_from_optimizer", cfg.init_from_optimizer),
                                   ("init_from_schedule continue", cfg.init_from_schedule == "continue")) if on]
    if not cfg.init_from:
        if wants:
            raise TokenFormerError(f"{wants[0]} needs init_from: the checkpoint directory to start from")
        return WarmStart()
    start = WarmStart(tuning=cfg.tune_tokens > 0)
    if cfg.tune_tokens:
        start.frozen = freeze_old_tokens(model)  # tune_model's growth is the last one
    elif cfg.freeze_old:
        history = getattr(model.config, "growth_history", None) or []
        if not history:
            raise TokenFormerError(f"freeze_old needs a grown model, but {cfg.init_from} has no growth in its "
                                   f"growth_history: grow it first with `tokenformer grow`")
        start.frozen = freeze_old_tokens(model)
    return start


def start_optimizer(cfg, start: WarmStart, optimizer: torch.optim.Optimizer, sharded: bool = False) -> WarmStart:
    """After the optimizer is built: carry its state and the schedule position from init_from."""
    if not cfg.init_from:
        return start
    if start.frozen is not None:
        start.frozen.attach(optimizer)
    needs_state = cfg.init_from_optimizer or cfg.init_from_schedule == "continue"
    source = read_trainer_state(resolve_checkpoint(cfg.init_from)) if needs_state else None
    if needs_state and source is None:
        wanted = "init_from_optimizer" if cfg.init_from_optimizer else "init_from_schedule continue"
        raise TokenFormerError(
            f"{wanted} needs the training state of {cfg.init_from}, which holds no trainer.pt: give a training "
            f"checkpoint (SAVE/step_N) or `tokenformer grow` of one, or drop {wanted.split()[0]}")
    if cfg.init_from_optimizer:
        if sharded:
            raise TokenFormerError("init_from_optimizer is not supported under FSDP2: use parallelism ddp")
        if source.get("optimizer") is None:
            raise TokenFormerError(f"{cfg.init_from} holds its optimizer state sharded (FSDP2), which cannot be "
                                   f"carried over: drop init_from_optimizer")
        start.carried_parameters = load_optimizer_state_by_name(optimizer, source["optimizer"], str(cfg.init_from))
    if source is not None:
        start.source_step = int(source["step"])
    if cfg.init_from_schedule == "continue":
        start.step, start.consumed_samples = int(source["step"]), int(source.get("consumed_samples", 0))
        if cfg.train_iters <= start.step:
            raise TokenFormerError(
                f"with init_from_schedule continue, train_iters counts the whole schedule: {cfg.train_iters} is "
                f"not beyond the step {start.step} of {cfg.init_from}; set train_iters > {start.step}")
    return start
