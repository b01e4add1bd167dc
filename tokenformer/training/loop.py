"""The one training loop, for one process and for `torchrun`, whatever the task: `train(cfg)` trains
the task that `cfg`'s command registers (`tokenformer.training.registry`; the contract is
`tokenformer.training.tasks.base.Task`).

A step takes `gradient_accumulation_steps` micro-batches on every rank: rank r of N takes every
N-th micro-batch of the global order of samples (`micro_batch_start`), so a step's global batch is
the same for any N. The learning rate follows the schedule; gradients are clipped; checkpoints are
complete and crash-safe (`checkpointing`), and `resume` continues with the same losses as an
uninterrupted run: sample i of the global order, the RNG states and the optimizer all come back.
The loop reads the options of `training.config` and knows no particular task or model.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tokenformer.checkpoint import load_model
from tokenformer.console import note, progress_bar
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.scoring import to_device
from tokenformer.outputs import mark_dir
from tokenformer.parallel.pipeline import Pipeline, PipelineModel
from tokenformer.parallel.tokens import loss_context
from tokenformer.threads import use_threads
from tokenformer.training import growth_schedule, warm_start
from tokenformer.training.checkpointing import CheckpointManager, capture_rng, restore_rng
from tokenformer.training.config import LoopConfig
from tokenformer.training.distributed import (DistEnv, all_reduce_mean, barrier, blocks, describe_rank_failure,
                                              gradient_sync, init_distributed, maybe_fail, resume_batch_note,
                                              shutdown, unwrap, wrap_model)
from tokenformer.training.metrics import MetricsLogger, plot_loss_curve
from tokenformer.training.optim import build_optimizer, clip_gradients, lr_at
from tokenformer.training.precision import autocast_context, check_precision, grad_scaler, sharded_param_dtype
from tokenformer.training.registry import command_of
from tokenformer.training.run_folder import RunFolder
from tokenformer.training.tasks.base import Task, TaskContext


def train(cfg: Any, model: nn.Module | None = None, task: Task | None = None) -> dict[str, Any]:
    """Train `model` (default: the task's own, or `init_from`'s) on the task of `cfg`'s command and
    return a summary: steps, final train and validation loss, samples seen, last checkpoint, metrics
    and plot paths, per-step losses, and the task's own outputs (`Task.finish`).

    `cfg` is a command's config (`TrainConfig`, `VisionTrainConfig`, ...); `task` replaces the
    command's task. Under torchrun an epoch command's `batch_size` stays the global batch: rank r of
    N trains on its share of every global batch; rank 0 writes the run folder."""
    command = command_of(cfg)
    task = task or command.task(cfg)

    def body(env: DistEnv) -> dict[str, Any]:
        return run(cfg.loop_config(task.steps_per_epoch, env.dp_size), model, env, task, cfg, command.model)

    return run_distributed(cfg.device, cfg.save, body, cfg.tp_size, cfg.pp_size, claim=cfg)


def run_distributed(device: str, save: str | None, body: Callable[[DistEnv], Any], tp_size: int = 1,
                    pp_size: int = 1, claim: Any = None) -> Any:
    """`body(env)` inside the process group torchrun set up (or alone outside torchrun). A rank's
    error becomes one sentence naming the rank and the checkpoint in `save` to resume from (a bug
    keeps its traceback); the group is left at the end unless the caller had joined it already.
    `claim`, a run config, first claims `save` for its command (`tokenformer.outputs.mark_dir`)."""
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    env = init_distributed(device, tp_size=tp_size, pp_size=pp_size)
    failed = False
    try:
        if save and env.is_main and claim is not None:  # the write door, before anything is written
            mark_dir(save, claim.command, resume=claim.resume, overwrite=getattr(claim, "overwrite", False),
                     what="save folder")
        return body(env)
    except Exception as error:
        failed = True
        if not env.distributed:
            raise
        latest = RunFolder(Path(save)).checkpoints().latest() if save else None
        described = describe_rank_failure(error, env, latest)
        if described is None:
            raise
        raise described from error
    finally:
        # A failing rank leaves its group to the process's exit: its error is reported (torchrun's error
        # file) before the peers waiting on it see their connections close and report theirs. (Which
        # came first used to depend on whether torch.distributed.tensor.parallel was imported.)
        if env.distributed and not was_initialised and not failed:
            shutdown()


def micro_batch_start(consumed_samples: int, micro_step: int, rank: int, world_size: int,
                      micro_batch_size: int) -> int:
    """First global sample of this rank's micro-batch: rank r of N takes every N-th micro-batch of
    the global order, so a step's global batch is the same whatever N (for a fixed
    micro_batch_size x gradient_accumulation_steps x N)."""
    return consumed_samples + (micro_step * world_size + rank) * micro_batch_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Everything one training run holds while it runs."""

    cfg: LoopConfig
    env: DistEnv
    task: Task
    model: nn.Module              # as trained: wrapped by DDP, or sharded in place by FSDP2
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    manager: CheckpointManager | None
    sharded: bool
    warm: warm_start.WarmStart
    folder: RunFolder | None
    step: int = 0
    consumed_samples: int = 0
    resumed_from: Path | None = None
    elapsed_before: float = 0.0   # training time of the runs this one resumed
    started: float = 0.0
    growths: list[dict[str, Any]] = field(default_factory=list)  # made inside this run (`grow_at`)
    pipeline: Pipeline | None = None  # pipeline parallelism: `model` is this rank's stage

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    @property
    def units_per_step(self) -> int:
        cfg = self.cfg
        return (cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * self.env.dp_size
                * self.task.units_per_sample)

    def context(self) -> TaskContext:
        return TaskContext(self.env, self.folder, self.step)


def initial_model(cfg: LoopConfig, model: nn.Module | None, task: Task, model_class: type | None) -> nn.Module:
    """The model given, else `init_from`'s (which must be of the command's `model_class`), else the task's."""
    if model is not None:
        return model
    if not cfg.init_from:
        return task.build_model()
    model = load_model(cfg.init_from).train()
    if model_class is not None and not isinstance(model, model_class):
        raise TokenFormerError(f"init_from {cfg.init_from} holds a {type(model).__name__}, and this command trains "
                               f"a {model_class.__name__}: give a checkpoint of one")
    return model


def set_up_blocks(cfg: LoopConfig, model: nn.Module, env: DistEnv) -> None:
    """Activation checkpointing and torch.compile, for whatever model: a model honours
    `gradient_checkpointing`, and its repeated blocks (`distributed.blocks`) are compiled."""
    if cfg.checkpoint_activations and not hasattr(model, "gradient_checkpointing"):
        raise TokenFormerError(f"checkpoint_activations: a {type(model).__name__} cannot recompute its blocks "
                               f"(it has no gradient_checkpointing switch); drop the option")
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.checkpoint_activations
    if cfg.compile:
        # Block by block and in place (nn.Module.compile): parameter names stay those of the
        # checkpoints, and FSDP2 can still shard each block afterwards.
        if env.is_main:
            print("compiling the model's blocks (torch.compile): the first steps wait, 20 s or more",
                  file=sys.stderr)
        for block in blocks(model):
            block.compile()


def start_run(cfg: LoopConfig, model: nn.Module | None, env: DistEnv, task: Task,
              command_config: Any = None, model_class: type | None = None) -> Run:
    """Seed, build or load the model, let the task load its data, wrap the model for the
    parallelism, build the optimizer, and resume from the latest checkpoint when asked."""
    check_precision(cfg.precision, env.device)
    # token and pipeline parallelism shard too: their checkpoints are DCP shards, like FSDP2's
    sharded = env.distributed and (cfg.parallelism == "fsdp2" or env.mesh is not None)
    seed_everything(cfg.seed)
    model = warm_start.tune_model(cfg, initial_model(cfg, model, task, model_class))  # token tuning: base + new tokens
    use_threads(cfg.num_threads, sum(p.numel() for p in model.parameters()))
    folder = RunFolder.of(cfg.save)
    task.prepare(model, TaskContext(env, folder))
    model.to(env.device).train()
    set_up_blocks(cfg, model, env)
    warm = warm_start.prepare_model(cfg, model)  # freezes before the optimizer sees the parameters
    pipeline = Pipeline(model, env.mesh["pp"].get_group(), cfg.pp_schedule) if env.pp_size > 1 else None
    model = pipeline.stage if pipeline is not None else model
    model = wrap_model(model, env, cfg.parallelism if sharded else "ddp",
                       param_dtype=sharded_param_dtype(cfg.precision, env.device) if sharded else None)
    optimizer = build_optimizer(unwrap(model), cfg)
    warm = warm_start.start_optimizer(cfg, warm, optimizer, sharded=sharded)
    run = Run(cfg, env, task, model, optimizer, grad_scaler(cfg.precision),
              folder.checkpoints(cfg.keep_last_n, env) if folder is not None else None, sharded, warm, folder,
              step=warm.step, consumed_samples=warm.consumed_samples,
              pipeline=pipeline.start(cfg.gradient_accumulation_steps, env.device) if pipeline is not None else None)
    growth_schedule.check_run(cfg, unwrap(model), task, sharded, run.step)
    if run.manager is not None:
        resume(run)
        if env.is_main:
            source = command_config if command_config is not None else cfg
            folder.write_configs(source.command, source.to_dict(), cfg.to_dict())
    elif env.is_main:
        print("warning: no `save` directory: the trained model is not kept (pass --save DIR to keep it)",
              file=sys.stderr)
    return run


def resume(run: Run) -> None:
    """Clear a crashed save's leftovers; with `resume`, restore the latest checkpoint in place."""
    cfg, env, manager = run.cfg, run.env, run.manager
    manager.remove_leftovers()
    barrier(env)  # no rank looks for the latest checkpoint while rank 0 clears leftovers
    latest = manager.latest() if cfg.resume else None
    if latest is None:
        if cfg.resume and env.is_main:
            print(f"no checkpoint in {cfg.save}: starting from scratch", file=sys.stderr)
        return
    if cfg.grow_at:  # a checkpoint past growth steps holds the grown model: grow to its shapes first
        growth_schedule.catch_up(run, int(latest.name.rsplit("_", 1)[-1]))
    state = manager.load(latest, run.model, run.optimizer, sharded=run.sharded)
    run.task.load_state(state.get("task", {}), latest)
    run.step, run.consumed_samples = int(state["step"]), int(state["consumed_samples"])
    run.elapsed_before = float(state.get("elapsed_s", 0.0))
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    run.resumed_from = latest
    if env.is_main:
        print(f"resuming from {latest} at step {run.step} of {cfg.train_iters}")
        lr_note = resume_schedule_note(state, run.step, cfg)
        if lr_note:
            print(f"warning: {lr_note}", file=sys.stderr)
    message = resume_batch_note(state, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps,
                                env.dp_size)
    if message and env.is_main:
        print(f"warning: {message}", file=sys.stderr)


def resume_schedule_note(state: dict[str, Any], step: int, cfg) -> str | None:
    """A sentence when the learning rate the run had at `step` differs from the one the new settings give
    there (a longer `train_iters` stretches the decay, so the lr moves back up): explained, not refused,
    because extending a schedule can be what the user wants; the sentence names how not to."""
    before = (state.get("scheduler") or {}).get("lr")
    now = lr_at(max(step, 1), cfg.schedule)
    if before is None or math.isclose(before, now, rel_tol=1e-6, abs_tol=1e-12):
        return None
    saved = json.loads(state.get("train_config") or "{}")
    old_decay = saved.get("lr_decay_iters") or saved.get("train_iters")
    fix = f"; to go on at min_lr instead, pass --lr_decay_iters {old_decay}" if old_decay else ""
    return (f"the learning-rate schedule changed: at step {step} the run's lr was {before:.3g} and the new "
            f"settings give {now:.3g}{' (it moves back up)' if now > before else ''}{fix}")


def accumulated_loss(run: Run, ctx: TaskContext, by_count: bool) -> tuple[float, float]:
    """Forward and backward of this rank's micro-batches of the step: the step's loss averaged over the
    ranks, and the factor the gradients still need (1 unless the task's loss terms vary)."""
    cfg, env, model = run.cfg, run.env, run.model
    micro, accumulation = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    loss_sum, terms = torch.zeros((), device=env.device), 0
    for micro_step in range(accumulation):
        first = micro_batch_start(run.consumed_samples, micro_step, env.dp_rank, env.dp_size, micro)
        batch = to_device(run.task.train_batch(first, micro), env.device)
        with gradient_sync(model, sync=micro_step == accumulation - 1), loss_context(env.tp_size > 1):
            with autocast_context(cfg.precision, env.device):
                loss, count = run.task.loss(model, batch, ctx)
            scaled = loss * count if by_count else loss / accumulation
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach() * count if by_count else loss.detach()
        terms += count
    run.consumed_samples += micro * accumulation * env.dp_size
    if not by_count:
        return float(all_reduce_mean(loss_sum / accumulation, env)), 1.0
    # one collective: the global loss sum and term count; DDP averaged the ranks' sums
    totals = all_reduce_mean(torch.stack([loss_sum, torch.tensor(float(terms), device=env.device)]), env)
    global_loss_sum, global_terms = (totals * env.world_size).tolist()
    return global_loss_sum / global_terms, env.world_size / global_terms


def pipelined_loss(run: Run) -> float:
    """The step through the pipeline: this data-parallel rank's micro-batches, the ones `accumulated_loss`
    would take one by one, as one batch that the schedule splits again; the loss averaged over the ranks."""
    cfg, env = run.cfg, run.env
    micro, accumulation = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    batch = torch.cat([run.task.train_batch(micro_batch_start(run.consumed_samples, k, env.dp_rank, env.dp_size,
                                                              micro), micro) for k in range(accumulation)])
    with autocast_context(cfg.precision, env.device), loss_context(env.tp_size > 1):
        loss = run.pipeline.step(to_device(batch, env.device))  # (accumulation x micro, T + 1)
    run.consumed_samples += micro * accumulation * env.dp_size
    return float(all_reduce_mean(torch.tensor(loss, device=env.device), env))


def train_step(run: Run, iteration: int) -> tuple[float, float, float]:
    """One optimizer step (all its micro-batches); returns the loss averaged over the ranks, the
    learning rate and the gradient norm before clipping."""
    cfg, env, model, optimizer = run.cfg, run.env, run.model, run.optimizer
    lr = lr_at(iteration, cfg.schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    ctx = TaskContext(env, run.folder, iteration)
    # A task whose batches hold different numbers of loss terms (caption tokens) backpropagates each
    # micro-batch's sum; the gradients are divided by the step's global count below, so that the step
    # minimises the mean over every term of the global batch however it is split over ranks and
    # micro-batches. Any other task: the mean of the micro-batches' means.
    by_count = run.task.loss_terms_vary and run.pipeline is None  # the language task's terms do not vary
    if run.pipeline is not None:
        step_loss = pipelined_loss(run)
    else:
        step_loss, factor = accumulated_loss(run, ctx, by_count)
    if not math.isfinite(step_loss):
        latest = run.manager.latest() if run.manager is not None else None
        kept = f"the last good checkpoint {latest} is kept" if latest else "no checkpoint was written yet"
        raise TokenFormerError(f"the training loss became {step_loss} at step {iteration}; {kept}: "
                               f"lower lr, raise warmup or use fp32/bf16")
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)
    if by_count:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    grad_norm = run.pipeline.clip_gradients(cfg.clip_grad) if run.pipeline is not None else \
        clip_gradients(model, cfg.clip_grad)
    if run.scaler is not None:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()
    run.step = iteration
    run.task.after_step(unwrap(model), ctx)
    return step_loss, lr, grad_norm


def save_checkpoint(run: Run) -> Path | None:
    """Write checkpoint `run.step` (every rank calls this) and redraw the loss curve."""
    if run.manager is None:
        return None
    cfg, task = run.cfg, run.task
    state = {"consumed_samples": run.consumed_samples, "task": task.state(), "rng": capture_rng(),
             "scheduler": {"iteration": run.step, "lr": lr_at(max(run.step, 1), cfg.schedule)},
             "scaler": run.scaler.state_dict() if run.scaler is not None else None,
             "train_config": json.dumps(cfg.to_dict()), "world_size": run.env.world_size,
             "dp_size": run.env.dp_size,
             "elapsed_s": run.elapsed}
    path = run.manager.save(run.step, run.model, run.optimizer, state, tokenizer=task.tokenizer,
                            sharded=run.sharded, extra_files=run.warm.checkpoint_files)
    if run.env.is_main and cfg.plot:
        plot_loss_curve(run.folder.metrics, run.folder.loss_plot, title=task.plot_title, ylabel=task.loss_label,
                        validation=task.validation_label)
    return path


def validate(run: Run, logger: MetricsLogger) -> dict[str, Any] | None:
    """The task's validation record at this step, logged and shown (collective)."""
    model = PipelineModel(run.pipeline) if run.pipeline is not None else run.model
    with loss_context(run.env.tp_size > 1):
        record = run.task.evaluate(model, run.context())
    if record is None:
        return None
    record.update(step=run.step, elapsed_s=run.elapsed)  # in place: the task's own history sees them too
    logger.log(record)
    if run.env.is_main:
        note(f"{run.task.describe(record)} ({record['elapsed_s']:.0f} s)", run.cfg.progress)
    return record


def log_step(run: Run, logger: MetricsLogger, loss: float, lr: float, grad_norm: float, rate: float) -> None:
    """A metrics line of the step just taken (collective: the task's extras may all-reduce)."""
    task = run.task
    logger.log({"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                task.unit: run.consumed_samples * task.units_per_sample, f"{task.unit}_per_s": rate,
                **task.log_extras(unwrap(run.model), run.context())})


def run(cfg: LoopConfig, model: nn.Module | None, env: DistEnv, task: Task, command_config: Any = None,
        model_class: type | None = None) -> dict[str, Any]:
    """The loop: steps until `train_iters`, validating every `eval_interval` steps and saving
    every `save_interval` (and both at the end); returns the summary `train` describes."""
    state = start_run(cfg, model, env, task, command_config, model_class)
    folder = state.folder
    logger = MetricsLogger(folder.metrics if folder is not None and env.is_main else None,
                           resume_step=state.step if state.resumed_from is not None else None,
                           tensorboard_dir=cfg.tensorboard_dir if env.is_main else None,
                           wandb_project=cfg.wandb_project if env.is_main else None, run_config=cfg.to_dict())
    state.started = time.perf_counter()
    first = validate(state, logger) if task.validate_at_start and state.resumed_from is None else None
    last, last_checkpoint, losses = first, state.resumed_from, {}
    start_step, interval_start, interval_units = state.step, time.perf_counter(), 0
    bar = progress_bar(cfg.train_iters, initial=state.step, desc=task.name, unit="step",
                       enabled=cfg.progress and env.is_main)
    try:
        while state.step < cfg.train_iters:
            if (growth := growth_schedule.due(state)) is not None:
                logger.log(growth_schedule.grow_run(state, growth))
            loss, lr, grad_norm = train_step(state, state.step + 1)
            step = state.step
            maybe_fail(step, env)
            losses[step] = loss
            interval_units += state.units_per_step
            bar.update(1)
            end = step == cfg.train_iters
            if step % cfg.log_interval == 0 or end:
                now = time.perf_counter()
                rate = interval_units / max(now - interval_start, 1e-9)
                interval_start, interval_units = now, 0
                log_step(state, logger, loss, lr, grad_norm, rate)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{f"{task.unit}_s": f"{rate:,.0f}"},
                                refresh=False)
            if step % cfg.eval_interval == 0 or end:
                last = validate(state, logger) or last
            if step % cfg.save_interval == 0 or end:
                last_checkpoint = save_checkpoint(state) or last_checkpoint
    finally:
        bar.close()
        logger.close()
    outputs = task.finish(state.model, state.context())
    barrier(env)  # every rank returns once the outputs exist
    elapsed = time.perf_counter() - state.started
    plot = folder.loss_plot if folder is not None else None
    return {"step": state.step, "train_loss": losses.get(state.step),
            "val_loss_initial": first.get("val_loss") if first else None,
            "val_loss": last.get("val_loss") if last else None, "validation": last,
            f"{task.unit}_seen": state.consumed_samples * task.units_per_sample,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "metrics": str(folder.metrics) if folder is not None else None,
            "plot": str(plot) if plot is not None and plot.is_file() else None, "losses": losses,
            "wall_time_s": elapsed, "total_time_s": state.elapsed,
            f"{task.unit}_per_s": (state.step - start_step) * state.units_per_step / max(elapsed, 1e-9),
            "resumed_from": str(state.resumed_from) if state.resumed_from else None, "growths": state.growths,
            **state.warm.outputs(last_checkpoint), **outputs}
