"""Where the time goes: torch.profiler tables for the shapes of `bench.compare`.

    python -m bench.profile decode [--quick] [--threads 1]   # 16 greedy decoding steps
    python -m bench.profile step [--quick] [--threads 1]     # one fp32 training step (no optimizer)

Prints the top operators by self CPU time, grouped by input shape, for TokenFormer and for
Hugging Face GPTNeoX of the same width and depth.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from bench.compare import SHAPES, VOCAB, hf_gpt_neox, require_transformers, tokenformer_config
from tokenformer import TokenFormer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "step"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_transformers()
    s = SHAPES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    ours, ref = TokenFormer(tokenformer_config(s)), hf_gpt_neox(s)
    idx = torch.randint(0, VOCAB, (s["batch"], s["seq"]))

    def decode_ours():
        with torch.no_grad():
            cache = ours.allocate_cache(1, s["prompt"] + 17)
            ours(idx[:1, :s["prompt"]], cache=cache, last_only=True)
            for t in range(16):
                ours(idx[:1, t:t + 1], cache=cache)

    def decode_hf():
        with torch.no_grad():
            past = ref(idx[:1, :s["prompt"]], use_cache=True, logits_to_keep=1).past_key_values
            for t in range(16):
                past = ref(idx[:1, t:t + 1], past_key_values=past, use_cache=True).past_key_values

    def step(model, forward):
        def run():
            for p in model.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(forward().flatten(0, 1), idx.flatten()).backward()
        return run

    runs = ({"TokenFormer": decode_ours, "HF GPTNeoX": decode_hf} if args.what == "decode" else
            {"TokenFormer": step(ours.train(), lambda: ours(idx)),
             "HF GPTNeoX": step(ref.train(), lambda: ref(input_ids=idx).logits)})
    for name, run in runs.items():
        run()  # warm-up
        with profile(record_shapes=True) as prof:
            run()
        print(f"\n{name}: {args.what} ({'quick' if args.quick else 'full'} shape, "
              f"{torch.get_num_threads()} threads)")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
            max_shapes_column_width=60))


if __name__ == "__main__":
    main()
