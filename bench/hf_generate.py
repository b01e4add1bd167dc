"""Decoding speed through transformers against the native generate, in the same run, on the same weights.

    python -m bench.hf_generate [--presets small,base-cpu,150M] [--prompt 32] [--new 64] [--rounds 5]

Three ways to decode greedily, each timed token by token (the moment each new token's logits are
ready), so that the decode rate is (new - 1) tokens over the time from the first new token to the last:

    native          tokenformer.generate_tokens (preallocated KVCache)
    hf_forward      a plain greedy loop over TokenFormerForCausalLM with a DynamicCache: the cost of
                    the wrapper itself (its forward, transformers' cache)
    hf_generate     model.generate(do_sample=False): the wrapper plus transformers' generation loop
                    (timed by a logits processor that only notes the time)

The runs alternate (native, hf_forward, hf_generate, native, ...): the machine is shared, and
alternating spreads any disturbance over all three. Tokens/s are medians over `--rounds`; a ratio is
the median over rounds of the ratio within each round. Random weights
(speed does not depend on them); batch 1; one thread unless --threads. Prints the tokens/s and the
ratios to native; writes bench/results/hf_generate.json. Needs the hf extra. Not a test: numbers depend
on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from tokenformer import Config, TokenFormer, generate_tokens
from tokenformer.hf import to_hf
from tokenformer.hf.modeling import CACHE_FIELD  # `cache` in newer transformers, `past_key_values` before

VOCAB = {"small": 257, "base-cpu": 257}  # the byte-level presets; others keep GPT-NeoX-20B's 50277


def native_run(model, prompt: list[int], new: int) -> list[float]:
    """The times at which each new token is there."""
    stamps = []
    for _ in generate_tokens(model, prompt, new, vocab_size=model.config.vocab_size):
        stamps.append(time.perf_counter())
    return stamps


@torch.no_grad()
def hf_forward_run(model, prompt: list[int], new: int) -> list[float]:
    cache = DynamicCache(config=model.config)
    vocab = model.config.vocab_size
    logits = model(torch.tensor([prompt]), **{CACHE_FIELD: cache}, logits_to_keep=1).logits[:, -1]
    stamps = []
    for step in range(new):
        logits[:, vocab:] = float("-inf")
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        stamps.append(time.perf_counter())
        if step + 1 < new:
            logits = model(token, **{CACHE_FIELD: cache}).logits[:, -1]
    return stamps


class Stamps(LogitsProcessor):
    """Notes when each step's logits reach the processors; changes nothing."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def hf_generate_run(model, prompt: list[int], new: int) -> list[float]:
    stamps = Stamps()
    model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                   max_new_tokens=new, do_sample=False,
                   logits_processor=LogitsProcessorList([stamps]))
    return stamps.stamps


RUNS = {"native": native_run, "hf_forward": hf_forward_run, "hf_generate": hf_generate_run}


def measure(preset: str, prompt_length: int, new: int, rounds: int) -> dict:
    config = Config.from_name(preset, **({"vocab_size": VOCAB[preset]} if preset in VOCAB else {}))
    torch.manual_seed(0)
    native = TokenFormer(config).eval()
    hf = to_hf(native, eos_token_id=config.vocab_size - 1).eval()  # the same tensors
    hf.generation_config.eos_token_id = None  # as the native run: no end-of-text stop (no min_new_tokens check)
    models = {"native": native, "hf_forward": hf, "hf_generate": hf}
    prompt = torch.randint(0, config.vocab_size, (prompt_length,)).tolist()
    for name, run in RUNS.items():  # warm-up: first calls allocate and fill caches
        run(models[name], prompt, 4)
    prefill: dict[str, list[float]] = {name: [] for name in RUNS}
    decode: dict[str, list[float]] = {name: [] for name in RUNS}
    for _ in range(rounds):
        for name, run in RUNS.items():
            start = time.perf_counter()
            stamps = run(models[name], prompt, new)
            assert len(stamps) == new, (name, len(stamps))
            prefill[name].append(stamps[0] - start)
            decode[name].append((new - 1) / (stamps[-1] - stamps[0]))
    result = {name: {"prefill_s": statistics.median(prefill[name]),
                     "decode_tokens_per_s": statistics.median(decode[name]),
                     "decode_tokens_per_s_all_rounds": decode[name]} for name in RUNS}
    for name in ("hf_forward", "hf_generate"):
        # the ratio within each round (runs next to each other in time), then the median over rounds:
        # steadier than a ratio of medians when the machine's load changes between rounds
        result[name]["decode_ratio_to_native"] = statistics.median(
            ours / native for ours, native in zip(decode[name], decode["native"]))
    return {"preset": preset, "parameters": native.num_parameters(), "vocab_size": config.vocab_size, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,base-cpu,150M")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are kept (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p, args.prompt, args.new, args.rounds) for p in args.presets.split(",")]
    print(f"decode tokens/s, batch 1, prompt {args.prompt}, {args.new} new tokens, {args.threads} thread(s), "
          f"median of {args.rounds}")
    print(f"{'preset':<10}{'params':>13}{'native':>10}{'hf_forward':>12}{'ratio':>8}{'hf_generate':>13}{'ratio':>8}")
    for r in rows:
        print(f"{r['preset']:<10}{r['parameters']:>13,}{r['native']['decode_tokens_per_s']:>10.1f}"
              f"{r['hf_forward']['decode_tokens_per_s']:>12.1f}{r['hf_forward']['decode_ratio_to_native']:>8.3f}"
              f"{r['hf_generate']['decode_tokens_per_s']:>13.1f}{r['hf_generate']['decode_ratio_to_native']:>8.3f}")
    out = Path(__file__).parent / "results" / "hf_generate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
                               "threads": args.threads, "torch": torch.__version__,
                               "transformers": transformers.__version__,
                               "cpu": platform.processor() or platform.machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
