"""Where the time goes: torch.profiler tables for the shapes of `bench.compare`.

    python -m bench.profile decode [--quick] [--threads 1]   # 16 greedy decoding steps
    python -m bench.profile step [--quick] [--threads 1]     # one training step (no optimizer)
    (both: [--device cuda|cpu|auto] [--dtype fp32|bf16])

Prints the top operators by self CPU time (self GPU time on a GPU, where the CUDA kernels are
profiled too), grouped by input shape, for TokenFormer and for Hugging Face GPTNeoX of the same
width and depth. A profile, not a rate: no MFU here (bench.compare has it).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import add_device_arguments, resolve, synchronize
from bench.compare import SHAPES, VOCAB, hf_gpt_neox, require_transformers, tokenformer_config
from tokenformer import TokenFormer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["decode", "step"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=12)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    run = resolve(args)
    require_transformers()
    s = SHAPES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    ours = TokenFormer(tokenformer_config(s)).to(run.device, run.dtype)
    ref = hf_gpt_neox(s).to(run.device, run.dtype)
    idx = torch.randint(0, VOCAB, (s["batch"], s["seq"]), device=run.device)

    def decode_ours():
        with torch.no_grad():
            cache = ours.allocate_cache(1, s["prompt"] + 17)
            ours(idx[:1, :s["prompt"]], cache=cache, last_only=True)
            for t in range(16):
                ours(idx[:1, t:t + 1], cache=cache)

    def decode_hf():
        from tokenformer.hf.modeling import CACHE_FIELD  # `cache` in newer transformers, `past_key_values` before
        with torch.no_grad():
            past = getattr(ref(idx[:1, :s["prompt"]], use_cache=True, logits_to_keep=1), CACHE_FIELD)
            for t in range(16):
                past = getattr(ref(idx[:1, t:t + 1], use_cache=True, **{CACHE_FIELD: past}), CACHE_FIELD)

    def step(model, forward):
        def run():
            for p in model.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(forward().flatten(0, 1).float(), idx.flatten()).backward()
        return run

    runs = ({"TokenFormer": decode_ours, "HF GPTNeoX": decode_hf} if args.what == "decode" else
            {"TokenFormer": step(ours.train(), lambda: ours(idx)),
             "HF GPTNeoX": step(ref.train(), lambda: ref(input_ids=idx).logits)})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    for name, fn in runs.items():
        fn()  # warm-up
        synchronize(run.device)
        with profile(activities=activities, record_shapes=True) as prof:
            fn()
            synchronize(run.device)
        print(f"\n{name}: {args.what} ({'quick' if args.quick else 'full'} shape, {run.describe()})")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total" if run.cuda else "self_cpu_time_total", row_limit=args.rows,
            max_name_column_width=40, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
