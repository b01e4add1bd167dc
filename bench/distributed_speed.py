"""Training tokens/s of one process against 2 torchrun processes (DDP and FSDP2) on the same global batch.

    python -m bench.distributed_speed [--preset small] [--micro-batch 4] [--steps 30] [--nproc 2]

Every run is the real `tokenformer train` in a subprocess, on a synthetic corpus written here:
one process with micro batch `nproc x micro-batch`, then `torchrun --nproc_per_node=nproc` with
micro batch `micro-batch` for each parallelism, so every optimizer step sees the same windows.
tokens/s is the median over logging intervals after the first (warm-up). Prints a table with the
ratio to the faster one-process run (all cores, or one thread) and writes bench/results/distributed_speed.json. Not a test: the numbers
depend on the machine and on what else runs on it.

One process uses every core (intra-op threads); each torchrun rank gets cores / nproc threads, so
on a CPU the comparison is intra-op threading against data parallelism on the same cores.
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
from pathlib import Path

import numpy as np
import torch

from tokenformer.distributed import usable_cores

REPO = Path(__file__).resolve().parents[1]


def write_corpus(directory: Path, num_tokens: int, vocab: int = 256, seed: int = 0) -> Path:
    """Random byte 'documents' in the `tokenformer prepare` layout (throughput ignores the text)."""
    from tokenformer import ByteTokenizer
    from tokenformer.indexed_dataset import IndexedDatasetWriter

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
    (directory / "prepare.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size}))
    return directory


def train_run(corpus: Path, save: Path, args, nproc: int, parallelism: str, threads: int | None = None) -> dict:
    fields = {"model": json.dumps({"name": args.preset, "seq_length": args.seq}), "data_path": str(corpus),
              "train_iters": args.steps, "log_interval": args.log_interval, "eval_iters": 0,
              "save": str(save), "save_interval": 10 * args.steps, "plot": "false", "progress": "false",
              "device": "cpu", "seed": 1, "parallelism": parallelism,
              "train_micro_batch_size_per_gpu": args.micro_batch * (args.nproc if nproc == 1 else 1),
              "gradient_accumulation_steps": args.accumulation}
    if threads is not None:
        fields["num_threads"] = threads
    overrides = [token for key, value in fields.items() for token in (f"--{key}", str(value))]
    launcher = [sys.executable, "-m", "tokenformer"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "tokenformer"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([*launcher, "train", *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {nproc}-process {parallelism} run failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # drop the warm-up interval
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return {"processes": nproc, "parallelism": parallelism if nproc > 1 else "none",
            "threads_per_process": threads or max(1, usable_cores() // nproc),
            "tokens_per_s": statistics.median(rates), "intervals": len(rates), "final_loss": losses[max(losses)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="per rank; one process uses nproc x this")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--parallelism", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    args = parser.parse_args()
    if args.steps < 2 * args.log_interval:
        raise SystemExit("--steps must be at least twice --log-interval (the first interval is warm-up)")
    global_batch = args.micro_batch * args.accumulation * args.nproc
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus", num_tokens=(args.steps + 1) * global_batch * (args.seq + 1))
        # one process with every core, and with one thread: on a busy machine intra-op threads
        # can lose badly to contention, so the faster of the two is the baseline
        cores = usable_cores()
        rows = [train_run(corpus, tmp / f"single-{t}", args, 1, "ddp", threads=t)
                for t in sorted({cores, 1}, reverse=True)]
        for parallelism in args.parallelism:
            rows.append(train_run(corpus, tmp / parallelism, args, args.nproc, parallelism))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    single = max(row["tokens_per_s"] for row in rows if row["processes"] == 1)
    for row in rows:
        row["speedup_vs_1_process"] = row["tokens_per_s"] / single
    print(f"{args.preset}, seq {args.seq}, global batch {global_batch} windows, {args.steps} steps, "
          f"{usable_cores()} CPU cores, torch {torch.__version__}, load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'processes':>9}  {'parallelism':<11}{'threads':>8}{'tokens/s':>12}{'vs 1 process':>14}"
          f"{'final loss':>12}")
    for row in rows:
        print(f"{row['processes']:>9}  {row['parallelism']:<11}{row['threads_per_process']:>8}"
              f"{row['tokens_per_s']:>12,.0f}{row['speedup_vs_1_process']:>13.2f}x{row['final_loss']:>12.4f}")
    print("(vs 1 process: against the faster one-process run; equal final losses show the same training)")
    out = Path(__file__).parent / "results" / "distributed_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "preset": args.preset, "seq": args.seq, "global_batch": global_batch,
                               "micro_batch_per_rank": args.micro_batch, "accumulation": args.accumulation,
                               "steps": args.steps, "cpu_cores": usable_cores(),
                               "load_average_1min": [load_before, load_after], "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
