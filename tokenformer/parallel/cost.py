"""The analytic cost of a layout: memory per rank and bytes communicated per optimizer step.

A layout is `pp x dp x tp` ranks (`Layout`): `tp` token-parallel ranks split every Pattention's
tokens, the heads and the vocabulary (`parallel.tokens`), `pp` stages hold consecutive blocks
(`parallel.pipeline`), and the `dp` data-parallel groups either replicate (DDP) or shard (FSDP2)
what is left. The counts below are those of this package's collectives, verified against the
collectives counted in 2- and 4-rank runs (tests/test_parallel.py, docs/distributed.md).

Collective bytes are per rank with ring algorithms: an all-reduce of M bytes over P ranks sends
2 (P-1)/P M, a reduce-scatter or all-gather of a full tensor of M bytes (P-1)/P M.

Token parallelism, per layer and per token (h = hidden size), forward and backward:
    all-reduce of h:       4  (proj and ffn outputs; the attention and ffn input gradients)
    reduce-scatter of h:   4  (q, k, v outputs to heads; proj input gradient)
    all-gather of h:       4  (proj input from heads; q, k, v output gradients)
    all-reduce of 1:      25  (the norm's sum of squares, 1 forward and 4 backward per Pattention)
and per token for the whole model: 2 all-reduces of h (embedding output, head input gradient)
and 3 of 1 (the vocabulary-parallel cross-entropy). Megatron-style tensor parallelism of a
Transformer of the same width needs 4 all-reduces of h per layer and token (`megatron_tp_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor.debug import CommDebugMode

from tokenformer.models.config import Config

# (all-reduces of h, reduce-scatters of h, all-gathers of h, all-reduces of one number), per layer and token
TP_LAYER_COLLECTIVES = (4, 4, 4, 25)
TP_MODEL_COLLECTIVES = (2, 0, 0, 3)  # embedding and head, per token
MEGATRON_LAYER_ALL_REDUCES = 4       # attention and MLP outputs forward, their input gradients backward
ADAM_STATE_BYTES = 8                 # two float32 moments per parameter


@dataclass(frozen=True)
class Layout:
    """`pp` stages x `dp` data-parallel groups x `tp` token-parallel ranks; `fsdp`: whether the data-
    parallel groups shard parameters, gradients and optimizer state (else they replicate them)."""

    pp: int = 1
    dp: int = 1
    tp: int = 1
    fsdp: bool = False

    @property
    def ranks(self) -> int:
        return self.pp * self.dp * self.tp

    def __str__(self) -> str:
        parts = [f"pp{self.pp}" if self.pp > 1 else "", f"{'fsdp' if self.fsdp else 'dp'}{self.dp}" if self.dp > 1
                 else "", f"tp{self.tp}" if self.tp > 1 else ""]
        return " x ".join(p for p in parts if p) or "1 rank"


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes on each data-parallel group."""

    micro_batch: int = 1          # sequences per micro-batch
    micro_batches: int = 8        # gradient accumulation steps (the pipeline's micro-batches)
    activation_bytes: int = 2     # bf16 activations (4: fp32)
    checkpointing: bool = False   # recompute each block in the backward


def ring(kind: str, size: int) -> float:
    """Bytes sent per rank, per byte of the full tensor, by one collective over `size` ranks."""
    if size <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (size - 1) / size


def tp_bytes_per_token(config: Config, tp: int, activation_bytes: int = 4, layers: int | None = None) -> float:
    """Bytes one token-parallel rank sends per token of a micro-batch (forward + backward), for
    `layers` blocks (default all) plus the embedding and head."""
    h, layers = config.hidden_size, config.num_layers if layers is None else layers
    ar_h, rs_h, ag_h, ar_1 = TP_LAYER_COLLECTIVES
    per_layer = ring("all_reduce", tp) * (ar_h * h + ar_1) + ring("all_gather", tp) * (rs_h + ag_h) * h
    model_ar_h, _, _, model_ar_1 = TP_MODEL_COLLECTIVES
    per_model = ring("all_reduce", tp) * (model_ar_h * h + model_ar_1)
    return activation_bytes * (layers * per_layer + per_model)


def megatron_tp_bytes_per_token(hidden_size: int, num_layers: int, tp: int, activation_bytes: int = 4) -> float:
    """The same for Megatron-style tensor parallelism of a Transformer (column-parallel q/k/v and fc1,
    row-parallel output and fc2), its vocabulary-parallel embedding and head counted as ours."""
    model_ar_h, _, _, model_ar_1 = TP_MODEL_COLLECTIVES
    return activation_bytes * ring("all_reduce", tp) * (num_layers * MEGATRON_LAYER_ALL_REDUCES * hidden_size
                                                        + model_ar_h * hidden_size + model_ar_1)


def stage_parameters(config: Config, pp: int) -> int:
    """Parameters of the largest pipeline stage: its blocks, and the embedding matrix (the first
    stage's lookup, the last stage's tied head)."""
    h = config.hidden_size
    per_layer = 2 * h * (3 * config.qkv_slot_num + config.proj_slot_num + config.ffn_slot_num)
    return math.ceil(config.num_layers / pp) * per_layer + config.padded_vocab_size * h + 2 * h


def activation_elements_per_token(config: Config, tp: int) -> tuple[float, float]:
    """Elements one block keeps for its backward per token (under token parallelism), and those it
    keeps with activation checkpointing (its input only). Kept: the two LayerNorm inputs and
    outputs, q/k/v (this rank's heads) and the attention output, proj's gathered input, and three
    score-sized tensors per Pattention (scores, normalised scores, weights; n/tp each)."""
    h = config.hidden_size
    scores = 3 * (3 * config.qkv_slot_num + config.proj_slot_num + config.ffn_slot_num) / tp
    return 5 * h + 4 * h / tp + scores, h


def memory_per_rank(config: Config, layout: Layout, work: Workload, param_bytes: int = 4) -> dict[str, float]:
    """Bytes per rank: parameters, gradients and AdamW state (float32), and activations."""
    params = stage_parameters(config, layout.pp) / layout.tp
    if layout.fsdp:
        params /= layout.dp
    states = params * (2 * param_bytes + ADAM_STATE_BYTES)  # weights, gradients, two moments
    full, kept = activation_elements_per_token(config, layout.tp)
    tokens = work.micro_batch * config.seq_length
    # micro-batches in flight on the first stage: 1F1B keeps pp of them, no pipeline keeps one
    in_flight = min(layout.pp, work.micro_batches)
    layers = math.ceil(config.num_layers / layout.pp)
    per_block = kept if work.checkpointing else full
    logits = 2 * config.padded_vocab_size / layout.tp  # logits and their gradient, last stage
    activations = work.activation_bytes * tokens * (
        in_flight * layers * per_block + (full if work.checkpointing else 0) + logits)
    return {"states": states, "activations": activations, "total": states + activations}


def bytes_per_step(config: Config, layout: Layout, work: Workload, param_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per optimizer step, by kind of parallelism."""
    tokens = work.micro_batch * config.seq_length * work.micro_batches
    layers = math.ceil(config.num_layers / layout.pp)
    tp = tokens * tp_bytes_per_token(config, layout.tp, work.activation_bytes, layers) if layout.tp > 1 else 0.0
    params = stage_parameters(config, layout.pp) / layout.tp * param_bytes
    if layout.fsdp:  # parameters gathered for every micro-batch's forward and backward, gradients scattered once
        dp = (2 * work.micro_batches + 1) * ring("all_gather", layout.dp) * params
    else:
        dp = ring("all_reduce", layout.dp) * params
    pp = 0.0
    if layout.pp > 1:  # hidden states forward, their gradients backward; tied-matrix gradients summed
        pp = 2 * tokens * config.hidden_size * work.activation_bytes + \
            ring("all_reduce", 2) * config.padded_vocab_size * config.hidden_size / layout.tp * param_bytes
    return {"tp": tp, "dp": dp, "pp": pp, "total": tp + dp + pp}


class CollectiveBytes(CommDebugMode):
    """Counts the bytes this rank sends in DTensor's collectives while active (`with CollectiveBytes()
    as counted: ...`; then `counted.sent` and `counted.calls` by kind), by the ring formulas above:
    what `tp_bytes_per_token` predicts, measured. Point-to-point sends and FSDP2's own collectives do
    not pass through it."""

    KINDS = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter",
             "all_gather_into_tensor": "all_gather"}

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, float] = {kind: 0.0 for kind in self.KINDS.values()}
        self.calls: dict[str, int] = {kind: 0 for kind in self.KINDS.values()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = self.KINDS.get(getattr(func, "__name__", "").split(".")[0]) \
            if "_c10d_functional" in str(func) else None
        if kind is not None:
            tensor, group_name = args[0], args[-1]
            size = _resolve_process_group(group_name).size()
            full = tensor.numel() * tensor.element_size() * (size if kind == "all_gather" else 1)
            self.sent[kind] += ring(kind, size) * full
            self.calls[kind] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    @property
    def total(self) -> float:
        return sum(self.sent.values())
