"""How many CPU threads a command computes with: `--num-threads` when given, else `OMP_NUM_THREADS`
when set, else a rule from the model's size and the cores this process may use.

Why a rule: torch's own default is one thread per core, and a small model gains nothing from a second
thread (each product is too short to split) while on a busy machine the threads mostly wait for
each other. The rule and its measurement are in docs/performance.md ("CPU threads").
"""

from __future__ import annotations

import argparse
import os

import torch

from tokenformer.options import number

# One thread per this many parameters, at most one per core: measured on 2 cores (docs/performance.md).
PARAMETERS_PER_THREAD = 20_000_000


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


def use_threads(requested: int | None, num_parameters: int) -> int:
    """Set torch's intra-op threads for a model of `num_parameters`: `requested` if given, else
    the user's OMP_NUM_THREADS if set (left as torch read it), else `default_threads`; returns the count."""
    if requested:
        count = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        count = default_threads(num_parameters)
    torch.set_num_threads(count)
    return count


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--num-threads N` of a command that computes with a model (read by `use_threads`)."""
    parser.add_argument("--num-threads", type=number(int, minimum=1), default=None, metavar="N",
                        help="CPU threads (default: one per 20M parameters, at most one per core; "
                        "OMP_NUM_THREADS when set)")
