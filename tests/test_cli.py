"""The `tokenformer` command: help for every subcommand, installed entry point."""

import re
import subprocess
import sys

import pytest

from tokenformer.__main__ import COMMANDS, build_parser, main

# A few options each subcommand's --help must show, written out here (not read from its parser):
# train's fields take both spellings (`--train_iters` and `--train-iters`).
OWN_OPTIONS = {
    "prepare": ["--out", "--tokenizer", "--vocab-size", "--hf-dataset", "--valid-fraction"],
    "make-scenes": ["--out", "--train", "--val", "--seed", "--image-size", "--shard-size"],
    "train": ["--train_iters", "--train-iters", "--init_from", "--init-from", "--resume", "--parallelism",
              "--checkpoint_activations"],
    "train-vision": ["--epochs", "--batch_size", "--batch-size", "--augment", "--ema"],
    "train-captioner": ["--data", "--val_data", "--tokenizer", "--vision_from", "--lm_from", "--caption_samples"],
    "train-clip": ["--model", "--data", "--val_data", "--val-data", "--classes", "--tokenizer", "--epochs"],
    "evaluate-clip": ["--checkpoint", "--data", "--zero-shot", "--templates", "--batch-size", "--max-samples"],
    "evaluate": ["--checkpoint", "--tasks", "--data", "--stride", "--context", "--include-path"],
    "generate": ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--image"],
    "grow": ["--checkpoint", "--out", "--qkv-slot-num", "--proj-slot-num", "--ffn-slot-num", "--mode"],
    "shrink": ["--checkpoint", "--out", "--ffn-slot-num", "--data", "--calibration-windows", "--scale"],
    "convert": ["--config", "--tokenizer", "--dtype"],
}


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def first_line(function) -> str:
    return function.__doc__.strip().splitlines()[0].strip()


def squeeze(text: str) -> str:
    """Whitespace runs as one space, none after a hyphen: argparse wraps help text at the terminal
    width, also after the hyphen of a word (`GPT-` / `NeoX`)."""
    return re.sub(r"- ", "-", " ".join(text.split()))


def listed_options(help_text: str) -> set[str]:
    """The option strings of the `options:` list of a --help (not the ones its prose mentions):
    the entries are the lines indented by two spaces, the invocation before the help column."""
    entries = re.findall(r"^  (-\S.*)$", help_text[help_text.index("\noptions:\n"):], re.M)
    return {name for entry in entries for name in re.findall(r"(?<![\w-])--?[a-z][\w-]*", entry.split("  ")[0])}


def test_top_level_help_lists_every_subcommand_with_its_summary(capsys):
    out = help_of([], capsys)
    assert "usage: tokenformer" in out and "COMMAND --help" in squeeze(out)
    listed = squeeze(out[out.index("COMMAND\n"):])
    for name, (_, run) in COMMANDS.items():
        # `name`, then the first line of its docstring
        assert re.search(rf"(^| ){re.escape(name)} {re.escape(squeeze(first_line(run)))}", listed), (name, out)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_shows_its_docstring_and_its_options(command, capsys):
    out = help_of([command], capsys)
    assert out.startswith(f"usage: tokenformer {command} ")
    _, run = COMMANDS[command]
    assert squeeze(run.__doc__) in squeeze(out)  # the whole docstring is the description
    shown = listed_options(out)
    for option in OWN_OPTIONS[command]:
        assert option in shown, f"`tokenformer {command} --help` does not show {option}"
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
            assert set(action.option_strings) <= shown | {"-h"}, (command, action.option_strings)
            assert squeeze(action.help.replace("%%", "%")).split(" (default")[0] in squeeze(out), \
                (command, action.option_strings)


def test_module_entry_point_runs(capsys):
    out = subprocess.run([sys.executable, "-m", "tokenformer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert squeeze(out.stdout) == squeeze(help_of([], capsys))  # the same parser (wrapped at its own width)


def test_version(capsys):
    import tokenformer

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"tokenformer {tokenformer.__version__}\n"
