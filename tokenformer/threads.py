"""How many CPU threads a command computes with: `--num-threads` when given, else `OMP_NUM_THREADS`
when set, else a rule from the model's size, the cores this process may use and how busy they are.

Why a rule: torch's own default is one thread per core. A tiny model gains nothing from a second
thread (each product is too short to split), and on a busy machine a thread that waits for a core
stalls every operation: measured 7-10x slower with 2 threads than with 1 on 2 cores under load,
while a 1.1M-parameter model trained 1.64x faster with 2 threads on the same cores when quiet. The
measurements are in docs/performance.md ("CPU threads").
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from tokenformer.options import number

# One thread per this many parameters, at most one per idle core (docs/performance.md, "CPU threads").
PARAMETERS_PER_THREAD = 1_000_000


def usable_cores() -> int:
    """Cores this process may run on (a slurm or container CPU set, not the whole machine)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_threads(num_parameters: int, cores: int | None = None) -> int:
    """The rule: one thread per `PARAMETERS_PER_THREAD` parameters (at least one), at most one per core
    (of this process's share: torchrun's processes on one machine split its cores)."""
    cores = cores or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(cores, num_parameters // PARAMETERS_PER_THREAD))


def idle_cores(cores: int | None = None) -> int:
    """The cores not taken by other work: the cores less the 1-minute load average, rounded up, at
    least one (all of them where the platform has no load average)."""
    cores = cores or usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return cores
    return max(1, min(cores, math.ceil(cores - load)))


def use_threads(requested: int | None, num_parameters: int) -> int:
    """Set torch's intra-op threads for a model of `num_parameters`: `requested` if given, else
    the user's OMP_NUM_THREADS if set (left as torch read it), else `default_threads` but no more
    than the idle cores; returns the count."""
    if requested:
        count = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        count = min(default_threads(num_parameters), idle_cores())
    torch.set_num_threads(count)
    return count


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--num-threads N` of a command that computes with a model (read by `use_threads`)."""
    parser.add_argument("--num-threads", type=number(int, minimum=1), default=None, metavar="N",
                        help="CPU threads (default: one per 1M parameters, at most one per idle core; "
                        "OMP_NUM_THREADS when set)")
