"""Crash-safe training checkpoints and the random-number state that makes resuming exact.

A checkpoint is a folder `SAVE/step_00000100/` holding an ordinary model directory
(`config.json`, `model.safetensors`, `tokenizer.json`: `tokenformer generate --checkpoint` works
on it; the run may add files beside it, e.g. a token-tuning run's adapter) plus `trainer.pt`
(optimizer, schedule position, RNG states, data position, the task's state) and, under FSDP2,
`sharded/` (torch.distributed.checkpoint). `SAVE/latest` names the newest complete one.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from tokenformer.checkpoint import latest_checkpoint
from tokenformer.errors import TokenFormerError
from tokenformer.files import (LATEST_FILE, SHARDED_DIR, TRAINER_STATE_FILE, WEIGHTS_FILE, atomic_write_text,
                               fsync_dir, fsync_tree, training_checkpoints)
from tokenformer.inputs import read_safetensors, torch_load_safe
from tokenformer.models.pretrained import save_model
from tokenformer.parallel.pipeline import stage_states
from tokenformer.training.distributed import (DistEnv, barrier, load_full_into_sharded, load_sharded, save_sharded,
                                              unwrap)




class CheckpointWriteError(TokenFormerError, OSError):
    """A checkpoint could not be written (a full disk, most often); the previous one is kept."""


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Complete, crash-safe training checkpoints in `directory`, newest named by `latest`.

    A checkpoint is written into a hidden temporary folder, flushed, then renamed to
    `step_NNNNNNNN` (one atomic rename), and only then does `latest` (rewritten atomically) point
    at it. A crash at any moment leaves the previous checkpoint and a `latest` naming it; the
    leftover temporary folder is removed by the next run. The oldest are pruned to `keep_last_n`.
    """

    def __init__(self, directory: str | Path, keep_last_n: int = 3, env=None) -> None:
        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.env = env or DistEnv()

    @staticmethod
    def name_of(step: int) -> str:
        return f"step_{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return training_checkpoints(self.directory)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def remove_leftovers(self) -> None:
        if self.env.is_main and self.directory.is_dir():
            for path in self.directory.glob(".tmp-step_*"):
                shutil.rmtree(path, ignore_errors=True)
            for path in self.directory.glob(f".{LATEST_FILE}.*.tmp"):  # an `atomic_path` killed mid-write
                path.unlink(missing_ok=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], tokenizer=None, sharded: bool = False,
             extra_files: Sequence[Callable[[Path, nn.Module, dict | None], None]] = ()) -> Path:
        """Write checkpoint `step` (every rank calls this; rank 0 writes the files); each of
        `extra_files` is called with the folder being written, the plain model and its full state
        (None unless sharded) to add its files."""
        name = self.name_of(step)
        tmp, final = self.directory / f".tmp-{name}", self.directory / name
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        if sharded:
            save_sharded(tmp / SHARDED_DIR, model, optimizer)
            state = _full_model_state(model)
            optimizer_state = None
        else:
            state = None
            optimizer_state = optimizer.state_dict() if self.env.is_main else None
        if self.env.is_main:
            previous = self.latest()
            try:
                self._write_model(tmp, model, tokenizer, state)
                for write in extra_files:
                    write(tmp, unwrap(model), state)
                self._write_trainer_state(tmp, {**trainer_state, "optimizer": optimizer_state, "step": step})
                fsync_tree(tmp)
                self._publish(tmp, final, name)
            except (OSError, RuntimeError, SafetensorError) as e:
                full = _disk_full(e, self.directory)
                if not full and not isinstance(e, OSError) and "write" not in str(e).lower():
                    raise  # not a failed write: a bug, whose traceback helps
                shutil.rmtree(tmp, ignore_errors=True)  # `latest` still names `previous`: keep the rest
                raise self._save_error(e, step, previous, full) from None
            self.prune()
        barrier(self.env)
        return final

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        """Rename the complete folder `tmp` to `final`, then point `latest` at it."""
        if final.exists():  # a rerun over an old directory: replace it, keeping the swap atomic
            stale = self.directory / f".tmp-{name}-old"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.directory)
        atomic_write_text(self.directory / LATEST_FILE, name + "\n")

    def _save_error(self, error: Exception, step: int, previous: Path | None, full: bool) -> CheckpointWriteError:
        """The one sentence for a checkpoint that could not be written (a full disk, most often)."""
        kept = f"the previous checkpoint {previous.name} is kept" if previous else "no earlier checkpoint exists"
        if full:
            return CheckpointWriteError(f"disk full while saving checkpoint {step} to {self.directory}: {kept}; "
                                        f"free space and resume (--resume)")
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        return CheckpointWriteError(f"could not write checkpoint {step} to {self.directory} ({reason}): {kept}; "
                                    f"fix the directory and resume (--resume)")

    def _write_model(self, directory: Path, model: nn.Module, tokenizer, state: dict | None) -> None:
        plain = unwrap(model)
        # under FSDP2 `state` is the gathered full state; the sharded parameters are not
        save_model(plain, directory, tokenizer, state)

    def _write_trainer_state(self, directory: Path, state: dict[str, Any]) -> None:
        torch.save(state, directory / TRAINER_STATE_FILE)

    def prune(self) -> None:
        found = self.checkpoints()
        latest = self.latest()
        for path in found[:-self.keep_last_n]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             sharded: bool = False) -> dict[str, Any]:
        """Restore model (and optimizer) in place; return the trainer state (step, data, rng, ...)."""
        path = Path(path)
        state = torch_load_safe(path / TRAINER_STATE_FILE, what="trainer state")
        missing = [k for k in ("step", "consumed_samples", "rng") if not isinstance(state, dict) or k not in state]
        if missing:
            raise TokenFormerError(f"trainer state {path / TRAINER_STATE_FILE} lacks {missing[0]!r}: it was not "
                                   f"written by `tokenformer train`; resume from another checkpoint or start afresh")
        if not sharded and optimizer is not None and state.get("optimizer") is None \
                and (path / SHARDED_DIR).is_dir():
            sharded = True  # an FSDP2 checkpoint resumed by one process or DDP: DCP reshards it
        if sharded and (path / SHARDED_DIR).is_dir():
            load_sharded(path / SHARDED_DIR, model, optimizer)
            return state
        if sharded:  # a one-process or DDP checkpoint (full state) resumed under FSDP2
            weights = read_safetensors(path / WEIGHTS_FILE)
            load_full_into_sharded(model, optimizer, weights, state.get("optimizer"), source=str(path))
            return state
        plain = unwrap(model)
        weights = read_safetensors(path / WEIGHTS_FILE, device=next(plain.parameters()).device)
        try:
            plain.load_state_dict(weights)
        except RuntimeError as e:
            lines = str(e).splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise TokenFormerError(f"{path} holds a model of another shape than this run's ({detail}): resume "
                                   f"with the same model config, or use a new `save` directory") from None
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state


def _disk_full(error: Exception, directory: Path) -> bool:
    """Whether a failed write ran out of space. safetensors and torch.save do not always keep the
    errno (they raise their own errors), so a disk left with (almost) no free bytes counts too."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(error):
        return True
    try:
        return shutil.disk_usage(directory).free < 64 * 1024
    except OSError:
        return False


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU of rank 0; collective under FSDP2. A pipeline
    stage's is gathered on every rank of the stage (not offloaded to rank 0 alone), then the stages'
    are joined into the whole model's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    group = getattr(unwrap(model), "pipeline_group", None)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=group is None))
    return state if group is None else stage_states({k: v.cpu() for k, v in state.items()}, group)
