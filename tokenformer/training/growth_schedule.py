"""Growth inside one training run (`grow_at`): the model gains parameter tokens part-way through and
the same run goes on, as staged training does (one schedule, one data order, one optimizer).

When: each `grow_at` point is an optimizer step g (or a fraction of `train_iters`, rounded); the
model grows after step g is taken, logged, validated and saved, before step g + 1. So checkpoint
`step_g` holds the model before that growth and every later checkpoint the grown one.

How: `tokenformer.scaling.grow` (exact: the grown model computes the same function; official: the
official random rows; `grow_noise` perturbs the old tokens too), or the model's own `grow` method,
by `grow_factor` or to the slot counts of `grow_to`, the new rows drawn from a generator seeded by
`seed` and the growth's index (the same on every rank and after a resume).

The optimizer: `carry` (default) maps the AdamW state with `grow_optimizer_state`: the old tokens
keep their moments and step count, the new tokens start at zero moments; `fresh` starts a new
AdamW. The schedule goes on where it was; `grow_rewarm` ramps the lr up again after each growth
(`optim.Schedule.rewarm_at`).

Resume: a run resumed from a checkpoint past k growth points grows its freshly built model k times
(shapes only: weights and optimizer state then come from the checkpoint); resumed at a growth
step, it grows at that step as the uninterrupted run did.

Refused, by name: FSDP2 (re-sharding a grown model and its optimizer mid-run is not built),
compile, token tuning and freeze_old, and whatever a task refuses (`Task.growth_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.options import option
from tokenformer.scaling.grow import grow, grow_optimizer_state, slot_counts
from tokenformer.training.distributed import unwrap, wrap_model
from tokenformer.training.optim import build_optimizer

GROW_OPTIMIZERS = ("carry", "fresh")


@dataclass
class GrowthOptions:
    """Growing the model inside the run (`training.growth_schedule`)."""

    grow_at: list[float] = option("grow the model after these optimizer steps (whole numbers) or fractions of "
                                  "train_iters (in (0, 1)), and go on with the same run; several make a chain "
                                  "(S -> M -> L)", default_factory=list)
    grow_factor: float = option("each growth multiplies every slot count by this (unless grow_to)", above=1,
                                default=2.0)
    grow_to: Any = option("instead of grow_factor: one mapping of slot counts per grow_at point, e.g. "
                          "[{qkv_slot_num: 64, proj_slot_num: 64, ffn_slot_num: 256}] (YAML or Python)",
                          default=None)
    grow_mode: str = option("exact (the grown model computes the same function) or official (random new "
                            "rows, the normalisation follows the new count); to save compute grow once at 0.25 "
                            "with official: it paid on every seed measured (docs/growing.md)", default="exact")
    grow_optimizer: str = option("carry: old tokens keep their AdamW moments, new tokens start at zero; "
                                 "fresh: a new AdamW at each growth", default="carry")
    grow_rewarm: int = option("after each growth, ramp the lr linearly from 0 back to the schedule's over this "
                              "many steps (0: no re-warm, the schedule goes on)", minimum=0, default=0)
    grow_noise: float = option("add N(0, this x each tensor's std) to the old parameter tokens at each growth (the "
                               "official author's suggestion; 0: none, exact growth stays exact)", minimum=0, default=0.0)


def growth_steps(points: list[float], train_iters: int) -> list[int]:
    """The optimizer steps after which the model grows: whole numbers as they are, fractions in
    (0, 1) of `train_iters` rounded; each in 1 .. train_iters - 1, increasing."""
    steps = []
    for point in points:
        if 0 < point < 1:
            step = int(round(point * train_iters))
        elif point >= 1 and float(point).is_integer():
            step = int(point)
        else:
            raise TokenFormerError(f"grow_at {point!r} is neither an optimizer step (a whole number) nor a "
                                   f"fraction of the run in (0, 1)")
        if not 1 <= step < train_iters:
            raise TokenFormerError(f"grow_at {point!r} is step {step}, outside steps 1 .. {train_iters - 1} of this "
                                   f"{train_iters}-step run (the model grows after a step, before the next)")
        steps.append(step)
    if steps != sorted(set(steps)):
        raise TokenFormerError(f"grow_at must name increasing, distinct steps; it gives steps {steps}")
    return steps


def targets(cfg) -> list[dict[str, Any]]:
    """What each growth passes to `grow` besides its mode and seed: the slot counts of `grow_to`,
    else `factor`; checked against `grow_at`."""
    if cfg.grow_to is None:
        return [{"factor": cfg.grow_factor} for _ in cfg.grow_at]
    grow_to = cfg.grow_to
    if isinstance(grow_to, str):
        import yaml

        grow_to = yaml.safe_load(grow_to)
    if isinstance(grow_to, Mapping):
        grow_to = [grow_to]
    if not isinstance(grow_to, list) or not all(isinstance(t, Mapping) for t in grow_to) \
            or len(grow_to) != len(cfg.grow_at):
        raise TokenFormerError(f"grow_to must be a list of {len(cfg.grow_at)} slot-count mappings, one per grow_at "
                               f"point (e.g. [{{ffn_slot_num: 256}}]), got {cfg.grow_to!r}")
    return [dict(t) for t in grow_to]


def check_options(cfg) -> None:
    """The growth options' own checks (a config's `validate`): targets, and what cannot grow mid-run."""
    if not cfg.grow_at:
        if cfg.grow_to is not None:
            raise TokenFormerError("grow_to needs grow_at: the steps at which to grow to those slot counts")
        return
    targets(cfg)
    if hasattr(cfg, "train_iters"):
        growth_steps(cfg.grow_at, cfg.train_iters)
    for name, why in (("tune_tokens", "token tuning trains only its added tokens of a frozen model"),
                      ("freeze_old", "it freezes the tokens of init_from's growth, not of the run's"),
                      ("compile", "the compiled blocks would have to be compiled again at each growth")):
        if getattr(cfg, name):
            raise TokenFormerError(f"grow_at cannot be combined with {name}: {why}; drop one of them")


def check_run(cfg, model: nn.Module, task, sharded: bool, start_step: int) -> None:
    """Before the run: refuse growth where the run cannot grow, each time naming why."""
    if not cfg.grow_at:
        return
    if sharded:
        raise TokenFormerError("grow_at is not supported under FSDP2 (the sharded model and optimizer would have to "
                               "be sharded again at each growth): use parallelism ddp")
    reason = task.growth_refusal()
    if reason:
        raise TokenFormerError(f"this task cannot use grow_at: {reason}")
    if not hasattr(model, "towers") and not own_growth(model):
        if not hasattr(model, "config"):
            raise TokenFormerError(f"grow_at: a {type(model).__name__} has no config with slot counts to grow")
        slot_counts(model.config)  # names the missing field of a model that cannot grow
    early = [s for s in growth_steps(cfg.grow_at, cfg.train_iters) if s < start_step]
    if early:
        raise TokenFormerError(f"grow_at step {early[0]} comes before step {start_step}, where this run starts "
                               f"from init_from: give later steps")


def grow_run(run, index: int, carry: bool | None = None) -> dict[str, Any]:
    """Growth number `index` of `run` (a `loop.Run`), in place: the grown model, wrapped again for
    DDP, and a new optimizer over it, holding the carried moments (`carry`, default the option)
    or none. Returns the metrics record of the growth."""
    cfg, env = run.cfg, run.env
    old = unwrap(run.model)
    before = sum(p.numel() for p in old.parameters())
    how = dict(mode=cfg.grow_mode, seed=cfg.seed + 1 + index, **targets(cfg)[index],
               **({"noise": cfg.grow_noise} if cfg.grow_noise else {}))
    grown = old.grow(**how) if own_growth(old) else grow(old, **how)
    grown.to(env.device).train()
    carry = cfg.grow_optimizer == "carry" if carry is None else carry
    state = grow_optimizer_state(run.optimizer.state_dict(), old, grown) if carry else None
    run.model = wrap_model(grown, env, "ddp")
    run.optimizer = build_optimizer(grown, cfg)
    if state is not None:
        run.optimizer.load_state_dict(state)
    history = getattr(grown.config, "growth_history", None) or [{}]
    record = {"step": run.step + 1, "event": "grow", "grown_after": run.step, "growth": index + 1,
              "parameters_before": before, "parameters": sum(p.numel() for p in grown.parameters()),
              "slots_from": history[-1].get("from"), "slots_to": history[-1].get("to"), "mode": cfg.grow_mode,
              "optimizer": "carry" if carry else "fresh", "rewarm": cfg.grow_rewarm}
    run.growths.append(record)
    return record


def own_growth(model: nn.Module) -> bool:
    """A model class may grow itself: a method `grow(mode=, seed=, **target)` returning the grown
    copy (the growth experiment's Transformer control widens its FFN so)."""
    return callable(getattr(model, "grow", None))


def catch_up(run, checkpoint_step: int) -> None:
    """Before loading a checkpoint of step `checkpoint_step`: grow the model through every growth
    the run had made by then (the steps before it), so that the shapes match."""
    for index, step in enumerate(growth_steps(run.cfg.grow_at, run.cfg.train_iters)):
        if step < checkpoint_step and index >= len(run.growths):
            grow_run(run, index, carry=False)  # the checkpoint's optimizer state replaces it


def due(run) -> int | None:
    """The index of the growth due before the next step, if any."""
    steps = growth_steps(run.cfg.grow_at, run.cfg.train_iters) if run.cfg.grow_at else []
    index = len(run.growths)
    return index if index < len(steps) and steps[index] == run.step else None
