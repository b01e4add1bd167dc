"""`docs/reference.md`, written from the code: every field of the run configs (their `--help`
texts) and every option of every subcommand, so the reference cannot drift from the command line.

    python -m tokenformer.cli.reference > docs/reference.md
"""

from __future__ import annotations

import argparse

from tokenformer.__main__ import build_parser
from tokenformer.options import reference_markdown
from tokenformer.training.registry import training_commands


def _options_table(parser: argparse.ArgumentParser) -> str:
    lines = ["| option | meaning |", "| --- | --- |"]
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}` (positional)"
        meaning = (action.help or "").replace("|", "/").replace("%%", "%")
        # `is`, not `in`: a default of 0 equals False and is still worth saying
        if all(action.default is not v for v in (None, argparse.SUPPRESS, False)) and "default" not in meaning:
            meaning += f" (default {action.default})"
        lines.append(f"| {names} | {meaning} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    commands = training_commands()
    parts = ["# Reference\n",
             "Generated from the code by `python -m tokenformer.cli.reference > docs/reference.md`; "
             "`tokenformer COMMAND --help` says the same.\n",
             f"The fields of the training commands' configs ({', '.join(commands)}) are set in a YAML "
             "config or as `--field value` (`--field-name` works too; a bare "
             "`--flag` means true).\n"]
    for name, command in commands.items():
        parts += [f"## `tokenformer {name}` config fields\n",
                  f"Trains a `{command.model.__name__}` (`init_from` must hold one); e.g. `{command.example}`.\n",
                  reference_markdown(command.config)]
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        if name in commands:
            continue
        summary = (parser.description or "").split("\n\n")[0].replace("\n", " ")
        parts += [f"## `tokenformer {name}`\n", f"{summary}\n", _options_table(parser)]
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
