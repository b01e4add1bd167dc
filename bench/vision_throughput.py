"""Training throughput (forward + backward + AdamW step) of the vision TokenFormer and of a standard
ViT of the same width and depth, in images/s, and their ratio.

    python -m bench.vision_throughput [--preset fmnist-28] [--batch 128] [--repeats 5] [--threads N] \
        [--device cuda|cpu|auto] [--dtype fp32|bf16]

bf16 is autocast (fp32 weights and AdamW, as `precision: bf16` trains). `tokenformer.flops` has no
count for the vision models, so this reports images/s and their ratio, not MFU. Prints a table
and writes bench/results/vision_throughput.json. Not a test: numbers depend on the machine and on
what else runs on it (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import Run, add_device_arguments, resolve, synchronize
from experiments.vit import ViT
from tokenformer import VisionConfig, VisionTokenFormer
from tokenformer.training.precision import autocast_context


def images_per_second(model: torch.nn.Module, config: VisionConfig, batch: int, repeats: int,
                      run: Run) -> tuple[float, float]:
    """Median images/s over `repeats` training steps after two warm-up steps, by wall and by CPU time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, config.num_channels, config.image_size, config.image_size, device=run.device)
    y = torch.randint(0, config.num_classes, (batch,), device=run.device)
    wall, cpu = [], []
    for i in range(repeats + 2):
        w, c = time.perf_counter(), time.process_time()
        with autocast_context(run.dtype_name, run.device):
            logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(run.device)
        if i >= 2:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return batch / median(wall), batch / median(cpu) * torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fmnist-28")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    add_device_arguments(parser)
    args = parser.parse_args()
    run = resolve(args)
    config = VisionConfig.from_name(args.preset)
    torch.manual_seed(0)
    rows = {}
    for name, model in (("VisionTokenFormer", VisionTokenFormer(config)), ("ViT", ViT(config))):
        wall, cpu = images_per_second(model.to(run.device).train(), config, args.batch, args.repeats, run)
        rows[name] = {"parameters": model.num_parameters(), "images_per_s": wall,
                      "images_per_cpu_s_per_thread": cpu / torch.get_num_threads()}
    ratio = rows["VisionTokenFormer"]["images_per_s"] / rows["ViT"]["images_per_s"]
    print(f"{args.preset}, batch {args.batch}, {run.describe()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':<20}{'parameters':>12}{'images/s':>11}{'images/CPU-s':>14}")
    for name, r in rows.items():
        print(f"{name:<20}{r['parameters']:>12,}{r['images_per_s']:>11,.0f}{r['images_per_cpu_s_per_thread']:>14,.0f}")
    print(f"TokenFormer / ViT throughput: {ratio:.2f}")
    out = Path(__file__).parent / "results" / "vision_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"models": rows, "ratio": ratio, "preset": args.preset, "batch": args.batch,
                               "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                               "device": str(run.device), "dtype": run.dtype_name,
                               "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
