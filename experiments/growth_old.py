"""Incremental scaling in miniature: does growing a small TokenFormer beat training the big one?

    python experiments/growth.py            # the README run: writes experiments/results/growth.{json,png}
    python experiments/growth.py --steps 40 --grow-at 20 --eval-interval 10 --out /tmp/g --work /tmp/g/work  # smoke

On the State of the Union addresses (`../shared/data/sotu`, else this Python's standard library),
byte-level tokens, every run through the trainer (`tokenformer.training.loop.train`):

  scratch                 the large model (same depth and width, more parameter tokens) from scratch
  small                   the small model, stopped at `--grow-at` of the same `--steps` schedule
  then the small checkpoint is grown to the large shape (`scaling.grow_checkpoint`, what
  `tokenformer grow` runs) and trained `--steps - --grow-at` more steps, each variant a curve:
  exact/fresh-restart     exact growth, fresh AdamW, re-warmed schedule (the official recipe)
  exact/fresh-low-lr      ... fresh AdamW, re-warmed to a lower peak lr (`--low-lr`)
  exact/fresh-continue    ... fresh AdamW, the small run's schedule continued (no re-warm)
  exact/carry-continue    ... optimizer state carried (new tokens: zero moments), schedule continued
  official/fresh-restart  official growth (random new rows, n follows the count), official recipe
  and, with `--variants`, exact/carry-restart and official/carry-continue.

Runs go `--jobs` at a time (one thread each). Cumulative training FLOPs are analytic matmul FLOPs
(`tokenformer.flops`, forward + backward) and count the small model's training in the grown runs.
Writes OUT/growth.json (every validation point, the table) and OUT/growth.png (loss vs FLOPs).
Restarted runs read the data in a fresh order (seed + 1) so that they do not revisit exactly the
windows the small model saw; continued runs go on from the small run's data position.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUTCOME_FILE = "outcome.json"
SOTU = ROOT.parent / "shared" / "data" / "sotu" / "sotu.jsonl.gz"

# name -> (growth mode, carry optimizer, continue schedule, low lr)
VARIANTS = {
    "exact/fresh-restart": ("exact", False, False, False),
    "exact/carry-restart": ("exact", True, False, False),
    "exact/fresh-continue": ("exact", False, True, False),
    "exact/carry-continue": ("exact", True, True, False),
    "exact/fresh-low-lr": ("exact", False, False, True),
    "official/fresh-restart": ("official", False, False, False),
    "official/carry-continue": ("official", True, True, False),
}
DEFAULT_VARIANTS = ("exact/fresh-restart", "exact/fresh-low-lr", "exact/fresh-continue", "exact/carry-continue",
                    "official/fresh-restart")


def slots(text: str) -> dict[str, int]:
    qkv, proj, ffn = (int(v) for v in text.split(","))
    return dict(qkv_slot_num=qkv, proj_slot_num=proj, ffn_slot_num=ffn)


def prepare_corpus(work: Path, valid_fraction: float) -> tuple[Path, str]:
    from tokenformer.data.prepare import prepare

    out = work / "data"
    if (out / "prepare.json").is_file():
        meta = json.loads((out / "prepare.json").read_text())
        return out, meta.get("corpus", "?")
    if SOTU.is_file():
        corpus, inputs, limit = "State of the Union (../shared/data/sotu)", [SOTU], None
    else:
        corpus, inputs, limit = "Python standard library (first 600 files)", None, 600
    meta = prepare(inputs, out, tokenizer="byte", valid_fraction=valid_fraction, max_documents=limit,
                   progress=False)
    meta["corpus"] = corpus
    (out / "prepare.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out, corpus


def run_training(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process: the trainer, nothing else."""
    from tokenformer.training.config import TrainConfig
    from tokenformer.training.loop import train
    from tokenformer.training.metrics import read_metrics

    start = time.perf_counter()
    summary = train(TrainConfig(**values))
    records = read_metrics(Path(values["save"]) / "metrics.jsonl")
    outcome = {"name": name, "wall_time_s": time.perf_counter() - start, "checkpoint": summary["checkpoint"],
               "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
               "tokens_per_s": summary["tokens_per_s"], "config": values}
    (Path(values["save"]) / OUTCOME_FILE).write_text(json.dumps(outcome) + "\n")
    return outcome


def finished_run(name: str, values: dict[str, Any], earlier_results: Path) -> dict[str, Any] | None:
    """An earlier run of `name` with exactly these settings (`--reuse`), finished, or None. Its
    timing comes from its outcome.json, or from the earlier results file."""
    from tokenformer.training.checkpointing import CheckpointManager
    from tokenformer.training.config import TrainConfig
    from tokenformer.training.metrics import read_metrics

    save = Path(values["save"])
    if not (save / "train_config.json").is_file() or not (save / "metrics.jsonl").is_file():
        return None
    if json.loads((save / "train_config.json").read_text()) != json.loads(json.dumps(TrainConfig(**values).to_dict())):
        return None
    latest = CheckpointManager(save).latest()
    if latest is None or latest.name != CheckpointManager.name_of(values["train_iters"]):
        return None
    records = read_metrics(save / "metrics.jsonl")
    timing = json.loads((save / OUTCOME_FILE).read_text()) if (save / OUTCOME_FILE).is_file() else \
        json.loads(earlier_results.read_text())["runs"].get(name, {}) if earlier_results.is_file() else {}
    return {"name": name, "checkpoint": str(latest), "reused": True,
            "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
            "wall_time_s": timing.get("wall_time_s", float("nan")), "tokens_per_s": timing.get("tokens_per_s")}


def flops_per_step(model: dict[str, Any], tokens_per_step: int) -> float:
    from tokenformer.models.config import Config
    from tokenformer.flops import tokenformer_flops

    config = Config(**model)
    return tokenformer_flops(config, config.seq_length).training().total * tokens_per_step


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a validation curve first reaches `target` (linear between points), or None."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return f0
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = {"scratch": dict(color="black", linewidth=2.2), "small": dict(color="grey", linestyle=":")}
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, run in results["runs"].items():
        xs, ys = zip(*[(p["flops"], p["val_loss"]) for p in run["curve"]])
        style = styles.get(name) or dict(color=next(colours), linestyle="--" if name.startswith("official") else "-")
        ax.plot(xs, ys, marker=".", markersize=4, label=name, **style)
    ax.axvline(results["growth_flops"], color="grey", alpha=0.4)
    ax.axhline(results["runs"]["scratch"]["final_val_loss"], color="black", alpha=0.3, linewidth=0.8)
    top = results["runs"]["small"]["curve"][min(2, len(results["runs"]["small"]["curve"]) - 1)]["val_loss"]
    lowest = min(p["val_loss"] for run in results["runs"].values() for p in run["curve"])
    ax.set_ylim(lowest - 0.03, top)
    ax.set_xlabel("cumulative training FLOPs (matmul, forward + backward; small model's training included)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Growing a TokenFormer vs training it from scratch ({results['corpus'].split(' (')[0]}, bytes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "growth", help="data and checkpoints")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of the from-scratch run")
    parser.add_argument("--grow-at", type=int, default=200, help="steps of the small model before growing")
    parser.add_argument("--small", type=slots, default=slots("64,64,256"), help="qkv,proj,ffn tokens of the small model")
    parser.add_argument("--large", type=slots, default=slots("192,192,768"), help="... of the large model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=2e-4)
    parser.add_argument("--low-lr", type=float, default=1e-3, help="peak lr of the low-lr variant")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-iters", type=int, default=16, help="validation micro-batches (of --batch windows)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: the five of the README)")
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time (one CPU thread each)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the runs in --work that finished with the same settings (e.g. to add a variant)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not 0 < args.grow_at < args.steps:
        parser.error(f"unknown variant {unknown[0]}" if unknown else "need 0 < --grow-at < --steps")

    from tokenformer.scaling.grow import grow_checkpoint

    began = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data, corpus = prepare_corpus(args.work, valid_fraction=0.03)
    print(f"corpus: {corpus}; data in {data}", flush=True)

    shape = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 seq_length=args.seq, vocab_size=257)
    small_model, large_model = {**shape, **args.small}, {**shape, **args.large}
    common = dict(data_path=str(data), train_micro_batch_size_per_gpu=args.batch, lr=args.lr, min_lr=args.min_lr,
                  warmup_iters=args.warmup, lr_decay_style="cosine", weight_decay=0.1, clip_grad=1.0,
                  eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.eval_interval,
                  keep_last_n=1, plot=False, progress=False, num_threads=1, device="cpu", seed=args.seed)
    after = args.steps - args.grow_at
    configs = {
        "scratch": dict(common, model=large_model, train_iters=args.steps, save_interval=args.steps),
        # the small model runs the first grow_at steps of the same schedule (decay over --steps)
        "small": dict(common, model=small_model, train_iters=args.grow_at, lr_decay_iters=args.steps,
                      save_interval=args.grow_at),
    }
    for name in variants:
        mode, carry, cont, low = VARIANTS[name]
        grown = str(args.work / f"grown-{mode}")
        values = dict(common, init_from=grown, init_from_optimizer=carry, save_interval=args.steps)
        if cont:
            values.update(init_from_schedule="continue", train_iters=args.steps)
        else:
            values.update(init_from_schedule="restart", train_iters=after, seed=args.seed + 1)
        if low:
            values.update(lr=args.low_lr)
        configs[name] = values
    for name, values in configs.items():
        values["save"] = str(args.work / "runs" / name.replace("/", "-"))

    tokens_per_step = args.batch * args.seq
    small_step, large_step = flops_per_step(small_model, tokens_per_step), flops_per_step(large_model, tokens_per_step)
    outcomes: dict[str, dict[str, Any]] = {}
    growth_losses: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        pending: dict[futures.Future, str] = {}

        def launch(name: str) -> None:
            earlier = finished_run(name, configs[name], args.out / "growth.json") if args.reuse else None
            if earlier is not None:
                done_with(name, earlier)
            else:
                pending[pool.submit(run_training, name, configs[name])] = name

        def done_with(name: str, outcome: dict[str, Any]) -> None:
            outcomes[name] = outcome
            print(f"{name}: {'reused' if outcome.get('reused') else 'done'} ({outcome['wall_time_s']:.0f} s), "
                  f"final validation loss {outcome['val'][-1][1]:.4f}", flush=True)
            if name == "small":
                for mode in sorted({VARIANTS[v][0] for v in variants}):
                    old, new = grow_checkpoint(outcome["checkpoint"], args.work / f"grown-{mode}", mode=mode,
                                               seed=args.seed, **args.large)
                    print(f"grew the small model ({old.num_parameters():,} parameters) to "
                          f"{new.num_parameters():,} ({mode})", flush=True)
                for variant in variants:
                    launch(variant)

        launch("small")
        launch("scratch")
        while pending:
            done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for job in done:
                done_with(pending.pop(job), job.result())

    # ---- curves, table ----
    def curve_of(name: str) -> list[dict[str, float]]:
        points = []
        for step, loss in outcomes[name]["val"]:
            if name == "scratch":
                flops = step * large_step
            elif name == "small":
                flops = step * small_step
            else:
                after_growth = step - args.grow_at if configs[name]["init_from_schedule"] == "continue" else step
                flops = args.grow_at * small_step + after_growth * large_step
            points.append({"step": step, "flops": flops, "val_loss": loss})
        return points

    results: dict[str, Any] = {
        "command": "python experiments/growth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corpus": corpus, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available, "
                                     f"{args.jobs} runs at a time, 1 thread each",
        "settings": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "small_model": small_model, "large_model": large_model,
        "flops_per_step": {"small": small_step, "large": large_step},
        "growth_flops": args.grow_at * small_step, "runs": {},
    }
    small_final = outcomes["small"]["val"][-1][1]
    for name in ["scratch", "small"] + [v for v in VARIANTS if v in outcomes]:
        curve = curve_of(name)
        run = {"curve": curve, "final_val_loss": curve[-1]["val_loss"], "total_flops": curve[-1]["flops"],
               "wall_time_s": outcomes[name]["wall_time_s"], "tokens_per_s": outcomes[name]["tokens_per_s"],
               "reused_from_earlier_invocation": bool(outcomes[name].get("reused"))}
        if name not in ("scratch", "small"):
            run["val_loss_before_growth"] = small_final
            run["val_loss_right_after_growth"] = curve[0]["val_loss"]
            run["val_loss_peak_after_growth"] = max(p["val_loss"] for p in curve[:3])
        results["runs"][name] = run
    target = results["runs"]["scratch"]["final_val_loss"]
    scratch_flops = results["runs"]["scratch"]["total_flops"]
    scratch_curve = [(p["flops"], p["val_loss"]) for p in results["runs"]["scratch"]["curve"]]
    grown_names = [n for n in results["runs"] if n not in ("scratch", "small")]
    # a level every grown run reaches, so that their compute can be compared with scratch's
    common = max(results["runs"][n]["final_val_loss"] for n in grown_names) if grown_names else target
    results["common_target"] = common
    for name, run in results["runs"].items():
        points = [(p["flops"], p["val_loss"]) for p in run["curve"]]
        run["flops_to_reach_scratch_final"] = compute_to_reach(points, target)
        run["flops_to_reach_common_target"] = compute_to_reach(points, common)
        # how the run compares with the from-scratch curve at the same compute, after the growth point
        gaps = [loss - _interpolate(scratch_curve, flops) for flops, loss in points
                if name in grown_names and results["growth_flops"] < flops <= scratch_flops]
        run["max_gap_to_scratch_after_growth"] = max(gaps) if gaps else None
        run["final_gap_to_scratch"] = gaps[-1] if gaps else None
    results["wall_time_s"] = time.perf_counter() - began
    results["table"] = table(results, target, common)
    (args.out / "growth.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results, args.out / "growth.png")
    except ImportError:
        print("matplotlib is missing (pip install -e '.[plot]'): no PNG", file=sys.stderr)
    print(results["table"])
    print(f"wall time {results['wall_time_s'] / 60:.1f} min; wrote {args.out / 'growth.json'} and growth.png")
    return 0


def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1] if x > curve[-1][0] else curve[0][1]


def table(results: dict[str, Any], target: float, common: float) -> str:
    scratch = results["runs"]["scratch"]

    def reach(flops: float | None) -> str:
        return "not reached" if flops is None else f"{flops:.3g} ({flops / scratch['total_flops']:.2f}x)"

    lines = [f"| run | final val loss | training FLOPs | FLOPs to reach {common:.3f} | FLOPs to reach {target:.3f} "
             f"(scratch's final) | loss before -> right after -> peak after growth | gap to scratch at equal "
             f"FLOPs: worst / at the end |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in results["runs"].items():
        jump = "" if "val_loss_before_growth" not in run else (
            f"{run['val_loss_before_growth']:.3f} -> {run['val_loss_right_after_growth']:.3f} -> "
            f"{run['val_loss_peak_after_growth']:.3f}")
        gap = "" if run["max_gap_to_scratch_after_growth"] is None else \
            f"{run['max_gap_to_scratch_after_growth']:+.3f} / {run['final_gap_to_scratch']:+.3f}"
        lines.append(f"| {name} | {run['final_val_loss']:.3f} | {run['total_flops']:.3g} | "
                     f"{reach(run['flops_to_reach_common_target'])} | {reach(run['flops_to_reach_scratch_final'])} | "
                     f"{jump} | {gap} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
