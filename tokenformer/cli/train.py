"""`tokenformer train` and `tokenformer train-vision`: the one training loop from a YAML config and
`--field value` overrides (`tokenformer.training`)."""

from __future__ import annotations

import argparse
import os

from tokenformer.errors import TokenFormerError
from tokenformer.options import add_options
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig, VisionTrainConfig
from tokenformer.training.loop import train, train_vision


def arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TrainConfig, "configs/demo.yaml")


def main(args: argparse.Namespace) -> None:
    """Train a TokenFormer: `tokenformer train CONFIG.yaml [--field value ...]`.

    CONFIG is a YAML file of the fields below (see configs/); every field can be set or overridden
    on the command line as `--field value` (`--train_iters 10` or `--train-iters 10`). Data come
    from `data_path` (a `tokenformer prepare` directory) or GPT-NeoX prefixes (`train_data_paths`).
    Checkpoints, metrics.jsonl and loss_curve.png go to `save`; `--resume` continues from the latest
    checkpoint there, with the same losses as an uninterrupted run. Under `torchrun` the same
    command trains with DDP or FSDP2 (`--parallelism`)."""
    cfg = TrainConfig.from_args(args)
    _refuse_mixing_runs(cfg.save, cfg.resume)
    summary = train(cfg)
    if not _is_rank_zero():
        return
    before, after = summary["val_loss_initial"], summary["val_loss"]
    lines = [f"trained to step {summary['step']}: {summary['tokens_seen']:,} tokens, "
             f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_time_s']:.1f} s"]
    if summary["train_loss"] is not None:
        lines.append(f"final training loss {summary['train_loss']:.4f}")
    if after is not None:
        lines.append(f"validation loss {'' if before is None else f'{before:.4f} -> '}{after:.4f} "
                     f"(perplexity {summary['val_ppl']:.2f})")
    if summary["checkpoint"]:
        lines.append(f"checkpoint {summary['checkpoint']}")
    if summary["adapter"]:
        lines.append(f"adapter {summary['adapter']}")
    if summary["plot"]:
        lines.append(f"loss curve {summary['plot']}")
    print("\n".join(lines))


def vision_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, VisionTrainConfig, "configs/fashion_mnist.yaml")


def vision_main(args: argparse.Namespace) -> None:
    """Train an image classifier (a vision TokenFormer) and report its top-1 accuracy.

    Fields come from the YAML CONFIG, then `--field value` overrides (every field below). The
    output directory `save` gets checkpoints, metrics.jsonl, accuracy.png and model/ (the evaluated
    weights, the EMA ones with `ema`); `--resume` continues from its latest checkpoint exactly.
    Under `torchrun` the same command trains data-parallel (DDP), `batch_size` the global batch."""
    cfg = VisionTrainConfig.from_args(args)
    _refuse_mixing_runs(cfg.save, cfg.resume)
    result = train_vision(cfg)
    if not _is_rank_zero():
        return
    print(f"test accuracy {100 * result['test_accuracy']:.2f}% after {result['epochs']} epochs "
          f"({result['step']} steps, {result['wall_time_s']:.0f} s, {result['num_parameters']:,} parameters)")


def _refuse_mixing_runs(save: str | None, resume: bool) -> None:
    # a fresh run there would mix its checkpoints with the old run's, and prune the old ones
    if save and not resume and CheckpointManager(save).checkpoints():
        raise TokenFormerError(f"{save} already holds checkpoints of a run: pass --resume to continue it, "
                               f"or choose another `save` directory")


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
