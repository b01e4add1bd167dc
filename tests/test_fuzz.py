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

import csv
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
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
from tokenformer.data.image_text import iter_shards, open_image_text
from tokenformer.data.images import ImageFolder, read_idx, write_idx
from tokenformer.data.indexed import IndexedDataset
from tokenformer.data.prepare import load_prepared, prepare
from tokenformer.data.scenes import write_scene_dataset
from tokenformer.errors import TokenFormerError
from tokenformer.inputs import read_safetensors, torch_load_safe
from tokenformer.models.captioner import Captioner, CaptionerConfig
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer
from tokenformer.models.config import Config
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import train
from tokenformer.training.tasks.caption import scene_groups

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
    # image-text: a few 32x32 scenes (shards of 3), their val images again under a captions.csv,
    # and untrained tiny CLIP and captioner directories
    write_scene_dataset(root / "scenes", train=6, val=4, shard_size=3)
    captioned = root / "captioned"
    captioned.mkdir()
    val = open_image_text(root / "scenes" / "val")
    with open(captioned / "captions.csv", "w", newline="") as f:
        table = csv.writer(f)  # quoted as needed: captions hold commas
        table.writerow(["file", "caption"])
        for i in range(len(val)):
            (captioned / f"{val.key(i)}.png").write_bytes(val.image_bytes(i))
            table.writerow([f"{val.key(i)}.png", val.caption(i)])
    CLIPTokenFormer(CLIPConfig.from_name("tiny")).save_pretrained(root / "clip", tokenizer=tf.ByteTokenizer())
    Captioner(CaptionerConfig.resolve("tiny")).save_pretrained(root / "captioner", tokenizer=tf.ByteTokenizer())
    return {"root": root, "docs": docs, "data": root / "data", "run": root / "run",
            "checkpoint": root / "run" / "step_00000002", "model": root / "model", "official": root / "official.bin",
            "yml": root / "official.yml", "mnist": images, "folder": root / "folder", "scenes": root / "scenes",
            "captioned": captioned, "clip": root / "clip", "captioner": root / "captioner"}


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


# How a reader in a separate process reaches each file (the root case, see read_without_override).
READ_IN_CHILD = {"config.json": "tf.TokenFormer.from_pretrained(d)", "model.safetensors": "tf.TokenFormer.from_pretrained(d)",
                 "tokenizer.json": "tf.load_tokenizer(d)"}
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


def read_without_override(directory: Path, name: str) -> subprocess.CompletedProcess:
    """Read `directory` as MODEL_FILES[name] does, in a child process that is root without the two
    capabilities that let root read any file whatever its mode (dropped from the bounding set before
    exec): how a permission error is met where the tests run as root. (Switching to `nobody` would not
    do: the interpreter may live in root's private home.) Exit 3 with the TokenFormerError message."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop_override():
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    code = ("import sys\nfrom pathlib import Path\nimport tokenformer as tf\nd = Path(sys.argv[1])\n"
            f"try:\n    {READ_IN_CHILD[name]}\nexcept tf.TokenFormerError as e:\n    print(e)\n    sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env,
                          preexec_fn=drop_override, timeout=300)


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_an_unreadable_file_is_named(world, copy_of, name):
    directory = copy_of("model")
    (directory / name).chmod(0)
    try:
        if ROOT:
            try:
                done = read_without_override(directory, name)
            except (OSError, subprocess.SubprocessError) as e:  # no CAP_SETPCAP (a restricted container)
                if os.environ.get("CI"):
                    raise
                pytest.skip(f"cannot drop root's file-access override here ({e}); CI runs it")
            lines = done.stdout.strip().splitlines()
            assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])
            assert len(lines) == 1 and str(directory / name) in lines[0], done.stdout
            return
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


# ---- image-text readers ------------------------------------------------------------------------

def read_every_sample(source) -> list:
    """Every sample of `source` read as training reads it: indexed (image, caption, extra) and streamed."""
    samples = open_image_text(source)
    indexed = [(samples.image(i), samples.caption(i), samples.extra(i)) for i in range(len(samples))]
    return indexed + list(iter_shards(source))


def shard_members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_members(shard: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard of these members, in this order (a stand-in for a shard damaged before it was written)."""
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_damaged_tar_shards(world, copy_of):
    """A damaged shard, in a folder of shards or named alone: indexed and streamed reading both refuse it."""
    name = "shard-000000.tar"
    pristine = (world["scenes"] / "train" / name).read_bytes()
    for label, data, must_fail in damaged_versions(pristine, seed=20):
        if label.startswith("truncated"):
            # a tar ends with zero blocks padded to 10 kB: a cut in the padding may leave a whole tar
            must_fail = pristine[len(data):].strip(b"\0") != b""
        folder = copy_of("scenes") / "train"
        (folder / name).write_bytes(data)
        before = tree_hash(folder)
        for source in (folder, folder / name):
            expect_refused(lambda: read_every_sample(source), folder / name, must_fail, "tar shard")
        assert tree_hash(folder) == before, label


def test_damaged_shard_members(world, copy_of):
    """A shard whose members are damaged (image, caption, metadata) or missing: the shard and sample named."""
    shard = world["scenes"] / "train" / "shard-000000.tar"
    members = shard_members(shard)
    png, caption, extra = members[3][1], members[4][1], members[5][1]  # the second sample's
    cases = []
    for label, data, must_fail in damaged_versions(png, seed=21):
        harmless = label.startswith("truncated") and int(label.split()[-1]) >= len(png) - 12  # only IEND lost
        cases.append((f"image {label}", 3, data, must_fail and not harmless))
    for label, data, must_fail in damaged_versions(extra, seed=22):
        cases.append((f"metadata {label}", 5, data, must_fail))
    # any bytes are a caption once they decode: only random bytes (invalid UTF-8) must fail
    cases += [(f"caption {label}", 4, data, label == "random bytes")
              for label, data, _ in damaged_versions(caption, seed=23)]
    for label, position, data, must_fail in cases:
        damaged = copy_of("scenes") / "train" / shard.name
        write_members(damaged, [(n, data if i == position else d) for i, (n, d) in enumerate(members)])
        expect_refused(lambda: read_every_sample(damaged), damaged, must_fail, "shard member")
    key = members[3][0].partition(".")[0]
    wrong = {"a sample missing its .txt": [m for m in members if m[0] != f"{key}.txt"],
             "a sample missing its image": [m for m in members if m[0] != f"{key}.png"],
             "a caption with no sample": members + [("zzz.txt", b"a caption")],
             "members out of order": members[3:] + members[:3] + members[3:4],
             "two images of one key": members[:6] + [(f"{key}.jpg", png)],
             "metadata nested too deep": [(n, b"[" * 100_000 if n == f"{key}.json" else d) for n, d in members],
             "a file of another kind": [(p.name, p.read_bytes()) for p in sorted(world["model"].iterdir())]}
    for label, chosen in wrong.items():
        damaged = copy_of("scenes") / "train" / shard.name
        write_members(damaged, chosen)
        expect_refused(lambda: read_every_sample(damaged), damaged, kind="shard member")
    for other in (world["docs"] / "corpus.jsonl.gz", world["model"] / "model.safetensors",
                  world["scenes"] / "scenes.json"):
        damaged = copy_of("scenes") / "train" / shard.name
        shutil.copyfile(other, damaged)
        expect_refused(lambda: read_every_sample(damaged.parent), damaged, kind="other kind")


def test_a_directory_or_nothing_where_a_shard_belongs(world, copy_of):
    folder = copy_of("scenes") / "train"
    (folder / "shard-000001.tar").unlink()
    (folder / "shard-000001.tar").mkdir()
    for source in (folder, f"{folder}/shard-{{000000..000001}}.tar"):
        expect_refused(lambda: read_every_sample(source), folder / "shard-000001.tar", kind="directory for a file")
    (folder / "shard-000001.tar").rmdir()
    for source in (folder / "shard-000001.tar", f"{folder}/shard-{{000000..000001}}.tar"):
        expect_refused(lambda: read_every_sample(source), folder / "shard-000001.tar", kind="missing shard")
    (folder / "shard-000002.tar").write_bytes(b"")
    expect_refused(lambda: read_every_sample(folder), folder / "shard-000002.tar", kind="tar shard")
    (folder / "shard-000002.tar").unlink()
    samples = open_image_text(folder)
    (folder / "shard-000000.tar").unlink()  # indexed, then deleted before a sample is read
    expect_refused(lambda: samples.image(0), folder / "shard-000000.tar", kind="missing shard")


CAPTION_TABLES = {  # (file name, text) of a captions file that must be refused, by what is wrong with it
    "a row with more fields than the header": ("captions.csv", "file,caption\n{0},two red circles, and more\n"),
    "a row without caption": ("captions.csv", "file,caption\n{0}\n"),
    "no caption column": ("captions.csv", "file,words\n{0},a red circle\n"),
    "no header": ("captions.csv", "{0},a red circle\n"),
    "an image that does not exist": ("captions.csv", "file,caption\nmissing.png,a red circle\n"),
    "a directory as image": ("captions.csv", "file,caption\n.,a red circle\n"),
    "a field above csv's limit": ("captions.csv", "file,caption\n{0},\"" + "a" * 200_000 + "\"\n"),
    "no rows": ("captions.csv", "file,caption\n"),
    "a line that is not JSON": ("captions.jsonl", '{{"file": "{0}", "caption": "a"}}\n{{"file": \n'),
    "a line that is a list": ("captions.jsonl", '["{0}", "a red circle"]\n'),
    "a number as file name": ("captions.jsonl", '{{"file": 7, "caption": "a red circle"}}\n'),
    "a list as caption": ("captions.jsonl", '{{"file": "{0}", "caption": ["a"]}}\n'),
    "a line nested too deep": ("captions.jsonl", "[" * 100_000 + "\n"),
}


def test_damaged_caption_tables(world, copy_of):
    """A folder of images with a damaged captions.csv / captions.jsonl, or a damaged image it names."""
    pristine = (world["captioned"] / "captions.csv").read_bytes()
    header = pristine.index(b"\n") + 1
    for label, data, must_fail in damaged_versions(pristine, seed=24):
        # a cut inside a caption leaves a shorter caption, a flip a changed letter (or a missing file)
        fail = label in ("empty", "random bytes") or (label.startswith("truncated") and len(data) < header)
        folder = copy_of("captioned")
        (folder / "captions.csv").write_bytes(data)
        expect_refused(lambda: read_every_sample(folder), folder / "captions.csv", fail, "captions.csv")
    rows = list(csv.DictReader(io.StringIO(pristine.decode())))
    jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()
    for label, data, must_fail in damaged_versions(jsonl, seed=25):
        cut_in_a_line = label.startswith("truncated") and not data.endswith((b"\n", b"}"))
        fail = label in ("empty", "random bytes") or cut_in_a_line
        folder = copy_of("captioned")
        (folder / "captions.csv").unlink()
        (folder / "captions.jsonl").write_bytes(data)
        expect_refused(lambda: read_every_sample(folder), folder / "captions.jsonl", fail, "captions.jsonl")
    first = rows[0]["file"]
    for label, (name, text) in CAPTION_TABLES.items():
        folder = copy_of("captioned")
        (folder / "captions.csv").unlink()
        (folder / name).write_text(text.format(first))
        named = folder / ("missing.png" if "does not exist" in label else name)
        before = tree_hash(folder)
        expect_refused(lambda: read_every_sample(folder), named, kind=f"{name} row")
        assert tree_hash(folder) == before, label
    for label, data, must_fail in [d for d in damaged_versions((world["captioned"] / first).read_bytes(), seed=26)
                                   if d[2]][:5]:
        folder = copy_of("captioned")
        (folder / first).write_bytes(data)
        expect_refused(lambda: read_every_sample(folder), folder / first, kind="captioned image")


def test_damaged_scene_metadata(world, copy_of):
    """scenes.json is a record for whoever reads the folder, never read back: damaged, the shards
    still read; the dataset's root is no shard folder (the message names its split folders); scene
    attributes (KEY.json) of another form are refused by the captioner's scorer, naming the sample."""
    pristine = (world["scenes"] / "scenes.json").read_bytes()
    for label, data, _ in [d for d in damaged_versions(pristine, seed=27) if d[2]][:4]:
        scenes = copy_of("scenes")
        (scenes / "scenes.json").write_bytes(data)
        TALLY["scenes.json"] += 1
        assert len(read_every_sample(scenes / "train")) == 2 * 6, label
    expect_refused(lambda: open_image_text(world["scenes"]), world["scenes"], kind="scenes root")
    where = f"sample '00000001' of shard {world['scenes'] / 'train' / 'shard-000000.tar'}"
    for groups in ([5], [[1, "red", "circle"]], [["one", "red", "circle", "top left"]], [[1, "red", ["circle"], 2]]):
        expect_refused(lambda: scene_groups({"groups": groups}, where), world["scenes"] / "train" / "shard-000000.tar",
                       kind="scene attributes")
    assert scene_groups({"groups": 5}, where) is None  # no groups: a sample that is no scene
    assert scene_groups({"groups": [[1, "red", "circle", "top left"]]}, where) == [(1, "red", "circle", "top left")]


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


def clip_argv(data, *extra) -> list:
    return ["train-clip", "--model", "tiny", "--data", data, "--epochs", "1", "--batch_size", "2", "--tokenizer",
            "byte", "--progress", "false", "--plot", "false", "--device", "cpu", "--num_threads", "1", *extra]


def captioner_argv(data, *extra) -> list:
    # the BPE of the captions (the byte tokenizer makes a caption longer than the tiny LM's context)
    return ["train-captioner", "--model", "tiny", "--data", data, "--epochs", "1", "--batch_size", "2",
            "--bpe_vocab_size", "300", "--caption_samples", "0", "--progress", "false", "--plot", "false",
            "--device", "cpu", "--num_threads", "1", *extra]


def test_image_text_commands_on_damaged_data(world, copy_of, tmp_path, capsys):
    """train-clip, train-captioner and evaluate-clip on a damaged shard, a directory where a shard
    belongs and damaged caption tables: one line naming the file, before any training, data untouched."""
    commands = {
        "train-clip": lambda data: clip_argv(data),
        "train-captioner": lambda data: captioner_argv(data),
        "evaluate-clip": lambda data: ["evaluate-clip", "--checkpoint", world["clip"], "--data", data,
                                       "--device", "cpu"],
    }
    name = "shard-000000.tar"
    damages = [d for d in damaged_versions((world["scenes"] / "train" / name).read_bytes(), seed=28) if d[2]][:4]
    for label, data, _ in damages:
        for command, argv in commands.items():
            train = copy_of("scenes") / "train"
            (train / name).write_bytes(data)
            before = tree_hash(train.parent)
            run_cli(argv(train), capsys, train / name, kind=command)
            assert tree_hash(train.parent) == before, (command, label)
    for command, argv in commands.items():
        train = copy_of("scenes") / "train"
        (train / name).unlink()
        (train / name).mkdir()
        run_cli(argv(train), capsys, train / name, kind=command)
        folder = copy_of("captioned")
        for label in ("a row with more fields than the header", "an image that does not exist"):
            (folder / "captions.csv").write_text(CAPTION_TABLES[label][1].format("00000000.png"))
            named = folder / ("missing.png" if "exist" in label else "captions.csv")
            run_cli(argv(folder), capsys, named, kind=command)
    scenes = copy_of("scenes")
    (scenes / "val" / name).write_bytes(damages[0][1])
    for argv in (clip_argv(scenes / "train", "--val_data", scenes / "val"),
                 captioner_argv(scenes / "train", "--val_data", scenes / "val")):
        run_cli(argv, capsys, scenes / "val" / name, kind=f"{argv[0]} val_data")
    run_cli(clip_argv(world["scenes"]), capsys, world["scenes"], kind="train-clip")  # the root, not OUT/train


def test_training_stops_at_a_damaged_sample(world, copy_of, capsys):
    """Damage that indexing cannot see (an image's pixels, a scene's attributes) ends the run when
    the sample is read: one line naming the shard, the run's data untouched."""
    scenes = copy_of("scenes")
    shard = scenes / "train" / "shard-000000.tar"
    members = shard_members(shard)
    write_members(shard, [(n, d[:40] if n.endswith(".png") else d) for n, d in members])
    before = tree_hash(scenes)
    run_cli(clip_argv(scenes / "train"), capsys, shard, kind="train-clip image")
    shard = scenes / "val" / "shard-000000.tar"
    members = shard_members(shard)
    write_members(shard, [(n, json.dumps({"groups": [[1, "red"]]}).encode() if n.endswith(".json") else d)
                          for n, d in members])
    before = tree_hash(scenes)
    # the first validation (before any step) captions the val samples and scores them against their scenes
    run_cli(captioner_argv(scenes / "train", "--val_data", scenes / "val", "--caption_samples", "2",
                           "--max_new_tokens", "2"), capsys, shard, kind="train-captioner scene attributes")
    assert tree_hash(scenes) == before


def test_clip_and_captioner_checkpoints_and_images(world, copy_of, tmp_path, capsys):
    """evaluate-clip on a damaged CLIP directory; generate --image on a damaged image or captioner directory."""
    image = tmp_path / "scene.png"
    image.write_bytes((world["captioned"] / "00000000.png").read_bytes())
    commands = {
        "evaluate-clip": ("clip", lambda d: ["evaluate-clip", "--checkpoint", d, "--data", world["scenes"] / "val",
                                             "--device", "cpu"]),
        "generate --image": ("captioner", lambda d: ["generate", "--checkpoint", d, "--image", image,
                                                     "--max-new-tokens", "2", "--device", "cpu"]),
    }
    for command, (model, argv) in commands.items():
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            pristine = (world[model] / name).read_bytes()
            damages = [d for d in damaged_versions(pristine, seed=29) if d[2]][:3]
            damages.append(("another kind", (world["data"] / "prepare.json").read_bytes(), True))
            for label, data, _ in damages:
                checkpoint = copy_of(model)
                (checkpoint / name).write_bytes(data)
                before = tree_hash(checkpoint)
                run_cli(argv(checkpoint), capsys, checkpoint / name, kind=command)
                assert tree_hash(checkpoint) == before, (command, name, label)
        checkpoint = copy_of(model)
        other = world["clip" if model == "captioner" else "captioner"]
        shutil.copyfile(other / "config.json", checkpoint / "config.json")
        run_cli(argv(checkpoint), capsys, checkpoint, kind=command)  # the other model's directory
    png = image.read_bytes()
    for label, data, _ in [d for d in damaged_versions(png, seed=30) if d[2]][:5]:
        image.write_bytes(data)
        run_cli(commands["generate --image"][1](world["captioner"]), capsys, image, kind="generate --image")
        assert image.read_bytes() == data
    for named in (tmp_path, tmp_path / "missing.png"):
        run_cli(["generate", "--checkpoint", world["captioner"], "--image", named], capsys, named,
                kind="generate --image")


def test_make_scenes_refuses_a_file_as_its_output(tmp_path, capsys):
    out = tmp_path / "scenes"
    out.write_text("not a folder")
    for target in (out, out / "inner"):
        run_cli(["make-scenes", "--out", target, "--train", "2", "--val", "1", "--quiet"], capsys, out,
                kind="make-scenes")
    assert out.read_text() == "not a folder"


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
    (["make-scenes", "--out", "o", "--train", "0"], "--train"), (["make-scenes", "--out", "o", "--val", "-1"], "--val"),
    (["make-scenes", "--out", "o", "--seed", "-1"], "--seed"),
    (["make-scenes", "--out", "o", "--image-size", "8"], "--image-size"),
    (["make-scenes", "--out", "o", "--max-objects", "17"], "--max-objects"),
    (["make-scenes", "--out", "o", "--shard-size", "0"], "--shard-size"),
    (["train-clip", "--epochs", "0"], "--epochs"), (["train-clip", "--batch_size", "1"], "--batch_size"),
    (["train-clip", "--bpe_vocab_size", "100"], "--bpe_vocab_size"),
    (["train-clip", "--max_train_samples", "0"], "--max_train_samples"),
    (["train-clip", "--max_val_samples", "0"], "--max_val_samples"),
    (["train-clip", "--eval_batch_size", "0"], "--eval_batch_size"), (["train-clip", "--lr", "-1"], "--lr"),
    (["train-clip", "--warmup_epochs", "-1"], "--warmup_epochs"), (["train-clip", "--adam_beta2", "1"], "--adam_beta2"),
    (["train-clip", "--adam_eps", "0"], "--adam_eps"), (["train-clip", "--crop_padding", "-1"], "--crop_padding"),
    (["train-clip", "--seed", "-1"], "--seed"), (["train-clip", "--keep_last_n", "0"], "--keep_last_n"),
    (["train-clip", "--num_threads", "0"], "--num_threads"),
    (["train-captioner", "--epochs", "0"], "--epochs"), (["train-captioner", "--batch_size", "0"], "--batch_size"),
    (["train-captioner", "--bpe_vocab_size", "256"], "--bpe_vocab_size"),
    (["train-captioner", "--max_train_samples", "0"], "--max_train_samples"),
    (["train-captioner", "--caption_samples", "-1"], "--caption_samples"),
    (["train-captioner", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["train-captioner", "--eval_interval", "0"], "--eval_interval"),
    (["train-captioner", "--weight_decay", "-0.1"], "--weight_decay"),
    (["train-captioner", "--adam_beta1", "1.5"], "--adam_beta1"),
    (["evaluate-clip", "--checkpoint", "c", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["evaluate-clip", "--checkpoint", "c", "--data", "d", "--max-samples", "0"], "--max-samples"),
    (["evaluate-clip", "--checkpoint", "c", "--data", "d", "--std", "0"], "--std"),
    (["generate", "--checkpoint", "c", "--image", "x.png", "--max-new-tokens", "-1"], "--max-new-tokens"),
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
    assert total >= 700, TALLY  # what the tests above try between them; fewer means one stopped early
