"""Token tuning against LoRA at equal trainable parameters, with full fine-tuning as a reference.

    python -m experiments.token_tuning [--quick] [--work DIR] [--out DIR]

A small byte-level TokenFormer is pretrained on the Python standard library (the package's one
training loop), then fine-tuned on the State of the Union addresses (`../shared/data/sotu`) three
ways, each for the same steps on the same batches with the same schedule and a sweep of peak
learning rates:

- token tuning: `add_tuning_tokens` (k new tokens per Pattention, exact growth) and
  `freeze_old_tokens`, only the new rows train;
- LoRA of rank r on every `key_param_tokens` and `value_param_tokens` (`W + B A`, A random, B
  zero, only A and B train), written here as a parametrization; r and k are chosen so that both
  train the same number of parameters;
- full fine-tuning (every tensor trains).

Reports the held-out validation loss after the steps (best learning rate of each method), the
trainable parameters and the median step time as a ratio against full fine-tuning (all measured in
this one process, one thread), and writes OUT/token_tuning.json and OUT/token_tuning.png. The base
and the prepared data are kept in WORK and reused by a rerun. `--quick` is a smoke test in about
a minute: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from tokenformer.checkpoint import load_model
from tokenformer.data.prepare import prepare
from tokenformer.data.windows import WindowDataset
from tokenformer.evaluation.scoring import mean_loss
from tokenformer.files import PREPARE_METADATA_FILE, SPLIT_PREFIXES
from tokenformer.scaling.freeze import freeze_old_tokens
from tokenformer.scaling.tune import add_tuning_tokens
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train
from tokenformer.training.optim import Schedule, lr_at

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT.parent / "shared" / "data" / "sotu" / "sotu.jsonl.gz"


@dataclasses.dataclass
class Setup:
    """Every number of the experiment; `quick()` shrinks them to a smoke test."""

    model: dict = dataclasses.field(default_factory=lambda: dict(
        name="small", seq_length=128))  # 4 layers, width 128, 128/128/512 parameter tokens, bytes
    stdlib_documents: int = 600
    pretrain_steps: int = 800
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    steps: int = 200
    batch: int = 8
    warmup: int = 10
    min_lr_ratio: float = 0.1
    eval_every: int = 50
    eval_windows: int = 128
    tokens: int = 13           # k per Pattention ...
    rank: int = 5              # ... and the LoRA rank with the same trainable count (see lora_parameters)
    # the same grid for the two methods compared; full fine-tuning wants smaller steps
    lrs: dict = dataclasses.field(default_factory=lambda: {
        "token tuning": [3e-3, 1e-2, 3e-2], "LoRA": [3e-3, 1e-2, 3e-2], "full fine-tuning": [3e-4, 1e-3, 3e-3]})
    seed: int = 0
    seeds: int = 2             # the best lr of each method is run with this many seeds
    timing_rounds: int = 40    # interleaved steps of the three methods for the step times

    @classmethod
    def quick(cls) -> "Setup":
        return cls(model=dict(name="tiny", seq_length=64), stdlib_documents=40, pretrain_steps=20,
                   pretrain_batch=4, steps=6, batch=2, warmup=2, eval_every=3, eval_windows=8,
                   tokens=4, rank=2, lrs={"token tuning": [1e-2], "LoRA": [3e-3], "full fine-tuning": [1e-3]},
                   timing_rounds=6)


# ---- data and base ------------------------------------------------------------------------------

def prepared(out: Path, inputs, documents: int | None, valid_fraction: float) -> Path:
    if not (out / PREPARE_METADATA_FILE).is_file():
        prepare(inputs, out, tokenizer="byte", valid_fraction=valid_fraction, max_documents=documents,
                progress=False)
    return out


def pretrain(setup: Setup, data: Path, work: Path) -> Path:
    """The base: pretrained on the stdlib through the package's training loop (reused if there)."""
    save = work / "pretrain"
    latest = CheckpointManager(save).latest()
    if latest is not None and latest.name == CheckpointManager.name_of(setup.pretrain_steps):
        return latest
    cfg = TrainConfig(model=setup.model, data_path=str(data), train_iters=setup.pretrain_steps,
                      train_micro_batch_size_per_gpu=setup.pretrain_batch, lr=setup.pretrain_lr,
                      min_lr=setup.pretrain_lr * setup.min_lr_ratio, warmup_iters=max(1, setup.pretrain_steps // 20),
                      eval_interval=max(1, setup.pretrain_steps // 4), eval_iters=8, save=str(save),
                      save_interval=setup.pretrain_steps, keep_last_n=1, plot=False, progress=False,
                      num_threads=1, device="cpu", seed=setup.seed, resume=True)
    summary = train(cfg)
    print(f"pretrained {setup.pretrain_steps} steps on the stdlib: validation loss {summary['val_loss']:.4f}")
    return Path(summary["checkpoint"])


# ---- the three methods --------------------------------------------------------------------------

class LoRADelta(nn.Module):
    """`W + B A` for a frozen `W` (n, d): B (n, r) zero, A (r, d) random as PEFT draws it (so the
    model starts at the base), scaling 1."""

    def __init__(self, n: int, d: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d)  # kaiming_uniform(a=sqrt(5)) of an (r, d) matrix, PEFT's A
        self.A = nn.Parameter((torch.rand(rank, d, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(n, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.B @ self.A  # (n, d)


def with_lora(base: nn.Module, rank: int, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of `base` with LoRA on every key/value token tensor; returns it and A, B."""
    model = load_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.pattentions().values():
        for name in ("key_param_tokens", "value_param_tokens"):
            n, d = getattr(layer, name).shape
            parametrize.register_parametrization(layer, name, LoRADelta(n, d, rank, generator))
    return model, [p for p in model.parameters() if p.requires_grad]


def with_tokens(base: nn.Module, tokens: int, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """`base` token-tuned with `tokens` new tokens per Pattention; returns it and its trainable tensors."""
    model = add_tuning_tokens(base, tokens, seed=seed).train()
    model._frozen = freeze_old_tokens(model)  # the optimizer is attached in fine_tune
    return model, [p for p in model.parameters() if p.requires_grad]


def with_everything(base: nn.Module, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    model = load_copy(base)
    return model, list(model.parameters())


def load_copy(base: nn.Module) -> nn.Module:
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    return model.train()


def trainable_count(method: str, model: nn.Module, setup: Setup) -> int:
    """Parameters the method changes: the new rows for token tuning (the key/value tensors it
    trains hold the frozen base rows too), every trainable tensor otherwise."""
    if method == "token tuning":
        return sum(setup.tokens * (layer.in_features + layer.out_features) for layer in model.pattentions().values())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameters(model: nn.Module, rank: int) -> int:
    return sum(rank * (n + d) for layer in model.pattentions().values()
               for n, d in (layer.key_param_tokens.shape, layer.value_param_tokens.shape))


# ---- fine-tuning --------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay for every method; token tuning restores its old rows after each
    step (part of its cost, so inside the timed step)."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    if hasattr(model, "_frozen"):
        model._frozen.attach(optimizer)
    return optimizer


def train_step(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
               batch: torch.Tensor) -> float:
    logits = model(batch[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


def fine_tune(model: nn.Module, params: list[nn.Parameter], lr: float, setup: Setup, data: WindowDataset,
              valid: list[torch.Tensor]) -> dict[str, Any]:
    """The same loop for every method: warmup then cosine decay to lr * min_lr_ratio, clipping 1.0."""
    optimizer = make_optimizer(model, params, lr)
    schedule = Schedule(lr, lr * setup.min_lr_ratio, setup.warmup, setup.steps)
    curve = [(0, mean_loss(model, valid))]
    for step in range(1, setup.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        loss = train_step(model, params, optimizer, data.batch((step - 1) * setup.batch, setup.batch))
        if not math.isfinite(loss):
            curve.append((step, float("nan")))
            break
        if step % setup.eval_every == 0 or step == setup.steps:
            curve.append((step, mean_loss(model, valid)))
    return {"lr": lr, "curve": curve, "final_val_loss": curve[-1][1]}


def step_times(builders: dict[str, Callable], lrs: dict[str, float], setup: Setup,
               data: WindowDataset) -> dict[str, list[float]]:
    """Seconds per training step of each method, the methods taking turns step by step, so that
    all of them see the same load on a shared machine."""
    states = {}
    for method, build in builders.items():
        model, params = build(setup.seed)
        states[method] = (model, params, make_optimizer(model, params, lrs[method]))
    times: dict[str, list[float]] = {method: [] for method in builders}
    for round_ in range(setup.timing_rounds):
        batch = data.batch(round_ * setup.batch, setup.batch)
        for method, (model, params, optimizer) in states.items():
            start = time.perf_counter()
            train_step(model, params, optimizer, batch)
            times[method].append(time.perf_counter() - start)
    return {method: t[3:] for method, t in times.items()}  # the first steps allocate


def validation_batches(dataset: WindowDataset, windows: int, batch: int) -> list[torch.Tensor]:
    """`windows` windows spread evenly over the held-out addresses, in batches."""
    picks = np.linspace(0, dataset.windows_per_epoch - 1, windows).astype(int)
    rows = [torch.from_numpy(dataset.window(int(i)).astype(np.int64)) for i in picks]
    return [torch.stack(rows[i:i + batch]) for i in range(0, len(rows), batch)]  # (B, T + 1) each


def sweep(method: str, build: Callable, setup: Setup, sotu: Path, seq: int,
          valid: list[torch.Tensor]) -> dict[str, Any]:
    """Every lr of the grid with seed 0, then the best lr again with the other seeds (another data
    order and another draw of the new tokens' values or LoRA's A)."""
    def one(lr: float, seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        data = WindowDataset([str(sotu / SPLIT_PREFIXES["train"])], seq, seed=seed)
        model, params = build(seed)
        run = {**fine_tune(model, params, lr, setup, data, valid), "seed": seed}
        print(f"{method:16s} lr {lr:.0e} seed {seed}: val loss {run['final_val_loss']:.4f}", flush=True)
        return run

    runs = [one(lr, setup.seed) for lr in setup.lrs[method]]
    finite = [r for r in runs if math.isfinite(r["final_val_loss"])]
    best = min(finite, key=lambda r: r["final_val_loss"]) if finite else runs[0]
    repeats = [one(best["lr"], setup.seed + s) for s in range(1, setup.seeds)]
    losses = [best["final_val_loss"]] + [r["final_val_loss"] for r in repeats]
    return {"runs": runs + repeats, "best": best, "best_lr_losses": losses, "best_lr_mean": statistics.mean(losses)}


def run_methods(setup: Setup, base: nn.Module, sotu: Path) -> dict[str, Any]:
    seq = base.config.seq_length
    valid = validation_batches(WindowDataset([str(sotu / SPLIT_PREFIXES["valid"])], seq, shuffle=False),
                               setup.eval_windows, 16)
    builders: dict[str, Callable[[int], tuple[nn.Module, list[nn.Parameter]]]] = {
        "token tuning": lambda seed: with_tokens(base, setup.tokens, seed),
        "LoRA": lambda seed: with_lora(base, setup.rank, seed),
        "full fine-tuning": lambda seed: with_everything(base, seed)}
    results: dict[str, Any] = {"base_val_loss": mean_loss(base, valid), "methods": {}}
    for method, build in builders.items():
        model, _ = build(setup.seed)
        results["methods"][method] = {"trainable_parameters": trainable_count(method, model, setup),
                                      **sweep(method, build, setup, sotu, seq, valid)}
    data = WindowDataset([str(sotu / SPLIT_PREFIXES["train"])], seq, seed=setup.seed)
    best_lrs = {method: m["best"]["lr"] for method, m in results["methods"].items()}
    for method, times in step_times(builders, best_lrs, setup, data).items():
        results["methods"][method].update(step_times_s=times, median_step_s=statistics.median(times))
    return results


# ---- report -------------------------------------------------------------------------------------

def table(results: dict[str, Any], setup: Setup) -> str:
    methods = results["methods"]
    full = methods["full fine-tuning"]["median_step_s"]
    names = {"token tuning": f"token tuning, k = {setup.tokens}", "LoRA": f"LoRA, r = {setup.rank}"}
    lines = [f"| method | trainable parameters | best peak lr (of the grid) | val loss after {setup.steps} steps, "
             f"seed {setup.seed} / mean of {setup.seeds} seeds | median step time (ratio to full FT) |",
             "| --- | --- | --- | --- | --- |",
             f"| base (no fine-tuning) | 0 | | {results['base_val_loss']:.4f} | |"]
    for method, m in methods.items():
        grid = setup.lrs[method]
        edge = " (grid edge)" if len(grid) > 1 and m["best"]["lr"] in (grid[0], grid[-1]) else ""
        lines.append(f"| {names.get(method, method)} | {m['trainable_parameters']:,} | {m['best']['lr']:g} "
                     f"(of {'/'.join(f'{lr:g}' for lr in grid)}){edge} | {m['best']['final_val_loss']:.4f} / "
                     f"{m['best_lr_mean']:.4f} | {m['median_step_s'] * 1e3:.1f} ms "
                     f"({m['median_step_s'] / full:.2f}x) |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, m in results["methods"].items():
        steps, losses = zip(*m["best"]["curve"])
        ax.plot(steps, losses, marker="o", label=f"{method} (lr {m['best']['lr']:g})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out SOTU loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.token_tuning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test in about a minute")
    parser.add_argument("--work", type=Path, default=None, help="data and the base (default runs/token_tuning[-quick])")
    parser.add_argument("--out", type=Path, default=None, help="results (default experiments/results; quick: WORK)")
    args = parser.parse_args(argv)
    if not SOTU.is_file():
        print(f"skipped: {SOTU} is absent (the State of the Union addresses are the fine-tuning task)")
        return 0
    torch.set_num_threads(1)
    setup = Setup.quick() if args.quick else Setup()
    work = args.work or ROOT / "runs" / ("token_tuning-quick" if args.quick else "token_tuning")
    out = args.out or (work if args.quick else ROOT / "experiments" / "results")
    out.mkdir(parents=True, exist_ok=True)
    load_before, started = os.getloadavg(), time.perf_counter()
    stdlib = prepared(work / "stdlib", None, setup.stdlib_documents, 0.02)
    sotu = prepared(work / "sotu", [SOTU], None, 0.1)
    base = load_model(pretrain(setup, stdlib, work)).eval()
    counts = {"token tuning": trainable_count("token tuning", base, setup), "LoRA": lora_parameters(base, setup.rank)}
    print(f"trainable parameters: token tuning {counts['token tuning']:,}, LoRA {counts['LoRA']:,}; "
          f"base {base.num_parameters():,}" + ("" if counts["token tuning"] == counts["LoRA"] else " (NOT equal)"))
    results = run_methods(setup, base, sotu)
    results.update(setup=dataclasses.asdict(setup), base_parameters=base.num_parameters(),
                   sotu_documents=json.loads((sotu / PREPARE_METADATA_FILE).read_text()),
                   wall_time_s=time.perf_counter() - started, load_average_before=load_before,
                   load_average_after=os.getloadavg(), threads=1, machine=platform.platform(),
                   python=sys.version.split()[0], torch=torch.__version__,
                   command="python -m experiments.token_tuning" + (" --quick" if args.quick else ""))
    (out / "token_tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    plotted = plot(results, out / "token_tuning.png")
    print(table(results, setup))
    print(f"{results['wall_time_s']:.0f} s; load average {load_before[0]:.2f} before, "
          f"{results['load_average_after'][0]:.2f} after; wrote {out / 'token_tuning.json'}"
          + (f" and {out / 'token_tuning.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
