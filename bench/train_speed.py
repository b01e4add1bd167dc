"""Training throughput of the real training loop (`tokenformer.training.loop.train`), in tokens/s.

    python -m bench.train_speed [--steps 20] [--rounds 3] [--threads 1] [--sweep] \
        [--device cuda|cpu|auto] [--dtype fp32|bf16]

Times whole optimizer steps (data windows from memory-mapped files, forward, backward, clipping,
AdamW) on a synthetic corpus of random tokens, for the `make demo` shape (configs/demo.yaml's
model and batch). Baseline and variants are measured in the same run, interleaved round by round
(the median of the rounds counts) so that a busy machine slows them alike:

- fp32 (the baseline), bf16 autocast, fp32 with activation checkpointing;
- with `--sweep`, the tiny / small / base-cpu presets at fp32 (seq 128, batch 8).

MFU (analytic matmul FLOPs per second, `tokenformer.flops`, against `bench.common.peak_flops`:
a GPU's datasheet figure, else a measured matmul) is given for the variants that compute in
`--dtype` (fp32: the baseline and checkpointing, which counts no recomputation; bf16: autocast).
Prints a table and writes bench/results/train_speed.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import add_device_arguments, peak_flops, resolve
from tokenformer import Config
from tokenformer.data.indexed import IndexedDatasetWriter
from tokenformer.flops import tokenformer_flops
from tokenformer.data.tokenizer import ByteTokenizer
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train

DEMO_SHAPE = dict(model={"name": "tiny", "vocab_size": 2048, "seq_length": 64}, train_micro_batch_size_per_gpu=16)
VARIANTS = {"fp32": dict(precision="fp32"), "bf16_autocast": dict(precision="bf16"),
            "fp32_activation_checkpointing": dict(precision="fp32", checkpoint_activations=True)}
SWEEP = {preset: dict(model={"name": preset, "vocab_size": 2048, "seq_length": 128},
                      train_micro_batch_size_per_gpu=8) for preset in ("tiny", "small", "base-cpu")}


def synthetic_corpus(directory: Path, num_tokens: int, vocab_size: int = 2048, seed: int = 0,
                     learnable: bool = False) -> Path:
    """Random documents of 200-2000 tokens, in the layout `tokenformer prepare` writes. Uniform
    random tokens by default (speed does not depend on them); `learnable`: a chain over 64 symbols
    whose next token is a fixed function of the last one 9 times in 10, so that a model's loss falls
    within tens of steps from ln(vocab) towards about 0.7 nats (the chain's entropy)."""
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(directory / "train_text_document", dtype=np.uint16)
    written = 0
    while written < num_tokens:
        length = int(rng.integers(200, 2000))
        if learnable:
            doc = np.empty(length, dtype=np.int64)
            doc[0], jumps, noise = rng.integers(64), rng.random(length) < 0.1, rng.integers(64, size=length)
            for i in range(1, length):  # 1 + (7 x + 3) mod 64: tokens 1..64, never 0 (the separator)
                doc[i] = noise[i] if jumps[i] else (7 * doc[i - 1] + 3) % 64
            doc += 1
        else:
            doc = rng.integers(1, vocab_size, size=length)
        writer.add_item(np.append(doc, 0))
        written += doc.size + 1
    writer.close()
    ByteTokenizer().save(directory / "tokenizer.json")  # only written into checkpoints; none here
    return directory


def tokens_per_second(data: Path, steps: int, threads: int, device: str, **fields) -> float:
    cfg = TrainConfig(data_path=str(data), train_iters=steps, eval_iters=0, save=None, progress=False,
                      plot=False, device=device, num_threads=threads, warmup_iters=1, **fields)
    return train(cfg)["tokens_per_s"]


def measure(data: Path, cases: dict[str, dict], steps: int, rounds: int, threads: int,
            device: str) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fields in cases.items():
            samples[name].append(tokens_per_second(data, steps, threads, device, **fields))
    return {name: statistics.median(values) for name, values in samples.items()}


def training_flops_per_token(model: dict) -> float:
    """Matmul FLOPs of forward + backward per token of the model a `model` field describes."""
    fields = {k: v for k, v in model.items() if k != "name"}
    return tokenformer_flops(Config.from_name(model["name"], **fields)).training().total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts")
    parser.add_argument("--sweep", action="store_true", help="also time the tiny/small/base-cpu presets")
    add_device_arguments(parser, threads=1)
    args = parser.parse_args()
    run = resolve(args)
    device = str(run.device)

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_corpus(Path(tmp), num_tokens=400_000)
        demo = measure(data, {name: {**DEMO_SHAPE, **fields} for name, fields in VARIANTS.items()},
                       args.steps, args.rounds, args.threads, device)
        sweep = measure(data, SWEEP, max(5, args.steps // 2), args.rounds, args.threads, device) if args.sweep else {}

    peak, source = peak_flops(run.device, run.dtype_name)
    demo_flops = training_flops_per_token(DEMO_SHAPE["model"])
    mfus = {name: demo[name] * demo_flops / peak for name, fields in VARIANTS.items()
            if fields["precision"] == run.dtype_name}
    if run.dtype_name == "fp32":
        mfus.update({f"sweep_{name}": sweep[name] * training_flops_per_token(case["model"]) / peak
                     for name, case in SWEEP.items() if name in sweep})
    baseline = demo["fp32"]
    print(f"training tokens/s, demo shape (tiny, vocab 2048, batch 16 x seq 64), {run.describe()}, "
          f"median of {args.rounds} rounds of {args.steps} steps; MFU against {peak / 1e9:,.0f} GFLOP/s ({source})")
    print(f"{'variant':<34}{'tokens/s':>12}{'vs fp32':>10}{'MFU':>8}")
    for name, value in demo.items():
        shown = f"{mfus[name]:>8.3f}" if name in mfus else ""
        print(f"{name:<34}{value:>12,.0f}{value / baseline:>10.2f}{shown}")
    if sweep:
        print("\nmodel-size sweep (fp32, batch 8 x seq 128)")
        for name, value in sweep.items():
            shown = f"{mfus[f'sweep_{name}']:>18.3f}" if f"sweep_{name}" in mfus else ""
            print(f"{name:<34}{value:>12,.0f}{shown}")
    result = {"demo_shape": {"model": DEMO_SHAPE["model"], "micro_batch": DEMO_SHAPE["train_micro_batch_size_per_gpu"],
                             "tokens_per_s": demo, "ratio_vs_fp32": {k: v / baseline for k, v in demo.items()}},
              "sweep_fp32_batch8_seq128_tokens_per_s": sweep, "steps": args.steps, "rounds": args.rounds,
              "mfu": mfus, "peak_flops": peak, "peak_source": source, "device": device, "dtype": run.dtype_name,
              "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    out = Path(__file__).parent / "results" / "train_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
