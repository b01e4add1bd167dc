"""Forward+backward throughput of one Pattention and of the whole model, in tokens/s.

    python -m bench.throughput [--preset small] [--batch 8] [--seq 128] [--repeats 5] \
        [--device cuda|cpu|auto] [--dtype fp32|bf16] [--threads N]

MFU is the analytic matmul FLOPs (`tokenformer.flops`, 3x the forward) per second against the
device's peak (`bench.common.peak_flops`: a GPU's datasheet figure, else a measured matmul).
Prints a table and writes bench/results/throughput.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench.common import add_device_arguments, mfu, peak_flops, resolve, synchronize
from tokenformer import Config, Pattention, TokenFormer
from tokenformer.flops import pattention_flops, tokenformer_flops


def time_fwd_bwd(fn, inputs, repeats: int, device: torch.device) -> float:
    """Median seconds of forward + backward over `repeats` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        fn(*inputs).float().square().mean().backward()
        synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_arguments(parser)
    args = parser.parse_args()
    run = resolve(args)
    config = Config.from_name(args.preset, seq_length=args.seq)
    tokens = args.batch * args.seq
    torch.manual_seed(0)
    factory = dict(device=run.device, dtype=run.dtype)
    h = config.hidden_size

    layer = Pattention(h, h, config.ffn_slot_num, **factory)
    x = torch.randn(args.batch, args.seq, h, requires_grad=True, **factory)
    t_layer = time_fwd_bwd(layer, (x,), args.repeats, run.device)

    model = TokenFormer(config).to(**factory)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=run.device)
    t_model = time_fwd_bwd(model, (idx,), args.repeats, run.device)

    peak, source = peak_flops(run.device, run.dtype_name)
    rows = {"pattention_ffn_tokens_per_s": tokens / t_layer, "model_tokens_per_s": tokens / t_model}
    mfus = {"pattention_ffn_mfu": mfu(3 * tokens * pattention_flops(h, h, config.ffn_slot_num), t_layer, peak),
            "model_mfu": mfu(tokenformer_flops(config).training().total * tokens, t_model, peak)}
    print(f"{'what':<32}{'tokens/s':>14}{'MFU':>8}   ({args.preset}, batch {args.batch} x seq {args.seq}, "
          f"{run.describe()}; peak {peak / 1e9:,.0f} GFLOP/s, {source})")
    for (k, v), m in zip(rows.items(), mfus.values()):
        print(f"{k:<32}{v:>14,.0f}{m:>8.2f}")
    out = Path(__file__).parent / "results" / "throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**rows, **mfus, "peak_flops": peak, "peak_source": source, "preset": args.preset,
                               "batch": args.batch, "seq": args.seq, "device": str(run.device),
                               "dtype": run.dtype_name, "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
