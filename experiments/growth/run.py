"""Running the arms of the growth experiment: each a complete training run through the package's
one training loop, two at a time in fresh processes, each leaving a finished file (`outcome.json`)
so that a killed experiment resumes where it stopped."""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from experiments.growth.protocol import IN_RUN_KINDS, Arm, Protocol, branch_interval, branch_step
from experiments.growth.transformer import Transformer, TransformerConfig, widen_ffn
from tokenformer.checkpoint import load_model
from tokenformer.errors import TokenFormerError
from tokenformer.models.config import Config
from tokenformer.models.lm import TokenFormer
from tokenformer.outputs import owner_of
from tokenformer.scaling.grow import grow
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

OUTCOME_FILE = "outcome.json"
STAGE_SEED_OFFSET = 1000  # a grown arm reads the data in a fresh order, not the windows its base saw


def train_config(p: Protocol, arm: Arm, lr: float, data: Path, save: Path, keep_every: int | None = None) -> TrainConfig:
    """The arm's run: its own warmup and decay (the protocol's schedule) over its steps, the
    protocol's shapes; an in-run arm grows at its points as `IN_RUN_KINDS` says."""
    warmup = p.steps if p.schedule == "wsd" else arm.steps  # wsd: one warmup for all, so that arms share a trunk
    eval_interval = max(1, warmup // p.evals_per_run)  # wsd: and validations at the same steps
    growth = {}
    if arm.grow_at:
        mode, optimizer, rewarm, noise = IN_RUN_KINDS[arm.family, arm.kind]
        growth = dict(grow_at=list(arm.grow_at), grow_to=[slots_to(p, arm.family, size) for size in arm.sizes()[1:]],
                      grow_mode=mode, grow_optimizer=optimizer, grow_rewarm=round(p.rewarm_fraction * p.steps) if
                      rewarm else 0, grow_noise=p.grow_noise if noise else 0.0)
    return TrainConfig(
        data_path=str(data), train_micro_batch_size_per_gpu=p.batch, train_iters=arm.steps, lr=lr,
        min_lr=lr * p.min_lr_ratio, warmup_iters=max(1, round(p.warmup_fraction * warmup)),
        lr_decay_style=p.schedule, wsd_decay_fraction=p.wsd_decay_fraction, weight_decay=0.1, clip_grad=1.0,
        eval_interval=eval_interval, eval_iters=p.eval_iters, log_interval=eval_interval, save=str(save),
        save_interval=keep_every or arm.steps, keep_last_n=10_000 if keep_every else 1,
        plot=False, progress=False, num_threads=1, device="cpu", seed=arm.seed + (STAGE_SEED_OFFSET if arm.parent else 0),
        resume=bool(arm.prefix), **growth)


def branch(p: Protocol, arm: Arm, runs: Path, save: Path) -> str | None:
    """An arm's steps up to `branch_step` are those of its trunk (`protocol.with_trunks`: the same
    seed, init, lr and data order): start it from the trunk's checkpoint there, with its metrics,
    when the trunk kept one (exact resume makes this the same as training those steps again).
    Returns the checkpoint used, or None."""
    source = runs / arm.prefix / CheckpointManager.name_of(branch_step(p, arm))
    if not source.is_dir():
        return None
    save.mkdir(parents=True)
    shutil.copytree(source, save / source.name)
    shutil.copyfile(runs / arm.prefix / "metrics.jsonl", save / "metrics.jsonl")
    return str(source.relative_to(runs))


def clear_unfinished(save: Path) -> None:
    """Remove an arm's folder that a killed run left: the training loop's output (its marker), or
    only what `branch` copied; a folder holding anything else is refused, never deleted."""
    if not save.exists():
        return
    copied = all(p.name == "metrics.jsonl" or p.name.startswith("step_") for p in save.iterdir())
    if owner_of(save) != "train" and not copied:
        raise TokenFormerError(f"{save} is not a training run's output: move it away, or choose another --work")
    shutil.rmtree(save)


def slots_to(p: Protocol, family: str, size: str) -> dict[str, int]:
    """What an in-run growth grows to: the slot counts of that size, or the Transformer's FFN width."""
    return p.slots(size) if family == "tf" else {"ffn_width": p.ffn_width(size)}


def build_model(p: Protocol, arm: Arm, runs: Path) -> torch.nn.Module:
    """A fresh model of the arm's family and size, or its grown base."""
    torch.manual_seed(arm.seed)
    if arm.parent:
        base = runs / arm.parent / "final"
        if arm.family == "tf":
            mode = arm.kind.removeprefix("grown-")
            return grow(load_model(base), factor=p.token_factor, mode=mode, seed=arm.seed).train()
        small = Transformer.from_pretrained(base)
        return widen_ffn(small, p.ffn_width("large"), arm.kind.removeprefix("widen-"), seed=arm.seed).train()
    spec = p.model(arm.family, "small" if arm.grow_at else arm.size)
    return TokenFormer(Config(**spec)) if arm.family == "tf" else Transformer(TransformerConfig(**spec))


def run_arm(p: Protocol, arm: Arm, lr: float, data: Path, runs: Path, keep_every: int | None = None,
            reuse_prefix: bool = True) -> dict[str, Any]:
    """Train one arm (in a worker process) and write its outcome file. An arm with a trunk starts
    from the trunk's checkpoint (`branch`) unless `reuse_prefix` is False; a trunk keeps a
    checkpoint every `keep_every` steps for the arms that branch from it."""
    torch.set_num_threads(1)
    save = runs / arm.name
    start = time.perf_counter()
    # an arm killed before its outcome file starts again (an in-run arm resumes its branch point and
    # must find no checkpoint of the earlier try)
    clear_unfinished(save)
    branched = branch(p, arm, runs, save) if arm.prefix and reuse_prefix else None
    summary = train(train_config(p, arm, lr, data, save, keep_every), build_model(p, arm, runs))
    latest = CheckpointManager(save).latest()
    final = save / "final"
    if final.exists():
        shutil.rmtree(final)
    latest.rename(final)  # the weights a grown arm starts from; the rest of the run is not needed
    curve = [(r["step"], r["val_loss"]) for r in read_metrics(save / "metrics.jsonl") if "val_loss" in r]
    growths = [r for r in read_metrics(save / "metrics.jsonl") if r.get("event") == "grow"]
    outcome = {"arm": arm.name, "lr": lr, "settings": settings_key(p, arm, lr), "curve": curve,
               "final_val_loss": curve[-1][1], "wall_time_s": time.perf_counter() - start,
               "tokens_per_s": summary["tokens_per_s"], "growths": growths, "branched_from": branched}
    (save / OUTCOME_FILE).write_text(json.dumps(outcome) + "\n")
    return outcome


# protocol fields that choose which arms run, not how one trains
ARM_LISTS = ("large_budgets", "small_budgets", "stage_budgets", "tf_seeds", "t_seeds", "lr_sweep", "fixed_lr",
             "grow_points", "one_point", "two_step_points")


def settings_key(p: Protocol, arm: Arm, lr: float) -> dict[str, Any]:
    """What must be equal for an earlier outcome to stand for this arm."""
    training = {k: v for k, v in p.to_dict().items() if k not in ARM_LISTS}
    return {"protocol": training, "arm": arm.name, "steps": arm.steps, "lr": lr}


def finished(p: Protocol, arm: Arm, lr: float, runs: Path) -> dict[str, Any] | None:
    path = runs / arm.name / OUTCOME_FILE
    if not path.is_file():
        return None
    outcome = json.loads(path.read_text())
    return outcome if outcome["settings"] == json.loads(json.dumps(settings_key(p, arm, lr))) else None


def run_all(p: Protocol, all_arms: list[Arm], data: Path, runs: Path, jobs: int,
            choose_lr: Callable[[Protocol, dict[str, dict[str, Any]], str], float],
            say: Callable[[str], None] = print, train_missing: bool = True) -> dict[str, dict[str, Any]]:
    """Every arm once what it needs is done: the lr sweep first (it picks each family's lr), then
    the ladders and bases, then the grown arms of each base. `jobs` at a time (1: in this process).
    `train_missing` False: only the arms finished earlier (a report on a run that was stopped)."""
    outcomes: dict[str, dict[str, Any]] = {}
    waiting = list(all_arms)
    pool = futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    running: dict[futures.Future, Arm] = {}

    def keep_every(arm: Arm) -> int | None:
        return branch_interval(p, all_arms, arm) if any(a.prefix == arm.name for a in all_arms) else None

    def ready(arm: Arm) -> bool:
        if arm.kind != "sweep" and any(a.kind == "sweep" and a.family == arm.family and a.name not in outcomes
                                       for a in all_arms):
            return False
        return all(need is None or need in outcomes for need in (arm.parent, arm.prefix))

    def record(arm: Arm, outcome: dict[str, Any], note: str) -> None:
        outcomes[arm.name] = outcome
        say(f"{arm.name}: {note} ({outcome['wall_time_s']:.0f} s), final validation loss "
            f"{outcome['final_val_loss']:.4f}")

    try:
        while waiting or running:
            for arm in list(waiting):
                if not ready(arm):  # asked as it comes: an arm finished earlier makes the next ones ready
                    continue
                if len(running) >= jobs and pool is not None:
                    break
                waiting.remove(arm)
                lr = arm.lr if arm.kind == "sweep" else choose_lr(p, outcomes, arm.family)
                earlier = finished(p, arm, lr, runs)
                if earlier is not None:
                    record(arm, earlier, "done earlier")
                elif not train_missing:
                    say(f"{arm.name}: not trained yet, left out")
                elif pool is None:
                    record(arm, run_arm(p, arm, lr, data, runs, keep_every(arm)), "done")
                    break  # in order: what this arm made ready may come before the rest
                else:
                    running[pool.submit(run_arm, p, arm, lr, data, runs, keep_every(arm))] = arm
            if running:
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for job in done:
                    record(running.pop(job), job.result(), "done")
            elif waiting and not any(ready(a) for a in waiting):
                if not train_missing:
                    break  # they wait on arms left out
                raise RuntimeError(f"arms wait on nothing that runs: {[a.name for a in waiting]}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return outcomes
