"""What token parallelism costs, measured and predicted (docs/distributed.md).

    python -m experiments.parallel            # ~1 minute on 2 CPU cores

1. Bytes per layer and token, counted: TokenFormer under token parallelism (`parallel.tokens`) and
   the growth experiment's Transformer control of the same width under torch's Megatron-style
   plan (column-parallel q/k/v and fc1, row-parallel proj and fc2, vocabulary-parallel embedding
   and head), on 2 and 4 gloo ranks (torch.multiprocessing), one forward and backward of fp32
   activations, every collective counted by `cost.CollectiveBytes`; per layer = the difference
   between a 2-layer and a 1-layer model. Beside them the analytic counts (`parallel.cost`).
2. The analytic memory per rank and bytes per step of candidate layouts for 150M to 100B+ models
   and the 1.5B grown 4x and 16x; the table and a plot (experiments/results/parallel.png).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenformer.models.config import Config
from tokenformer.parallel.cost import (Layout, Workload, bytes_per_step, megatron_tp_bytes_per_token, memory_per_rank,
                                       stage_parameters, tp_bytes_per_token)

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(hidden_size=128, num_attention_heads=4, qkv_slot_num=128, proj_slot_num=128, ffn_slot_num=512,
             vocab_size=256, seq_length=32)
BATCH = 2
GiB = 2 ** 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control_plan(model) -> dict:
    """torch's Megatron-style plan for the Transformer control."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"word_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    for i in range(len(model.layers)):
        for name in ("query", "key", "value", "fc1"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("proj", "fc2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def sent_bytes(model, mesh) -> float:
    """Bytes this rank sends in one forward and backward of BATCH windows."""
    from tokenformer.evaluation.scoring import window_loss
    from tokenformer.parallel.cost import CollectiveBytes
    from tokenformer.parallel.tokens import loss_context

    batch = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["seq_length"] + 1))
    with loss_context(True), CollectiveBytes() as counted:
        loss, _ = window_loss(model, batch)
        loss.backward()
    return counted.total


def measure_rank(rank: int, size: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from experiments.growth.transformer import Transformer, TransformerConfig, matched_ffn_width
    from tokenformer import TokenFormer
    from tokenformer.parallel.tokens import parallelize_tokens, replicated_input

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    mesh = init_device_mesh("cpu", (size,), mesh_dim_names=("tp",))
    width = matched_ffn_width(SHAPE["hidden_size"], SHAPE["qkv_slot_num"], SHAPE["proj_slot_num"],
                              SHAPE["ffn_slot_num"])
    result = {}
    for layers in (1, 2):
        tokenformer = parallelize_tokens(TokenFormer(Config(num_layers=layers, **SHAPE)), mesh)
        control = Transformer(TransformerConfig(num_layers=layers, hidden_size=SHAPE["hidden_size"],
                                                num_attention_heads=SHAPE["num_attention_heads"], ffn_width=width,
                                                seq_length=SHAPE["seq_length"], vocab_size=SHAPE["vocab_size"]))
        control = parallelize_module(control, mesh, control_plan(control))
        replicated_input(control.final_norm, mesh)  # its output meets the vocabulary-sharded head
        result[layers] = {"tokenformer": sent_bytes(tokenformer, mesh), "control": sent_bytes(control, mesh)}
    if rank == 0:
        Path(out, f"tp{size}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measured_table() -> list[dict]:
    rows = []
    tokens = BATCH * SHAPE["seq_length"]
    for size in (2, 4):
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(measure_rank, args=(size, free_port(), out), nprocs=size)
            counted = {int(k): v for k, v in json.loads(Path(out, f"tp{size}.json").read_text()).items()}
        config = Config(num_layers=1, **SHAPE)
        rows.append({
            "tp": size,
            "tokenformer_measured": (counted[2]["tokenformer"] - counted[1]["tokenformer"]) / tokens,
            "tokenformer_analytic": tp_bytes_per_token(config, size, 4, layers=1)
            - tp_bytes_per_token(config, size, 4, layers=0),
            "control_measured": (counted[2]["control"] - counted[1]["control"]) / tokens,
            "megatron_analytic": megatron_tp_bytes_per_token(SHAPE["hidden_size"], 1, size)
            - megatron_tp_bytes_per_token(SHAPE["hidden_size"], 0, size)})
    return rows


# ---- the analytic plan ---------------------------------------------------------------------------

def shape(num_layers: int, hidden_size: int, heads: int, slots: tuple[int, int, int], seq_length: int = 2048,
          padded_vocab_size: int = 50304) -> SimpleNamespace:
    """The fields `parallel.cost` reads (a `Config` refuses shapes larger than this machine's memory)."""
    qkv, proj, ffn = slots
    return SimpleNamespace(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads,
                           qkv_slot_num=qkv, proj_slot_num=proj, ffn_slot_num=ffn, seq_length=seq_length,
                           padded_vocab_size=padded_vocab_size)


def sizes() -> dict[str, SimpleNamespace]:
    """The released 150M and 1.5B, the 1.5B grown 4x and 16x (every slot count), and two larger models
    in the same proportions (slots h, h, 4h; GPT-NeoX vocabulary)."""
    return {"150M": shape(12, 768, 12, (768, 768, 3072)), "1.5B": shape(40, 1536, 16, (1536, 1536, 6144)),
            "1.5B grown x4": shape(40, 1536, 16, (4 * 1536, 4 * 1536, 4 * 6144)),
            "1.5B grown x16": shape(40, 1536, 16, (16 * 1536, 16 * 1536, 16 * 6144)),
            "13B": shape(32, 5120, 40, (5120, 5120, 20480)), "100B+": shape(48, 12288, 96, (12288, 12288, 49152))}


LAYOUTS = [Layout(dp=8), Layout(dp=8, fsdp=True), Layout(dp=4, tp=2, fsdp=True), Layout(dp=1, tp=8),
           Layout(pp=2, dp=4, fsdp=True), Layout(dp=64, fsdp=True), Layout(dp=8, tp=8, fsdp=True),
           Layout(pp=8, dp=8, fsdp=True), Layout(pp=4, dp=4, tp=4, fsdp=True)]
GLOBAL_BATCH = 256  # sequences of 2048 tokens per optimizer step (0.5M tokens), the same for every layout


def workload(layout: Layout) -> Workload:
    """Micro batch 1, as many micro-batches per data-parallel group as the global batch leaves,
    bf16 activations, activation checkpointing."""
    return Workload(micro_batch=1, micro_batches=GLOBAL_BATCH // layout.dp, activation_bytes=2, checkpointing=True)


def plan_rows() -> list[dict]:
    rows = []
    for name, config in sizes().items():
        for layout in LAYOUTS:
            if config.num_attention_heads % layout.tp or config.num_layers < layout.pp:
                continue
            memory, sent = memory_per_rank(config, layout, workload(layout)), bytes_per_step(config, layout, workload(layout))
            rows.append({"model": name, "parameters": stage_parameters(config, 1), "layout": str(layout),
                         "ranks": layout.ranks, "memory_gib": memory["total"] / GiB,
                         "states_gib": memory["states"] / GiB, "activations_gib": memory["activations"] / GiB,
                         **{f"{k}_gib": v / GiB for k, v in sent.items()}})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(sizes())
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for layout in layouts:
        got = {r["model"]: r for r in rows if r["layout"] == layout}
        xs = [i for i, m in enumerate(models) if m in got]
        axes[0].plot(xs, [got[models[i]]["memory_gib"] for i in xs], marker="o", label=layout)
        axes[1].plot(xs, [got[models[i]]["total_gib"] for i in xs], marker="o", label=layout)
    for ax, title in zip(axes, ("memory per rank (GiB)", "bytes sent per rank per step (GiB)")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(models)), models, rotation=20)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].axhline(80, color="grey", linestyle="--", linewidth=1)
    axes[0].text(0, 90, "80 GB GPU", color="grey")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Analytic cost per layout (global batch {GLOBAL_BATCH} x 2048 tokens, micro batch 1, bf16 "
                 "activations, activation checkpointing, fp32 AdamW)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    measured = measured_table() if "--plan-only" not in sys.argv else []
    print("bytes per layer per token (fp32 activations)")
    print("| ranks | TokenFormer TP measured | analytic | control (torch Megatron plan) measured | Megatron analytic |")
    for r in measured:
        print(f"| {r['tp']} | {r['tokenformer_measured']:,.0f} | {r['tokenformer_analytic']:,.0f} | "
              f"{r['control_measured']:,.0f} | {r['megatron_analytic']:,.0f} |")
    rows = plan_rows()
    print("\n| model | parameters | layout | ranks | memory/rank GiB | sent/rank/step GiB (tp + dp + pp) |")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['layout']} | {r['ranks']} | {r['memory_gib']:.1f} | "
              f"{r['total_gib']:.1f} ({r['tp_gib']:.1f} + {r['dp_gib']:.1f} + {r['pp_gib']:.1f}) |")
    plot(rows, RESULTS / "parallel.png")
    (RESULTS / "parallel.json").write_text(json.dumps({"measured": measured, "plan": rows, "shape": SHAPE,
                                                       "global_batch": GLOBAL_BATCH}, indent=1) + "\n")
    print(f"wrote {RESULTS / 'parallel.json'} and {RESULTS / 'parallel.png'}")


if __name__ == "__main__":
    main()
