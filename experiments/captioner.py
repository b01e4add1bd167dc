"""The captioner experiment: does a tiny TokenFormer captioner describe scenes it has not seen?

    python -m experiments.captioner                    # 20k train / 500 val scenes, 12 epochs (~11 min, 1 core)
    python -m experiments.captioner --quick            # a smoke run of a minute

Generates the 32x32 scenes (`tokenformer.data.scenes`; the val scenes avoid the object sets of the
train scenes), trains the tiny captioner (`tokenformer.models.captioner`) on the one loop
(`train`, the train-captioner task), and reports per epoch the validation caption loss and the scene accuracy of
greedy captions of held-out scenes: the whole scene exactly, and per attribute (count, colour,
shape, position; groups compared as multisets, see `attribute_matches`). For honesty it also
scores baselines computed from the training captions alone, with the same metric: always
predicting the most frequent training scene, and per attribute the share of the most frequent
value (majority) and one over the number of values (chance). Writes
experiments/results/captioner.json and captioner.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tokenformer.data import scenes
from tokenformer.data.image_text import open_image_text
from tokenformer.training.config import CaptionTrainConfig
from tokenformer.training.loop import train
from tokenformer.training.tasks.caption import ATTRIBUTES, accuracy_record, attribute_matches, scene_groups

RESULTS = Path(__file__).resolve().parent / "results"
VALUES = {"count": list(scenes.COUNT_WORDS), "colour": list(scenes.COLOURS), "shape": list(scenes.SHAPES),
          "position": list(scenes.POSITIONS)}


def baselines(train_dir: Path, val_dir: Path, caption_samples: int) -> dict:
    """What the training captions alone give: the most frequent training scene predicted for every
    scored val scene (same metric as the model), and per attribute majority and chance shares."""
    train_scenes = [tuple(sorted(scenes.parse_caption(c))) for c in open_image_text(train_dir).captions]
    val = open_image_text(val_dir)
    truths = [scene_groups(val.extra(i)) for i in range(min(caption_samples, len(val)))]
    majority_scene = list(Counter(train_scenes).most_common(1)[0][0])
    totals = sum(attribute_matches(truth, majority_scene) for truth in truths)
    groups = [group for scene in train_scenes for group in scene]
    per_attribute = {}
    for a, name in enumerate(ATTRIBUTES):
        value, n = Counter(g[a] for g in groups).most_common(1)[0]
        per_attribute[name] = {"majority_value": value, "majority_share": n / len(groups),
                               "chance": 1 / len(VALUES[name])}
    return {"majority_scene": [list(g) for g in majority_scene],
            "majority_scene_scores": accuracy_record(totals, len(truths)), "per_attribute": per_attribute,
            "train_groups": len(groups)}


def plot(history: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["val_loss"] for r in history], "o-")
    left.set(xlabel="epoch", ylabel="validation caption loss (nats/token)", title="caption loss")
    for key, label in [("exact_match", "exact scene")] + [(f"{a}_accuracy", a) for a in ATTRIBUTES]:
        line, = right.plot(epochs, [100 * r[key] for r in history], "o-", label=label)
        baseline = base["majority_scene_scores"][key]
        right.axhline(100 * baseline, color=line.get_color(), linestyle=":", linewidth=1)
    right.set(xlabel="epoch", ylabel="% of held-out scenes / groups", ylim=(0, 100),
              title="greedy captions (dotted: majority-scene baseline)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/captioner-experiment"))
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1000 train / 100 val scenes, 2 epochs")
    parser.add_argument("--results", type=Path, default=RESULTS / "captioner.json")
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.epochs = 1000, 100, 2
        args.results = args.out / "captioner.json"
    data = args.out / "scenes"
    started = time.perf_counter()
    metadata = scenes.write_scene_dataset(data, train=args.train, val=args.val, seed=args.seed)
    data_s = time.perf_counter() - started
    base = baselines(data / "train", data / "val", args.val)
    cfg = CaptionTrainConfig(model="tiny", data=str(data / "train"), val_data=str(data / "val"), tokenizer="bpe",
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             caption_samples=args.val, save=str(args.out / "run"), progress=False,
                             num_threads=args.threads, keep_last_n=1)
    if Path(cfg.save).exists():
        raise SystemExit(f"{cfg.save} exists: remove it (or give another --out) for a fresh run")
    summary = train(cfg)
    history = summary["history"]
    captions = [json.loads(line) for line in (Path(cfg.save) / "captions.jsonl").read_text().splitlines()]
    result = {
        "settings": {**cfg.to_dict(), "train_scenes": args.train, "val_scenes": args.val,
                     "val_overlap": metadata["val_overlap"], "torch": torch.__version__,
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads; shared with other "
                                f"jobs, timings are noisy"},
        "num_parameters": summary["num_parameters"], "steps": summary["step"],
        "train_time_s": summary["wall_time_s"], "data_time_s": data_s,
        "total_wall_time_s": time.perf_counter() - started, "load_average_after": os.getloadavg(),
        "history": history, "final": history[-1], "baselines": base,
        "examples": captions[:12],
        "exact_by_objects": exact_by_size(captions, data / "val"),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    plot(history, base, args.results.with_suffix(".png"))
    final = history[-1]
    print(f"{summary['step']} steps in {summary['wall_time_s']:.0f} s: validation caption loss "
          f"{final['val_loss']:.4f}, exact scenes {100 * final['exact_match']:.1f}% (majority scene "
          f"{100 * base['majority_scene_scores']['exact_match']:.1f}%)")
    for a in ATTRIBUTES:
        print(f"  {a:8s} {100 * final[f'{a}_accuracy']:5.1f}%   majority-scene "
              f"{100 * base['majority_scene_scores'][f'{a}_accuracy']:5.1f}%, majority value "
              f"{100 * base['per_attribute'][a]['majority_share']:5.1f}%, chance "
              f"{100 * base['per_attribute'][a]['chance']:5.1f}%")
    print(f"wrote {args.results}")


def exact_by_size(captions: list[dict], val_dir: Path) -> dict[str, dict[str, float]]:
    """Exact-match rate of the greedy captions by the number of groups in the true scene."""
    val = open_image_text(val_dir)
    index = {val.key(i): i for i in range(len(val))}
    tally: dict[int, list[float]] = {}
    for c in captions:
        truth = scene_groups(val.extra(index[c["key"]]))
        exact = attribute_matches(truth, scenes.parse_caption(c["caption"]))[0]
        tally.setdefault(len(truth), []).append(exact)
    return {str(k): {"scenes": len(v), "exact_match": float(np.mean(v))} for k, v in sorted(tally.items())}


if __name__ == "__main__":
    main()
