"""The `tokenformer` command: one subcommand per job.

Each subcommand lives in the module that does the job, as `cli_arguments(parser)` (its options)
and `cli_main(args)` (whose docstring is its `--help` text). A module serving several subcommands
(grow and shrink) holds a `CLI` dict instead: subcommand -> (cli_arguments, cli_main).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module holding cli_arguments / cli_main
COMMANDS = {
    "prepare": "tokenformer.prepare",
    "train": "tokenformer.train",
    "train-vision": "tokenformer.train_vision",
    "evaluate": "tokenformer.evaluate",
    "generate": "tokenformer.generate",
    "grow": "tokenformer.scaling",
    "shrink": "tokenformer.scaling",
    "convert": "tokenformer.convert",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenformer",
        description="TokenFormer: a Transformer whose linear layers are attention over parameter tokens. "
                    "Run `tokenformer COMMAND --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        if hasattr(module, "CLI"):
            arguments, run = module.CLI[name]
        else:
            arguments, run = module.cli_arguments, module.cli_main
        doc = (run.__doc__ or "").strip()
        summary = doc.split("\n\n")[0].replace("\n", " ")
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tokenformer.errors import TokenFormerError

    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except (TokenFormerError, FileNotFoundError, NotADirectoryError) as e:
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
    import json
    import os
    import time

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
