"""Training under faults: a full disk while saving a checkpoint (injected ENOSPC at each write of
the save path, and a real size-limited tmpfs where this machine allows mounting one), what a
killed run leaves behind (a torn metrics line, temporary files), and the SIGKILL trials of
`reliability.kill_trials` (one kill in CI; `TOKENFORMER_SLOW_TESTS=1` for four, `python -m
reliability.kill_trials` is the full drill)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import safetensors.torch

from reliability import kill_trials
from tokenformer.__main__ import main
from tokenformer.data.prepare import prepare
from tokenformer.errors import TokenFormerError
from tokenformer.outputs import MARKER_FILE
from tokenformer.training import checkpointing
from tokenformer.training.checkpointing import CheckpointManager, CheckpointWriteError
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_module")

TEXTS = [f"def g_{i}(y):\n    return y - {i}\n" * (1 + i % 3) for i in range(40)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    source = root / "c.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare([source], root / "data", tokenizer="byte", valid_fraction=0.1, progress=False)
    return root / "data"


def config(data: Path, save: Path, **changes) -> TrainConfig:
    values = dict(model={"name": "tiny", "seq_length": 16}, data_path=str(data), train_iters=6,
                  train_micro_batch_size_per_gpu=2, eval_interval=100, eval_iters=1, save_interval=3,
                  log_interval=1, lr=3e-3, warmup_iters=1, lr_decay_iters=6, progress=False, plot=False, device="cpu",
                  save=str(save), seed=3)
    values.update(changes)
    return TrainConfig(**values)


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written_then_no_space(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)  # the disk filled up part-way through the file
    no_space()


# the writes of a checkpoint, in order: weights (safetensors), trainer state (torch.save), `latest`
INJECTIONS = {
    "weights": (safetensors.torch, "save_file", half_written_then_no_space),
    "trainer state": (checkpointing.torch, "save", no_space),
    "latest pointer": (checkpointing, "atomic_write_text", no_space),
}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[int, float]:
    return train(config(data, tmp_path_factory.mktemp("whole") / "run"))["losses"]


@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys, uninterrupted,
                                                                where):
    save = tmp_path / "run"
    train(config(data, save, train_iters=3))
    kept = tree_hash(save / "step_00000003")
    module, name, replacement = INJECTIONS[where]
    monkeypatch.setattr(module, name, replacement)
    argv = ["train", "--model", "{name: tiny, seq_length: 16}", "--data_path", str(data), "--train_iters", "6",
            "--train_micro_batch_size_per_gpu", "2", "--eval_interval", "100", "--eval_iters", "1",
            "--save_interval", "3", "--log_interval", "1", "--lr", "3e-3", "--warmup_iters", "1", "--lr_decay_iters", "6", "--progress",
            "false", "--plot", "false", "--device", "cpu", "--save", str(save), "--seed", "3", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tokenformer train: error: disk full while saving checkpoint 6 to {save}: the previous "
                   f"checkpoint step_00000003 is kept; free space and resume (--resume)")
    monkeypatch.undo()
    assert (save / "latest").read_text().strip() == "step_00000003"
    assert tree_hash(save / "step_00000003") == kept
    leftovers = [p.name for p in save.rglob(".*") if p.name != MARKER_FILE]
    assert leftovers == [], leftovers  # no half-written temporary file or folder
    # when the pointer could not be moved, the new checkpoint is complete but not the latest one
    assert (save / "step_00000006").exists() == (where == "latest pointer")
    summary = train(config(data, save, resume=True))  # space freed: resume, same losses as never stopped
    assert summary["resumed_from"] == str(save / "step_00000003")
    assert [r["loss"] for r in read_metrics(save / "metrics.jsonl") if "loss" in r] == \
        [uninterrupted[s] for s in sorted(uninterrupted)]


def test_another_write_error_is_one_sentence_too(data, tmp_path, monkeypatch):
    save = tmp_path / "run"
    monkeypatch.setattr(checkpointing.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint 3 to .*run \(Input/output error\): "
                                                   r"no earlier checkpoint exists"):
        train(config(data, save, train_iters=3))
    assert not list(save.glob(".tmp-*"))


def _try_mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk_keeps_the_previous_checkpoint(data, tmp_path):
    """A 1.2 MB tmpfs holds one checkpoint of the tiny model but not two: the second save fills it."""
    disk = tmp_path / "small-disk"
    if not _try_mount_tmpfs(disk, "1200k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount privileges)")
    try:
        save = disk / "run"
        with pytest.raises(TokenFormerError, match=rf"disk full while saving checkpoint (6|9) to {save}: the previous "
                                                   rf"checkpoint step_0000000(3|6) is kept"):
            train(config(data, save, train_iters=12, keep_last_n=5))
        latest = CheckpointManager(save).latest()
        assert latest is not None and (save / "latest").read_text().strip() == latest.name
        assert [p.name for p in save.glob(".*")] == [MARKER_FILE]
        kill_trials.check_latest(save)  # the kept checkpoint loads
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_torn_metrics_line_and_leftover_temporary_files_are_cleared_on_resume(data, tmp_path, uninterrupted):
    """What a SIGKILL leaves: a metrics line cut short, a half-written `latest`, a checkpoint folder
    that was never renamed. The resumed run reads past them and gives the uninterrupted losses."""
    save = tmp_path / "run"
    train(config(data, save, train_iters=3))
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')
    (save / ".latest.abc123.tmp").write_text("step_000")
    (save / ".tmp-step_00000006").mkdir()
    assert kill_trials.phase_at_kill(save) == "mid-save"
    summary = train(config(data, save, resume=True))
    assert summary["step"] == 6 and [p.name for p in save.glob(".*")] == [MARKER_FILE]
    losses = [r["loss"] for r in read_metrics(save / "metrics.jsonl") if "loss" in r]
    assert losses == [uninterrupted[s] for s in sorted(uninterrupted)]


def test_phase_at_kill_reads_the_files_a_run_left(tmp_path):
    save = tmp_path / "run"
    assert kill_trials.phase_at_kill(save) == "startup"
    save.mkdir()
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert kill_trials.phase_at_kill(save) == "mid-step"
    (save / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    assert kill_trials.phase_at_kill(save) == "mid-metrics-line"


def test_a_damaged_latest_pointer_is_reported_by_the_drill(data, tmp_path):
    save = tmp_path / "run"
    train(config(data, save, train_iters=3))
    (save / "latest").write_text("step_0000009")
    state = kill_trials.check_latest(save)
    assert state == {"latest": "step_00000003", "pointer_ok": False}


def test_sigkilled_runs_resume_to_the_same_losses():
    """One kill at a random moment of a 4-step run, resumed to its end: three Python processes (the
    reference, the killed run, the resume), so it runs in CI too. TOKENFORMER_SLOW_TESTS=1 makes it
    two chains of two kills on a 6-step run (about five processes); the full drill is
    `python -m reliability.kill_trials`."""
    slow = os.environ.get("TOKENFORMER_SLOW_TESTS") == "1"
    trials, kills, steps = (2, 2, 6) if slow else (1, 1, 4)
    summary = kill_trials.run(trials=trials, kills_per_run=kills, train_iters=steps, save_interval=1, seed=1, out=None)
    assert summary["all_losses_identical"] and summary["all_final_weights_identical"]
    assert summary["unloadable_latest"] == 0 and len(summary["results"]) == trials

