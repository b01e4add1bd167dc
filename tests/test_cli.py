"""The `tokenformer` command: help for every subcommand, installed entry point."""

import subprocess
import sys

import pytest

from tokenformer.__main__ import COMMANDS, build_parser


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
    assert len(out) > 200


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "tokenformer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout and "generate" in out.stdout
