"""The `tokenformer` command: its table of subcommands.

Each subcommand is a pair of functions in `tokenformer.cli`: one declares its options on an
argparse parser, the other runs it and its docstring is the command's `--help` text. The training
commands come from their registry (`tokenformer.training.registry`): one implementation,
`tokenformer.cli.train`, runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenformer import __version__
from tokenformer.cli import clip, convert, evaluate, generate, prepare, scaling, scenes, train
from tokenformer.errors import TokenFormerError
from tokenformer.training.registry import training_commands
from tokenformer.outputs import claim_dir, claim_file

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



@dataclass(frozen=True)
class Output:
    """What a command writes: the option naming it, whether it is a folder or one file (`kind`, or
    a function of the arguments deciding), and the options naming what it reads."""

    option: str
    kind: str | Callable[[argparse.Namespace], str]
    reads: tuple[str, ...] = ()


# The write door of every command that writes outside a training run (those claim their `save`
# folder in tokenformer.training.loop): `main` claims the output before the command runs.
OUTPUTS = {
    "prepare": Output("out", "dir", ("inputs", "tokenizer", "hf_dataset")),
    "make-scenes": Output("out", "dir"),
    "grow": Output("out", "dir", ("checkpoint", "data")),
    "shrink": Output("out", "dir", ("checkpoint", "data")),
    "convert": Output("output", convert.output_kind, ("source", "config", "tokenizer")),
    "generate": Output("output_file", "file", ("input_file", "checkpoint", "image", "tokenizer")),
    "evaluate": Output("output", "file", ("checkpoint", "data")),
}


def claim_output(command: str, args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Check (and, for a folder, mark) the output of `command` before it runs."""
    spec = OUTPUTS.get(command)
    target = getattr(args, spec.option, None) if spec else None
    if target is None:
        return contextlib.nullcontext()
    inputs = []
    for name in spec.reads:
        value = getattr(args, name, None)
        inputs += [str(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
    inputs = [i for i in inputs if Path(i).exists()]  # presets and names ("byte", a Hub name) are not paths
    what = f"--{spec.option.replace('_', '-')}" if spec.option != "output" or command == "evaluate" else "output"
    kind = spec.kind(args) if callable(spec.kind) else spec.kind
    if kind == "file":
        claim_file(target, overwrite=args.overwrite, inputs=inputs, what=what)
        return contextlib.nullcontext()
    return claim_dir(target, command, overwrite=args.overwrite, inputs=inputs, what=what)


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
        if name in OUTPUTS:
            p.add_argument("--overwrite", action="store_true",
                           help="replace an earlier output of this command (only the files it wrote; "
                                "anything else there is kept)")
        p.set_defaults(_run=run)

    for i, (name, (arguments, run)) in enumerate(COMMANDS.items()):
        add(name, (run.__doc__ or "").strip(), arguments, run)
        if i == 1:
            for command in training_commands().values():
                add(command.name, command.help.strip(), lambda p, c=command: train.arguments(p, c), train.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for position, argument in enumerate(argv, start=1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # Python keeps an undecodable byte as a lone surrogate
            shown = ascii(os.fsencode(argument))[1:]
            print(f"tokenformer: error: argument {position} ({shown}) is not valid UTF-8: give text in UTF-8",
                  file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        with claim_output(args.command, args):
            args._run(args)
    except (TokenFormerError, OSError) as e:  # OSError: a path the user gave (missing, unreadable, full disk)
        _close_progress_bars()
        print(f"tokenformer {args.command}: error: {e}", file=sys.stderr)
        _tell_torchrun(f"tokenformer {args.command}: {e}")
        return 2
    except (MemoryError, RuntimeError) as e:  # an allocation no check foresaw: a sentence, not a traceback
        if not isinstance(e, MemoryError) and "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        _close_progress_bars()
        print(f"tokenformer {args.command}: error: ran out of memory ({type(e).__name__}): choose smaller sizes "
              f"(batch, model, context) or a machine with more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokenformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _close_progress_bars() -> None:
    """End a progress bar an error interrupted, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


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
