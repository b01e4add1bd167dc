"""Evaluation speed: loglikelihood requests/s by batch size, and perplexity tokens/s by stride.

    python -m bench.evaluate_speed [--preset small] [--requests 64] [--tokens 4096] \
        [--device cuda|cpu|auto] [--dtype fp32|bf16] [--threads N]

The requests are LAMBADA-shaped (a context of 40-120 tokens, a continuation of 1-3 tokens) on a
randomly initialised model with the byte vocabulary; perplexity runs over one random document.
The perplexity row with stride = context (each token computed once) also gives its MFU: forward
matmul FLOPs (`tokenformer.flops`) per second against `bench.common.peak_flops`.
Prints a table and writes bench/results/evaluate_speed.json. Not a test: numbers depend on the
machine (and on what else runs on it).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from bench.common import add_device_arguments, mfu, peak_flops, resolve, synchronize
from tokenformer import Config, TokenFormer
from tokenformer.flops import tokenformer_flops
from tokenformer.evaluation.scoring import perplexity, score_windows


def seconds(fn, device: torch.device) -> float:
    """Seconds of one run after one warm-up run."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096, help="document length for perplexity")
    add_device_arguments(parser)
    args = parser.parse_args()
    run = resolve(args)
    torch.manual_seed(0)
    rng = random.Random(0)
    model = TokenFormer(Config.from_name(args.preset)).to(run.device, run.dtype).eval()
    context = model.config.seq_length
    requests = [([rng.randrange(256) for _ in range(rng.randint(40, 120))],
                 [rng.randrange(256) for _ in range(rng.randint(1, 3))]) for _ in range(args.requests)]
    document = [rng.randrange(256) for _ in range(args.tokens)]

    rows = []
    for batch_size in (1, 4, 16):
        t = seconds(lambda: score_windows(model, requests, batch_size), run.device)
        rows.append({"what": f"loglikelihood, batch {batch_size}", "per_s": len(requests) / t, "unit": "requests/s"})
    for stride in (context, context // 4):
        t = seconds(lambda: perplexity(model, [(document, len(document))], prefix_id=256, stride=stride,
                                       batch_size=8, progress=False), run.device)
        rows.append({"what": f"perplexity, stride {stride} of {context}", "per_s": len(document) / t, "unit": "tokens/s"})
    peak, source = peak_flops(run.device, run.dtype_name)
    full = rows[-2]  # stride = context: every token's forward once (plus the first window's prefix)
    full["mfu"] = mfu(tokenformer_flops(model.config).total * len(document), len(document) / full["per_s"], peak)

    print(f"{'what':<36}{'speed':>12}   ({args.preset}, {model.num_parameters():,} parameters, "
          f"{run.describe()})")
    for row in rows:
        shown = f"   MFU {row['mfu']:.3f} ({source})" if "mfu" in row else ""
        print(f"{row['what']:<36}{row['per_s']:>12,.1f} {row['unit']}{shown}")
    out = Path(__file__).parent / "results" / "evaluate_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "preset": args.preset, "requests": args.requests,
                               "tokens": args.tokens, "threads": torch.get_num_threads(),
                               "device": str(run.device), "dtype": run.dtype_name, "peak_flops": peak,
                               "peak_source": source,
                               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
