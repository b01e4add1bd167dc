"""The hostile suite: mistakes a user makes that are not damaged files (tests/test_fuzz.py has
those), generated from the package's own tables so that a new writer, config field or option is
covered without a new test.

- writers: every command that writes (`OUTPUTS` of the command table, and the training commands)
  pointed at a non-empty folder of the user's, at each of its own inputs, at an earlier output of
  every other command and at its own earlier output without `--overwrite`: exit 2, one line, and
  the sha256 of every file the user has identical afterwards; with `--overwrite` it replaces its
  own output and keeps the user's file beside it.
- numbers: every numeric field of every model config (read from its dataclass fields) and every
  run-config field and command-line number (read from the parsers) at absurd values; sizes that
  would not fit in memory are refused before they are allocated.
- bombs: YAML aliases, a gzip bomb, a huge config file, a huge tar member, a 10^9-token context,
  in a child process under a memory cap (`resource.setrlimit`) and a time cap.
- environment: partial torchrun variables, unknown devices, arguments that are not UTF-8, FIFOs.

Each case: exit 2, one `error:` line on stderr, no traceback, nothing lost. The tally by category
is printed by the last test (docs/reliability.md quotes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import types
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.test_fuzz import tree_hash
from tokenformer.__main__ import OUTPUTS, build_parser, main
from tokenformer.errors import TokenFormerError
from tokenformer.outputs import MARKER_FILE, OUTPUT_NAMES
from tokenformer.training.registry import training_commands

TALLY: Counter = Counter()
TRAIN_COMMANDS = tuple(training_commands())
WRITERS = tuple(OUTPUTS) + TRAIN_COMMANDS
TIME_CAP = 60  # seconds a case may take in this process (SIGALRM), a child process too


class TimeCap(Exception):
    pass


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """`tokenformer ARGV` in this process under the time cap: (exit code, stderr)."""
    def stop(signum, frame):
        raise TimeCap(f"{argv[0]} ran past {TIME_CAP} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(TIME_CAP)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    return code, captured.err


def one_sentence(code: int, err: str, argv: list) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert "Traceback" not in err, (argv, err)
    assert code == 2, (argv, code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse prints its usage line above the error
        lines = [line for line in lines if not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    return lines[0]


def refused(argv: list, capsys, kind: str) -> str:
    TALLY[kind] += 1
    return one_sentence(*run_cli(argv, capsys), argv)


# ---- what a user has: a corpus, prompts, a model, images; and the outputs of every command --------

TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 5}\n" * (1 + i % 3) for i in range(24)]
TINY = {"name": "tiny", "seq_length": 16}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs, and one output of each kind made by the commands themselves (their markers)."""
    from PIL import Image

    import tokenformer as tf
    from tokenformer.models.config import Config

    root = tmp_path_factory.mktemp("hostile")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (root / "prompts.txt").write_text("def f(\nreturn x\n")
    model = tf.TokenFormer(Config.from_name("tiny", seq_length=16))
    model.save_pretrained(root / "model", tokenizer=tf.ByteTokenizer())
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    for i in range(4):
        folder = root / "images" / ("train", "val")[i // 2] / ("cat", "dog")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i}.png")
    world = {"root": root, "corpus": root / "corpus.jsonl", "prompts": root / "prompts.txt", "model": root / "model",
             "images": root / "images"}
    outputs = {"prepare": root / "data", "make-scenes": root / "scenes", "grow": root / "grown",
               "train": root / "run", "generate": root / "generated.jsonl"}
    world.update({f"out:{command}": path for command, path in outputs.items()})
    for command in ("prepare", "make-scenes", "grow", "train", "generate"):
        code = main([str(a) for a in recipe(command, world, outputs[command])])
        assert code == 0, command
    return world


def recipe(command: str, w: dict, out: Path) -> list:
    """A small run of `command` that writes `out`: the argv every case starts from."""
    train_tail = ["--progress", "false", "--plot", "false", "--device", "cpu", "--num_threads", "1"]
    image_text = ["--model", "tiny", "--data", w["root"] / "scenes" / "train", "--epochs", "1", "--batch_size", "2",
                  "--max_train_samples", "2", *train_tail, "--save", out]
    return {
        "prepare": ["prepare", w["corpus"], "--out", out, "--quiet", "--valid-fraction", "0.2"],
        "make-scenes": ["make-scenes", "--out", out, "--train", "4", "--val", "2", "--shard-size", "2", "--quiet"],
        "grow": ["grow", "--checkpoint", w["model"], "--out", out, "--factor", "2"],
        "shrink": ["shrink", "--checkpoint", w["model"], "--out", out, "--data", w["corpus"], "--factor", "0.5",
                   "--calibration-windows", "1", "--validation-windows", "1", "--seq-length", "8"],
        "convert": ["convert", w["model"], out],
        "generate": ["generate", "--checkpoint", w["model"], "--input-file", w["prompts"], "--output-file", out,
                     "--max-new-tokens", "2"],
        "evaluate": ["evaluate", "--checkpoint", w["model"], "--data", w["corpus"], "--context", "8", "--output", out],
        "train": ["train", "--model", json.dumps(TINY), "--data_path", w["root"] / "data", "--train_iters", "1",
                  "--train_micro_batch_size_per_gpu", "2", "--eval_iters", "1", *train_tail, "--save", out],
        "train-vision": ["train-vision", "--model", "tiny-28", "--data", w["images"], "--epochs", "1",
                         "--batch_size", "2", *train_tail, "--save", out],
        "train-captioner": ["train-captioner", *image_text, "--bpe_vocab_size", "300", "--caption_samples", "0"],
        "train-clip": ["train-clip", *image_text, "--tokenizer", "byte"],
    }[command]


def output_kind(command: str, argv: list) -> str:
    if command in TRAIN_COMMANDS:
        return "dir"
    spec = OUTPUTS[command]
    if not callable(spec.kind):
        return spec.kind
    return spec.kind(build_parser().parse_args([str(a) for a in argv]))


def with_output(argv: list, target: Path, out: Path) -> list:
    return [target if a == out else a for a in argv]


def user_files(root: Path) -> Path:
    """A folder of the user's own: files whose names a command might write, and a subfolder."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "config.json").write_text('{"mine": true}\n')
    (root / "train").mkdir()
    (root / "train" / "shard-000000.tar").write_bytes(b"my own shard")
    return root


def test_every_writer_has_a_recipe():
    """A new writing command fails here until the hostile cases below can run it."""
    assert set(OUTPUT_NAMES) <= set(WRITERS)  # every command with an output folder (and the file writers)
    assert set(training_commands()) <= set(WRITERS)
    for command in WRITERS:
        recipe(command, {k: Path(k) for k in ("root", "corpus", "prompts", "model", "images")}, Path("OUT"))


@pytest.mark.parametrize("command", WRITERS)
def test_a_writer_never_touches_what_it_did_not_write(command, world, tmp_path, capsys):
    """At a non-empty user folder (or file), at each of its own inputs, at another command's output:
    refused in one line, every byte the user has the same."""
    out = tmp_path / "OUT"
    argv = recipe(command, world, out)
    kind = output_kind(command, argv)
    targets = [("user folder", user_files(tmp_path / "mine"))]
    if kind == "file":
        (tmp_path / "mine.txt").write_text("my results\n")
        targets.append(("user file", tmp_path / "mine.txt"))
    inputs = [a for a in argv if isinstance(a, Path) and a != out and a.exists()]
    targets += [("own input", a) for a in inputs]
    targets += [("another command's output", path) for key, path in world.items()
                if key.startswith("out:") and key != f"out:{command}"]
    if kind == "file":  # a file inside another command's output
        targets.append(("another command's output", world["out:prepare"] / "prepare.json"))
    for label, target in targets:
        before = tree_hash(world["root"]), tree_hash(tmp_path)
        line = refused(with_output(argv, target, out), capsys, f"writers: {label}")
        assert str(target) in line or target.name in line, line
        assert (tree_hash(world["root"]), tree_hash(tmp_path)) == before, (command, label)


@pytest.mark.parametrize("command", WRITERS)
def test_a_writer_replaces_its_own_output_only_when_told(command, world, tmp_path, capsys):
    """A fresh output is written; again without --overwrite it is refused; with it, the command's
    own files are replaced and a file the user put beside them is kept."""
    out = tmp_path / "OUT"
    argv = recipe(command, world, out)
    before = tree_hash(world["root"])
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert tree_hash(world["root"]) == before  # the inputs too
    line = refused(argv, capsys, "writers: own earlier output")
    assert "--overwrite" in line or "--resume" in line, line
    if output_kind(command, argv) == "file":
        TALLY["writers: --overwrite"] += 1
        assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
        return
    assert (out / MARKER_FILE).is_file()
    (out / "my-notes.txt").write_text("keep me\n")
    kept = tree_hash(out)["my-notes.txt"]
    TALLY["writers: --overwrite"] += 1
    code, err = run_cli(argv + (["--overwrite", "true"] if command in TRAIN_COMMANDS else ["--overwrite"]), capsys)
    assert code == 0, err
    assert tree_hash(out)["my-notes.txt"] == kept


def test_a_failed_run_leaves_no_half_output(world, tmp_path, capsys):
    """A command that fails after claiming a new folder removes what it wrote there."""
    out = tmp_path / "grown"
    refused(["grow", "--checkpoint", world["model"], "--out", out, "--qkv-slot-num", "16"], capsys,
            "writers: failed run")  # fewer tokens: grow refuses
    assert not out.exists()


# ---- numbers: every field and option at absurd values ----------------------------------------------

ABSURD = [-1, 0, float("nan"), float("inf"), -float("inf"), "7", True, [3]]


def config_classes() -> list[type]:
    from tokenformer.models.captioner import CaptionerConfig
    from tokenformer.models.clip import CLIPConfig
    from tokenformer.models.config import Config
    from tokenformer.models.vision import VisionConfig

    return [Config, VisionConfig, CLIPConfig, CaptionerConfig]


def numeric_fields(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
        if kinds in ([int], [float]):
            found.append((f.name, kinds[0]))
    return found


def allowed(cls: type, name: str, kind: type, value) -> bool:
    """Whether the declared range takes `value` (so the config may accept it)."""
    bounds = getattr(cls, "field_bounds", {}).get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if kind is int and not isinstance(value, int):
        return False
    return bounds.holds(value) if bounds else (value >= 1 if kind is int else value > 0)


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_model_config_field_refuses_absurd_values(cls):
    """Each numeric field of each model config, at each absurd value and at 10^15: a sentence
    naming the field, or (only where the declared range takes it) a config that fits in memory."""
    from tokenformer.inputs import machine_memory

    preset = next(name for name in cls.presets() if name.startswith("tiny"))
    for name, kind in numeric_fields(cls):
        for value in ABSURD + [10**15]:
            TALLY["numbers: model config fields"] += 1
            try:
                config = cls.from_name(preset, **{name: value})
            except TokenFormerError as e:
                assert name in str(e) or "would need" in str(e), (name, value, str(e))
                assert "\n" not in str(e)
                continue
            assert allowed(cls, name, kind, value), f"{cls.__name__}.{name} took {value!r}"
            size = getattr(config, "memory_bytes", 0)
            assert size <= (machine_memory() or size), (name, value)


def test_a_model_config_json_with_absurd_values_is_one_line(world, tmp_path, capsys):
    """The same through the read door: config.json of a checkpoint with each absurd value of each
    field of the language model (JSON can hold NaN and Infinity), given to `generate`."""
    from tokenformer.models.config import Config

    good = json.loads((world["model"] / "config.json").read_text())
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    for name, _ in numeric_fields(Config):
        for value in ABSURD + [10**9]:
            (model / "config.json").write_text(json.dumps({**good, name: value}))
            code, err = run_cli(["generate", "--checkpoint", model, "--prompt", "x", "--max-new-tokens", "1"], capsys)
            TALLY["numbers: config.json fields"] += 1
            if code == 0:  # a value the range takes (a 10^9 base of the rotary embedding ...) and the weights fit
                assert allowed(Config, name, int, value) or allowed(Config, name, float, value), (name, value)
                continue
            line = one_sentence(code, err, [name, value])
            assert "config.json" in line or "model.safetensors" in line, line


def cli_number_options() -> list[tuple[str, argparse.Action]]:
    """Every option of every command whose value is a number (the parsers' declared types)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.type in (int, float) or hasattr(action.type, "bounds") or hasattr(action.type, "field_bounds"):
                found.append((command, action))
    return found


def test_every_command_line_number_declares_its_range():
    """A bare `type=int` takes NaN-free but unbounded values (--seed 2**70): every number option
    carries a range, so that the cases below can try outside it."""
    options = cli_number_options()
    assert len(options) > 40
    bare = [f"{command} {action.option_strings[0]}" for command, action in options if action.type in (int, float)]
    assert not bare, bare


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc", "1e400", "-1", str(2**70), "0"])
def test_every_command_line_number_refuses_absurd_values(value, capsys):
    """Each number option of each command at `value`: a usage error naming the option, unless
    its range takes the value."""
    for command, action in cli_number_options():
        try:
            action.type(value)
            continue  # in range (0 for --val, 2**70 for a count without maximum)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            pass
        TALLY["numbers: command-line options"] += 1
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, action.option_strings[0], value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        assert action.option_strings[0] in err or action.dest in err, err


def run_config_classes() -> list[type]:
    from tokenformer.training.config import CaptionTrainConfig, ClipTrainConfig, TrainConfig, VisionTrainConfig

    return [TrainConfig, VisionTrainConfig, CaptionTrainConfig, ClipTrainConfig]


def run_config_fields() -> list[tuple[str, str]]:
    from tokenformer.options import field_type

    return [(cls.command, f.name) for cls in run_config_classes()
            for f in dataclasses.fields(cls) if field_type(cls, f.name) in (int, float)]


@pytest.mark.parametrize("value", ["nan", "inf", "abc", "-1e400", str(2**70) + ".5"])
def test_every_run_config_number_refuses_absurd_values(value, tmp_path, capsys):
    """Each numeric field of each training command, on the command line and in its YAML file."""
    fields = run_config_fields()
    assert len(fields) > 60
    parser, config = build_parser(), tmp_path / "c.yaml"
    for command, name in fields:
        cls = next(c for c in run_config_classes() if c.command == command)
        try:  # a value the field's declared range takes (a fractional 2^70 for a learning rate) may run
            cls.converted({name: value})
            continue
        except TokenFormerError:
            pass
        TALLY["numbers: run-config fields"] += 2
        with pytest.raises(SystemExit) as e:  # the command line
            parser.parse_args([command, f"--{name}", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and name in err, err
        config.write_text(f"{name}: {value}\n")  # its YAML file: what `main` reads, in this process
        with pytest.raises(TokenFormerError) as refusal:
            cls.from_yaml(config)
        assert name in str(refusal.value) and str(config) in str(refusal.value), refusal.value
    line = one_sentence(*run_cli([command, config], capsys), [command])  # and once through `main`
    assert str(config) in line, line


SIZES = [  # options whose value is a size, at a value that would need more than any machine's memory
    (["grow", "--qkv-slot-num", 10**9], "would need"),
    (["grow", "--ffn-slot-num", 10**12], "would need"),
    (["grow", "--factor", 10**9], "would need"),
    (["make-scenes", "--image-size", 10**6], "would need"),
]


@pytest.mark.parametrize("change,expect", SIZES, ids=lambda c: " ".join(map(str, c)) if isinstance(c, list) else "")
def test_a_size_that_does_not_fit_is_refused_before_allocation(change, expect, world, tmp_path, capsys):
    command, option, value = change
    out = tmp_path / "OUT"
    argv = recipe(command, world, out)
    if "--factor" in argv:
        del argv[argv.index("--factor"):argv.index("--factor") + 2]
    argv += [option, value]
    line = refused(argv, capsys, "numbers: sizes")
    assert expect in line and "GiB" in line or "TiB" in line or "PiB" in line, line
    assert not out.exists()


# ---- bombs, in a child process under a memory and a time cap -------------------------------------

MEMORY_CAP = 3 << 30  # address space: torch's import takes about 1.5 GiB of it


# The child runs every bomb in turn, each under the time cap, and reports per bomb its exit code
# and stderr (one child: torch is imported once); an exception escaping a command is reported
# with its traceback, which fails the case.
CHILD = """
import contextlib, io, json, resource, signal, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from tokenformer.__main__ import main
def stop(signum, frame):
    raise TimeoutError('past the time cap')
signal.signal(signal.SIGALRM, stop)
for name, argv in json.loads(sys.argv[3]).items():
    err = io.StringIO()
    signal.alarm(int(sys.argv[2]))
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
    except BaseException:
        code = 'crash'
        err.write(traceback.format_exc())
    signal.alarm(0)
    print(json.dumps({'name': name, 'code': code, 'err': err.getvalue()}), flush=True)
"""


def capped(cases: dict[str, list], cwd: Path) -> dict[str, tuple[int, str]]:
    """Each `tokenformer ARGV` of `cases` in one child under the memory cap, each under the time cap."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argvs = json.dumps({name: [str(a) for a in argv] for name, argv in cases.items()})
    done = subprocess.run([sys.executable, "-c", CHILD, str(MEMORY_CAP), str(TIME_CAP), argvs], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIME_CAP * len(cases) + 60)
    results = {r["name"]: (r["code"], r["err"]) for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == set(cases), done.stderr
    return results


def yaml_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def gzip_bomb(path: Path, members: int = 16) -> Path:
    """256 MiB of zeros (16 members of 16 MiB) in about 256 kB: refused after 64 MiB."""
    member = gzip.compress(b"\0" * (1 << 24), compresslevel=9)  # 16 MiB of zeros in ~16 kB
    with open(path, "wb") as f:
        for _ in range(members):  # concatenated members decompress one after the other
            f.write(member)
    return path


def huge_tar_member(path: Path) -> Path:
    """A shard whose one member claims 512 MiB (a sparse file: no disk is used)."""
    info = tarfile.TarInfo("000.png")
    info.size = 512 << 20
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + info.size + 1024 * 10)
    return path


def huge_context(model: Path, padding: str = "") -> Path:
    """A model folder whose config.json asks for a 10^9-token context (after `padding`)."""
    from tokenformer.models.config import Config

    model.mkdir()
    config = {**Config.from_name("tiny").to_dict(), "seq_length": 10**9}
    (model / "config.json").write_text(padding + json.dumps(config))
    (model / "model.safetensors").write_bytes(b"never read: the config is refused first")
    return model


BOMBS = {
    "YAML aliases (train config)": lambda d: ["train", (d / "bomb.yaml").write_text(yaml_bomb()) and d / "bomb.yaml"],
    "YAML aliases (official .yml)": lambda d: ["convert", d / "x.bin", d / "out", "--config",
                                               (d / "b.yml").write_text(yaml_bomb()) and d / "b.yml"],
    "gzip bomb (text)": lambda d: ["prepare", gzip_bomb(d / "bomb.txt.gz"), "--out", d / "out", "--quiet"],
    "gzip bomb (JSONL line)": lambda d: ["prepare", gzip_bomb(d / "bomb.jsonl.gz"), "--out", d / "out", "--quiet"],
    "a 64 MiB config.json": lambda d: ["generate", "--checkpoint", huge_context(d / "model", " " * (64 << 20)),
                                       "--prompt", "x"],
    "a 512 MiB tar member": lambda d: ["train-clip", "--data", huge_tar_member(d / "shard-000000.tar"),
                                       "--tokenizer", "byte", "--device", "cpu"],
    "seq_length 10^9": lambda d: ["generate", "--checkpoint", huge_context(d / "model"), "--prompt", "x"],
}


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS caps memory on Linux")
def test_a_bomb_is_one_sentence_under_a_memory_cap(tmp_path):
    cases = {}
    for name, make in BOMBS.items():
        folder = tmp_path / str(len(cases))
        folder.mkdir()
        cases[name] = make(folder)
    for name, (code, err) in capped(cases, tmp_path).items():
        TALLY["bombs (child process, memory cap)"] += 1
        line = one_sentence(code, err, cases[name])
        assert "MemoryError" not in err, err
        assert not any(tmp_path.glob("*/out")), name
        assert any(word in line for word in ("would need", "expands to", "larger than", "longer than", "more than")), line
        print(f"{name}: {line}")


def test_a_long_text_is_read_in_pieces():
    """A text file longer than MAX_DOCUMENT_CHARS becomes pieces no longer than it, cut after a
    line end, that join to the text; the reader never asks for more than that at once."""
    from tokenformer.data.documents import _text_pieces

    class Reader(io.StringIO):
        largest = 0

        def read(self, size=-1):
            Reader.largest = max(Reader.largest, size if size >= 0 else 1 << 62)
            return super().read(size)

    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(2000))
    pieces = list(_text_pieces(Reader(text), limit=500))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 500 and Reader.largest == 500
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert list(_text_pieces(io.StringIO("x" * 1200), limit=500)) == ["x" * 500, "x" * 500, "x" * 200]
    TALLY["bombs: pieces"] += 1


# ---- weights of another dtype, checkpoints of another kind ---------------------------------------

def test_weights_of_another_dtype_are_refused_by_name(world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    state = load_file(str(model / "model.safetensors"))
    name = sorted(state)[0]
    save_file({**state, name: state[name].long()}, str(model / "model.safetensors"))
    line = refused(["generate", "--checkpoint", model, "--prompt", "x"], capsys, "weights: dtype")
    assert name in line and "int64" in line, line


KIND_COMMANDS = {  # a vision checkpoint where a language model belongs
    "train --init_from": lambda w, v, out: recipe("train", w, out) + ["--init_from", v],
    "train --tune_tokens": lambda w, v, out: recipe("train", w, out) + ["--init_from", v, "--tune_tokens", "2"],
    "generate": lambda w, v, out: ["generate", "--checkpoint", v, "--prompt", "x"],
    "shrink": lambda w, v, out: recipe("shrink", w, out)[:2] + [v] + recipe("shrink", w, out)[3:],
    "train --resume": lambda w, v, out: recipe("train", w, v.parent) + ["--resume"],
}


def test_a_checkpoint_of_another_kind_is_refused_by_name(world, tmp_path, capsys):
    from tokenformer.models.vision import VisionConfig, VisionTokenFormer

    vision = tmp_path / "vision"
    VisionTokenFormer(VisionConfig.from_name("tiny-28")).save_pretrained(vision)
    for name, make in KIND_COMMANDS.items():
        line = refused(make(world, vision, tmp_path / "OUT"), capsys, "checkpoints of another kind")
        assert "vision" in line, (name, line)


# ---- the environment -------------------------------------------------------------------------------

def test_partial_torchrun_variables_are_one_sentence(world, tmp_path, capsys, monkeypatch):
    for variables in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "0"}):
        for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        line = refused(recipe("train", world, tmp_path / "OUT"), capsys, "environment")
        assert "WORLD_SIZE" in line or "torchrun" in line, line


def test_unknown_device_non_utf8_arguments_and_special_files(world, tmp_path, capsys):
    line = refused(["generate", "--checkpoint", world["model"], "--prompt", "x", "--device", "gpu"], capsys,
                   "environment")
    assert "'gpu'" in line and "cuda" in line, line
    line = refused(["generate", "--checkpoint", world["model"], "--prompt", os.fsdecode(b"caf\xe9")], capsys,
                   "environment")
    assert "UTF-8" in line, line
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for argv in (["prepare", fifo, "--out", tmp_path / "out"],
                 ["grow", "--checkpoint", world["model"], "--out", tmp_path / "g", "--factor", "2", "--data", fifo],
                 ["generate", "--checkpoint", world["model"], "--input-file", world["prompts"], "--output-file", fifo]):
        line = refused(argv, capsys, "environment")
        assert "FIFO" in line and str(fifo) in line, line
    line = refused(["train", "--model", "tiny", "--data_path", world["root"] / "data", "--seed", str(2**70)], capsys,
                   "environment")
    assert "seed" in line, line


def test_zz_tally(capsys):
    """The counts by category (docs/reliability.md quotes them)."""
    with capsys.disabled():
        total = sum(TALLY.values())
        print(f"\nhostile: {total} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())))
