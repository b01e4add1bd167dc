"""The training commands (`tokenformer train`, `train-vision`, `train-clip`, `train-captioner`, and
any a task registers): one implementation, reading `tokenformer.training.registry`. Each runs the
one training loop from a YAML config and `--field value` overrides."""

from __future__ import annotations

import argparse
import os

from tokenformer.options import add_options
from tokenformer.training.loop import train
from tokenformer.training.registry import TrainingCommand, command_named


def arguments(parser: argparse.ArgumentParser, command: TrainingCommand) -> None:
    add_options(parser, command.config, command.example or f"a {command.name} recipe")
    parser.set_defaults(_training_command=command.name)


def main(args: argparse.Namespace) -> None:
    """Train with the command's config (CONFIG.yaml, then `--field value`) and print its report."""
    command = command_named(args._training_command)
    cfg = command.config.from_args(args)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(command.task.report(summary))

