"""Training steps of a preset sharded with FSDP2, timed on each rank: the worker of `bench/gpu.py`.

    torchrun --standalone --nproc_per_node 1 -m bench.fsdp_step --out step.json \
        [--preset 150M] [--seq 2048] [--micro-batch 4] [--steps 10] [--device auto] [--dtype bf16] \
        [--variants eager,compiled]

Why not `tokenformer train`: on one rank the training loop leaves FSDP out (it shards only when
there are several ranks), and this benchmark is about the sharded step itself. The numerics are the
loop's: fp32 master weights, FSDP2's mixed-precision policy (`sharded_param_dtype`: bf16 compute,
fp32 gradient reduction on a GPU) and the loop's autocast; `compiled` compiles each block in place
before sharding, as `compile: true` does. Random tokens: speed does not depend on them. Rank 0
writes the JSON: per variant the median step seconds, tokens/s and MFU against `bench.common`'s peak,
and the loss of every step; `--reference` adds those of an unsharded copy trained through the same
steps (the check that sharding changes nothing but rounding).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bench.common import add_device_arguments, mfu, peak_flops, resolve, synchronize
from bench.compare import train_step
from tokenformer import Config, TokenFormer
from tokenformer.flops import tokenformer_flops
from tokenformer.training.precision import sharded_param_dtype


def shard(model: TokenFormer, param_dtype: torch.dtype | None) -> None:
    """`fully_shard` per block, then the root: what `wrap_model` does with several ranks (it is a
    no-op on one, by design, so it is not reused here)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def make_step(model, args: argparse.Namespace, run, batch: torch.Tensor, losses: list):
    """One optimizer step of `model` on `batch` (B, T + 1) under the loop's autocast (fused AdamW on
    a GPU), its loss kept in `losses`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=run.cuda or None)
    return train_step(model, lambda m, idx: m(idx), batch[:, :-1], batch[:, 1:], optimizer, head=True,
                      precision=args.dtype, losses=losses)


def reference_losses(model: TokenFormer, args: argparse.Namespace, run, batch: torch.Tensor) -> list[float]:
    """The losses of the same steps on an unsharded copy: what FSDP2 must reproduce (in fp32, to
    float32 rounding; in bf16 its compute dtype also rounds the weights, which autocast keeps)."""
    losses: list = []
    step = make_step(model, args, run, batch, losses)
    for _ in range(args.warmup + args.steps):
        step()
    return [float(loss) for loss in losses]


def time_variant(config: Config, compiled: bool, args: argparse.Namespace, run) -> dict:
    """Median seconds of `args.steps` optimizer steps after `args.warmup`, and what they achieve;
    with `args.reference`, the losses of an unsharded copy and the largest relative difference."""
    torch.manual_seed(0)
    model = TokenFormer(config).to(run.device).train()
    parameters = model.num_parameters()
    batch = torch.randint(0, config.vocab_size, (args.micro_batch, config.seq_length + 1), device=run.device)
    reference = copy.deepcopy(model) if args.reference else None
    if compiled:
        for block in model.layers:
            block.compile()
    shard(model, sharded_param_dtype(args.dtype, run.device))
    sharded = all(isinstance(p, DTensor) for p in model.parameters())  # FSDP2 holds DTensor shards
    losses: list = []
    step = make_step(model, args, run, batch, losses)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(run.device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(run.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = args.micro_batch * config.seq_length
    flops = tokenformer_flops(config).training().total * tokens
    result = {"parameters": parameters, "sharded": sharded, "seconds_per_step": seconds,
              "tokens_per_s": tokens / seconds, "flops_per_step": flops, "warmup_seconds": warmup_s,
              "losses": [float(loss) for loss in losses], "first_loss": float(losses[0]),
              "last_loss": float(losses[-1])}
    if run.cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.reset_peak_memory_stats(run.device)
    if reference is not None:
        result["reference_losses"] = reference_losses(reference, args, run, batch)
        result["loss_relative_difference"] = max(abs(a - b) / abs(b) for a, b in
                                                 zip(result["losses"], result["reference_losses"]))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON written by rank 0")
    parser.add_argument("--preset", default="150M")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="windows per rank and step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median counts)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--variants", default="eager,compiled", help="eager, compiled or both")
    parser.add_argument("--reference", action="store_true",
                        help="also train an unsharded copy through the same steps and compare the losses")
    parser.add_argument("--peak-matmul", type=int, default=None,
                        help="side of the matmul measured when the peak is not in the datasheet table "
                             "(default 8192 on a GPU, 2048 on the CPU; small for dry runs: CPU bf16 is slow)")
    add_device_arguments(parser, dtype="bf16")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("bench.fsdp_step runs under torchrun: torchrun --standalone --nproc_per_node 1 "
                         "-m bench.fsdp_step --out FILE")
    run = resolve(args, local_rank=int(os.environ["LOCAL_RANK"]))
    if run.cuda:
        torch.cuda.set_device(run.device)
    dist.init_process_group("nccl" if run.cuda else "gloo")
    try:
        config = Config.from_name(args.preset, seq_length=args.seq)
        peak, source = peak_flops(run.device, args.dtype, args.peak_matmul)
        variants = {}
        for name in args.variants.split(","):
            variants[name] = time_variant(config, name == "compiled", args, run)
            variants[name]["mfu"] = mfu(variants[name]["flops_per_step"], variants[name]["seconds_per_step"], peak)
        if dist.get_rank() == 0:
            result = {"preset": args.preset, "seq": args.seq, "micro_batch": args.micro_batch,
                      "ranks": dist.get_world_size(),
                      "dtype": args.dtype, "device": str(run.device), "peak_flops": peak, "peak_source": source,
                      "variants": variants}
            if {"eager", "compiled"} <= variants.keys():
                eager, compiled = variants["eager"], variants["compiled"]
                result["compiled_speedup"] = eager["seconds_per_step"] / compiled["seconds_per_step"]
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
