"""Timing shared by the benchmarks: medians of alternating repetitions.

Alternating (A, B, A, B, ...) lets the load of other processes on a shared machine hit every side
of a comparison alike; the median drops the repetitions a burst of load spoiled. Every reading
waits for the GPU (`synchronize`), so that queued CUDA kernels count where they were launched.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device | None = None) -> None:
    """Wait for the GPU's queued kernels, so that a wall-clock reading covers them. A no-op on the
    CPU; with no device, the current CUDA device when this process has used CUDA."""
    if device is not None and device.type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def alternate(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in turn `reps` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
