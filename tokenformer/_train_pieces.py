"""TEMPORARY stand-ins for tokenformer.train's pieces (same names and signatures) until the LM
trainer is merged; then train_vision imports them from tokenformer.train and this file goes."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in m], "param_names": [n for n, _ in m], "weight_decay": wd}
              for m, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if m]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_at(iteration: int, cfg) -> float:
    warmup, decay = cfg.num_warmup_iters, cfg.decay_iters
    if warmup > 0 and iteration <= warmup:
        return cfg.lr * iteration / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if iteration >= decay:
        return cfg.min_lr
    progress = (iteration - warmup) / max(1, decay - warmup)
    if cfg.lr_decay_style == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MetricsLogger:
    def __init__(self, path, resume_step=None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self.path.write_text("")
            elif self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    def __init__(self, directory, keep_last_n: int = 3) -> None:
        self.directory, self.keep_last_n = Path(directory), keep_last_n

    def checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step_*") if (p / "trainer.pt").is_file())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def remove_leftovers(self) -> None:
        for path in self.directory.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any]) -> Path:
        from tokenformer.checkpoint import save_model_directory

        name = f"step_{step:08d}"
        tmp, final = self.directory / f".tmp-{name}", self.directory / name
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_directory(model, tmp)
        torch.save({**trainer_state, "optimizer": optimizer.state_dict(), "step": step}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for path in self.checkpoints()[:-self.keep_last_n]:
            shutil.rmtree(path, ignore_errors=True)
        return final

    def load(self, path, model, optimizer) -> dict[str, Any]:
        from safetensors.torch import load_file

        from tokenformer.checkpoint import torch_load_safe

        state = torch_load_safe(Path(path) / "trainer.pt")
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        return state
