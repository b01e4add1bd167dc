"""CLIP: the CLIP TokenFormer against an open_clip-shaped CLIP of ordinary linear layers (issue 16).

    python -m experiments.clip [--quick] [--part scenes|fashion|all] [--seed S] [--epochs N]
                               [--out runs/clip] [--sequential]

Both models are trained through the one `train` (train-clip) with the same recipe (steps, batch, learning
rate schedule, seed, data order, captions) in the same run: by default at the same time, each in its
own process on one thread (the machine's two cores, one each, under the same load); `--sequential`
trains one after the other. Both have the same width, depth, heads, embed_dim, context length and
image/patch size (one `CLIPConfig`); their parameter counts differ and are reported.

- scenes: generated image-caption scenes (`tokenformer.data.scenes`, 20k train / 1k val at 32x32),
  image->text and text->image recall@1/5/10 on val after every epoch.
- fashion: Fashion-MNIST from text prompts alone: trained on the training images captioned with
  TRAIN_TEMPLATES, then the test images classified with prompt ensembles of HELD_OUT_TEMPLATES;
  once on all 10 classes, once on 8 (`HELD_OUT_CLASSES` left out of training), zero-shot on all 10
  with the accuracy on the 2 unseen classes apart. Needs ../shared/data/fashion-mnist (skipped,
  with a message, when absent).

Writes `clip.json` and `clip.png` (val recall@1 and zero-shot accuracy per epoch) to
`experiments/results` (with `--quick`: to OUT, so a quick run never replaces the measured one).
A `--part` run updates its part of an existing clip.json and keeps the other.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experiments.clip_baseline import CLIPBaseline
from tokenformer.data import images
from tokenformer.data.prompts import FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES
from tokenformer.data.scenes import write_scene_dataset
from tokenformer.data.tokenizer import load_tokenizer
from tokenformer.evaluation.retrieval import zero_shot_classifier
from tokenformer.files import FINAL_MODEL_DIR, TOKENIZER_FILE
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer
from tokenformer.training.config import ClipTrainConfig
from tokenformer.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
FASHION_MNIST = ROOT.parent / "shared" / "data" / "fashion-mnist"
MODELS = ("CLIPTokenFormer", "CLIPBaseline")
PARTS = ("scenes", "fashion")
HELD_OUT_CLASSES = (8, 9)  # bag, ankle boot: the last two labels, fixed before any run
SEEN_CLASSES = [c for c in range(10) if c not in HELD_OUT_CLASSES]

# The one recipe of every run, for both models, not tuned per model: open_clip's AdamW settings
# (betas 0.9/0.98, eps 1e-6, weight decay 0.2), lr 1e-3 with half an epoch of warmup then cosine to
# 1e-5, clipping 1.0, batch 128, no augmentation, a 512-token BPE trained on the training captions.
RECIPE: dict[str, Any] = dict(batch_size=128, lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, lr_decay_style="cosine",
                              weight_decay=0.2, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-6, clip_grad=1.0,
                              augment="none", tokenizer="bpe", bpe_vocab_size=512, seed=0, eval_interval=1,
                              save_interval=1000, keep_last_n=1, log_interval=25)

# What each part trains on and for how long; `--quick` shrinks both to a minute or two.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {"scenes": dict(train=20000, val=1000, epochs=2),
             "fashion": dict(epochs=2, max_train_samples=10000, max_val_samples=None)},
    "quick": {"scenes": dict(train=2000, val=500, epochs=2),
              "fashion": dict(epochs=1, max_train_samples=6000, max_val_samples=2000)},
}


def runs_of(part: str, scale: dict[str, Any], out: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The train-clip configs (as dicts, without `save`) of a part: run name -> values. Another
    seed (initialisation, data order, caption draws; the same scenes) names its runs `NAME-seedS`."""
    suffix = f"-seed{seed}" if seed else ""
    recipe = dict(RECIPE, seed=seed)
    if part == "scenes":
        data = out / "scenes"
        return {f"scenes{suffix}": dict(recipe, model={"name": "tiny", "text": {"vocab_size": RECIPE["bpe_vocab_size"]}},
                                        data=str(data / "train"), val_data=str(data / "val"), epochs=scale["epochs"])}
    common = dict(recipe, model={"name": "tiny-28", "text": {"vocab_size": RECIPE["bpe_vocab_size"]}},
                  data=str(FASHION_MNIST), mean=[0.286], std=[0.353], epochs=scale["epochs"],
                  max_train_samples=scale["max_train_samples"], max_val_samples=scale["max_val_samples"])
    return {f"fashion-all-classes{suffix}": common,
            f"fashion-held-out-classes{suffix}": dict(common, classes=SEEN_CLASSES)}


def build(kind: str, cfg: ClipTrainConfig) -> torch.nn.Module:
    """One of MODELS for the config's preset; both from the same `CLIPConfig`."""
    config = CLIPConfig.resolve(cfg.model)
    return CLIPTokenFormer(config) if kind == "CLIPTokenFormer" else CLIPBaseline(config)


@torch.no_grad()
def zero_shot_predictions(model: torch.nn.Module, tokenizer, split: tuple[torch.Tensor, torch.Tensor],
                          transform: images.Transform, batch_size: int = 500) -> torch.Tensor:
    """The zero-shot class (N,) of every image of `split`, among all 10 Fashion-MNIST classes, by
    prompt ensembles of HELD_OUT_TEMPLATES (the task's `zero_shot`, kept per image here)."""
    model.eval()
    classifier = zero_shot_classifier(model, tokenizer, FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES)  # (10, E)
    predictions = []
    for x, _ in images.batches_of(split, batch_size, transform):
        features = F.normalize(model.encode_image(x).float(), dim=-1)  # (B, E)
        predictions.append((features @ classifier.T).argmax(-1))
    return torch.cat(predictions)


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 of each class's images (None for a class without images)."""
    return [float((predicted[labels == c] == c).float().mean()) if bool((labels == c).any()) else None
            for c in range(num_classes)]


def run_one(kind: str, values: dict[str, Any], save: str) -> dict[str, Any]:
    """Train one model (`kind` in MODELS) with the train-clip config `values`; a summary without the
    per-step losses (every 10th is kept)."""
    torch.set_num_threads(values.get("num_threads") or torch.get_num_threads())
    cfg = ClipTrainConfig.from_dict({**values, "save": save})
    torch.manual_seed(cfg.seed)
    model = build(kind, cfg)
    cpu_start = time.process_time()
    result = train(cfg, model)
    result["cpu_time_s"] = time.process_time() - cpu_start
    if Path(cfg.data) == FASHION_MNIST:
        model = type(model).from_pretrained(Path(save) / FINAL_MODEL_DIR)  # what the run saved
        tokenizer = load_tokenizer(Path(save) / FINAL_MODEL_DIR / TOKENIZER_FILE)
        x, y = images.load_mnist(cfg.data, "test")
        n = cfg.max_val_samples or len(y)
        transform = images.make_transform(False, "none", cfg.mean, cfg.std, model.config.vision.image_size)
        predicted = zero_shot_predictions(model, tokenizer, (x[:n], y[:n]), transform)
        result["per_class_zero_shot_top1"] = per_class_accuracy(predicted, y[:n], len(FASHION_MNIST_CLASSES))
    keep = ("history", "num_parameters", "step", "train_loss", "wall_time_s", "cpu_time_s", "images_per_s",
            "per_class_zero_shot_top1")
    summary = {k: result[k] for k in keep if k in result}
    image_tower = sum(p.numel() for p in model.visual.parameters())  # both models call it `visual`
    summary["parameters_by_tower"] = {"image": image_tower, "text": result["num_parameters"] - image_tower - 1,
                                      "logit_scale": 1}
    summary["losses"] = {step: loss for step, loss in result["losses"].items() if step % 10 == 0}
    return {"model": kind, "threads": torch.get_num_threads(), **summary}


def train_pair(values: dict[str, Any], out: Path, sequential: bool) -> dict[str, dict[str, Any]]:
    """Both models on `values`: at the same time on one thread each, or one after the other."""
    saves = [str(out / kind) for kind in MODELS]
    if sequential:
        results = [run_one(kind, values, save) for kind, save in zip(MODELS, saves)]
    else:
        values = {**values, "num_threads": 1, "progress": False}
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(MODELS), mp_context=context) as pool:
            results = list(pool.map(run_one, MODELS, [values] * len(MODELS), saves))
    return {r["model"]: r for r in results}


def run_part(part: str, scale: dict[str, Any], out: Path, sequential: bool, seed: int = 0,
             suffix: str = "") -> dict[str, Any] | None:
    """Every run of a part (named with `suffix` appended); None (with a message) when its data are absent."""
    if part == "fashion" and not FASHION_MNIST.is_dir():
        print(f"skipping the Fashion-MNIST part: {FASHION_MNIST} is absent (the shared data folder)")
        return None
    if part == "scenes":
        scenes = out / "scenes"
        wanted = {"train": scale["train"], "val": scale["val"], "seed": 0, "image_size": 32}
        made = json.loads((scenes / "scenes.json").read_text()) if (scenes / "scenes.json").is_file() else {}
        if any(made.get(k) != v for k, v in wanted.items()):
            write_scene_dataset(scenes, **wanted)
    report = {}
    for name, values in runs_of(part, scale, out, seed).items():
        name += suffix
        start, load_before = time.perf_counter(), os.getloadavg()
        results = train_pair(values, out / name, sequential)
        report[name] = {"config": values, "results": results, "chance": chance(part, scale),
                        "total_wall_time_s": time.perf_counter() - start,
                        "load_average_before": load_before, "load_average_after": os.getloadavg(),
                        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print_run(name, results)
    return report


def chance(part: str, scale: dict[str, Any]) -> dict[str, float]:
    """What guessing scores: recall@k = k / (val pairs) for retrieval, 1 / 10 for zero-shot top-1."""
    if part == "scenes":
        return {f"recall@{k}": k / scale["val"] for k in (1, 5, 10)}
    return {"zero_shot_top1": 1 / len(FASHION_MNIST_CLASSES)}


def print_run(name: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{name}")
    for kind, r in results.items():
        last = r["history"][-1] if r["history"] else {}
        found = ", ".join(f"{k} {100 * v:.1f}%" for k, v in last.items() if "recall@" in k or "zero_shot" in k)
        print(f"  {kind:<16}{r['num_parameters']:>10,} params  {r['wall_time_s']:>6.0f} s  "
              f"val loss {last.get('val_loss', float('nan')):.4f}  {found}")


def longest_runs(report: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """The runs of `prefix` (any seed) with the most epochs: name -> run."""
    runs = {name: run for name, run in report.items()
            if name == prefix or name.startswith(prefix + "-")}
    longest = max((run["config"]["epochs"] for run in runs.values()), default=None)
    return {name: run for name, run in runs.items() if run["config"]["epochs"] == longest}


def draw_curves(ax, runs: dict[str, dict[str, Any]], key: str, style: str, what: str) -> None:
    """One thin line per run (seed) and model of `key` per epoch, and the mean over the runs in bold."""
    colours = dict(zip(MODELS, ("tab:red", "tab:blue")))
    for kind in MODELS:
        curves = [[(r["epoch"], 100 * r[key]) for r in run["results"][kind]["history"] if key in r]
                  for run in runs.values() if kind in run["results"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        for curve in curves if len(curves) > 1 else []:
            ax.plot(*zip(*curve), style, color=colours[kind], alpha=0.3, linewidth=1)
        epochs = [e for e, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(epochs))]
        params = next(iter(runs.values()))["results"][kind]["num_parameters"]
        seeds = f", mean of {len(curves)} seeds" if len(curves) > 1 else ""
        ax.plot(epochs, mean, style, marker="o", color=colours[kind], label=f"{kind} ({params:,}): {what}{seeds}")


def plot(report: dict[str, Any], png: Path) -> Path | None:
    """Val recall@1 (scenes) and zero-shot top-1 (Fashion-MNIST) per epoch of the longest runs, both
    models; None without matplotlib (extra `plot`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is missing (pip install 'tokenformer[plot]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scenes = longest_runs(report, "scenes")
    draw_curves(left, scenes, "image_to_text_recall@1", "-", "image->text")
    draw_curves(left, scenes, "text_to_image_recall@1", "--", "text->image")
    all_classes, held_out = longest_runs(report, "fashion-all-classes"), longest_runs(report, "fashion-held-out-classes")
    draw_curves(right, all_classes, "zero_shot_top1", "-", "10 classes trained")
    draw_curves(right, held_out, "zero_shot_top1", "--", "8 trained: all test images")
    draw_curves(right, held_out, "zero_shot_unseen_top1", ":", "8 trained: the 2 unseen")
    right.axhline(10, color="grey", linewidth=0.8, label="chance (10 classes)")
    for ax, title, ylabel in ((left, "generated scenes: val retrieval (1,000 pairs)", "recall@1 (%)"),
                              (right, "Fashion-MNIST zero-shot (held-out prompts)", "top-1 (%)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a minute or two: small data, short runs")
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--out", type=Path, default=None, help="runs and data (default runs/clip, runs/clip-quick)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where clip.json and clip.png go (default experiments/results; OUT with --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train this many epochs instead of the scale's (adds runs NAME-Nepochs to clip.json)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of both models' runs (another seed adds runs NAME-seedS to clip.json)")
    parser.add_argument("--sequential", action="store_true",
                        help="train one model after the other instead of both at once on one thread each")
    args = parser.parse_args(argv)
    scale = SCALES["quick" if args.quick else "full"]
    out = args.out or ROOT / ("runs/clip-quick" if args.quick else "runs/clip")
    results = args.results or (out if args.quick else RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "clip.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    for part in (PARTS if args.part == "all" else (args.part,)):
        part_scale = scale[part] if args.epochs is None else dict(scale[part], epochs=args.epochs)
        found = run_part(part, part_scale, out, args.sequential, args.seed,
                         suffix="" if args.epochs is None else f"-{args.epochs}epochs")
        if found is not None:
            report.update(found)
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "scale": "quick" if args.quick else "full",
                         "mode": "sequential" if args.sequential else "parallel, one thread each"}
    path.write_text(json.dumps(report, indent=2) + "\n")
    png = plot(report, results / "clip.png")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return report


if __name__ == "__main__":
    main()
