"""Training throughput of one process against torchrun processes on the same global batch, for the
language model (`tokenformer train`, tokens/s, DDP and FSDP2) or the image classifier
(`tokenformer train-vision`, images/s, DDP).

    python -m bench.distributed_speed [--preset small] [--micro-batch 4] [--steps 20] [--nproc 2]
    python -m bench.distributed_speed --task vision [--preset fmnist-28] [--batch 128] [--steps 60] \
        [--log-interval 10] [--nproc 2]
    (both: [--device cpu|cuda|auto] [--dtype fp32|bf16])

Every run is the real command in a subprocess, on synthetic data written here: one process with
every core, one process with one thread, then `torchrun --standalone --nproc_per_node=nproc` for
each parallelism. The rate is read from SAVE/metrics.jsonl: the median over logging intervals after
the first (warm-up).

- `--task lm` (default): a random byte corpus; one process with micro batch `nproc x micro-batch`,
  each rank with micro batch `micro-batch`, so every optimizer step sees the same windows.
- `--task vision`: random 28x28 grey images of 10 classes in the MNIST IDX layout, `steps x batch`
  of them, trained for one epoch, so every run is exactly `steps` steps of the global batch `batch`
  (train-vision splits it over the ranks). No augmentation; the test set is 64 images, and its
  evaluation and the checkpoint at the end of the epoch come after the last timed interval anyway.

Prints a table with the ratio to the faster one-process run (all cores, or one thread) and writes
bench/results/distributed_speed.json (lm) or bench/results/distributed_speed_vision.json (vision).
Not a test: the numbers depend on the machine and on what else runs on it (the 1-minute load
average before and after is recorded).

One process uses every core (intra-op threads); each torchrun rank gets cores / nproc threads, so
on a CPU the comparison is intra-op threading against data parallelism on the same cores. On GPUs
(`--device cuda`) every rank takes one GPU. `--dtype` is the language model's training `precision`
(bf16: autocast, and FSDP2's bf16 compute on a GPU; train-vision runs fp32 only). Each language
model row also gives its MFU: analytic matmul FLOPs (`tokenformer.flops`) per second against
`bench.common.peak_flops` (a GPU's datasheet figure times the ranks, or a matmul measured here with
every core); the vision model has no FLOP count in `tokenformer.flops`, so no MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.common import add_device_arguments, peak_flops, resolve
from tokenformer import Config
from tokenformer.flops import tokenformer_flops
from tokenformer.training.distributed import usable_cores

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


# ---- synthetic data -----------------------------------------------------------------------------

def write_corpus(directory: Path, num_tokens: int, vocab: int = 256, seed: int = 0) -> Path:
    """Random byte 'documents' in the `tokenformer prepare` layout (throughput ignores the text)."""
    from tokenformer import ByteTokenizer
    from tokenformer.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    writer = IndexedDatasetWriter(directory / "train_text_document", dtype=np.uint16)
    written = 0
    while written < num_tokens:
        size = int(rng.integers(200, 2000))
        writer.add_item(rng.integers(0, vocab, size).tolist())
        written += size
    writer.close()
    tokenizer = ByteTokenizer()
    tokenizer.save(directory / "tokenizer.json")
    (directory / "prepare.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size,
                                                        "eod_id": tokenizer.eos_id}))
    return directory


def write_images(directory: Path, num_train: int, image_size: int = 28, num_classes: int = 10,
                 num_test: int = 64, seed: int = 0) -> Path:
    """Random grey images and labels in the MNIST IDX layout (throughput ignores the pixels)."""
    from tokenformer.data.images import write_idx

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        # unpacked names: gzip would spend its time on incompressible noise
        write_idx(directory / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, image_size, image_size), dtype=np.uint8))  # (N, H, W)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, num_classes, n, dtype=np.uint8))
    return directory


# ---- runs shared by both tasks --------------------------------------------------------------------

def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def timed_run(command: str, fields: dict[str, Any], save: Path, nproc: int, rate_key: str,
              parallelism: str = "ddp", threads: int | None = None, device: str = "cpu") -> dict:
    """`tokenformer COMMAND --field value ...` in one process, or under torchrun with `nproc` ranks;
    returns its table row: the median `rate_key` over logging intervals after the first, and the
    last train loss."""
    fields = {**fields, "save": str(save), "plot": "false", "progress": "false", "device": device, "seed": 1}
    if threads is not None:
        fields["num_threads"] = threads
    overrides = [token for key, value in fields.items() for token in (f"--{key}", str(value))]
    launcher = [sys.executable, "-m", "tokenformer"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "tokenformer"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([*launcher, command, *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {nproc}-process {parallelism} `tokenformer {command}` run failed:\n"
                         f"{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r[rate_key] for r in records if rate_key in r][1:]  # drop the warm-up interval
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return {"processes": nproc, "parallelism": parallelism if nproc > 1 else "none",
            "threads_per_process": threads or max(1, usable_cores() // nproc),
            rate_key: statistics.median(rates), "intervals": len(rates), "final_loss": losses[max(losses)]}


def compare(command: str, fields_for: Callable[[int, str], dict[str, Any]], workdir: Path, nproc: int,
            parallelisms: list[str], rate_key: str, device: str = "cpu") -> list[dict]:
    """The rows of one process and of `nproc` ranks per parallelism, each with its ratio to the
    faster one-process run; `fields_for(nproc, parallelism)` gives the command's fields."""
    # one process with every core, and with one thread: on a busy machine intra-op threads
    # can lose badly to contention, so the faster of the two is the baseline
    rows = [timed_run(command, fields_for(1, "ddp"), workdir / f"single-{threads}", 1, rate_key, threads=threads,
                      device=device)
            for threads in sorted({usable_cores(), 1}, reverse=True)]
    rows += [timed_run(command, fields_for(nproc, parallelism), workdir / parallelism, nproc, rate_key, parallelism,
                       device=device)
             for parallelism in parallelisms]
    single = max(row[rate_key] for row in rows if row["processes"] == 1)
    for row in rows:
        row["speedup_vs_1_process"] = row[rate_key] / single
    return rows


def report(rows: list[dict], rate_key: str, title: str, settings: dict[str, Any], out: Path,
           load_before: float | None, load_after: float | None) -> None:
    """Print the table and write the rows, `settings` and the machine to `out` (JSON)."""
    label = rate_key.replace("_per_s", "/s")  # tokens/s, images/s
    print(f"{title}, {usable_cores()} CPU cores, torch {torch.__version__}, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'processes':>9}  {'parallelism':<11}{'threads':>8}{label:>12}{'vs 1 process':>14}{'final loss':>12}"
          f"{'MFU' if 'mfu' in rows[0] else '':>8}")
    for row in rows:
        print(f"{row['processes']:>9}  {row['parallelism']:<11}{row['threads_per_process']:>8}"
              f"{row[rate_key]:>12,.0f}{row['speedup_vs_1_process']:>13.2f}x{row['final_loss']:>12.4f}"
              + (f"{row['mfu']:>8.3f}" if "mfu" in row else ""))
    if "peak_source" in rows[0]:
        print(f"(MFU against the {rows[0]['peak_source']})")
    print("(vs 1 process: against the faster one-process run; equal final losses show the same training)")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": rows, **settings, "cpu_cores": usable_cores(),
                               "load_average_1min": [load_before, load_after], "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine()}, indent=2) + "\n")
    print(f"wrote {out}")


# ---- the two tasks ---------------------------------------------------------------------------------

def lm_runs(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], dict[str, Any], str]:
    """`tokenformer train`: the rows, the settings for the JSON and the table's title."""
    global_batch = args.micro_batch * args.accumulation * args.nproc
    corpus = write_corpus(workdir / "corpus", num_tokens=(args.steps + 1) * global_batch * (args.seq + 1))

    def fields_for(nproc: int, parallelism: str) -> dict[str, Any]:
        # tp and pp: all the ranks are one model (no data parallelism), so each takes the whole batch
        layout = {"tp": {"tp_size": nproc}, "pp": {"pp_size": nproc}}.get(parallelism, {}) if nproc > 1 else {}
        whole = nproc == 1 or bool(layout)
        return {"model": json.dumps({"name": args.preset, "seq_length": args.seq}), "data_path": str(corpus),
                "train_iters": args.steps, "log_interval": args.log_interval, "eval_iters": 0,
                "save_interval": 10 * args.steps, "parallelism": "ddp" if layout else parallelism,
                "train_micro_batch_size_per_gpu": args.micro_batch * (args.nproc if whole else 1),
                "gradient_accumulation_steps": args.accumulation, "precision": args.dtype, **layout}

    rows = compare("train", fields_for, workdir, args.nproc, args.parallelism, "tokens_per_s", args.device)
    run = resolve(args)
    peak, source = peak_flops(run.device, args.dtype)
    per_token = tokenformer_flops(Config.from_name(args.preset, seq_length=args.seq)).training().total
    for row in rows:  # GPUs add up; CPU ranks share the cores the peak was measured on
        row["mfu"] = row["tokens_per_s"] * per_token / (peak * (row["processes"] if run.cuda else 1))
        row["peak_source"] = source
    settings = {"preset": args.preset, "seq": args.seq, "global_batch": global_batch,
                "micro_batch_per_rank": args.micro_batch, "accumulation": args.accumulation, "steps": args.steps}
    return rows, settings, f"{args.preset}, seq {args.seq}, global batch {global_batch} windows, {args.steps} steps"


def vision_runs(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], dict[str, Any], str]:
    """`tokenformer train-vision`: the rows, the settings for the JSON and the table's title."""
    from tokenformer.models.vision import VisionConfig

    if args.parallelism != ["ddp"]:
        raise SystemExit("train-vision runs under torchrun with DDP only: drop --parallelism (or pass ddp)")
    if args.dtype != "fp32":
        raise SystemExit("train-vision trains in fp32 only (it has no precision setting): drop --dtype")
    if args.batch % args.nproc:
        raise SystemExit(f"--batch {args.batch} (the global batch) must divide by --nproc {args.nproc}")
    config = VisionConfig.resolve(args.preset)
    if config.num_channels != 1:
        raise SystemExit(f"preset {args.preset} takes {config.num_channels}-channel images but the synthetic "
                         f"data here is grey (MNIST IDX): use tiny-28, fmnist-28 or small-28")
    num_train = args.steps * args.batch
    images = write_images(workdir / "images", num_train, config.image_size, config.num_classes)
    # one epoch of exactly `steps` global batches (train-vision drops no images then)
    fields = {"model": args.preset, "data": str(images), "epochs": 1, "max_train_samples": num_train,
              "batch_size": args.batch, "log_interval": args.log_interval, "augment": "none", "tta_flip": "false"}
    rows = compare("train-vision", lambda nproc, parallelism: fields, workdir, args.nproc, ["ddp"], "images_per_s",
                   args.device)
    settings = {"preset": args.preset, "global_batch": args.batch, "steps": args.steps}
    return rows, settings, f"{args.preset}, global batch {args.batch} images, {args.steps} steps"


@dataclass(frozen=True)
class Task:
    runs: Callable[[argparse.Namespace, Path], tuple[list[dict], dict[str, Any], str]]
    rate_key: str
    results: str
    defaults: dict[str, Any]


TASKS = {
    "lm": Task(lm_runs, "tokens_per_s", "distributed_speed.json",
               {"preset": "small", "steps": 20, "log_interval": 5, "parallelism": ["ddp", "fsdp2"]}),
    "vision": Task(vision_runs, "images_per_s", "distributed_speed_vision.json",
                   {"preset": "fmnist-28", "steps": 60, "log_interval": 10, "parallelism": ["ddp"]}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lm", choices=list(TASKS))
    parser.add_argument("--preset", help="lm: small; vision: fmnist-28 (a 28x28 grey preset)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (lm: 20, vision: 60)")
    parser.add_argument("--log-interval", type=int, help="steps per measured interval (lm: 5, vision: 10)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallelism", nargs="+", choices=["ddp", "fsdp2", "tp", "pp"],
                        help="lm: ddp fsdp2 (tp: token parallelism, pp: pipeline stages, each over all nproc "
                             "ranks; pp needs --accumulation >= nproc); vision: ddp")
    parser.add_argument("--seq", type=int, default=128, help="lm")
    parser.add_argument("--micro-batch", type=int, default=4, help="lm, per rank; one process uses nproc x this")
    parser.add_argument("--accumulation", type=int, default=1, help="lm")
    parser.add_argument("--batch", type=int, default=128, help="vision: the global batch of every run")
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/distributed_speed*.json)")
    add_device_arguments(parser, with_threads=False)
    args = parser.parse_args()
    task = TASKS[args.task]
    for name, value in task.defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 2 * args.log_interval:
        raise SystemExit("--steps must be at least twice --log-interval (the first interval is warm-up)")
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        rows, settings, title = task.runs(args, Path(tmp))
    report(rows, task.rate_key, title, settings, args.out or RESULTS / task.results, load_before, load_average())


if __name__ == "__main__":
    main()
