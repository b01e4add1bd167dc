"""The speed parts of the GPU suite (`bench/gpu.py`): each measures against a baseline timed in the
same run, and against the device's own ceilings measured by the first part.

    environment  the card, torch, CUDA; the bf16 matmul rate (a square product, measured) and the
                 copy bandwidth (STREAM copy and triad): the peaks the other parts divide by
    train_mfu    a training step of the 150M preset (sequence 2048, bf16 autocast, fused AdamW) at
                 the largest micro-batch that fits (a quick search over powers of two), eager and
                 with every block compiled (as `compile: true`), and HF GPTNeoX of equal width
    pattention   the 150M feed-forward Pattention, forward + backward in bf16, against the official
                 operation sequence (`bench.compare.bench_pattention`)
    decode       decode tokens/s at batch 1 and at a larger batch (`bench.decode.run`): ours plain,
                 static cache, compiled step, against HF `generate`, and the bandwidth roofline

MFU is analytic matmul FLOPs (`tokenformer.flops`) per second over the measured bf16 matmul rate
(`mfu`), and over the datasheet figure where bench/common.py knows the card (`mfu_datasheet`).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from bench import decode as decode_suite
from bench.common import Run, alternate, datasheet_peak, measured_peak, synchronize
from bench.gpu_checks import check
from bench.compare import bench_pattention, hf_gpt_neox, train_step
from tokenformer import Config, TokenFormer
from tokenformer.flops import gpt_neox_flops, pattention_flops, tokenformer_flops

GiB = 2**30


def free_memory(device: torch.device) -> None:
    """On a GPU, drop what the last step left: Python garbage first (cycles hold tensors), then the
    CUDA allocator's cache. On the CPU (the dry run) memory is not what a part runs short of."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fractions(flops_per_s: float, suite) -> dict:
    """A rate as a fraction of the measured bf16 matmul rate and of the datasheet peak."""
    measured = suite.peaks.get("bf16_matmul_flops")
    datasheet = suite.peaks.get("bf16_datasheet_flops")
    return {"flops_per_s": flops_per_s, "mfu": flops_per_s / measured if measured else None,
            "mfu_datasheet": flops_per_s / datasheet if datasheet else None}


# ---- the device's ceilings ----------------------------------------------------------------------

def environment(suite) -> dict:
    """What the run is on, and its measured ceilings (kept in `suite.peaks` for the other parts)."""
    device = suite.run.device
    e = suite.shapes["environment"]
    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, total_memory_gib=props.total_memory / GiB)
        suite.peaks["bf16_datasheet_flops"] = datasheet_peak(props.name, "bf16")
    else:
        info["device_name"] = "CPU"
    matmul = measured_peak(device, "bf16", e["matmul"], reps=e["reps"])
    copies, moved = decode_suite.stream(e["stream_mib"], device)
    seconds = alternate(copies, e["reps"])
    bandwidth = {name: moved[name] / seconds[name] for name in copies}
    suite.peaks.update(bf16_matmul_flops=matmul, copy_bytes_per_s=bandwidth["copy"],
                       triad_bytes_per_s=bandwidth["triad"])
    suite.log(f"  {info['device_name']}: bf16 matmul ({e['matmul']}^3) {matmul / 1e12:.1f} TFLOP/s, "
              f"copy {bandwidth['copy'] / 1e9:.0f} GB/s, triad {bandwidth['triad'] / 1e9:.0f} GB/s (read + written)")
    return {**info, "peaks": dict(suite.peaks), "matmul_side": e["matmul"], "stream_mib": e["stream_mib"]}


# ---- training step MFU --------------------------------------------------------------------------

def largest_micro_batch(make_step, candidates: list[int], device: torch.device) -> tuple[int | None, dict]:
    """The largest of `candidates` (ascending) whose step `make_step(mb)()` runs without running
    out of device memory, and what each try gave; stops at the first that does not fit."""
    best, tried = None, {}
    for micro_batch in candidates:
        try:
            step = make_step(micro_batch)
            step()
            synchronize(device)
            best, tried[micro_batch] = micro_batch, "fits"
        except torch.OutOfMemoryError:
            tried[micro_batch] = "out of memory"
            break
        finally:
            step = None
            free_memory(device)
    return best, tried


def time_steps(step, warmup: int, steps: int, device: torch.device) -> dict:
    """Median seconds of `steps` calls of `step` after `warmup` (compilation, the allocator), each
    waited for, and the peak memory over all of them."""
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": statistics.median(times), "warmup_seconds": warmup_s,
            "peak_memory_gib": peak_memory_gib(device)}


def step_maker(model, forward, vocab: int, seq: int, device: torch.device):
    """`make_step(micro_batch)`: a bf16-autocast training step of `model` on random tokens."""
    def make_step(micro_batch: int):
        batch = torch.randint(0, vocab, (micro_batch, seq + 1), device=device)  # (B, T + 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        return train_step(model, forward, batch[:, :-1], batch[:, 1:], optimizer, head=True, precision="bf16")
    return make_step


def train_mfu(suite) -> dict:
    """Ours eager and compiled, then HF GPTNeoX, each at the largest micro-batch that fits it."""
    t, device = suite.shapes["train"], suite.run.device
    config = Config.from_name(t["preset"], seq_length=t["seq"])
    vocab, seq = config.padded_vocab_size, t["seq"]
    torch.manual_seed(0)
    model = TokenFormer(config, device=device).train()
    make_ours = step_maker(model, lambda m, idx: m(idx), vocab, seq, device)
    micro_batch, tried = largest_micro_batch(make_ours, t["candidates"], device)
    if micro_batch is None:
        raise RuntimeError(f"no micro-batch of {t['candidates']} fits a {t['preset']} step: {tried}")
    tokens = micro_batch * seq
    ours_flops = tokenformer_flops(config).training().total * tokens
    out: dict = {"preset": t["preset"], "seq": seq, "micro_batch": micro_batch, "micro_batch_tried": tried,
                 "parameters": model.num_parameters(), "flops_per_step": ours_flops}

    def measure(label: str, make_step, flops: float, tokens: int) -> dict:
        timing = time_steps(make_step(tokens // seq), t["warmup"], t["steps"], device)
        result = {**timing, "tokens_per_s": tokens / timing["seconds_per_step"],
                  **fractions(flops / timing["seconds_per_step"], suite)}
        suite.log(f"  {label}: micro-batch {tokens // seq}, {result['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {result['mfu'] or 0:.3f}, peak memory {result['peak_memory_gib'] or 0:.1f} GiB")
        free_memory(device)
        return result
    out["eager"] = suite.attempt("eager", lambda: measure("eager", make_ours, ours_flops, tokens))
    for block in model.layers:  # as the loop's `compile: true`: block by block, in place
        block.compile()
    out["compiled"] = suite.attempt("compiled", lambda: measure("compiled", make_ours, ours_flops, tokens))
    del model, make_ours
    free_memory(device)
    out["hf"] = suite.attempt("hf", lambda: hf_step(suite, config, [c for c in t["candidates"] if c <= micro_batch],
                                                    measure))
    for name in ("eager", "compiled"):
        if "flops_per_s" in out[name] and "flops_per_s" in out["hf"]:
            out[f"{name}_flops_ratio_vs_hf"] = out[name]["flops_per_s"] / out["hf"]["flops_per_s"]
            out[f"{name}_tokens_ratio_vs_hf"] = out[name]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


def hf_step(suite, config: Config, candidates: list[int], measure) -> dict:
    """HF GPTNeoXForCausalLM of the same width, depth, heads, sequence and padded vocabulary (FFN
    4 x width, untied head), eager, at the largest of `candidates` that fits it."""
    device, seq = suite.run.device, config.seq_length
    shape = dict(hidden=config.hidden_size, layers=config.num_layers, heads=config.num_attention_heads,
                 seq=seq, prompt=0, new_tokens=0)
    torch.manual_seed(0)
    hf = hf_gpt_neox(shape, vocab_size=config.padded_vocab_size).to(device).train()
    make_hf = step_maker(hf, lambda m, idx: m(input_ids=idx).logits, config.padded_vocab_size, seq, device)
    micro_batch, tried = largest_micro_batch(make_hf, candidates, device)
    if micro_batch is None:
        raise RuntimeError(f"no micro-batch of {candidates} fits HF GPTNeoX's step: {tried}")
    flops = gpt_neox_flops(config.hidden_size, config.num_layers, 4 * config.hidden_size,
                           config.padded_vocab_size, seq).training().total * micro_batch * seq
    result = measure("HF GPTNeoX eager", make_hf, flops, micro_batch * seq)
    return {**result, "micro_batch": micro_batch, "micro_batch_tried": tried, "flops_per_step": flops,
            "parameters": sum(p.numel() for p in hf.parameters())}


# ---- Pattention and decoding --------------------------------------------------------------------

def pattention(suite) -> dict:
    """`bench.compare.bench_pattention` in bf16 (ours eager, lean, compiled vs the official
    sequence), with each variant's MFU."""
    s = suite.shapes["pattention"]
    result = bench_pattention(s, Run(suite.run.device, "bf16"))
    h, tokens = s["hidden"], s["pattention_tokens"]
    flops = 3 * tokens * pattention_flops(h, h, 4 * h)  # forward + backward
    result["flops"] = flops
    result["fractions"] = {name: fractions(flops / t, suite) for name, t in result["pattention_seconds"].items()}
    suite.log(f"  {result['pattention_shape']}: speed-up eager {result['pattention_speedup_eager']:.2f}, "
              f"compiled {result['pattention_speedup_compiled']:.2f} (x official sequence)")
    return result


def decode(suite, batch: int) -> dict:
    """`bench.decode.run` at the suite's decode shape, `batch` prompts, its paths; the tokens/s each
    path would reach at the bandwidth roofline (bandwidth x batch / bytes per step)."""
    d = suite.shapes["decode"]
    result = decode_suite.run(device=suite.run.device.type, dtype=d["dtype"], shape=d["shape"], batch=batch,
                              paths=tuple(d["paths"]))
    result["rows"] = [list(row) for row in result["rows"]]
    bandwidth = result["memory_bandwidth_gb_s"] * 1e9
    result["roofline_tokens_per_s"] = {name: bandwidth * batch / b for name, b in result["bytes_per_step_all"].items()}
    tps = result["decode_tokens_per_s"]
    suite.log(f"  batch {batch}: " + ", ".join(f"{name} {value:,.0f} tokens/s" for name, value in tps.items())
              + f"; roofline fraction {result['decode_roofline_fraction']:.2f}")
    return result


def decode_batch_1(suite) -> dict:
    return decode(suite, 1)


def decode_batched(suite) -> dict:
    return decode(suite, suite.shapes["decode"]["batch"])


def layouts(suite) -> dict:
    """Training throughput of 2 ranks as DDP, FSDP2, token parallelism and two pipeline stages against
    one process on the same global batch (`bench.distributed_speed`, one GPU per rank), and whether
    every layout ends at the one-process loss. Needs 2 GPUs: elsewhere (the dry run too) a note; on
    CPUs `python -m bench.distributed_speed --parallelism ddp fsdp2 tp pp` measures the same."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    gpus = torch.cuda.device_count() if suite.run.cuda else 0
    if gpus < 2:
        return {"note": f"skipped: needs 2 GPUs, this run has {gpus}", "checks": {}}
    shape = suite.shapes["layouts"]
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir=suite.workdir) as tmp:
        out = Path(tmp) / "layouts.json"
        command = [sys.executable, "-m", "bench.distributed_speed", "--preset", shape["preset"], "--seq",
                   str(shape["seq"]), "--micro-batch", str(shape["micro_batch"]), "--accumulation", "2",
                   "--steps", str(shape["steps"]), "--log-interval", str(shape["log_interval"]), "--nproc", "2",
                   "--parallelism", *shape["parallelisms"], "--device", suite.run.device.type, "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=suite.seconds_left())
        suite.log(done.stdout + done.stderr, echo=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench.distributed_speed failed:\n{done.stderr[-3000:]}")
        rows = json.loads(out.read_text())["runs"]
    single = next(r for r in rows if r["processes"] == 1)["final_loss"]
    for row in rows:
        suite.log(f"  {row['parallelism']:<6} x{row['processes']}: {row['tokens_per_s']:,.0f} tokens/s "
                  f"({row['speedup_vs_1_process']:.2f}x), final loss {row['final_loss']:.4f}")
    worst = max(abs(r["final_loss"] - single) for r in rows)
    return {"runs": rows, "checks": {"same_final_loss": check(worst, 1e-3)}}
