"""The GPU suite: correctness and speed on one CUDA device in under 8 minutes, into one folder.

    python -m bench.gpu [OUT] [--device cuda|cpu|auto] [--tiny] [--only PART,...] [--budget SECONDS]
    (or bench/gpu.sh OUT ...)

Writes OUT/gpu.json (every part's figures, checks, status, seconds and peak memory; rewritten after
each part, so a run cut short keeps what it measured) and OUT/gpu.log (everything printed, the
torchrun workers' output and every error's traceback). OUT defaults to bench/results/gpu.

Parts, in order (the correctness parts in bench/gpu_checks.py, the speed parts in bench/gpu_speed.py);
each is guarded: an error is recorded with its traceback and the next part runs. A global budget
(default 450 s) skips a part whose estimate no longer fits and interrupts one that overruns, so the
whole run stays under 8 minutes with Python's start-up. `--only` runs some parts (a second run
after a failure, say). Without a CUDA device it stops with one sentence, unless `--device cpu`
asks for a dry run; `--tiny` shrinks every shape so that each part takes about a second (on the CPU,
`torch.compile` then uses the aot_eager backend: the same graph capture, no code generation).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import gpu_checks as checks
from bench import gpu_speed as speed
from bench.common import Run, add_device_arguments, resolve
from tokenformer.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gpu"
BUDGET_S = 450  # 7.5 minutes of parts; Python's and CUDA's start-up take the rest of the 8

# The parts with their estimated seconds on one H100 (the `tiny` dry run: about 1 s each). The
# estimates count CUDA and transformers start-up in the first part that meets them; compile times
# are inductor's on a 16-core host.
PARTS: list[tuple[str, Callable, int]] = [
    ("environment", speed.environment, 10),   # CUDA start-up; 8192^3 bf16 products and 1 GiB copies: < 1 s
    ("logits", checks.logits, 10),            # 3 x 2 float64 CPU forwards (2 layers, width 256, 256 tokens) < 1 s
    ("gradients", checks.gradients, 5),       # one float64 CPU backward, two on the device: ~1 s
    ("training", checks.training, 25),        # 2 loop runs of 60 steps of base-cpu: start-up dominates
    ("hf_generate", checks.hf_generate, 10),  # transformers' import ~5 s; 2 x 32 greedy steps
    ("resume", checks.resume, 20),            # 4 loop runs of 6 steps, checkpoints on local disk
    ("fsdp", checks.fsdp, 40),                # 2 torchrun launches (~15 s each: Python, torch, NCCL start-up)
    ("train_mfu", speed.train_mfu, 120),      # 150M: search ~10 s, eager ~5 s, compile ~60 s, HF ~15 s
    ("decode", speed.decode_batch_1, 50),     # 150M bf16: compiled step ~30 s (CUDA graphs), 5 rounds ~5 s
    ("decode_batched", speed.decode_batched, 45),  # the same at batch 16: the step compiles again
    ("pattention", speed.pattention, 30),     # one Pattention compile ~20 s, 15 alternations < 1 s
    ("compile", checks.compile_check, 50),    # a 2-layer model fwd+bwd ~30 s, the decode step ~20 s
    # 2 GPUs only (else a note, the dry run too): 2 one-process runs and 4 torchrun launches of ~15 s each; last,
    # so that on one GPU's 8-minute budget it never pushes another part out (`--only layouts` runs it)
    ("layouts", speed.layouts, 100),
]

SHAPES = {
    "gpu": dict(
        compile_backend=None,  # inductor
        environment=dict(matmul=8192, reps=20, stream_mib=1024),
        check_model=dict(name="base-cpu", num_layers=2), check_seq=128, check_batch=2, decode_new_tokens=32,
        loop=dict(preset="base-cpu", seq=256, micro_batch=16, steps=60, lr=3e-3, resume_steps=6,
                  corpus_tokens=400_000),
        fsdp=dict(preset="base-cpu", seq=256, micro_batch=8, steps=4),
        train=dict(preset="150M", seq=2048, candidates=[4, 8, 16, 32, 64], warmup=3, steps=8),
        pattention=dict(hidden=768, pattention_tokens=8 * 2048, batch=8, reps=15),
        decode=dict(shape="150M", dtype="bf16", batch=16, paths=["ours_plain", "ours_static", "ours_compiled", "hf"]),
        layouts=dict(preset="base-cpu", seq=256, micro_batch=8, steps=20, log_interval=5,
                     parallelisms=["ddp", "fsdp2", "tp", "pp"]),
    ),
    "tiny": dict(
        compile_backend="aot_eager",
        environment=dict(matmul=64, reps=2, stream_mib=4),
        check_model=dict(name="tiny"), check_seq=16, check_batch=2, decode_new_tokens=8,
        loop=dict(preset="tiny", seq=32, micro_batch=4, steps=32, lr=1e-2, resume_steps=4, corpus_tokens=20_000),
        fsdp=dict(preset="tiny", seq=32, micro_batch=2, steps=2),
        train=dict(preset="tiny", seq=32, candidates=[1, 2], warmup=1, steps=2),
        pattention=dict(hidden=64, pattention_tokens=256, batch=2, reps=3),
        decode=dict(shape="tiny", dtype="bf16", batch=4, paths=["ours_plain", "ours_static", "ours_compiled", "hf"]),
        layouts=dict(preset="tiny", seq=32, micro_batch=2, steps=4, log_interval=1, parallelisms=["tp", "pp"]),
    ),
}


class PartTimeout(Exception):
    """A part ran past the suite's budget."""


@dataclass
class Suite:
    """What every part gets: where it runs, its shapes, a scratch folder, the log, the device's
    measured peaks (filled by `environment`) and the clock of the budget."""

    run: Run
    shapes: dict
    workdir: Path
    log_file: io.TextIOBase
    deadline: float
    peaks: dict = field(default_factory=dict)

    def log(self, text: str, echo: bool = True) -> None:
        """Print `text` (into the log, through the tee) or, with `echo=False`, only write it to the log."""
        if echo:
            print(text, flush=True)
        else:
            self.log_file.write(text.rstrip("\n") + "\n")
            self.log_file.flush()

    def seconds_left(self) -> float:
        return max(self.deadline - time.perf_counter(), 0.0)

    def attempt(self, label: str, fn: Callable[[], dict]) -> dict:
        """`fn()`, or {"error": ...} when it raises (the traceback goes to the log): one variant's
        failure inside a part leaves the others standing. A budget interrupt is not caught."""
        try:
            return fn()
        except PartTimeout:
            raise
        except Exception as error:  # noqa: BLE001 - recorded, and the part goes on
            self.log(f"  {label} failed: {type(error).__name__}: {error}")
            self.log(traceback.format_exc(), echo=False)
            return {"error": f"{type(error).__name__}: {error}"}


class Tee(io.TextIOBase):
    """A text stream writing to several streams at once (the console and the log)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`; elsewhere, no limit. A call into C
    (a CUDA wait) is interrupted when it returns."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def interrupt(signum, frame):
        raise PartTimeout(f"the part ran past the suite's budget ({seconds:.0f} s were left)")
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def compile_backend(backend: str | None):
    """Within the block every `torch.compile` (ours, the Decoder's, `Module.compile`'s) uses
    `backend` instead of inductor and its modes; None changes nothing."""
    if backend is None:
        yield
        return
    original = torch.compile

    def compile_with(model=None, **kwargs):
        kept = {k: v for k, v in kwargs.items() if k in ("fullgraph", "dynamic")}
        return original(model, backend=backend, **kept) if model is not None else \
            (lambda fn: original(fn, backend=backend, **kept))
    torch.compile = compile_with
    try:
        yield
    finally:
        torch.compile = original


def run_part(name: str, fn: Callable, estimate: float, suite: Suite) -> dict:
    """One part, guarded and timed: its status (ok, failed: a check missed, error, timeout, skipped),
    seconds, peak device memory, and its result or error."""
    left = suite.seconds_left()
    if estimate > left:
        suite.log(f"[{name}] skipped: {left:.0f} s of the budget left, estimated {estimate:.0f} s")
        return {"status": "skipped", "reason": f"budget: {left:.0f} s left, estimated {estimate:.0f} s"}
    suite.log(f"[{name}]")
    speed.reset_peak_memory(suite.run.device)
    start = time.perf_counter()
    record: dict = {}
    try:
        with time_limit(left):
            record["result"] = fn(suite)
        failed = [k for k, c in record["result"].get("checks", {}).items() if not c["ok"]]
        record["status"] = "failed" if failed else "ok"
        if failed:
            record["failed_checks"] = failed
    except PartTimeout as error:
        record.update(status="timeout", error=str(error))
    except Exception as error:  # noqa: BLE001 - recorded; the next part runs
        record.update(status="error", error=f"{type(error).__name__}: {error}")
        suite.log(traceback.format_exc(), echo=False)
    record["seconds"] = time.perf_counter() - start
    record["peak_memory_gib"] = speed.peak_memory_gib(suite.run.device)
    suite.log(f"[{name}] {record['status']} in {record['seconds']:.1f} s"
              + (f": {record['error']}" if "error" in record else "")
              + (f" (failed: {', '.join(record['failed_checks'])})" if "failed_checks" in record else ""))
    torch._dynamo.reset()  # compiled graphs and CUDA graph pools of this part go with it
    speed.free_memory(suite.run.device)
    return record


def summary(result: dict) -> dict:
    """The headline figures, flat, and every check's outcome."""
    parts = result["parts"]
    out: dict = {"parts_ok": [n for n, p in parts.items() if p["status"] == "ok"],
                 "parts_not_ok": {n: p["status"] for n, p in parts.items() if p["status"] != "ok"},
                 "checks_failed": [f"{n}.{c}" for n, p in parts.items() for c in p.get("failed_checks", [])]}
    value = {n: p.get("result", {}) for n, p in parts.items()}
    peaks = value.get("environment", {}).get("peaks", {})
    out["bf16_matmul_tflops"] = peaks.get("bf16_matmul_flops", math.nan) / 1e12
    out["copy_bandwidth_gb_s"] = peaks.get("copy_bytes_per_s", math.nan) / 1e9
    train = value.get("train_mfu", {})
    for name in ("eager", "compiled", "hf"):
        out[f"train_mfu_{name}"] = train.get(name, {}).get("mfu")
        out[f"train_tokens_per_s_{name}"] = train.get(name, {}).get("tokens_per_s")
    out["train_micro_batch"] = train.get("micro_batch")
    out["train_flops_ratio_vs_hf_compiled"] = train.get("compiled_flops_ratio_vs_hf")
    out["train_flops_ratio_vs_hf_eager"] = train.get("eager_flops_ratio_vs_hf")
    p = value.get("pattention", {})
    out["pattention_speedup_eager_bf16"] = p.get("pattention_speedup_eager")
    out["pattention_speedup_compiled_bf16"] = p.get("pattention_speedup_compiled")
    for part, label in (("decode", "batch_1"), ("decode_batched", "batched")):
        d = value.get(part, {})
        out[f"decode_speed_ratio_{label}"] = d.get("decode_speed_ratio")
        out[f"decode_roofline_fraction_{label}"] = d.get("decode_roofline_fraction")
        out[f"decode_roofline_fraction_hf_{label}"] = d.get("decode_roofline_fraction_hf")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=RESULTS,
                        help=f"folder for gpu.json and gpu.log (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run in seconds (with --device cpu)")
    parser.add_argument("--only", default=None, help="comma-separated parts to run (default all): "
                        + ", ".join(name for name, _, _ in PARTS))
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for all the parts (default {BUDGET_S}); a part that no longer fits is skipped")
    add_device_arguments(parser, dtype="bf16")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU and torch sees none: run it on a GPU machine, "
                         "or pass --device cpu (with --tiny) for a dry run")
    known = [name for name, _, _ in PARTS]
    args.parts = known if args.only is None else args.only.split(",")
    unknown = [name for name in args.parts if name not in known]
    if unknown:
        raise SystemExit(f"--only {args.only}: unknown part {unknown[0]!r}; use {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    run = resolve(args)
    shapes = SHAPES["tiny" if args.tiny else "gpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, started = args.out / "gpu.json", time.perf_counter()
    result: dict = {"device": str(run.device), "gpu": torch.cuda.get_device_name(run.device) if run.cuda else None,
                    "tiny": args.tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "budget_s": args.budget, "seconds": 0.0, "shapes": shapes, "parts": {}}
    with open(args.out / "gpu.log", "w") as log_file, tempfile.TemporaryDirectory() as work, \
            redirect_stdout(Tee(sys.stdout, log_file)), redirect_stderr(Tee(sys.stderr, log_file)), \
            compile_backend(shapes["compile_backend"]):
        suite = Suite(run, shapes, Path(work), log_file, deadline=started + args.budget)
        suite.log(f"bench.gpu: {run.describe()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                  f"budget {args.budget:.0f} s, parts {', '.join(args.parts)}")
        for name, fn, estimate in PARTS:
            if name in args.parts:
                result["parts"][name] = run_part(name, fn, 1 if args.tiny else estimate, suite)
                result["seconds"] = time.perf_counter() - started
                atomic_write_text(json_path, json.dumps(result, indent=2, default=str) + "\n")
        result["summary"] = summary(result)
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str) + "\n")
        for key, value in result["summary"].items():
            shown = f"{value:>12.3f}" if isinstance(value, float) else f"{value!s:>12}"
            suite.log(f"  {key:<40}{shown}")
        suite.log(f"took {result['seconds']:.0f} s; wrote {json_path} and {args.out / 'gpu.log'}")
    gc.collect()
    return result


if __name__ == "__main__":
    main()
