"""Distributed training on torch.distributed, launched by `torchrun`: the process group, wrapping a
model in DDP or FSDP2 (`fully_shard`), gradient-sync control for accumulation, and sharded
checkpoints with `torch.distributed.checkpoint` (DCP).

Outside torchrun (no WORLD_SIZE in the environment) everything degrades to one process with no
process group, so the same training code serves a laptop and a cluster.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tokenformer.errors import TokenFormerError
from tokenformer.files import CONFIG_FILE, SHARDED_DIR, TOKENIZER_FILE, WEIGHTS_FILE, atomic_copy, atomic_path
from tokenformer.optimizer_state import names_by_index
from tokenformer.parallel.tokens import parallelize_tokens
from tokenformer.threads import usable_cores

PARALLELISMS = ("ddp", "fsdp2")
# fault injection for tests and failure drills: "STEP" or "STEP:RANK" (default rank: the last one)
FAIL_AT_STEP_ENV = "TOKENFORMER_FAIL_AT_STEP"
TIMEOUT_ENV = "TOKENFORMER_DIST_TIMEOUT_MINUTES"


@dataclass
class DistEnv:
    """Where this process stands: its rank among `world_size` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_size: int = 1           # ranks that split every Pattention's tokens (consecutive ranks)
    pp_size: int = 1           # pipeline stages (the outermost mesh dim)
    mesh: Any = None           # the ("pp", "dp", "tp") DeviceMesh under token or pipeline parallelism

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Ranks that see different data: the world over the token-parallel groups and the stages."""
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def dp_rank(self) -> int:
        """Which share of the data this rank sees (the ranks of one tp group, and the stages of one
        pipeline, see the same)."""
        return self.rank // self.tp_size % self.dp_size


# what torchrun sets beside WORLD_SIZE, that joining its process group needs
TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _environment_number(name: str, default: str, minimum: int = 0) -> int:
    value = os.environ.get(name, default)
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TokenFormerError(f"environment variable {name}={value!r} is not an integer of at least {minimum}: "
                               f"torchrun sets it; unset it to run alone")
    return number


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' picks this rank's GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise TokenFormerError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TokenFormerError(f"device {device} was asked for but torch sees no CUDA GPU: use --device cpu")
    return resolved


def collective_timeout_minutes(default: float = 30.0) -> float:
    """How long a rank waits in a collective for a peer that neither answers nor dies before giving
    up: `TOKENFORMER_DIST_TIMEOUT_MINUTES`, else `default`. (A peer that dies is noticed at once.)"""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return default
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise TokenFormerError(f"{TIMEOUT_ENV}={value!r} must be a positive number of minutes")
    return minutes


def init_distributed(device: str = "auto", timeout_minutes: float | None = None, tp_size: int = 1,
                     pp_size: int = 1) -> DistEnv:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU), or stay single-process;
    with `tp_size` or `pp_size` > 1, lay the ranks out on a ("pp", "dp", "tp") DeviceMesh."""
    world_size = _environment_number("WORLD_SIZE", "1", minimum=1)
    if world_size % (tp_size * pp_size):
        raise TokenFormerError(f"tp_size {tp_size} x pp_size {pp_size} does not divide the {world_size} ranks: "
                               f"launch a multiple of {tp_size * pp_size} processes with torchrun (--nproc_per_node)")
    if world_size == 1:
        return DistEnv(device=resolve_device(device))
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise TokenFormerError(f"WORLD_SIZE={world_size} is set but not {', '.join(missing)}: start the command "
                               f"with torchrun, or unset WORLD_SIZE to run alone")
    timeout_minutes = timeout_minutes or collective_timeout_minutes()
    rank, local_rank = _environment_number("RANK", "0"), _environment_number("LOCAL_RANK", "0")
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    else:
        # torchrun sets OMP_NUM_THREADS=1; share the cores of this node between its ranks instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, usable_cores() // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=resolved if resolved.type == "cuda" else None)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, tp_size=tp_size,
                  pp_size=pp_size)
    if tp_size > 1 or pp_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        env.mesh = init_device_mesh(resolved.type, (pp_size, env.dp_size, tp_size), mesh_dim_names=("pp", "dp", "tp"))
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of any model here: the members of every `layers` list in it (a language
    model's, a vision tower's, both towers of a CLIP or a captioner). What torch.compile compiles
    and FSDP2 shards one by one."""
    return [block for module in model.modules()
            if isinstance(getattr(module, "layers", None), (nn.ModuleList, nn.ModuleDict))  # a pipeline stage's dict
            for block in module.layers.children()]


def wrap_model(model: nn.Module, env: DistEnv, parallelism: str = "ddp",
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """`ddp` (replicated weights) or `fsdp2` (`fully_shard` per block, then the root); a no-op alone.

    `param_dtype` is FSDP2's mixed-precision compute dtype (GPU); gradients reduce in float32.
    """
    if parallelism not in PARALLELISMS:
        raise TokenFormerError(f"unknown parallelism {parallelism!r}: use one of {', '.join(PARALLELISMS)}")
    if not env.distributed:
        return model
    dp_mesh = None
    if env.mesh is not None:  # token or pipeline parallelism: the data-parallel rest is sharded
        if env.tp_size > 1:
            parallelize_tokens(model, env.mesh["tp"])
        if env.dp_size == 1:
            return model
        if parallelism != "fsdp2":
            raise TokenFormerError(f"tp_size {env.tp_size} x pp_size {env.pp_size} over {env.world_size} ranks leaves "
                                   f"{env.dp_size} data-parallel groups, which FSDP2 shards: set parallelism fsdp2")
        dp_mesh = env.mesh["dp"]
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype is not None else MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def resume_batch_note(trainer_state: dict[str, Any], micro_batch: int, accumulation: int,
                      world_size: int) -> str | None:
    """A warning when a run resumes with another global batch than the one its checkpoint was
    trained with (another rank count without adjusting the micro batch), else None."""
    saved_world = trainer_state.get("dp_size", trainer_state.get("world_size"))
    try:
        saved = json.loads(trainer_state.get("train_config") or "{}")
        saved_batch = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"] * saved_world
    except (KeyError, TypeError, ValueError):
        return None
    batch = micro_batch * accumulation * world_size
    if batch == saved_batch:
        return None
    note = (f"resuming with a global batch of {batch} windows ({world_size} ranks x micro batch {micro_batch} x "
            f"accumulation {accumulation}) where the checkpoint trained with {saved_batch}: the data order "
            f"continues, but this is no longer the same run")
    if saved_batch % (accumulation * world_size) == 0:
        note += f"; set train_micro_batch_size_per_gpu to {saved_batch // (accumulation * world_size)} to keep it"
    return note


class InjectedFailure(TokenFormerError):
    """The failure `TOKENFORMER_FAIL_AT_STEP` asked for."""


def maybe_fail(step: int, env: DistEnv) -> None:
    """Fail one rank right after optimizer step `step` when `TOKENFORMER_FAIL_AT_STEP` says so.

    `TOKENFORMER_FAIL_AT_STEP=3` makes the last rank raise after step 3, `=3:0` rank 0, and
    `=3:1:kill` kills rank 1 outright (SIGKILL, as the OOM killer or a lost node would: no message,
    no cleanup). It is how the tests (and an operator's drill) check that a rank dying mid-run stops
    the whole job promptly, leaves the last checkpoint intact, and that `--resume` continues with
    the same losses.
    """
    spec = os.environ.get(FAIL_AT_STEP_ENV)
    if not spec:
        return
    parts = spec.split(":")
    try:
        if len(parts) > 3 or (len(parts) == 3 and parts[2] != "kill"):
            raise ValueError(spec)
        failing_step = int(parts[0])
        failing_rank = int(parts[1]) if len(parts) > 1 and parts[1] else env.world_size - 1
    except ValueError:
        raise TokenFormerError(f"{FAIL_AT_STEP_ENV}={spec!r} is not STEP, STEP:RANK or STEP:RANK:kill") from None
    if step != failing_step or env.rank != failing_rank:
        return
    if parts[-1] == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"failed on purpose after step {step} ({FAIL_AT_STEP_ENV}={spec})")


# what gloo, nccl and the c10d store say when the process at the other end is gone
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe",
              "timed out", "collective operation timeout", "nccl communicator was aborted")


def describe_rank_failure(error: BaseException, env: DistEnv, latest: str | Path | None) -> \
        TokenFormerError | None:
    """One clear sentence for an error that stopped this rank of a distributed run, or None (a bug:
    keep its traceback).

    A rank whose collective failed because a peer died says so and points at the checkpoint to
    resume from, instead of printing a backend traceback; a rank's own error names the rank.
    """
    where = f"rank {env.rank} of {env.world_size}"
    resume = f"the last complete checkpoint is {latest}: rerun with --resume to continue from it" \
        if latest else "no checkpoint was written yet"
    if isinstance(error, (TokenFormerError, FileNotFoundError, NotADirectoryError)):
        return TokenFormerError(f"{where}: {error}; {resume}")
    message = str(error).lower()
    backend_errors = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError", "DistNetworkError")
                           if hasattr(dist, name))
    if isinstance(error, backend_errors) or (isinstance(error, RuntimeError) and
                                             any(s in message for s in _PEER_GONE)):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", first_line)  # gloo's "[source/file.cc:553] " prefix
        return TokenFormerError(f"{where} stopped because another rank failed or stopped answering (see its "
                                f"error; the backend said: {first_line[:120]}); {resume}")
    return None


# ---- sharded checkpoints (DCP) ------------------------------------------------------------------

def save_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any] | None = None) -> None:
    """Every rank writes its shards of the model and optimizer into `directory` (DCP format)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, **(extra or {})},
             checkpoint_id=str(directory))


def _dcp_load(state: dict[str, Any], directory: str | Path) -> None:
    """`dcp.load` in place; without a process group one process reads every shard itself (DCP warns
    that it assumes so: that is the intent here, so the warning is silenced)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(directory), no_dist=single)


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 extra: dict[str, Any] | None = None) -> None:
    """Load a DCP checkpoint written by any number of ranks into this run's sharding (in place)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else \
        (get_state_dict(model, [])[0], None)
    state: dict[str, Any] = {"model": model_state, **(extra or {})}
    if optimizer is not None:
        state["optim"] = optim_state
    _dcp_load(state, directory)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})


def load_full_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None,
                           source: str = "the checkpoint") -> None:
    """Load a full-state checkpoint (one process or DDP: weights and an ordinary optimizer state dict)
    into an FSDP2 model and its optimizer; every rank reads it all and keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if optimizer is not None and optimizer_state is None:
        raise TokenFormerError(f"{source} holds no optimizer state to resume from")
    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=weights, optim_state_dict={}, options=options)
        return
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict=optimizer_state_by_name(optimizer_state, source), options=options)


def optimizer_state_by_name(state: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered) keyed by parameter name instead, the form
    `torch.distributed.checkpoint.state_dict` works with."""
    names = names_by_index(state, source=source, fix="resume it with parallelism ddp")
    groups = []
    for group in state["param_groups"]:
        fqns = [names[index] for index in group["params"]]
        groups.append({**group, "params": fqns, "param_names": fqns})
    return {"state": {names[index]: value for index, value in state["state"].items()}, "param_groups": groups}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DCP folder (`.metadata` inside) or a training checkpoint holding one under `sharded/`."""
    path = Path(path)
    return (path / ".metadata").is_file() or (path / SHARDED_DIR / ".metadata").is_file()


def consolidate_sharded(directory: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict from a DCP checkpoint, read in ONE process (no process group).

    Only the model's tensors are read (not the optimizer's), each straight into a full-size tensor
    built from the checkpoint's metadata, whatever number of ranks wrote the shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    if (directory / SHARDED_DIR / ".metadata").is_file():
        directory = directory / SHARDED_DIR
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} is not a sharded (torch.distributed.checkpoint) checkpoint: "
                                f"it has no .metadata file")
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    model = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not model:
        raise TokenFormerError(f"{directory} holds no model state")
    state = {"model": model}
    _dcp_load(state, directory)
    return state["model"]


def export_sharded(source: str | Path, output: str | Path) -> Path:
    """Write an ordinary checkpoint directory (config.json, model.safetensors, tokenizer.json) from a
    sharded one: a training checkpoint `step_N/` or its `step_N/sharded/` folder."""
    from safetensors.torch import save_file

    source, output = Path(source), Path(output)
    home = source if (source / SHARDED_DIR).is_dir() else source.parent  # where config.json lives
    if not (home / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{home / CONFIG_FILE} does not exist: give the training checkpoint folder "
                                f"(step_N/) that holds sharded/ and config.json")
    if output.resolve() in (home.resolve(), source.resolve()):
        raise TokenFormerError(f"write the consolidated checkpoint to a new directory, not into {output}")
    state = consolidate_sharded(source)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    if (home / TOKENIZER_FILE).is_file():
        atomic_copy(home / TOKENIZER_FILE, output / TOKENIZER_FILE)
    atomic_copy(home / CONFIG_FILE, output / CONFIG_FILE)  # last: config.json never points at nothing
    return output
