"""TokenFormer against its peers, measured in one run: the suite of issue 8.

    python -m bench.compare [--quick] [--device cuda|cpu|auto] [--dtype fp32|bf16] [--threads N]
    (or `make bench` / `make bench-quick`)

1. Pattention forward+backward: ours (eager, memory-lean, torch.compile) vs the official operation
   sequence written naively from the spec (`bench/reference.py`): time and activation memory.
2. A training step (forward, backward, AdamW): TokenFormer vs Hugging Face `GPTNeoXForCausalLM`
   of the same width, depth, sequence length and vocabulary (randomly initialised, FFN 4 x width),
   as achieved matmul FLOP/s (analytic counts from `tokenformer.flops`), for the whole model and
   for the body without the vocabulary head; fp32, and bf16 on a GPU, where the CPU has it, or
   with `--dtype bf16`.
3. Model FLOPs utilisation: on the CPU against a large `torch.mm` timed in the same alternation;
   on a GPU against the datasheet peak of the card (`bench/common.py`; the same measured matmul for
   a card not in its table). `mfu_peak_source` says which.
4. Generation with the KV cache (greedy, batch 1): prefill and decode tokens/s, ours vs HF `generate`.
5. Activation memory of a training step: our model vs the same model running the official sequence.
6. Data preparation tokens/s (`bench/data_prep.py`).
7. The decode suite (`bench/decode.py`'s `run`, when present): its headline keys and table rows
   join ours (the rest of its result under `decode`).

`--dtype` is the dtype of items 1, 4 and 7 (item 2 runs fp32, and bf16 as said; item 5 fp32).
Every ratio is >1 when ours is better. Times are medians of alternating repetitions (A, B, A, B,
...) so that load from other processes hits both sides alike. Memory is the exact number of bytes
the autograd graph keeps for the backward (collected with `saved_tensors_hooks`, each storage
counted once, parameters and the layer input left out): deterministic, unlike a CPU peak-RSS
reading. Writes bench/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import data_prep, decode
from bench.common import Run, add_device_arguments, alternate, datasheet_peak, gemm, resolve
from bench.reference import official_pattentions
from tokenformer import Config, Pattention, TokenFormer
from tokenformer.flops import gpt_neox_flops, tokenformer_flops
from tokenformer.generate import generate_tokens
from tokenformer.models.lm import rotary_cos_sin
from tokenformer.training.precision import autocast_context

RESULTS = Path(__file__).parent / "results" / "compare.json"
VOCAB = 50277  # GPT-NeoX-20B; both models pad to 50304

# The benchmark shapes: the released models' proportions (slots qkv = proj = width, ffn = 4 x width)
# at a size that 2 CPU cores run in minutes.
SHAPES = {
    "full": dict(hidden=512, layers=4, heads=8, seq=256, batch=2, reps=9, bf16=True,
                 pattention_tokens=2048, prompt=240, new_tokens=32, gemm=2048),
    "quick": dict(hidden=256, layers=4, heads=4, seq=256, batch=2, reps=7, bf16=False,
                  pattention_tokens=1024, prompt=224, new_tokens=16, gemm=1024),
}


# ---- measuring ----------------------------------------------------------------------------------

def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors that autograd keeps for the backward of `fn()`, each storage once,
    without the storages of `exclude` (parameters, inputs)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(kept.values())


def bf16_supported() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") and \
            "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# ---- the models -------------------------------------------------------------------------------

def tokenformer_config(s: dict, **overrides) -> Config:
    h = s["hidden"]
    values = dict(name="bench", num_layers=s["layers"], hidden_size=h, num_attention_heads=s["heads"],
                  qkv_slot_num=h, proj_slot_num=h, ffn_slot_num=4 * h, seq_length=max_positions(s),
                  vocab_size=VOCAB)
    return Config(**{**values, **overrides})


def max_positions(s: dict) -> int:
    """Long enough for training windows and for the prompt plus the generated tokens."""
    return max(s["seq"], s["prompt"] + s["new_tokens"] + 1)


def require_transformers():
    try:
        import transformers
    except ImportError:
        sys.exit("bench.compare needs Hugging Face transformers as the reference: "
                 "pip install -c constraints.txt -e '.[bench]'  (or run `make bench`)")
    return transformers


def hf_gpt_neox(s: dict, vocab_size: int | None = None):
    """HF GPTNeoXForCausalLM of the shape's width, depth, heads and positions (FFN 4 x width, untied
    head), with our padded vocabulary (default that of GPT-NeoX-20B, 50304)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    h = s["hidden"]
    config = GPTNeoXConfig(vocab_size=vocab_size or tokenformer_config(s).padded_vocab_size, hidden_size=h,
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           intermediate_size=4 * h, rotary_pct=0.25, max_position_embeddings=max_positions(s),
                           use_parallel_residual=False, attention_dropout=0.0, hidden_dropout=0.0,
                           tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return GPTNeoXForCausalLM(config)


def tokenformer_body(model: TokenFormer, idx: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, h): the model without its vocabulary head."""
    with torch.no_grad():
        x = model.word_embeddings(idx)
    cos, sin = rotary_cos_sin(torch.arange(idx.shape[1]), model.config.rotary_dim,
                              model.config.rotary_emb_base, x.dtype)
    for block in model.layers:
        x = block(x, cos, sin)
    return model.final_norm(x)


def train_step(model, forward, idx, targets, optimizer, head: bool, precision: str = "fp32",
               losses: list | None = None):
    """One optimizer step as a function: `forward(model, idx)` under the training loop's autocast
    for `precision`, the loss in float32 (`head`: cross-entropy of the logits; else the mean square
    of the hidden states), backward, `optimizer.step()`. Each loss is appended to `losses` (on the
    device: the step does not wait for the GPU)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(precision, idx.device):
            out = forward(model, idx)
        if head:
            loss = F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
        else:
            loss = out.float().square().mean()
        loss.backward()
        optimizer.step()
        if losses is not None:
            losses.append(loss.detach())
    return step


# ---- the suite ----------------------------------------------------------------------------------

def bench_pattention(s: dict, run: Run = Run(torch.device("cpu"), "fp32")) -> dict:
    """Item 1: one feed-forward-sized Pattention (h -> h, 4h tokens), forward + backward."""
    h, n, tokens = s["hidden"], 4 * s["hidden"], s["pattention_tokens"]
    torch.manual_seed(0)
    factory = dict(device=run.device, dtype=run.dtype)
    ours = Pattention(h, h, n, **factory)
    lean = Pattention(h, h, n, memory_lean=True, **factory)
    lean.load_state_dict(ours.state_dict())
    x = torch.randn(s["batch"], tokens // s["batch"], h, requires_grad=True, **factory)
    grad = torch.randn(s["batch"], tokens // s["batch"], h, **factory)
    compiled = torch.compile(ours)

    def fwd_bwd_of(layer, official=False):
        def fwd_bwd():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            with official_pattentions() if official else nullcontext():
                y = layer(x)
            y.backward(grad)
        return fwd_bwd

    print("  compiling the Pattention (torch.compile, inductor) ...", flush=True)
    start = time.perf_counter()
    fwd_bwd_of(compiled)()
    compile_s = time.perf_counter() - start
    t = alternate({"official": fwd_bwd_of(ours, True), "ours": fwd_bwd_of(ours), "lean": fwd_bwd_of(lean),
                   "compiled": fwd_bwd_of(compiled)}, max(15, s["reps"]))  # cheap: more repetitions
    excl = [x, *ours.parameters(), *lean.parameters()]
    with official_pattentions():
        mem_official = saved_bytes(lambda: ours(x), excl)
    mem_ours, mem_lean = saved_bytes(lambda: ours(x), excl), saved_bytes(lambda: lean(x), excl)
    return {
        "pattention_shape": f"x ({s['batch']}, {tokens // s['batch']}, {h}), {n} tokens, {h} -> {h}",
        "pattention_seconds": t, "pattention_compile_seconds": compile_s,
        "pattention_speedup_eager": t["official"] / t["ours"],
        "pattention_speedup_lean": t["official"] / t["lean"],
        "pattention_speedup_compiled": t["official"] / t["compiled"],
        "pattention_saved_bytes": {"official": mem_official, "ours": mem_ours, "lean": mem_lean},
        "pattention_memory_saving": mem_official / mem_ours,
        "pattention_memory_saving_lean": mem_official / mem_lean,
    }


def bench_training(s: dict, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> dict:
    """Items 2 and 3: training steps, whole and body, ours vs HF GPT-NeoX, as FLOP/s and MFU.

    The GEMM peak is timed in the same alternation as the steps (its median, like theirs), so that
    the load of other processes weighs on both sides of the MFU fraction alike. On a GPU in
    bench/common.py's datasheet table, MFU is against the datasheet peak instead."""
    torch.manual_seed(0)
    B, T = s["batch"], s["seq"]
    config = tokenformer_config(s)
    ours = TokenFormer(config).to(device, dtype).train()
    ref = hf_gpt_neox(s).to(device, dtype).train()
    idx = torch.randint(0, VOCAB, (B, T), device=device)
    targets = torch.randint(0, VOCAB, (B, T), device=device)
    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)

    # The body step leaves out every vocabulary-sized matrix: the head, and the embedding's
    # gradient and AdamW update (for HF, which unties them, embed_in and embed_out).
    body_ours = [p for n, p in ours.named_parameters() if not n.startswith("word_embeddings")]
    body_ref = [p for n, p in ref.gpt_neox.named_parameters() if not n.startswith("embed_in")]

    def hf_body(m, i):
        with torch.no_grad():
            x = m.gpt_neox.embed_in(i)
        return m.gpt_neox(inputs_embeds=x).last_hidden_state

    steps = {
        "ours": train_step(ours, lambda m, i: m(i), idx, targets, adamw(ours.parameters()), head=True),
        "hf": train_step(ref, lambda m, i: m(input_ids=i).logits, idx, targets, adamw(ref.parameters()), head=True),
        "ours_body": train_step(ours, tokenformer_body, idx, targets, adamw(body_ours), head=False),
        "hf_body": train_step(ref, hf_body, idx, targets, adamw(body_ref), head=False),
    }
    t = alternate({**steps, "gemm": gemm(s["gemm"], dtype, device)}, s["reps"])
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    datasheet = datasheet_peak(torch.cuda.get_device_name(device), dtype_name) if device.type == "cuda" else None
    peak = datasheet or 2 * s["gemm"] ** 3 / t["gemm"]
    source = "datasheet" if datasheet else f"measured {s['gemm']}^3 matmul in the same alternation"
    tokens = B * T
    f_ours = tokenformer_flops(config, seq_length=T).training() * tokens
    f_ref = gpt_neox_flops(s["hidden"], s["layers"], 4 * s["hidden"], config.padded_vocab_size, T).training() * tokens
    rate = {"ours": f_ours.total / t["ours"], "hf": f_ref.total / t["hf"],
            "ours_body": f_ours.body / t["ours_body"], "hf_body": f_ref.body / t["hf_body"]}
    return {"seconds": t, "flops_per_step": {"ours": f_ours.total, "hf": f_ref.total,
                                             "ours_body": f_ours.body, "hf_body": f_ref.body},
            "flops_per_second": rate,
            "step_flops_ratio": rate["ours"] / rate["hf"],
            "body_flops_ratio": rate["ours_body"] / rate["hf_body"],
            "mfu": rate["ours"] / peak, "mfu_body": rate["ours_body"] / peak,
            "mfu_hf": rate["hf"] / peak, "gemm_peak_flops": peak, "peak_source": source}


def bench_activation_memory(s: dict, device: torch.device = torch.device("cpu")) -> dict:
    """Item 5: bytes kept for the backward by a whole training forward (fp32)."""
    torch.manual_seed(0)
    config = tokenformer_config(s)
    idx = torch.randint(0, VOCAB, (s["batch"], s["seq"]), device=device)
    default = TokenFormer(config, device=device)
    lean = TokenFormer(tokenformer_config(s, pattention_memory_lean=True), device=device)
    params = [*default.parameters(), *lean.parameters()]
    with official_pattentions():
        official = saved_bytes(lambda: default(idx), params)
    ours, ours_lean = saved_bytes(lambda: default(idx), params), saved_bytes(lambda: lean(idx), params)
    return {"step_saved_bytes": {"official": official, "ours": ours, "lean": ours_lean},
            "step_memory_saving": official / ours, "step_memory_saving_lean": official / ours_lean}


def bench_generation(s: dict, run: Run = Run(torch.device("cpu"), "fp32")) -> dict:
    """Item 4: greedy generation, batch 1; prefill from 1-token runs, decode from the difference."""
    torch.manual_seed(0)
    ours = TokenFormer(tokenformer_config(s)).to(run.device, run.dtype).eval()
    ref = hf_gpt_neox(s).to(run.device, run.dtype).eval()
    prompt = torch.randint(0, VOCAB, (1, s["prompt"]), device=run.device)
    N = s["new_tokens"]

    def run_ours(n):
        return lambda: list(generate_tokens(ours, prompt[0].tolist(), n))

    def run_hf(n):
        def gen():
            with torch.no_grad():
                ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return gen

    t = alternate({"ours_1": run_ours(1), "hf_1": run_hf(1), "ours_n": run_ours(N), "hf_n": run_hf(N)},
                  s["reps"])
    decode = {k: (N - 1) / (t[f"{k}_n"] - t[f"{k}_1"]) for k in ("ours", "hf")}
    prefill = {k: s["prompt"] / t[f"{k}_1"] for k in ("ours", "hf")}
    # The prefill's matmul FLOPs (the head for the last position only, as both compute it):
    # at equal width a TokenFormer layer does 4/3 the work of a standard one.
    P, h = s["prompt"], s["hidden"]
    config = tokenformer_config(s)
    f_ours = tokenformer_flops(config, seq_length=P).body * P + 2 * h * config.padded_vocab_size
    f_hf = gpt_neox_flops(h, s["layers"], 4 * h, config.padded_vocab_size, P).body * P + 2 * h * config.padded_vocab_size
    return {"generation_seconds": t, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
            "prefill_speed_ratio": prefill["ours"] / prefill["hf"],
            "prefill_flops_ratio": (f_ours / t["ours_1"]) / (f_hf / t["hf_1"]),
            "decode_speed_ratio": decode["ours"] / decode["hf"]}


def bench_data_prep(quick: bool) -> dict:
    """Item 6: `bench/data_prep.py`."""
    return {"data_prep": data_prep.run(quick)}


def bench_decode(quick: bool, run: Run, threads: int | None) -> dict:
    """Item 7: the decode suite of `bench/decode.py` (its `run` gives ratios and table rows)."""
    return decode.run(quick=quick, device=run.device.type, dtype=run.dtype_name, threads=threads)


# The decode suite's headline keys (issue 17), put at the top of compare.json; the rest of its
# result (its own shape, device, timings) stays under "decode".
DECODE_KEYS = ("decode_speed_ratio", "decode_speed_ratio_plain", "decode_speed_ratio_param_matched",
               "decode_speed_ratio_bf16", "decode_speed_ratio_int8", "decode_static_speedup",
               "decode_compiled_speedup", "decode_roofline_fraction", "decode_roofline_fraction_hf",
               "memory_bandwidth_gb_s", "bytes_per_token")


def merge_decode(result: dict, suite: dict) -> list[tuple]:
    """Put the decode suite's headline keys at the top of `result`, the whole of it under
    `result["decode"]`, and return its table rows. Where a key clashes with item 4's
    (`decode_speed_ratio`), item 4's figure stays as `generation_<key>`."""
    rows = [tuple(row) for row in suite["rows"]]
    for key in DECODE_KEYS:
        if key not in suite:
            continue
        if key in result:
            result[f"generation_{key}"] = result[key]
        result[key] = suite[key]
    result["decode"] = {k: v for k, v in suite.items() if k != "rows"}
    result["decode_rows"] = rows
    return rows


# ---- report -------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_suite(s: dict, run: Run, quick: bool, threads: int | None) -> dict:
    """Items 1-7 in order; their keys, flat, plus the table rows of the decode suite."""
    result: dict = {}
    phase_start = [time.perf_counter()]

    def phase(title: str) -> None:
        now = time.perf_counter()
        print(f"  ({now - phase_start[0]:.0f} s)\n{title}", flush=True)
        phase_start[0] = now

    phase(f"[1/7] Pattention forward+backward ({run.dtype_name})")
    result.update(bench_pattention(s, run))
    phase("[2/7, 3/7] training steps and GEMM peak (fp32)")
    fp32 = bench_training(s, torch.float32, run.device)
    result.update({k: fp32[k] for k in ("step_flops_ratio", "body_flops_ratio")})
    result["mfu_fp32"], result["mfu_fp32_body"], result["mfu_fp32_hf"] = fp32["mfu"], fp32["mfu_body"], fp32["mfu_hf"]
    result["mfu_peak_source"] = fp32["peak_source"]
    result["training_fp32"] = fp32
    # bf16 on a CPU without bf16 units is emulated, ~50x slower than fp32: left out there
    if run.cuda or ((s["bf16"] or run.dtype_name == "bf16") and bf16_supported()):
        phase("[2/7, 3/7] training steps and GEMM peak (bf16 weights)")
        bf16 = bench_training(s, torch.bfloat16, run.device)
        result["training_bf16"] = bf16
        result["step_flops_ratio_bf16"], result["body_flops_ratio_bf16"] = bf16["step_flops_ratio"], bf16["body_flops_ratio"]
        result["mfu_bf16"] = bf16["mfu"]
    phase(f"[4/7] generation ({run.dtype_name})")
    result.update(bench_generation(s, run))
    phase("[5/7] activation memory of a training step")
    result.update(bench_activation_memory(s, run.device))
    phase("[6/7] data preparation")
    result.update(bench_data_prep(quick))
    phase("[7/7] decode (bench/decode.py)")
    merge_decode(result, bench_decode(quick, run, threads))
    phase("done")
    return result


def table_rows(result: dict) -> list[tuple]:
    """(measure, ratio, unit, target) of every headline figure, the decode suite's last."""
    rows = [
        ("Pattention fwd+bwd speed-up, eager", result["pattention_speedup_eager"], "x official sequence", ">= 1.2"),
        ("Pattention speed-up, torch.compile", result["pattention_speedup_compiled"], "x official (eager)", ">= 1.3"),
        ("Pattention speed-up, memory-lean", result["pattention_speedup_lean"], "x official sequence", ">= 1.15"),
        ("Pattention activation memory saving, lean", result["pattention_memory_saving_lean"], "x official bytes", ">= 2"),
        ("Pattention activation memory saving, default", result["pattention_memory_saving"], "x official bytes", ""),
        ("training step FLOP/s, whole model", result["step_flops_ratio"], "x HF GPTNeoX", ">= 0.9"),
        ("training step FLOP/s, body (no head)", result["body_flops_ratio"], "x HF GPTNeoX", ">= 0.9"),
        ("MFU fp32, whole step", result["mfu_fp32"], "of fp32 peak", ">= 0.5"),
        ("MFU fp32, body", result["mfu_fp32_body"], "of fp32 peak", ""),
        ("MFU fp32, HF GPTNeoX whole step", result["mfu_fp32_hf"], "of fp32 peak", ""),
    ]
    if "training_bf16" in result:
        rows += [("training step FLOP/s bf16, whole", result["step_flops_ratio_bf16"], "x HF GPTNeoX", ""),
                 ("training step FLOP/s bf16, body", result["body_flops_ratio_bf16"], "x HF GPTNeoX", ""),
                 ("MFU bf16, whole step", result["mfu_bf16"], "of bf16 peak", "")]
    decode_ratio = result.get("generation_decode_speed_ratio", result["decode_speed_ratio"])
    rows += [
        ("generation prefill tokens/s", result["prefill_speed_ratio"], "x HF generate", ""),
        ("generation prefill FLOP/s", result["prefill_flops_ratio"], "x HF generate", ""),
        ("generation decode tokens/s", decode_ratio, "x HF generate", ">= 1.0"),
        ("training-step activation memory saving", result["step_memory_saving"], "x official bytes", ""),
        ("  the same, memory-lean", result["step_memory_saving_lean"], "x official bytes", ""),
    ]
    return rows + result.get("decode_rows", [])


def print_report(result: dict, out: Path) -> None:
    print(f"\n{'measure':<50}{'ratio':>8}  {'unit':<20}{'target':>8}")
    for name, value, unit, target in table_rows(result):
        shown = f"{value:>8.2f}" if isinstance(value, (int, float)) else f"{'-':>8}"
        print(f"{name:<50}{shown}  {unit:<20}{str(target):>8}")
    pb = result["pattention_saved_bytes"]
    sb = result["step_saved_bytes"]
    print(f"\nPattention saved for backward: official {fmt_bytes(pb['official'])}, ours {fmt_bytes(pb['ours'])}, "
          f"lean {fmt_bytes(pb['lean'])} (bytes autograd keeps, without parameters and the input)")
    print(f"training step saved for backward: official sequence {fmt_bytes(sb['official'])}, "
          f"ours {fmt_bytes(sb['ours'])}, lean {fmt_bytes(sb['lean'])}")
    fp32 = result["training_fp32"]
    r = fp32["flops_per_second"]
    print(f"achieved fp32 GFLOP/s: ours {r['ours'] / 1e9:.1f} (body {r['ours_body'] / 1e9:.1f}), "
          f"HF {r['hf'] / 1e9:.1f} (body {r['hf_body'] / 1e9:.1f}); peak {fp32['gemm_peak_flops'] / 1e9:.1f} "
          f"({fp32['peak_source']})")
    d, p = result["decode_tokens_per_s"], result["prefill_tokens_per_s"]
    print(f"generation tokens/s: prefill ours {p['ours']:.0f} / HF {p['hf']:.0f}; "
          f"decode ours {d['ours']:.1f} / HF {d['hf']:.1f}")
    prep = result["data_prep"]
    if isinstance(prep, dict):
        rates = {name: r.get("tokens_per_s") for name, r in prep.get("tokenizers", {}).items()}
        print("data preparation tokens/s: " + (", ".join(f"{k} {v:,.0f}" for k, v in rates.items()
                                                         if isinstance(v, (int, float))) or str(prep)))
    print(f"took {result['seconds']:.0f} s; wrote {out}")


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes: under 3 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    run = resolve(args)
    s = SHAPES["quick" if args.quick else "full"]
    transformers = require_transformers()  # fail early, with the install hint
    started = time.perf_counter()
    cpu = machine_name()
    result: dict = {"mode": "quick" if args.quick else "full", "shape": s,
                    "dtype": "float32" if run.dtype_name == "fp32" else "bfloat16", "device": str(run.device),
                    "gpu": torch.cuda.get_device_name(run.device) if run.cuda else None,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "cpu": cpu, "threads": torch.get_num_threads()}
    print(f"bench.compare ({result['mode']}): width {s['hidden']}, {s['layers']} layers, {s['heads']} heads, "
          f"batch {s['batch']} x seq {s['seq']}, vocab 50304; {s['reps']} alternating repetitions; "
          f"torch {torch.__version__}, {run.describe()}, {cpu}", flush=True)
    result.update(run_suite(s, run, args.quick, args.threads))
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)  # first: a report bug must not lose the run
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result, args.out)
    return result


if __name__ == "__main__":
    main()
