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

from experiments.growth.protocol import Arm, Protocol
from experiments.growth.transformer import Transformer, TransformerConfig, widen_ffn
from tokenformer.checkpoint import load_model
from tokenformer.models.config import Config
from tokenformer.models.lm import TokenFormer
from tokenformer.scaling.grow import grow
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

OUTCOME_FILE = "outcome.json"
STAGE_SEED_OFFSET = 1000  # a grown arm reads the data in a fresh order, not the windows its base saw


def train_config(p: Protocol, arm: Arm, lr: float, data: Path, save: Path) -> TrainConfig:
    """The arm's run: its own warmup and cosine decay over its steps, the protocol's shapes."""
    eval_interval = max(1, arm.steps // p.evals_per_run)
    return TrainConfig(
        data_path=str(data), train_micro_batch_size_per_gpu=p.batch, train_iters=arm.steps, lr=lr,
        min_lr=lr * p.min_lr_ratio, warmup_iters=max(1, round(p.warmup_fraction * arm.steps)),
        lr_decay_style="cosine", weight_decay=0.1, clip_grad=1.0, eval_interval=eval_interval,
        eval_iters=p.eval_iters, log_interval=eval_interval, save=str(save), save_interval=arm.steps,
        keep_last_n=1, plot=False, progress=False, num_threads=1, device="cpu",
        seed=arm.seed + (STAGE_SEED_OFFSET if arm.grown else 0))


def build_model(p: Protocol, arm: Arm, runs: Path) -> torch.nn.Module:
    """A fresh model of the arm's family and size, or its grown base."""
    torch.manual_seed(arm.seed)
    if arm.grown:
        base = runs / arm.parent / "final"
        if arm.family == "tf":
            mode = arm.kind.removeprefix("grown-")
            return grow(load_model(base), factor=p.token_factor, mode=mode, seed=arm.seed).train()
        small = Transformer.from_pretrained(base)
        return widen_ffn(small, p.ffn_width("large"), arm.kind.removeprefix("widen-"), seed=arm.seed).train()
    spec = p.model(arm.family, arm.size)
    return TokenFormer(Config(**spec)) if arm.family == "tf" else Transformer(TransformerConfig(**spec))


def run_arm(p: Protocol, arm: Arm, lr: float, data: Path, runs: Path) -> dict[str, Any]:
    """Train one arm (in a worker process) and write its outcome file."""
    torch.set_num_threads(1)
    save = runs / arm.name
    start = time.perf_counter()
    summary = train(train_config(p, arm, lr, data, save), build_model(p, arm, runs))
    latest = CheckpointManager(save).latest()
    final = save / "final"
    if final.exists():
        shutil.rmtree(final)
    latest.rename(final)  # the weights a grown arm starts from; the rest of the run is not needed
    curve = [(r["step"], r["val_loss"]) for r in read_metrics(save / "metrics.jsonl") if "val_loss" in r]
    outcome = {"arm": arm.name, "lr": lr, "settings": settings_key(p, arm, lr), "curve": curve,
               "final_val_loss": curve[-1][1], "wall_time_s": time.perf_counter() - start,
               "tokens_per_s": summary["tokens_per_s"]}
    (save / OUTCOME_FILE).write_text(json.dumps(outcome) + "\n")
    return outcome


# protocol fields that choose which arms run, not how one trains
ARM_LISTS = ("large_budgets", "small_budgets", "stage_budgets", "tf_seeds", "t_seeds", "lr_sweep")


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
            choose_lr: Callable[[dict[str, dict[str, Any]], str], float],
            say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Every arm once what it needs is done: the lr sweep first (it picks each family's lr), then
    the ladders and bases, then the grown arms of each base. `jobs` at a time (1: in this process)."""
    outcomes: dict[str, dict[str, Any]] = {}
    waiting = list(all_arms)
    pool = futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    running: dict[futures.Future, Arm] = {}

    def ready(arm: Arm) -> bool:
        if arm.kind != "sweep" and any(a.kind == "sweep" and a.family == arm.family and a.name not in outcomes
                                       for a in all_arms):
            return False
        return arm.parent is None or arm.parent in outcomes

    def record(arm: Arm, outcome: dict[str, Any], note: str) -> None:
        outcomes[arm.name] = outcome
        say(f"{arm.name}: {note} ({outcome['wall_time_s']:.0f} s), final validation loss "
            f"{outcome['final_val_loss']:.4f}")

    try:
        while waiting or running:
            for arm in [a for a in waiting if ready(a)]:
                if len(running) >= jobs and pool is not None:
                    break
                waiting.remove(arm)
                lr = arm.lr if arm.kind == "sweep" else choose_lr(outcomes, arm.family)
                earlier = finished(p, arm, lr, runs)
                if earlier is not None:
                    record(arm, earlier, "done earlier")
                elif pool is None:
                    record(arm, run_arm(p, arm, lr, data, runs), "done")
                else:
                    running[pool.submit(run_arm, p, arm, lr, data, runs)] = arm
            if running:
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for job in done:
                    record(running.pop(job), job.result(), "done")
            elif waiting and not any(ready(a) for a in waiting):
                raise RuntimeError(f"arms wait on nothing that runs: {[a.name for a in waiting]}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return outcomes
