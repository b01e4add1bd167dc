"""The `tokenformer` command: its table of subcommands.

Each subcommand is a pair of functions in `tokenformer.cli`: one declares its options on an
argparse parser, the other runs it and its docstring is the command's `--help` text. The training
commands come from their registry (`tokenformer.training.registry`): one implementation,
`tokenformer.cli.train`, runs them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokenformer import __version__
from tokenformer.cli import clip, convert, evaluate, generate, prepare, scaling, scenes, train
from tokenformer.errors import TokenFormerError
from tokenformer.training.registry import training_commands

# subcommand -> (declare its options, run it); the training commands join after make-scenes
COMMANDS = {
    "prepare": (prepare.arguments, prepare.main),
    "make-scenes": (scenes.arguments, scenes.main),
    "evaluate-clip": (clip.evaluate_arguments, clip.evaluate_main),
    "evaluate": (evaluate.arguments, evaluate.main),
    "generate": (generate.arguments, generate.main),
    "grow": (scaling.grow_arguments, scaling.grow_main),
    "shrink": (scaling.shrink_arguments, scaling.shrink_main),
    "convert": (convert.arguments, convert.main),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenformer",
        description="TokenFormer: a Transformer whose linear layers are attention over parameter tokens. "
                    "Run `tokenformer COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"tokenformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, doc: str, arguments, run) -> None:
        summary = doc.split("\n\n")[0].replace("\n", " ")
        p = sub.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(_run=run)

    for i, (name, (arguments, run)) in enumerate(COMMANDS.items()):
        add(name, (run.__doc__ or "").strip(), arguments, run)
        if i == 1:
            for command in training_commands().values():
                add(command.name, command.help.strip(), lambda p, c=command: train.arguments(p, c), train.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except (TokenFormerError, OSError) as e:  # OSError: a path the user gave (missing, unreadable, full disk)
        print(f"tokenformer {args.command}: error: {e}", file=sys.stderr)
        _tell_torchrun(f"tokenformer {args.command}: {e}")
        return 2
    except KeyboardInterrupt:
        print(f"tokenformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _tell_torchrun(message: str) -> None:
    """Under torchrun, put the sentence in its error file so that its failure summary shows it
    (instead of "To enable traceback see ...")."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                 "timestamp": str(int(time.time()))}}}
        try:
            with open(path, "w") as f:
                json.dump(record, f)
        except OSError:  # the message is on stderr already; the summary is a nicety
            pass


if __name__ == "__main__":
    sys.exit(main())
