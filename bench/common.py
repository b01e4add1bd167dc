"""What every benchmark shares: the `--device`, `--dtype` and `--threads` arguments, timing that waits
for the GPU, and the peak FLOP/s that model FLOPs utilisation (MFU) is measured against.

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    run = resolve(parser.parse_args())          # run.device, run.dtype, run.dtype_name
    seconds = alternate({"a": fa, "b": fb}, reps=9)
    peak, source = peak_flops(run.device, run.dtype_name)

`alternate` and `synchronize` live in bench/timing.py and are re-exported here. The peak on a GPU
is NVIDIA's datasheet dense figure for the detected card (`GPU_PEAK_TFLOPS`); on a GPU not in the
table, and on the CPU, it is the rate of a large `torch.mm` measured here. `source` says which one
was used.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable

import torch

from bench.timing import alternate, synchronize
from tokenformer.errors import TokenFormerError
from tokenformer.training.distributed import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Dense peak TFLOP/s from NVIDIA's datasheets (no structured sparsity). fp32 is the plain CUDA-core
# rate, since PyTorch's default keeps TF32 off for fp32 matmuls; bf16 is the tensor-core rate with
# fp32 accumulation. Ordered: the first pattern that matches the device name wins, so the specific
# variants (H100 PCIe, NVL) come before the general one. A card without a bf16 figure (V100, T4
# have no bf16 tensor cores) falls back to the measured matmul for bf16.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*PCIe", {"fp32": 51.0, "bf16": 756.0}),   # H100 PCIe datasheet
    (r"H100.*NVL", {"fp32": 60.0, "bf16": 835.0}),    # H100 NVL datasheet
    (r"H100|H200", {"fp32": 67.0, "bf16": 989.0}),    # H100 SXM5 / H200 SXM datasheets
    (r"A100", {"fp32": 19.5, "bf16": 312.0}),         # A100 datasheet (PCIe and SXM alike)
    (r"L40S", {"fp32": 91.6, "bf16": 362.0}),         # L40S datasheet
    (r"\bL4\b", {"fp32": 30.3, "bf16": 121.0}),       # L4 datasheet
    (r"\bA10\b", {"fp32": 31.2, "bf16": 125.0}),      # A10 datasheet (not A100, not A10G)
    (r"RTX 4090", {"fp32": 82.6, "bf16": 165.2}),     # Ada whitepaper, GeForce RTX 4090
    (r"V100S", {"fp32": 16.4}),                       # V100S PCIe datasheet
    (r"V100.*PCIE", {"fp32": 14.0}),                  # V100 PCIe datasheet
    (r"V100", {"fp32": 15.7}),                        # V100 SXM2 datasheet
    (r"\bT4\b", {"fp32": 8.1}),                       # T4 datasheet
]


# ---- arguments ----------------------------------------------------------------------------------

def add_device_arguments(parser: argparse.ArgumentParser, dtype: str = "fp32",
                         threads: int | None = None, with_threads: bool = True) -> None:
    """`--device cuda|cpu|auto`, `--dtype fp32|bf16` and (unless `with_threads=False`, for a
    benchmark that sets threads per subprocess itself) `--threads N`, the CPU intra-op threads."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default auto: the GPU when there is one)")
    parser.add_argument("--dtype", default=dtype, choices=list(DTYPES),
                        help=f"weights and activations (default {dtype})")
    if not with_threads:
        return
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch CPU threads (default: torch's, one per core). On a machine shared with "
                             "other busy processes, 1 avoids OpenMP waiting for descheduled threads")


@dataclass(frozen=True)
class Run:
    """Where and in what a benchmark runs, resolved from its arguments."""

    device: torch.device
    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.cuda else f"CPU, {torch.get_num_threads()} threads"
        return f"{self.dtype_name} on {self.device} ({name})"


def resolve(args: argparse.Namespace, local_rank: int = 0) -> Run:
    """The device and dtype the arguments ask for (`cuda` and `auto`: GPU `local_rank`); sets the
    thread count. Exits with one sentence when CUDA is asked for and absent."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device, local_rank)
    except TokenFormerError as error:
        raise SystemExit(str(error)) from None
    return Run(device, args.dtype)


# ---- peak FLOP/s and MFU ------------------------------------------------------------------------

def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """FLOP/s of the first `GPU_PEAK_TFLOPS` entry matching `device_name` (as
    `torch.cuda.get_device_name` spells it), for `dtype`; None when the card or the dtype is not there."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def gemm(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Callable[[], torch.Tensor]:
    """An (n x n) @ (n x n) product (2 n^3 FLOPs): the measured peak that MFU falls back to."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return lambda: torch.mm(a, b)


def measured_peak(device: torch.device, dtype: str, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a large square matmul here (n = 8192 on a GPU, 2048 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    return 2 * n ** 3 / alternate({"gemm": gemm(n, DTYPES[dtype], device)}, reps)["gemm"]


def peak_flops(device: torch.device, dtype: str, n: int | None = None) -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where it comes from: the datasheet for a known GPU,
    else a matmul of side `n` measured now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, dtype)
        if peak is not None:
            return peak, f"datasheet dense {dtype} peak of the {name}"
        source = f"measured {dtype} matmul ({name} is not in bench/common.py's datasheet table)"
    else:
        source = f"measured {dtype} matmul on the CPU"
    return measured_peak(device, dtype, n), source


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: the achieved rate `flops / seconds` as a fraction of `peak` FLOP/s."""
    return flops / seconds / peak


__all__ = ["DTYPES", "GPU_PEAK_TFLOPS", "Run", "add_device_arguments", "alternate", "datasheet_peak", "gemm",
           "measured_peak", "mfu", "peak_flops", "resolve", "synchronize"]
