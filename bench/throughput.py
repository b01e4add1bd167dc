"""Forward+backward throughput of one Pattention and of the whole model, in tokens/s.

    python -m bench.throughput [--preset small] [--batch 8] [--seq 128] [--repeats 5]

Prints a table and writes bench/results/throughput.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tokenformer import Config, Pattention, TokenFormer


def time_fwd_bwd(fn, inputs, repeats: int) -> float:
    """Median seconds of forward + backward over `repeats` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn(*inputs).float().square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = Config.from_name(args.preset, seq_length=args.seq)
    tokens = args.batch * args.seq
    torch.manual_seed(0)

    layer = Pattention(config.hidden_size, config.hidden_size, config.ffn_slot_num)
    x = torch.randn(args.batch, args.seq, config.hidden_size, requires_grad=True)
    t_layer = time_fwd_bwd(layer, (x,), args.repeats)

    model = TokenFormer(config)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    t_model = time_fwd_bwd(model, (idx,), args.repeats)

    rows = {"pattention_ffn_tokens_per_s": tokens / t_layer, "model_tokens_per_s": tokens / t_model}
    print(f"{'what':<32}{'tokens/s':>14}   ({args.preset}, batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads)")
    for k, v in rows.items():
        print(f"{k:<32}{v:>14,.0f}")
    out = Path(__file__).parent / "results" / "throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**rows, "preset": args.preset, "batch": args.batch, "seq": args.seq,
                               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
