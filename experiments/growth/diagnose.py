"""`python -m experiments.growth.diagnose [--steps 3000] [--jobs 2] RUN [RUN ...]`

The seed-2 diagnostic: the in-run protocol's large TokenFormer (`Protocol.in_run`), trained the
first `--steps` steps of its N-step WSD run (identical to it up to where its own decay starts) with
the model's initialisation and the data order seeded apart, and one setting changed at a time.
Each RUN is `name:field=value,...` over INIT (init seed), DATA (data-order seed) and the run
config's lr, warmup_iters, clip_grad, adam_beta2, adam_eps, weight_decay; e.g.
`i2d0:init=2,data=0` or `lr1e-3:init=2,data=2,lr=1e-3`. Logs the training loss and gradient norm
every 25 steps and the protocol's validation loss every 250, and prints one line a run: the
validation losses, the largest gradient norm, the share of logged steps clipped, and each
Pattention's tokens in use at `--measure-at` (the share of weights theta(s) above 0.05 on held-out
windows: how many of its parameter tokens a layer really uses). Results (one JSON
object per run) go to runs/growth-diagnose/NAME.json; a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.growth.__main__ import ROOT, prepare_corpus
from experiments.growth.protocol import Arm, Protocol
from experiments.growth.run import clear_unfinished, train_config
from tokenformer.checkpoint import load_model
from tokenformer.data.indexed import IndexedDataset
from tokenformer.models.config import Config
from tokenformer.models.lm import TokenFormer
from tokenformer.models.pattention import Pattention, normalise
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

ACTIVE = 0.05  # a parameter token takes part in a Pattention's output where its weight theta(s) exceeds this
CONFIG_FIELDS = {"lr": float, "warmup_iters": int, "clip_grad": float, "adam_beta2": float, "adam_eps": float,
                 "weight_decay": float}


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    name, _, fields = text.partition(":")
    settings: dict[str, Any] = {"init": 2, "data": 2}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        if key in ("init", "data"):
            settings[key] = int(value)
        elif key in CONFIG_FIELDS:
            settings[key] = CONFIG_FIELDS[key](value)
        else:
            raise argparse.ArgumentTypeError(f"unknown setting {key!r}: init, data, {', '.join(CONFIG_FIELDS)}")
    return name, settings


def active_shares(model: torch.nn.Module, data: Path, p: Protocol, windows: int = 16) -> dict[str, float]:
    """Each Pattention's share of (input position, parameter token) pairs whose weight exceeds
    ACTIVE, over the first `windows` held-out windows: how many of its tokens a layer really uses."""
    valid = IndexedDataset(data / "valid_text_document")
    tokens = np.concatenate([np.asarray(valid[i]) for i in range(min(len(valid), 64))])[:windows * p.seq_length]
    shares: dict[str, float] = {}

    def hook(name: str):
        def record(module: Pattention, args: tuple, _out: torch.Tensor) -> None:
            weights = normalise(args[0] @ module.key_param_tokens.T, module.norm_activation_type,
                                module.effective_scale_num)
            shares[name] = float((weights > ACTIVE).float().mean())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, Pattention)]
    with torch.no_grad():
        model.eval()(torch.tensor(tokens.astype(np.int64)).view(windows, p.seq_length))
    for handle in handles:
        handle.remove()
    return shares


def run_one(name: str, settings: dict[str, Any], steps: int, measure_at: int, data: Path, work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    p = Protocol.in_run()
    arm = Arm("tf", "large", settings["data"], 1.0, p.steps)
    save = work / name
    clear_unfinished(save)
    cfg = train_config(p, arm, p.fixed_lr[0], data, save)
    changes = {k: v for k, v in settings.items() if k in CONFIG_FIELDS}
    if "lr" in changes:
        changes["min_lr"] = changes["lr"] * p.min_lr_ratio
    # the N-step run's schedule, stopped at `steps`: WSD decays over the last 20% of train_iters, so
    # a shorter run with the same warmup is the long one up to 0.8 x its own steps
    cfg = dataclasses.replace(cfg, train_iters=steps, log_interval=25, eval_interval=250, save_interval=measure_at,
                              keep_last_n=10_000, **changes)
    torch.manual_seed(settings["init"])
    model = TokenFormer(Config(**p.model("tf", "large")))
    began = time.perf_counter()
    train(cfg, model)
    shares = active_shares(load_model(save / CheckpointManager.name_of(measure_at)), data, p)
    rows = read_metrics(save / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    logged = [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "grad_norm" in r]
    clip = changes.get("clip_grad", cfg.clip_grad)
    result = {"name": name, "settings": settings, "steps": steps, "measure_at": measure_at, "val": val,
              "train": logged, "max_grad_norm": max(g for _, _, g in logged),
              "clipped_share": sum(g > clip for _, _, g in logged) / len(logged), "active_shares": shares,
              "wall_time_s": time.perf_counter() - began}
    shutil.rmtree(save)
    (work / f"{name}.json").write_text(json.dumps(result) + "\n")
    return result


def line(result: dict[str, Any]) -> str:
    val = " ".join(f"{s}:{v:.4f}" for s, v in result["val"] if s % 500 == 0 or s == result["steps"])
    active = " ".join(f"{name.replace('layers.', 'L').replace('attention.', '')}:{share:.2f}"
                      for name, share in result.get("active_shares", {}).items())
    return (f"{result['name']:>12} {result['settings']}: {val} | max grad norm {result['max_grad_norm']:.2f}, "
            f"clipped {result['clipped_share']:.0%} ({result['wall_time_s']:.0f} s) | tokens in use: {active}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.growth.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=parse_run, metavar="RUN")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--measure-at", type=int, default=1600,
                        help="the step whose checkpoint the tokens in use are measured on (before the run's decay)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "growth-diagnose")
    parser.add_argument("--data-work", type=Path, default=ROOT / "runs" / "growth-inrun",
                        help="where the in-run experiment prepared its corpus")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data, _ = prepare_corpus(args.data_work, quick=False)
    todo = []
    for name, settings in args.runs:
        done = args.work / f"{name}.json"
        if done.is_file() and (old := json.loads(done.read_text()))["settings"] == settings and \
                (old["steps"], old.get("measure_at")) == (args.steps, args.measure_at):
            print(line(old), "(done earlier)", flush=True)
        else:
            todo.append((name, settings))
    with futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(run_one, name, settings, args.steps, args.measure_at, data, args.work)
                for name, settings in todo]
        for job in futures.as_completed(jobs):
            print(line(job.result()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
