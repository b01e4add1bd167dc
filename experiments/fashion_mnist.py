"""Fashion-MNIST: the small vision TokenFormer against a standard ViT of the same width and depth.

    python -m experiments.fashion_mnist [--config configs/fashion_mnist.yaml] [--out runs/fashion_mnist]
                                        [--sequential] [--field value ...]
    torchrun --standalone --nproc_per_node 2 -m experiments.fashion_mnist [...]

Both models are trained with the same recipe (the config, then the `--field value` overrides of
`tokenformer train-vision`) in the same run: by default at the same time, each in its own process
on one thread (the machine's two cores, one each, under the same load); `--sequential` trains
one after the other with the config's thread count. Under torchrun both are trained one after
the other, each data-parallel over the ranks (`train-vision`'s DDP). Prints both test
accuracies, wall and CPU times, and writes `OUT/fashion_mnist.json` and `OUT/fashion_mnist.png`
(accuracy vs epoch).
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

import torch

MODELS = ("VisionTokenFormer", "ViT")


def run_one(kind: str, values: dict, out: str) -> dict:
    """Train one model (`kind` in MODELS) with the train-vision config `values`."""
    from experiments.vit import ViT
    from tokenformer.models.vision import VisionConfig, VisionTokenFormer
    from tokenformer.training.config import VisionTrainConfig
    from tokenformer.training.loop import train

    cfg = VisionTrainConfig.from_dict({**values, "save": str(Path(out) / kind)})
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    config = VisionConfig.resolve(cfg.model)
    model = VisionTokenFormer(config) if kind == "VisionTokenFormer" else ViT(config)
    cpu_start = time.process_time()  # this process only (rank 0 under torchrun)
    result = train(cfg, model)
    result["cpu_time_s"] = time.process_time() - cpu_start
    result["model"] = kind
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/fashion_mnist.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/fashion_mnist"))
    parser.add_argument("--sequential", action="store_true",
                        help="train one model after the other instead of both at once on one thread each")
    parser.add_argument("--only", choices=MODELS, default=None, help="train only this model")
    parser.add_argument("--resume", action="store_true",
                        help="continue both runs from their latest checkpoints in OUT (epoch ends)")
    args, rest = parser.parse_known_args()
    if len(rest) % 2 or any(not k.startswith("--") for k in rest[::2]):
        parser.error(f"overrides must be --field value pairs, got {rest}")
    import yaml

    values = yaml.safe_load(args.config.read_text()) or {}
    from tokenformer.training.config import VisionTrainConfig

    overrides = {k[2:].replace("-", "_"): v for k, v in zip(rest[::2], rest[1::2])}
    values.update(VisionTrainConfig.from_dict({**values, **overrides}).to_dict())  # converted, checked
    values.pop("save", None)
    values["resume"] = args.resume
    kinds = [args.only] if args.only else list(MODELS)
    from tokenformer.training.distributed import init_distributed, shutdown

    env = init_distributed(values.get("device", "auto"))  # under torchrun: one group for both runs
    load_before = os.getloadavg()
    start = time.perf_counter()
    if env.distributed:
        results = [run_one(kind, values, str(args.out)) for kind in kinds]
        shutdown()
        if not env.is_main:
            return
        mode = f"torchrun, {env.world_size} processes (DDP) of {values.get('num_threads') or 1} thread(s)"
    elif args.sequential or len(kinds) == 1:
        results = [run_one(kind, values, str(args.out)) for kind in kinds]
        mode = "sequential"
    else:
        values = {**values, "num_threads": 1, "progress": False}
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(kinds), mp_context=context) as pool:
            results = list(pool.map(run_one, kinds, [values] * len(kinds), [str(args.out)] * len(kinds)))
        mode = "parallel, one thread each"
    total = time.perf_counter() - start
    summary = {
        "config": values, "mode": mode,
        "total_wall_time_s": total, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "results": {r["model"]: r for r in results},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fashion_mnist.json").write_text(json.dumps(summary, indent=2) + "\n")
    from tokenformer.training.metrics import plot_accuracy

    plot_accuracy({f"{r['model']} ({r['num_parameters']:,} params)": r["history"] for r in results},
                  args.out / "fashion_mnist.png", title="Fashion-MNIST test accuracy")
    print(f"{'model':<20}{'params':>10}{'test acc':>10}{'epochs':>8}{'wall s':>9}{'cpu s':>9}")
    for r in results:
        print(f"{r['model']:<20}{r['num_parameters']:>10,}{100 * r['test_accuracy']:>9.2f}%{r['epochs']:>8}"
              f"{r['wall_time_s']:>9.0f}{r['cpu_time_s']:>9.0f}")
    print(f"{mode}; total wall time {total:.0f} s; load average before {load_before[0]:.1f}, "
          f"after {summary['load_average_after'][0]:.1f} (2 cores; other jobs share them)")
    print(f"wrote {args.out / 'fashion_mnist.json'} and {args.out / 'fashion_mnist.png'}")


if __name__ == "__main__":
    main()
