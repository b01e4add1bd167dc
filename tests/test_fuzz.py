"""Damaged inputs at the door: every reader and every command that reads files, handed truncated,
bit-flipped, random, empty, mistaken (a valid file of another kind), unreadable and misplaced
(a directory where a file belongs) inputs.

The contract checked for each: a library call raises `TokenFormerError` naming the path (nothing
else escapes), a command exits non-zero with one line on stderr naming the path and no traceback,
and nothing the user had is modified or deleted (the input tree is hashed before and after). A
flipped byte inside tensor data or text can leave a valid file: such an input may also succeed,
but never crash. `TALLY` counts the inputs tried; the last test prints it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenformer as tf
from tokenformer.__main__ import main
from tokenformer.data.documents import iter_documents
from tokenformer.data.images import ImageFolder, read_idx, write_idx
from tokenformer.data.indexed import IndexedDataset
from tokenformer.data.prepare import load_prepared, prepare
from tokenformer.errors import TokenFormerError
from tokenformer.inputs import read_safetensors, torch_load_safe
from tokenformer.models.config import Config
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread_module")

TALLY: Counter = Counter()  # inputs tried, by reader or command; printed by the last test
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---- the damage ---------------------------------------------------------------------------------

def damaged_versions(data: bytes, seed: int = 0) -> Iterator[tuple[str, bytes, bool]]:
    """(label, bytes, must_fail) for one file: empty, truncations, flips, random bytes. A flipped
    byte may leave a valid file (must_fail False), and so may a cut that only drops trailing
    whitespace; every other damage must be refused."""
    rng = random.Random(seed)
    yield "empty", b"", True
    for cut in sorted({1, 4, 8, 9, 17, 40, len(data) // 3, len(data) // 2, len(data) - 1}):
        if 0 < cut < len(data):
            yield f"truncated at {cut}", data[:cut], data[cut:].strip() != b""
    for i in range(6):
        position = rng.randrange(len(data)) if i else 0  # the first byte is always a header byte
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        yield f"bit flipped at {position}", bytes(flipped), i == 0
    yield "random bytes", rng.randbytes(max(64, min(len(data), 4096))), True


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path -> sha256 (and directories as such)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def expect_refused(call: Callable[[], object], path: Path, must_fail: bool = True, kind: str = "") -> bool:
    """`call` raises TokenFormerError naming `path` (or succeeds, where the damage may be harmless)."""
    TALLY[kind] += 1
    try:
        call()
    except TokenFormerError as e:
        message = str(e)
        assert str(path) in message or path.name in message, (kind, message)
        assert "\n" not in message.strip(), message
        return True
    assert not must_fail, f"{kind}: a damaged {path} was accepted"
    return False


def run_cli(argv: list[str], capsys, named: Path, must_fail: bool = True, kind: str = "") -> int:
    """`tokenformer ARGV` in this process: exit 0, or exit 2 with one stderr line naming `named`."""
    TALLY[f"cli {kind or argv[0]}"] += 1
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if must_fail:
        assert code != 0, (argv, err)
    if code:
        lines = [line for line in err.strip().splitlines() if "error:" in line]
        assert len(lines) == 1, err
        assert str(named) in lines[0] or named.name in lines[0], (argv, err)
    return code


# ---- what a user has: a prepared corpus, a training run, a model, official files, images ----------

TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 5}\n" * (1 + i % 3) for i in range(40)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    docs = root / "docs"
    docs.mkdir()
    with open(docs / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    (docs / "corpus.jsonl.gz").write_bytes(gzip.compress((docs / "corpus.jsonl").read_bytes()))
    (docs / "notes.txt").write_text("\n".join(TEXTS))
    prepare([docs / "corpus.jsonl"], root / "data", tokenizer="byte", valid_fraction=0.2, progress=False)
    cfg = TrainConfig(model={"name": "tiny", "seq_length": 16}, data_path=str(root / "data"), train_iters=2,
                      train_micro_batch_size_per_gpu=2, eval_iters=1, save_interval=2, log_interval=1,
                      progress=False, plot=False, device="cpu", save=str(root / "run"), seed=0)
    train(cfg)
    model = tf.TokenFormer(Config.from_name("tiny", seq_length=16)).eval()
    model.save_pretrained(root / "model", tokenizer=tf.ByteTokenizer())
    torch.save(tf.export_official(model), root / "official.bin")
    (root / "official.yml").write_text(json.dumps({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                                   "seq_length": 16, "qkv_slot_num": 32, "proj_slot_num": 32,
                                                   "ffn_slot_num": 128, "vocab_size": 257}))
    images = root / "mnist"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    for split in ("train", "t10k"):
        write_idx(images / f"{split}-images-idx3-ubyte.gz", pixels)
        write_idx(images / f"{split}-labels-idx1-ubyte.gz", np.arange(8, dtype=np.uint8) % 3)
    folder = root / "folder" / "cat"
    folder.mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image", reason="Pillow is in the dev extra")
    for i in range(2):
        Image.fromarray(pixels[i]).save(folder / f"{i}.png")
    return {"root": root, "docs": docs, "data": root / "data", "run": root / "run",
            "checkpoint": root / "run" / "step_00000002", "model": root / "model", "official": root / "official.bin",
            "yml": root / "official.yml", "mnist": images, "folder": root / "folder"}


@pytest.fixture
def copy_of(world, tmp_path) -> Callable[[str], Path]:
    """A private copy of one of the world's inputs, to damage."""
    def make(name: str) -> Path:
        source = world[name]
        target = tmp_path / name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return target
    return make


# ---- library readers ------------------------------------------------------------------------------

MODEL_FILES = {  # file of a model directory -> how reading the directory reaches it
    "config.json": lambda d: tf.TokenFormer.from_pretrained(d),
    "model.safetensors": lambda d: tf.TokenFormer.from_pretrained(d),
    "tokenizer.json": lambda d: tf.load_tokenizer(d),
}


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_a_damaged_model_directory_file_is_one_sentence(world, copy_of, name):
    pristine = (world["model"] / name).read_bytes()
    for label, data, must_fail in damaged_versions(pristine, seed=len(name)):
        directory = copy_of("model")
        (directory / name).write_bytes(data)
        if name == "model.safetensors" and label.startswith("bit flipped") and int(label.split()[-1]) < 8:
            must_fail = True  # the header length: any change breaks the file
        expect_refused(lambda: MODEL_FILES[name](directory), directory / name, must_fail, f"model dir {name}")


@pytest.mark.parametrize("name,other", [("config.json", "tokenizer.json"), ("tokenizer.json", "config.json"),
                                        ("model.safetensors", "config.json"), ("config.json", "model.safetensors")])
def test_a_file_of_another_kind_is_named(world, copy_of, name, other):
    directory = copy_of("model")
    shutil.copyfile(world["model"] / other, directory / name)
    expect_refused(lambda: MODEL_FILES[name](directory), directory / name, kind="other kind")


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_a_directory_where_a_file_belongs(world, copy_of, name):
    directory = copy_of("model")
    (directory / name).unlink()
    (directory / name).mkdir()
    expect_refused(lambda: MODEL_FILES[name](directory), directory / name, kind="directory for a file")


@pytest.mark.skipif(ROOT, reason="running as root: chmod cannot make a file unreadable")
@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_an_unreadable_file_is_named(world, copy_of, name):
    directory = copy_of("model")
    (directory / name).chmod(0)
    try:
        if os.access(directory / name, os.R_OK):
            pytest.skip("chmod does not take away read access here")
        expect_refused(lambda: MODEL_FILES[name](directory), directory / name, kind="unreadable")
    finally:
        (directory / name).chmod(0o644)


@given(header=st.binary(max_size=64), length=st.integers(min_value=0, max_value=2**64 - 1))
@FUZZ
def test_any_safetensors_header_is_read_or_refused(tmp_path, header, length):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header)
    expect_refused(lambda: read_safetensors(path), path, must_fail=False, kind="safetensors header (hypothesis)")


@given(entry=st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I64", "X9"]),
                                    "shape": st.lists(st.integers(-2, 5), max_size=3),
                                    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3)}))
@FUZZ
def test_a_safetensors_entry_outside_the_file_is_refused(tmp_path, entry):
    """A JSON header whose tensor lies partly outside the file, or whose bytes do not match its
    shape, is refused before the safetensors library sees it; one that fits loads."""
    header = json.dumps({"t": entry}).encode()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    offsets, shape = entry["data_offsets"], entry["shape"]
    itemsize = {"F32": 4, "I64": 8}.get(entry["dtype"])
    fits = (itemsize is not None and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= 16
            and all(d >= 0 for d in shape) and offsets[1] - offsets[0] == int(np.prod(shape)) * itemsize)
    refused = expect_refused(lambda: read_safetensors(path), path, must_fail=not fits, kind="safetensors entry")
    assert refused != fits


def test_damaged_trainer_state_and_official_bin(world, copy_of):
    for name, read in (("checkpoint", lambda p: CheckpointManager(p.parent).load(p, tf.TokenFormer(
            Config.from_name("tiny", seq_length=16)), None)), ):
        pristine = (world[name] / "trainer.pt").read_bytes()
        for label, data, must_fail in damaged_versions(pristine, seed=3):
            directory = copy_of(name)
            (directory / "trainer.pt").write_bytes(data)
            expect_refused(lambda: read(directory), directory / "trainer.pt", must_fail, "trainer.pt")
    for label, data, must_fail in damaged_versions(world["official"].read_bytes(), seed=4):
        path = copy_of("official")
        path.write_bytes(data)
        expect_refused(lambda: tf.load_official(path, "tiny"), path, must_fail, "official .bin")
    path = copy_of("official")
    path.write_bytes((world["checkpoint"] / "trainer.pt").read_bytes())  # a trainer state is no state dict
    expect_refused(lambda: tf.load_official(path, Config.from_name("tiny", seq_length=16)), path, kind="other kind")
    expect_refused(lambda: torch_load_safe(world["yml"]), world["yml"], kind="other kind")


def test_a_damaged_latest_pointer_falls_back_to_the_newest_checkpoint(world, copy_of):
    run = copy_of("run")
    for label, data, _ in damaged_versions((world["run"] / "latest").read_bytes(), seed=5):
        (run / "latest").write_bytes(data)
        TALLY["latest pointer"] += 1
        assert CheckpointManager(run).latest() == run / "step_00000002", label
    (run / "latest").unlink()
    (run / "latest").mkdir()
    TALLY["latest pointer"] += 1
    assert CheckpointManager(run).latest() == run / "step_00000002"


def test_damaged_configs_yaml_and_prepare_metadata(world, copy_of, tmp_path):
    yml = world["yml"].read_bytes()
    for label, data, must_fail in damaged_versions(yml, seed=6):
        path = tmp_path / "model.yml"
        path.write_bytes(data)
        expect_refused(lambda: Config.from_neox_yaml(path), path, must_fail, "official .yml")
        path = tmp_path / "train.yaml"
        path.write_bytes(data)
        # JSON is YAML too: any parseable version still holds model fields, which no train field is
        expect_refused(lambda: TrainConfig.from_yaml(path), path, label != "empty", "train YAML")
    config_json = (world["model"] / "config.json").read_bytes()
    for label, data, must_fail in damaged_versions(config_json, seed=7):
        path = tmp_path / "config.json"
        path.write_bytes(data)
        expect_refused(lambda: Config.from_json(path), path, must_fail, "config .json")
    for label, data, must_fail in damaged_versions((world["data"] / "prepare.json").read_bytes(), seed=8):
        data_dir = copy_of("data")
        (data_dir / "prepare.json").write_bytes(data)
        expect_refused(lambda: load_prepared(data_dir), data_dir / "prepare.json", must_fail, "prepare.json")
    for values in ({"hidden_size": 60, "num_attention_heads": 7}, {"vocab_size": 0}, {"num_layers": -1},
                   {"hidden_size": "wide"}, {"rotary_pct": "a quarter"}, {"seq_length": [16]}):
        path = tmp_path / "absurd.json"
        path.write_text(json.dumps({**Config.from_name("tiny").to_dict(), **values}))
        expect_refused(lambda: Config.from_json(path), path, kind="absurd config values")


def test_damaged_indexed_pairs(world, copy_of):
    prefix = "valid_text_document"
    for suffix in (".idx", ".bin"):
        pristine = (world["data"] / f"{prefix}{suffix}").read_bytes()
        for label, data, must_fail in damaged_versions(pristine, seed=9):
            data_dir = copy_of("data")
            (data_dir / f"{prefix}{suffix}").write_bytes(data)
            # a .bin of its old length is valid whatever its bytes (flipped or random tokens)
            same_length = len(data) == len(pristine)
            expect_refused(lambda: IndexedDataset(data_dir / prefix), data_dir / f"{prefix}{suffix}",
                           must_fail and (suffix == ".idx" or not same_length), f"indexed {suffix}")


@given(sizes=st.lists(st.integers(-3, 40), max_size=6), extra=st.integers(-8, 8), doc_end=st.integers(-1, 8))
@FUZZ
def test_an_index_that_disagrees_with_its_bin_is_refused(tmp_path, sizes, extra, doc_end):
    """Valid MMIDIDX headers with absurd contents (negative sizes, a .bin of another length, a
    document index that does not end at N) are refused; consistent ones read back."""
    prefix = tmp_path / "d"
    n = len(sizes)
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(np.maximum(sizes_arr, 0))[:-1] * 2]).astype(np.int64)[:n]
    doc_idx = np.asarray([0, n if doc_end < 0 else doc_end], dtype=np.int64)
    header = b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([8]) + n.to_bytes(8, "little") + \
        (2).to_bytes(8, "little")
    Path(f"{prefix}.idx").write_bytes(header + sizes_arr.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    tokens = max(0, int(np.maximum(sizes_arr, 0).sum()) + extra)
    Path(f"{prefix}.bin").write_bytes(bytes(2 * tokens))
    consistent = all(s >= 0 for s in sizes) and extra == 0 and (doc_end < 0 or doc_end == n)
    refused = expect_refused(lambda: IndexedDataset(prefix), Path(f"{prefix}.idx"), must_fail=not consistent,
                             kind="indexed header (hypothesis)")
    assert refused != consistent


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz", "notes.txt"])
def test_damaged_documents_name_the_file(world, tmp_path, name):
    pristine = (world["docs"] / name).read_bytes()
    for label, data, must_fail in damaged_versions(pristine, seed=10):
        path = tmp_path / name
        path.write_bytes(data)
        # plain text is never "damaged" (undecodable bytes become U+FFFD), an empty file is no
        # document; JSONL cut at a line end is shorter JSONL; a cut or random gzip stream is refused
        if name == "notes.txt" or label == "empty":
            fail = False
        elif name.endswith(".gz"):
            fail = "flipped" not in label
        else:
            fail = label == "random bytes" or (label.startswith("truncated") and not data.endswith((b"\n", b"}")))
        expect_refused(lambda: list(iter_documents([path])), path, fail, f"documents {name}")


def test_a_bad_jsonl_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    with pytest.raises(TokenFormerError, match=r"c\.jsonl line 3 is not valid JSON"):
        list(iter_documents([path]))
    TALLY["documents line"] += 1


def test_damaged_idx_and_images(world, copy_of):
    for name in ("t10k-images-idx3-ubyte.gz",):
        pristine = (world["mnist"] / name).read_bytes()
        raw = gzip.decompress(pristine)
        for label, data, must_fail in [*damaged_versions(pristine, seed=11),
                                       *((f"raw {lbl}", d, m) for lbl, d, m in damaged_versions(raw, seed=12))]:
            directory = copy_of("mnist")
            (directory / name).write_bytes(data)
            expect_refused(lambda: read_idx(directory / name), directory / name, must_fail, "IDX")
    png = (world["folder"] / "cat" / "0.png").read_bytes()
    for label, data, must_fail in damaged_versions(png, seed=13):
        folder = copy_of("folder")
        (folder / "cat" / "0.png").write_bytes(data)
        # Pillow needs no IEND chunk (the last 12 bytes): a cut there leaves every pixel
        harmless = label.startswith("truncated") and int(label.split()[-1]) >= len(png) - 12
        expect_refused(lambda: ImageFolder(folder)[0], folder / "cat" / "0.png", must_fail and not harmless,
                       "image file")


# ---- commands ---------------------------------------------------------------------------------------

def test_commands_on_a_damaged_checkpoint(world, copy_of, tmp_path, capsys):
    """generate, evaluate, grow, shrink, convert and train --init_from on a checkpoint with one
    damaged file: one line, the file named, the checkpoint untouched."""
    commands = {
        "generate": lambda d: ["generate", "--checkpoint", d, "--prompt", "hi", "--max-new-tokens", "2"],
        "evaluate": lambda d: ["evaluate", "--checkpoint", d, "--data", world["docs"] / "corpus.jsonl",
                               "--output", tmp_path / "eval.json"],
        "grow": lambda d: ["grow", "--checkpoint", d, "--out", tmp_path / "grown", "--factor", "2"],
        "shrink": lambda d: ["shrink", "--checkpoint", d, "--out", tmp_path / "shrunk", "--factor", "0.5",
                             "--data", world["docs"] / "corpus.jsonl"],
        "convert": lambda d: ["convert", d, tmp_path / "out.bin"],
        "train --init_from": lambda d: ["train", "--model", "{name: tiny, seq_length: 16}", "--data_path",
                                        world["data"], "--init_from", d, "--train_iters", "1", "--progress", "false",
                                        "--plot", "false", "--eval_iters", "0", "--device", "cpu"],
    }
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        pristine = (world["checkpoint"] / name).read_bytes()
        damages = [d for d in damaged_versions(pristine, seed=14) if d[2]][:4]  # the ones that must fail
        damages.append(("another kind", (world["data"] / "prepare.json").read_bytes(), True))
        for label, data, _ in damages:
            for command, argv in commands.items():
                if name == "tokenizer.json" and command in ("convert", "train --init_from", "grow"):
                    continue  # they do not read the tokenizer (grow copies it as it is)
                checkpoint = copy_of("checkpoint")
                (checkpoint / name).write_bytes(data)
                before = tree_hash(checkpoint)
                run_cli(argv(checkpoint), capsys, checkpoint / name, kind=command)
                assert tree_hash(checkpoint) == before, (command, name, label)


def test_train_resume_from_a_damaged_checkpoint_keeps_the_run(world, copy_of, capsys):
    pristine = (world["checkpoint"] / "trainer.pt").read_bytes()
    for label, data, must_fail in [d for d in damaged_versions(pristine, seed=15) if d[2]][:5]:
        run = copy_of("run")
        (run / "step_00000002" / "trainer.pt").write_bytes(data)
        before = tree_hash(run)
        # the damaged trainer.pt hides the checkpoint from `latest` unless it still exists as a file
        run_cli(["train", "--model", "{name: tiny, seq_length: 16}", "--data_path", world["data"], "--save", run,
                 "--resume", "--train_iters", "3", "--progress", "false", "--plot", "false", "--device", "cpu"],
                capsys, run / "step_00000002" / "trainer.pt", kind="train --resume")
        assert tree_hash(run) == before, label


def test_commands_on_damaged_data_files(world, copy_of, tmp_path, capsys):
    for name in ("valid_text_document.idx", "prepare.json"):
        pristine = (world["data"] / name).read_bytes()
        for label, data, must_fail in [d for d in damaged_versions(pristine, seed=16) if d[2]][:5]:
            data_dir = copy_of("data")
            (data_dir / name).write_bytes(data)
            before = tree_hash(data_dir)
            run_cli(["evaluate", "--checkpoint", world["model"], "--data", data_dir, "--output", tmp_path / "e.json"]
                    if name.endswith(".idx") else
                    ["train", "--model", "{name: tiny, seq_length: 16}", "--data_path", data_dir, "--train_iters", "1",
                     "--progress", "false", "--plot", "false", "--device", "cpu"],
                    capsys, data_dir / name, kind="evaluate --data" if name.endswith(".idx") else "train data_path")
            assert tree_hash(data_dir) == before
    for label, data, must_fail in [d for d in damaged_versions((world["docs"] / "corpus.jsonl.gz").read_bytes(),
                                                              seed=17) if d[2]][:5]:
        docs = copy_of("docs")
        (docs / "corpus.jsonl.gz").write_bytes(data)
        run_cli(["prepare", docs / "corpus.jsonl.gz", "--out", tmp_path / "prepared", "--quiet"], capsys,
                docs / "corpus.jsonl.gz", kind="prepare")
        assert not (tmp_path / "prepared").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe\x00binary")
    run_cli(["generate", "--checkpoint", world["model"], "--input-file", prompts, "--output-file",
             tmp_path / "o.jsonl"], capsys, prompts, kind="generate --input-file")
    for label, data, must_fail in [d for d in damaged_versions(world["official"].read_bytes(), seed=18) if d[2]][:5]:
        official = copy_of("official")
        official.write_bytes(data)
        run_cli(["convert", official, tmp_path / "converted", "--config", world["yml"]], capsys, official,
                kind="convert official")
    yml = tmp_path / "bad.yml"
    yml.write_bytes(b"num_layers: [unclosed\n")
    run_cli(["convert", world["official"], tmp_path / "converted", "--config", yml], capsys, yml,
            kind="convert official")


def test_train_vision_on_damaged_idx(world, copy_of, capsys):
    name = "train-images-idx3-ubyte.gz"
    pristine = (world["mnist"] / name).read_bytes()
    for label, data, must_fail in [d for d in damaged_versions(pristine, seed=19) if d[2]][:5]:
        mnist = copy_of("mnist")
        (mnist / name).write_bytes(data)
        before = tree_hash(mnist)
        run_cli(["train-vision", "--model", "tiny-28", "--data", mnist, "--epochs", "1", "--progress", "false",
                 "--plot", "false", "--device", "cpu"], capsys, mnist / name, kind="train-vision")
        assert tree_hash(mnist) == before


@pytest.mark.parametrize("argv,option", [
    (["train", "--train_iters", "-5"], "--train_iters"), (["train", "--lr", "-1"], "--lr"),
    (["train", "--warmup", "1.5"], "--warmup"), (["train", "--adam_beta2", "1"], "--adam_beta2"),
    (["train-vision", "--batch-size", "0"], "--batch-size"), (["train-vision", "--ema", "1"], "--ema"),
    (["grow", "--checkpoint", "c", "--out", "o", "--factor", "0.5"], "--factor"),
    (["shrink", "--checkpoint", "c", "--out", "o", "--data", "d", "--factor", "2"], "--factor"),
    (["generate", "--checkpoint", "c", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "--checkpoint", "c", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--checkpoint", "c", "--prompt", "x", "--top-k", "0"], "--top-k"),
    (["generate", "--checkpoint", "c", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["evaluate", "--checkpoint", "c", "--limit", "0"], "--limit"),
    (["prepare", "--out", "o", "--valid-fraction", "1"], "--valid-fraction"),
    (["prepare", "--out", "o", "--vocab-size", "100"], "--vocab-size"),
])
def test_out_of_range_numbers_are_usage_errors(argv, option, capsys):
    TALLY["cli numbers"] += 1
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"argument {option}".replace("_", "-") in err.replace("_", "-") and ("at least" in err or "in [" in err or "in (" in err or "above" in err)


def test_out_of_range_yaml_values_name_the_field(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("train_iters: -5\n")
    TALLY["yaml numbers"] += 1
    assert main(["train", str(config)]) == 2
    assert "train config field train_iters must be at least 1, got -5" in capsys.readouterr().err


def test_end_to_end_no_traceback_in_a_real_process(world, copy_of, tmp_path):
    """A few runs of the installed command in its own process: one line, exit 2, no traceback."""
    checkpoint = copy_of("checkpoint")
    (checkpoint / "model.safetensors").write_bytes((world["checkpoint"] / "model.safetensors").read_bytes()[:100])
    config = copy_of("model") / "config.json"
    config.write_text("{not json")
    cases = [(["generate", "--checkpoint", checkpoint, "--prompt", "x"], checkpoint / "model.safetensors"),
             (["evaluate", "--checkpoint", config.parent, "--data", world["docs"] / "corpus.jsonl"], config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv, named in cases:
        TALLY["subprocess"] += 1
        done = subprocess.run([sys.executable, "-m", "tokenformer", *map(str, argv)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert str(named) in done.stderr or named.name in done.stderr, done.stderr


def test_zz_tally(request, capsys):
    """Print how many damaged inputs were tried (this test runs last in the file)."""
    total = sum(TALLY.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} damaged inputs, all clean: "
              + ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())))
    selected = [item for item in request.session.items if item.module is request.module]
    if len(selected) < 40:
        pytest.skip("the tally is checked when the whole file runs")
    assert total >= 400, TALLY  # what the tests above try between them; fewer means one stopped early
