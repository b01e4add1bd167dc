"""Decoding at the memory roofline: tokens/s of every decode path against Hugging Face GPT-NeoX, and
the fraction of this device's measured memory bandwidth each one reaches.

    python -m bench.decode [--quick] [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]

Greedy decoding at batch 1 reads every weight once per token (plus the KV cache), so

    roofline fraction = bytes read per token x tokens/s / memory bandwidth

where the bandwidth is measured in the same run (a STREAM-like copy and triad of buffers far
bigger than the caches, bytes read + written per second) and the bytes per token come from the
shapes: every Pattention key/value token (or linear weight, for HF), the head, one embedding row,
and the KV cache at the mean decode length (prompt + new / 2), in the dtype each path stores.

Timed paths (alternating rounds, medians): ours plain (`generate_tokens` on the model, KVCache),
ours static (`tokenformer.decode.Decoder`: decode layout + static cache), static + `torch.compile`,
bf16 weights, int8 key/value tokens and head (bf16 activations, compiled); HF `generate` at equal
width (same layers, heads, width, vocabulary; FFN 4 x width, untied head: what `bench.compare`
runs) and at equal parameter count (tied embeddings and FFN 6 x width, so that a layer holds
4h^2 + 12h^2 = 16h^2 weights like ours: the same width, depth and vocabulary, and the parameter
count within 0.1%, the difference being HF's biases and LayerNorm weights). `--dtype` is the dtype
of the main comparison (plain, static, compiled, HF); bf16 and int8 run in any case.

Each path's decode rate is (new - 1) tokens over the time from the first new token to the last
(ours: when `generate_tokens` yields it; HF: when its logits reach the logits processors). With
`run(batch=B)` the prompts are B random rows of equal length, ours decoded by a batched greedy loop
over the same generation interface, and a step's B tokens count B: the weights are read once per
step for all rows, the KV cache once per row.
`run(...)` returns the result dict (with `rows` for `bench.compare`'s table); the command also
writes bench/results/decode.json. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import DTYPES, add_device_arguments, resolve
from bench.timing import alternate, synchronize
from tokenformer import Config, TokenFormer, generate_tokens
from tokenformer.decode import Decoder

RESULTS = Path(__file__).parent / "results" / "decode.json"
VOCAB = 50277  # GPT-NeoX-20B; both models pad to 50304

# bench.compare's generation shapes: the released models' proportions at a size 2 CPU cores decode
# in seconds. The STREAM buffers are far bigger than any cache (32 MiB L3 on the development machine).
SHAPES = {
    "full": dict(hidden=512, layers=4, heads=8, prompt=240, new_tokens=32, reps=7, stream_mib=256),
    "quick": dict(hidden=256, layers=4, heads=4, prompt=224, new_tokens=16, reps=3, stream_mib=128),
    # the released TokenFormer-150M's shape, for a GPU (`bench/gpu.py`); on 2 CPU cores about 10 minutes
    "150M": dict(hidden=768, layers=12, heads=12, prompt=240, new_tokens=64, reps=5, stream_mib=1024),
    # the GPU suite's dry run (`bench/gpu.py --tiny`): every path in about a second
    "tiny": dict(hidden=64, layers=2, heads=4, prompt=16, new_tokens=6, reps=2, stream_mib=8),
}


# ---- the models ---------------------------------------------------------------------------------

def tokenformer_config(s: dict) -> Config:
    h = s["hidden"]
    return Config(name="bench-decode", num_layers=s["layers"], hidden_size=h, num_attention_heads=s["heads"],
                  qkv_slot_num=h, proj_slot_num=h, ffn_slot_num=4 * h, vocab_size=VOCAB,
                  seq_length=s["prompt"] + s["new_tokens"] + 1)


def gpt_neox(s: dict, ffn_multiple: int, tied: bool):
    """HF GPTNeoXForCausalLM of the benchmark's width, depth, heads and padded vocabulary."""
    try:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except ImportError:
        sys.exit("bench.decode needs Hugging Face transformers as the reference: pip install -e '.[bench]'")
    h = s["hidden"]
    config = GPTNeoXConfig(vocab_size=tokenformer_config(s).padded_vocab_size, hidden_size=h,
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           intermediate_size=ffn_multiple * h, rotary_pct=0.25,
                           max_position_embeddings=s["prompt"] + s["new_tokens"] + 1,
                           use_parallel_residual=False, attention_dropout=0.0, hidden_dropout=0.0,
                           tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    model = GPTNeoXForCausalLM(config)
    model.generation_config.eos_token_id = None  # never stop early: every run makes `new` tokens
    model.generation_config.pad_token_id = 0
    return model


# ---- bytes and bandwidth --------------------------------------------------------------------------

def kv_cache_bytes(s: dict, element_bytes: int) -> float:
    """Keys and values of every layer at the mean decode length, prompt + new / 2, for each of the
    `s["batch"]` rows (default 1)."""
    rows = s.get("batch", 1)
    return rows * 2 * s["layers"] * s["hidden"] * (s["prompt"] + s["new_tokens"] / 2) * element_bytes


def tokenformer_bytes(model: TokenFormer, s: dict, element_bytes: int, int8: bool = False) -> float:
    """Bytes one decode step reads: all key/value tokens and the tied head (int8: one byte each plus a
    scale per row), one embedding row, the final norm, and the KV cache (of every row of a batch)."""
    h = s["hidden"]

    def matrix(out_features: int, in_features: int) -> float:  # a product's weight, (out, in)
        if int8:
            return out_features * in_features + out_features * element_bytes  # int8, a scale per row
        return out_features * in_features * element_bytes
    weights = sum(matrix(*layer.key_param_tokens.shape) + matrix(*layer.value_param_tokens.T.shape)
                  for layer in model.pattentions().values())
    weights += matrix(*model.word_embeddings.weight.shape)  # the tied head
    return weights + (h + 2 * h) * element_bytes + kv_cache_bytes(s, element_bytes)


def gpt_neox_bytes(model, s: dict, element_bytes: int) -> float:
    """All parameters except the input embedding, of which one row is read (when tied, the
    embedding is the head and is counted once)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    read = params if tied else params - embedding.numel() + s["hidden"]
    return read * element_bytes + kv_cache_bytes(s, element_bytes)


def stream(mib: int, device: torch.device) -> tuple[dict, dict[str, int]]:
    """STREAM copy (b = a) and triad (a = b + 3 c) over fp32 buffers of `mib` MiB each, and the
    bytes each moves (read + written). The buffers are filled first: an untouched page reads as
    the shared zero page, from cache."""
    n = mib * 2**20 // 4
    a, b, c = (torch.rand(n, device=device) for _ in range(3))

    def copy():
        b.copy_(a)
        synchronize(device)

    def triad():
        torch.add(b, c, alpha=3.0, out=a)
        synchronize(device)
    return {"copy": copy, "triad": triad}, {"copy": 2 * 4 * n, "triad": 3 * 4 * n}


# ---- timing ---------------------------------------------------------------------------------------

def ours_stamps(model, prompt: list[int], new: int) -> list[float]:
    """When each new token is there (`generate_tokens` gets its id on the host: synchronised)."""
    stamps = []
    for _ in generate_tokens(model, prompt, new):
        stamps.append(time.perf_counter())
    return stamps


@torch.no_grad()
def ours_batch_stamps(model, prompt: torch.Tensor, new: int) -> list[float]:
    """Greedy decoding of equal-length prompts (B, P) through the generation interface that
    `generate_tokens` uses (a prefill, then one-token steps on the cache; no padding, so no mask):
    when each step's B tokens are on the host."""
    batch, length = prompt.shape
    cache = model.allocate_cache(batch, length + new)
    logits = model(prompt, cache=cache, last_only=True)[:, -1]  # (B, V)
    stamps = []
    for step in range(new):
        token = logits.argmax(dim=-1)  # (B,)
        token.tolist()  # the ids on the host, as a generation loop needs them: synchronised
        stamps.append(time.perf_counter())
        if step + 1 < new:
            logits = model(token[:, None], cache=cache)[:, -1]
    return stamps


def hf_stamps(model, prompt: torch.Tensor, new: int) -> list[float]:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        """Notes when each step's logits reach the processors; changes nothing."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    stamps = Stamps()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]))
    return stamps.stamps


PATHS = ("ours_plain", "ours_static", "ours_compiled", "ours_bf16", "ours_int8", "hf", "hf_param_matched", "hf_bf16")
COMPILED_PATHS = ("ours_compiled", "ours_int8")


def timed_paths(s: dict, device: torch.device, dtype: torch.dtype,
                paths: tuple[str, ...] = PATHS) -> tuple[dict, dict, dict]:
    """The models of the asked-for paths, a generating function per path, and the bytes each reads
    per decode step (all `s["batch"]` rows). `hf_bf16` is left out when `dtype` is bf16 (it is `hf`)."""
    torch.manual_seed(0)
    model = TokenFormer(tokenformer_config(s)).to(device, dtype).eval()
    fp32 = model if dtype == torch.float32 else None
    if fp32 is None and {"ours_bf16", "ours_int8"} & set(paths):
        fp32 = TokenFormer(tokenformer_config(s)).to(device).eval()
    size = torch.finfo(dtype).bits // 8
    builders = {
        "ours_plain": lambda: model, "ours_static": lambda: Decoder(model),
        "ours_compiled": lambda: Decoder(model, compile=True),
        "ours_bf16": lambda: Decoder(fp32, dtype=torch.bfloat16),
        "ours_int8": lambda: Decoder(fp32, dtype=torch.bfloat16, int8=True, compile=True),
        "hf": lambda: gpt_neox(s, 4, tied=False).to(device, dtype).eval(),
        "hf_param_matched": lambda: gpt_neox(s, 6, tied=True).to(device, dtype).eval(),
        "hf_bf16": lambda: gpt_neox(s, 4, tied=False).to(device, torch.bfloat16).eval(),
    }
    if dtype == torch.bfloat16:
        del builders["hf_bf16"]
    models = {name: builders[name]() for name in paths if name in builders}
    ours_bytes = {"ours_plain": (size, False), "ours_static": (size, False), "ours_compiled": (size, False),
                  "ours_bf16": (2, False), "ours_int8": (2, True)}
    bytes_read = {name: tokenformer_bytes(model, s, *ours_bytes[name]) if name in ours_bytes else
                  gpt_neox_bytes(m, s, torch.finfo(next(m.parameters()).dtype).bits // 8)
                  for name, m in models.items()}
    prompt = torch.randint(0, VOCAB, (s.get("batch", 1), s["prompt"]), device=device)  # (B, P)
    new = s["new_tokens"]

    def ours(m):
        if prompt.shape[0] == 1:
            return lambda: ours_stamps(m, prompt[0].tolist(), new)
        return lambda: ours_batch_stamps(m, prompt, new)
    runs = {name: ours(m) if name in ours_bytes else (lambda m=m: hf_stamps(m, prompt, new))
            for name, m in models.items()}
    return models, runs, bytes_read


def path_memory(runs: dict, device: torch.device) -> dict | None:
    """On a GPU, the memory each path takes beyond the models (cache, activations, CUDA graphs):
    the peak of one run less what was allocated before it, in GiB; one run each, also a warm-up."""
    if device.type != "cuda":
        return None
    extra = {}
    for name, fn in runs.items():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        extra[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return {"models_gib": torch.cuda.memory_allocated(device) / 2**30, "peak_extra_gib": extra}


def measure_rates(s: dict, runs: dict, device: torch.device) -> tuple[dict, dict, dict]:
    """Tokens/s of each path (medians of the rounds after the first) and of every round, and the
    memory bandwidth of each STREAM kernel, from one alternation."""
    new, batch = s["new_tokens"], s.get("batch", 1)
    rates: dict[str, list[float]] = {name: [] for name in runs}

    def recorded(name: str):
        def fn():
            stamps = runs[name]()
            rates[name].append(batch * (new - 1) / (stamps[-1] - stamps[0]))
        return fn
    copies, moved = stream(s["stream_mib"], device)
    seconds = alternate({**{name: recorded(name) for name in runs}, **copies}, s["reps"])
    bandwidth = {name: moved[name] / seconds[name] for name in moved}
    tps = {name: statistics.median(r[1:]) for name, r in rates.items()}  # r[0]: the warm-up round
    return tps, rates, bandwidth


def run(quick: bool = False, device: str = "cpu", dtype: str = "fp32", threads: int | None = None,
        shape: str | None = None, batch: int = 1, paths: tuple[str, ...] = PATHS) -> dict:
    """Measure the decode paths `paths` (default all) at `batch` prompts of equal length; the keys
    of issue 17 for the paths measured, plus `rows` (label, ratio, unit, target). `shape` names one
    of SHAPES (default: "quick" with `quick`, else "full")."""
    if threads:
        torch.set_num_threads(threads)
    shape = shape or ("quick" if quick else "full")
    s = {**SHAPES[shape], "batch": batch}
    dev, dt = torch.device(device), DTYPES[dtype]
    started = time.perf_counter()
    models, runs, bytes_read = timed_paths(s, dev, dt, paths)
    print(f"bench.decode ({shape}): width {s['hidden']}, {s['layers']} layers, "
          f"{s['heads']} heads, prompt {s['prompt']}, {s['new_tokens']} new tokens, batch {batch}, {dtype} on {device}, "
          f"{torch.get_num_threads()} threads; compiling the decode steps ...", flush=True)
    compile_start = time.perf_counter()
    for name in COMPILED_PATHS:
        if name in runs:
            runs[name]()  # the first call compiles
    compile_seconds = time.perf_counter() - compile_start
    memory = path_memory(runs, dev)
    tps, rates, bandwidth = measure_rates(s, runs, dev)
    peak = max(bandwidth.values())
    # a step reads the weights once for all rows: per token, its bytes over the batch
    fraction = {name: bytes_read[name] * tps[name] / batch / peak for name in tps}
    result = {
        "mode": shape, "shape": s, "device": device, "dtype": dtype, "batch": batch,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()
                       if isinstance(m, torch.nn.Module) and not isinstance(m, Decoder)},
        "decode_tokens_per_s": tps, "decode_tokens_per_s_all_rounds": rates, "bytes_per_step_all": bytes_read,
        "bytes_per_token_all": {name: b / batch for name, b in bytes_read.items()},
        "memory_bandwidth_all_gb_s": {k: v / 1e9 for k, v in bandwidth.items()}, "memory": memory,
        "compile_seconds": compile_seconds, "roofline_fraction_all": fraction, "memory_bandwidth_gb_s": peak / 1e9,
        **headline(tps, fraction, dt),
    }
    result["bytes_per_token"] = result["bytes_per_token_all"][result["best_fp32_path"]]
    result["rows"] = decode_rows(result)
    result["seconds"] = time.perf_counter() - started
    return result


def headline(tps: dict, fraction: dict, dt: torch.dtype) -> dict:
    """The ratios of issue 17, each where both of its paths were measured. The best path is the
    fastest of plain, static and compiled, in the main dtype (`best_fp32_path`, named when fp32 was
    the only main dtype)."""
    best = max((name for name in ("ours_static", "ours_compiled", "ours_plain") if name in tps), key=tps.get)
    hf_bf16 = tps.get("hf_bf16", tps.get("hf") if dt == torch.bfloat16 else None)
    pairs = {"decode_speed_ratio": (best, "hf"), "decode_speed_ratio_plain": ("ours_plain", "hf"),
             "decode_speed_ratio_param_matched": (best, "hf_param_matched"),
             "decode_speed_ratio_int8": ("ours_int8", "hf"),
             "decode_static_speedup": ("ours_static", "ours_plain"),
             "decode_compiled_speedup": ("ours_compiled", "ours_plain")}
    out = {key: tps[a] / tps[b] for key, (a, b) in pairs.items() if a in tps and b in tps}
    out["best_fp32_path"] = best
    if "ours_bf16" in tps and (hf_bf16 or "ours_plain" in tps):
        out["decode_speed_ratio_bf16"] = tps["ours_bf16"] / (hf_bf16 or tps["ours_plain"])
        out["decode_speed_ratio_bf16_against"] = "hf_bf16" if hf_bf16 else "ours_plain"
    out["decode_roofline_fraction"] = fraction[best]
    if "hf" in fraction:
        out["decode_roofline_fraction_hf"] = fraction["hf"]
    return out


def decode_rows(result: dict) -> list[tuple]:
    """(label, ratio, unit, target) of each headline figure that was measured."""
    best, dtype = result["best_fp32_path"], result["dtype"]
    rows = [
        ("decode_speed_ratio", f"decode tokens/s, best {dtype} path ({best})", "x HF generate", ">= 1.0"),
        ("decode_speed_ratio_plain", "decode tokens/s, plain (KVCache)", "x HF generate", ""),
        ("decode_speed_ratio_param_matched", f"decode tokens/s, best {dtype} vs param-matched HF",
         "x HF (6x FFN, tied)", ">= 1.0"),
        ("decode_speed_ratio_bf16", "decode tokens/s, bf16", f"x {result.get('decode_speed_ratio_bf16_against')}", ""),
        ("decode_speed_ratio_int8", "decode tokens/s, int8 (compiled)", f"x HF generate {dtype}", ""),
        ("decode_static_speedup", "decode static cache speed-up", "x ours plain", ""),
        ("decode_compiled_speedup", "decode static + compiled speed-up", "x ours plain", ""),
        ("decode_roofline_fraction", f"decode roofline fraction, ours best {dtype}", "of bandwidth", ""),
        ("decode_roofline_fraction_hf", "decode roofline fraction, HF", "of bandwidth", ""),
    ]
    return [(label, result[key], unit, target) for key, label, unit, target in rows if key in result]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 256, 16 new tokens, 3 rounds")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="the model shape (default: full, or quick with --quick); 150M: the released 150M's")
    add_device_arguments(parser)  # --device, --dtype (of the main comparison), --threads
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(args.quick, resolve(args).device.type, args.dtype, args.threads, args.shape)
    result["cpu"] = platform.processor() or platform.machine()
    tps, nbytes = result["decode_tokens_per_s"], result["bytes_per_token_all"]
    fraction = result["roofline_fraction_all"]
    print(f"\n{'path':<18}{'tokens/s':>10}{'MB/token':>10}{'roofline':>10}")
    for name in tps:
        print(f"{name:<18}{tps[name]:>10.1f}{nbytes[name] / 1e6:>10.1f}{fraction[name]:>10.2f}")
    bw = result["memory_bandwidth_all_gb_s"]
    print(f"memory bandwidth: copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s (read + written); "
          f"compile {result['compile_seconds']:.0f} s")
    print(f"\n{'measure':<50}{'ratio':>8}  {'unit':<22}{'target':>8}")
    for name, value, unit, target in result["rows"]:
        print(f"{name:<50}{value:>8.2f}  {unit:<22}{target:>8}")
    print(f"took {result['seconds']:.0f} s; wrote {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
