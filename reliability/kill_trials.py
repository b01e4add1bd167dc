"""Training under SIGKILL: a tiny run killed at random moments, resumed, and compared with an
uninterrupted run.

    python -m reliability.kill_trials --trials 20

A reference run trains a tiny TokenFormer on a tiny prepared corpus (made here, in a temporary
directory) to the end, in its own process, saving a checkpoint every `--save-interval` steps. Then
each trial (re)starts the run with `--resume`, waits until its metrics reach a random step between
the one it resumed from and the last (the interpreter's start-up is no place for a kill), kills it
with SIGKILL a random fraction of one step's time later, inside the next step or the checkpoint
written after it (no handler runs: as the OOM killer or a lost node would), notes from the files on disk where
the kill landed (`mid-step`; `mid-save`: a `.tmp-step_*` folder or a temporary `latest` exists;
`mid-metrics-line`: metrics.jsonl ends inside a line; `finished`: the delay outlived the run), and
checks that the `latest` pointer names a complete checkpoint and that the checkpoint a resume
would start from loads. After `--kills-per-run` such trials on one directory, the run is resumed
to its end: it passes when its per-step training losses are bit for bit the reference's and its
final weights file is byte for byte the reference's.

Writes `reliability/results/kill_trials.json` (`--out`); the report is docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenformer.checkpoint import CHECKPOINT_NAME, load_model
from tokenformer.data.prepare import prepare
from tokenformer.files import LATEST_FILE, METRICS_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE
from tokenformer.inputs import torch_load_safe
from tokenformer.training.checkpointing import CheckpointManager

RESULTS = Path(__file__).resolve().parent / "results" / "kill_trials.json"
TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * (1 + i % 4) for i in range(300)]


def make_corpus(root: Path) -> Path:
    """A prepared byte-level corpus of a few hundred short documents."""
    source = root / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare([source], root / "data", tokenizer="byte", valid_fraction=0.05, progress=False)
    return root / "data"


def write_config(root: Path, data: Path, train_iters: int, save_interval: int) -> Path:
    config = {"model": {"name": "tiny", "seq_length": 32}, "data_path": str(data), "train_iters": train_iters,
              "train_micro_batch_size_per_gpu": 4, "lr": 3e-3, "warmup_iters": 2, "eval_interval": 10,
              "eval_iters": 2, "save_interval": save_interval, "keep_last_n": 2, "log_interval": 1,
              "plot": False, "progress": False, "device": "cpu", "num_threads": 1, "seed": 0}
    path = root / "train.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def start(config: Path, save: Path, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tokenformer", "train", str(config), "--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen, what: str) -> None:
    _, err = process.communicate(timeout=900)
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {process.returncode}:\n{err}")
    if "Traceback" in err:
        raise RuntimeError(f"{what} printed a traceback:\n{err}")


def losses(save: Path) -> dict[int, float]:
    """The per-step training losses in `save/metrics.jsonl` (validation lines have no `loss`)."""
    out = {}
    for line in (save / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def weights_digest(save: Path) -> str:
    latest = CheckpointManager(save).latest()
    return hashlib.sha256((latest / WEIGHTS_FILE).read_bytes()).hexdigest()


def phase_at_kill(save: Path) -> str:
    """Where the run was when it died, read from what it left on disk."""
    if not save.is_dir() or not (save / METRICS_FILE).is_file():
        return "startup"
    if list(save.glob(".tmp-step_*")) or list(save.glob(f".{LATEST_FILE}.*.tmp")):
        return "mid-save"
    text = (save / METRICS_FILE).read_bytes()
    if text and not text.endswith(b"\n"):
        return "mid-metrics-line"
    if not text:
        return "startup"
    return "mid-step"


def check_latest(save: Path) -> dict[str, Any]:
    """The checkpoint a resume would start from, loaded; and whether the `latest` pointer itself
    names a complete checkpoint (it may be absent before the first save)."""
    pointer = save / LATEST_FILE
    pointer_ok = None
    if pointer.is_file():
        name = pointer.read_text().strip()
        pointer_ok = bool(CHECKPOINT_NAME.fullmatch(name)) and (save / name / TRAINER_STATE_FILE).is_file()
    latest = CheckpointManager(save).latest()
    if latest is not None:
        load_model(latest)  # raises if the weights or config are damaged
        state = torch_load_safe(latest / TRAINER_STATE_FILE)
        assert isinstance(state, dict) and "step" in state, latest
    return {"latest": latest.name if latest else None, "pointer_ok": pointer_ok}


def _metrics_marker(save: Path) -> tuple[int, int] | None:
    path = save / METRICS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size


def _last_step(save: Path) -> int:
    try:
        lines = (save / METRICS_FILE).read_bytes().split(b"\n")
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", -1))
        except (ValueError, AttributeError):  # a line being written, or none yet
            continue
    return -1


def kill_during_training(config: Path, save: Path, rng: random.Random, step_s: float,
                         train_iters: int) -> dict[str, Any]:
    """Resume the run, wait until its metrics reach a random step before the last, kill it a random
    fraction of a step later (inside the next step or the save after it), and inspect what it left."""
    latest = CheckpointManager(save).latest()
    done = int(latest.name.split("_")[1]) if latest else 0
    target = rng.randrange(done, train_iters)
    before = _metrics_marker(save)
    process = start(config, save, resume=True)
    while process.poll() is None and (_metrics_marker(save) == before or _last_step(save) < target):
        time.sleep(0.005)  # start-up, then the steps before `target`: no kill lands there
    delay = rng.uniform(0.0, 1.0) * step_s
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    state = check_latest(save)
    phase = phase_at_kill(save) if killed else "finished"
    if killed and phase == "mid-step" and state["latest"] == CheckpointManager.name_of(train_iters):
        phase = "after-last-step"  # trained and saved: the kill hit the validation, plots or exit
    return {"after_step": done, "target_step": target, "delay_s": round(delay, 3), "killed": killed,
            "phase": phase, **state}


def run_chain(config: Path, save: Path, kills: int, rng: random.Random, step_s: float, train_iters: int,
              reference: dict[int, float], digest: str) -> list[dict[str, Any]]:
    """Up to `kills` kill-and-resume trials on one `save` directory (each resumes what the last one
    left; fewer if the run reaches its end first), then one resume to the end, compared with the
    reference run."""
    trials: list[dict[str, Any]] = []
    while len(trials) < kills and CheckpointManager(save).latest() != save / CheckpointManager.name_of(train_iters):
        trials.append(kill_during_training(config, save, rng, step_s, train_iters))
    finish(start(config, save, resume=True), f"resuming {save}")
    got = losses(save)
    same_losses = got == reference  # float equality: bit for bit (JSON keeps every bit of a float)
    first_diff = next((s for s in sorted(reference) if got.get(s) != reference[s]), None)
    same_weights = weights_digest(save) == digest
    for trial in trials:
        trial.update(same_losses=same_losses, first_differing_step=first_diff, same_final_weights=same_weights)
    return trials


def reference_run(config: Path, save: Path, train_iters: int) -> tuple[dict[int, float], str, float]:
    """The uninterrupted run: its losses, final weights' digest and seconds per training step
    (from its first metrics line to its last checkpoint: start-up and exit are no training)."""
    process = start(config, save, resume=False)
    while process.poll() is None and _metrics_marker(save) is None:
        time.sleep(0.02)
    began = time.perf_counter()
    while process.poll() is None and not (save / CheckpointManager.name_of(train_iters)).is_dir():
        time.sleep(0.02)
    seconds = time.perf_counter() - began
    finish(process, "the reference run")
    reference = losses(save)
    return reference, weights_digest(save), seconds / train_iters


def run(trials: int, kills_per_run: int, train_iters: int, save_interval: int, seed: int,
        out: Path | None) -> dict[str, Any]:
    """The reference run, then `trials` kills in chains of `kills_per_run`; returns (and writes) the summary."""
    rng = random.Random(seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill-trials-") as tmp:
        root = Path(tmp)
        config = write_config(root, make_corpus(root), train_iters, save_interval)
        reference, digest, step_s = reference_run(config, root / "reference", train_iters)
        results: list[dict[str, Any]] = []
        while len(results) < trials:
            chain = run_chain(config, root / f"run_{len(results):03d}", min(kills_per_run, trials - len(results)),
                              rng, step_s, train_iters, reference, digest)
            results += chain
            for number, r in enumerate(chain, start=len(results) - len(chain) + 1):
                print(f"kill {number}/{trials}: resumed at step {r['after_step']}, killed {r['delay_s']:.2f} s after "
                      f"step {r['target_step']} "
                      f"({r['phase']}), latest {r['latest']}; resumed run's losses "
                      f"{'identical' if r['same_losses'] else 'DIFFER'}", flush=True)
    phases: dict[str, int] = {}
    for r in results:
        phases[r["phase"]] = phases.get(r["phase"], 0) + 1
    summary = {"trials": trials, "kills_per_run": kills_per_run, "train_iters": train_iters,
               "save_interval": save_interval, "seed": seed, "seconds_per_step": round(step_s, 3),
               "total_s": round(time.perf_counter() - began, 1), "phases": phases,
               "all_losses_identical": all(r["same_losses"] for r in results),
               "all_final_weights_identical": all(r["same_final_weights"] for r in results),
               "unloadable_latest": sum(r["pointer_ok"] is False for r in results), "results": results}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kills, each followed by a resume (default 20)")
    parser.add_argument("--kills-per-run", type=int, default=4,
                        help="kills on one run before it is resumed to its end and compared (default 4)")
    parser.add_argument("--train-iters", type=int, default=24, help="steps of the run (default 24)")
    parser.add_argument("--save-interval", type=int, default=2, help="steps between checkpoints (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    args = parser.parse_args(argv)
    summary = run(args.trials, args.kills_per_run, args.train_iters, args.save_interval, args.seed, args.out)
    print(f"{summary['trials']} kills in {summary['total_s']:.0f} s, by phase {summary['phases']}; "
          f"losses identical in every trial: {summary['all_losses_identical']}; final weights identical: "
          f"{summary['all_final_weights_identical']}; unloadable latest: {summary['unloadable_latest']}")
    print(f"wrote {args.out}")
    return 0 if summary["all_losses_identical"] and summary["all_final_weights_identical"] \
        and not summary["unloadable_latest"] else 1


if __name__ == "__main__":
    sys.exit(main())
