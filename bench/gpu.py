"""The GPU suite: one GPU, under 8 minutes, one JSON (bench/results/gpu.json). Driven by bench/gpu.sh.

    python -m bench.gpu [--device cuda|cpu|auto] [--tiny] [--only pattention,fsdp,decode] [--out FILE]

1. `pattention`: a feed-forward-sized Pattention of the 150M preset (768 -> 768, 3072 tokens, on
   8 x 2048 positions), forward + backward, in fp32 and bf16: ours eager and `torch.compile`d
   against the official operation sequence (`bench/reference.py`), ratios from the same
   alternation, and MFU against the card's peak (`bench/common.py`).
2. `fsdp`: training steps of the 150M preset sharded with FSDP2 on one rank (`torchrun
   --nproc_per_node 1 -m bench.fsdp_step`, bf16), eager and with each block compiled: tokens/s, MFU.
3. `decode`: `bench/decode.py`'s `run` at the 150M preset's shape (ours vs HF GPTNeoX: plain,
   static cache, compiled, bf16, int8; the roofline fraction against the measured bandwidth).

Without a CUDA device it stops with one sentence, unless `--device cpu` asks for a dry run; `--tiny`
shrinks every shape (the tiny preset, width 64) so that the dry run takes seconds. `--dtype` (default
bf16) is the decode suite's main dtype; the Pattention runs both, the FSDP2 step bf16. Times wait for
the GPU (`torch.cuda.synchronize`). Every ratio is > 1 when ours is better.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import decode
from bench.common import Run, add_device_arguments, mfu, peak_flops, resolve
from bench.compare import bench_pattention
from tokenformer.flops import pattention_flops

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gpu.json"
SECTIONS = ("pattention", "fsdp", "decode")

# The 150M preset's feed-forward Pattention and a training step of the preset; `tiny` for dry runs.
SHAPES = {
    "gpu": dict(pattention=dict(hidden=768, pattention_tokens=8 * 2048, batch=8, reps=20),
                fsdp=dict(preset="150M", seq=2048, micro_batch=4, steps=10, warmup=3, variants="eager,compiled"),
                peak_matmul=None),
    "tiny": dict(pattention=dict(hidden=64, pattention_tokens=256, batch=2, reps=3),
                 fsdp=dict(preset="tiny", seq=64, micro_batch=2, steps=2, warmup=1, variants="eager"),
                 peak_matmul=128),  # a CPU without bf16 units multiplies bf16 at ~1 GFLOP/s
}


def pattention_section(shape: dict, run: Run, peak_matmul: int | None = None) -> dict:
    """Item 1 in fp32 and in bf16, each with its MFU against the peak of its dtype."""
    h, tokens = shape["hidden"], shape["pattention_tokens"]
    flops = 3 * tokens * pattention_flops(h, h, 4 * h)  # forward + backward
    out = {}
    for dtype in ("fp32", "bf16"):
        result = bench_pattention(shape, Run(run.device, dtype))
        peak, source = peak_flops(run.device, dtype, peak_matmul)
        seconds = result["pattention_seconds"]
        out[dtype] = {**result, "flops": flops, "peak_flops": peak, "peak_source": source,
                      "mfu": {name: mfu(flops, t, peak) for name, t in seconds.items()}}
    return out


def fsdp_section(shape: dict, run: Run, peak_matmul: int | None = None) -> dict:
    """Item 2: `bench.fsdp_step` under torchrun with one rank, in a subprocess (a process group of
    its own); its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp_step.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "bench.fsdp_step", "--out", str(out), "--device", run.device.type, "--dtype", "bf16",
                   "--preset", shape["preset"], "--seq", str(shape["seq"]), "--micro-batch", str(shape["micro_batch"]),
                   "--steps", str(shape["steps"]), "--warmup", str(shape["warmup"]), "--variants", shape["variants"]]
        if peak_matmul:
            command += ["--peak-matmul", str(peak_matmul)]
        if not run.cuda:  # the dry run: the rank gets this process's threads, not torchrun's one
            command += ["--threads", str(torch.get_num_threads())]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the FSDP2 training step under torchrun failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def decode_section(tiny: bool, run: Run) -> dict:
    """Item 3: `bench.decode.run` at the 150M preset's shape (`--tiny`: its quick shape)."""
    result = decode.run(device=run.device.type, dtype=run.dtype_name, shape="quick" if tiny else "150M")
    result["rows"] = [list(row) for row in result.get("rows", [])]
    return result


def summary(result: dict) -> dict:
    """The headline figures, flat: what bench/README.md's GPU table shows."""
    flat: dict = {}
    for dtype, p in result.get("pattention", {}).items():
        flat[f"pattention_speedup_eager_{dtype}"] = p["pattention_speedup_eager"]
        flat[f"pattention_speedup_compiled_{dtype}"] = p["pattention_speedup_compiled"]
        flat[f"pattention_mfu_compiled_{dtype}"] = p["mfu"]["compiled"]
    fsdp = result.get("fsdp", {})
    for name, v in fsdp.get("variants", {}).items():
        flat[f"fsdp_{name}_tokens_per_s"] = v["tokens_per_s"]
        flat[f"fsdp_{name}_mfu"] = v["mfu"]
    if "compiled_speedup" in fsdp:
        flat["fsdp_compiled_speedup"] = fsdp["compiled_speedup"]
    decode = result.get("decode", {})
    for key in ("decode_speed_ratio", "decode_speed_ratio_bf16", "decode_compiled_speedup"):
        if key in decode:
            flat[key] = decode[key]
    return flat


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run in seconds (with --device cpu)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run (default {','.join(SECTIONS)})")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    add_device_arguments(parser, dtype="bf16")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU and torch sees none: run it on a GPU machine, "
                         "or pass --device cpu (with --tiny) for a dry run")
    sections = args.only.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only {args.only}: unknown section {sorted(unknown)[0]!r}; use {', '.join(SECTIONS)}")
    run = resolve(args)
    shapes = SHAPES["tiny" if args.tiny else "gpu"]
    started = time.perf_counter()
    result: dict = {"device": str(run.device), "gpu": torch.cuda.get_device_name(run.device) if run.cuda else None,
                    "tiny": args.tiny, "torch": torch.__version__, "shapes": shapes}
    print(f"bench.gpu: {run.describe()}, sections {', '.join(sections)}", flush=True)
    if "pattention" in sections:
        print("[1/3] Pattention forward+backward, fp32 and bf16", flush=True)
        result["pattention"] = pattention_section(shapes["pattention"], run, shapes["peak_matmul"])
    if "fsdp" in sections:
        print(f"[2/3] {shapes['fsdp']['preset']} training steps, FSDP2 on 1 rank (torchrun), bf16", flush=True)
        result["fsdp"] = fsdp_section(shapes["fsdp"], run, shapes["peak_matmul"])
    if "decode" in sections:
        print("[3/3] decode (bench/decode.py)", flush=True)
        result["decode"] = decode_section(args.tiny, run)
    result["summary"] = summary(result)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)  # first: a report bug must not lose the run
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for key, value in result["summary"].items():
        print(f"  {key:<40}" + (f"{value:>12.3f}" if isinstance(value, (int, float)) else f"{value!s:>12}"))
    print(f"took {result['seconds']:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
