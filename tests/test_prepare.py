"""`tokenformer prepare`: every input format and tokenizer, read back through the indexed files."""

import gzip
import hashlib
import importlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_file
from tokenformer import ByteTokenizer, TokenFormerError, load_tokenizer, prepare
from tokenformer.__main__ import main
from tokenformer.data import documents
from tokenformer.data.indexed import IndexedDataset

# `tokenformer.data.prepare` the attribute is the function (re-exported); the module is reached by name
prep = importlib.import_module("tokenformer.data.prepare")

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Pattention: tokens attend to parameter tokens.",
    "naïve café — 日本語 ✓ emoji 🙂\nsecond line\n",
    "def f(x):\n    return x * 2\n",
    "   leading and trailing spaces   ",
]


def read_split(out: Path, split: str) -> list[list[int]]:
    ds = IndexedDataset(out / f"{split}_text_document")
    return [ds[i].tolist() for i in range(len(ds))]


def read_back(out: Path) -> tuple[list[list[int]], list[list[int]]]:
    return read_split(out, "train"), read_split(out, "valid")


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [256]


def hand_score(text: str, seed: int) -> float:
    """The documented split rule, computed here independently: blake2b of the text keyed by the seed."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2 ** 64


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


# ----------------------------------------------------------------------------- inputs

def test_text_files_and_folders_with_the_byte_tokenizer(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(DOCS[0])
    (folder / "a.py").write_text(DOCS[3])
    (folder / "sub" / "c.md").write_text(DOCS[2])
    (folder / "skipped.bin").write_bytes(b"\x00\x01")      # no matching pattern
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.txt").write_text("hidden")     # hidden folders are skipped
    (folder / "empty.txt").write_text("")                   # empty documents are skipped
    single = tmp_path / "single.txt"
    single.write_text(DOCS[1])
    meta = prepare([single, folder], tmp_path / "out", valid_fraction=0.0)
    train, valid = read_back(tmp_path / "out")
    # files first as given, then the folder in sorted path order
    assert train == [byte_ids(d) for d in (DOCS[1], DOCS[3], DOCS[0], DOCS[2])] and valid == []
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 and meta["eod_id"] == 256
    assert meta["dtype"] == "uint16" and meta["documents"] == 4
    assert meta["splits"]["train"] == {"prefix": "train_text_document", "documents": 4,
                                       "tokens": sum(len(byte_ids(d)) for d in DOCS[:4])}
    assert json.loads((tmp_path / "out" / "prepare.json").read_text()) == meta
    assert isinstance(load_tokenizer(tmp_path / "out"), ByteTokenizer)
    assert prep.load_prepared(tmp_path / "out") == meta


def test_glob_option_selects_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("alpha")
    (tmp_path / "c" / "b.log").write_text("beta")
    prepare([tmp_path / "c"], tmp_path / "out", glob="*.log", valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids("beta")]
    # the Python API takes one bare input and a Tokenizer object too
    meta = prepare(str(tmp_path / "c" / "a.txt"), tmp_path / "one", tokenizer=ByteTokenizer(), valid_fraction=0.0)
    assert read_split(tmp_path / "one", "train") == [byte_ids("alpha")] and meta["tokenizer"] == "byte"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_inputs(tmp_path, suffix):
    records = [{"text": d, "meta": {"i": i}} for i, d in enumerate(DOCS)]
    path = tmp_path / f"shard{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, records)
    elif suffix == ".jsonl.gz":
        write_jsonl(path, records, gzip.open)
    else:
        zstandard = pytest.importorskip("zstandard", reason="zstandard is in the dev extra; install tokenformer[zstd]")
        raw = ("".join(json.dumps(r) + "\n" for r in records) + "\n").encode()  # a blank line at the end
        frames = [zstandard.ZstdCompressor().compress(part) for part in (raw[:100], raw[100:])]
        path.write_bytes(b"".join(frames))  # two frames, as concatenated shards have
    prepare([path], tmp_path / "out", valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids(d) for d in DOCS]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_lone_surrogates_in_json_become_replacement_characters(tmp_path, tokenizer):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "broken \\ud800 pair"}\n{"text": "fine"}\n')
    meta = prepare([path], tmp_path / "out", tokenizer=tokenizer, vocab_size=260, valid_fraction=0.0)
    tok = load_tokenizer(tmp_path / "out")
    assert read_split(tmp_path / "out", "train")[0] == tok.encode("broken \ufffd pair") + [meta["eod_id"]]


def test_byte_order_mark_and_bad_bytes(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))  # not UTF-8
    prepare([tmp_path / "bom.jsonl", tmp_path / "latin1.txt"], tmp_path / "out", valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids("first"), byte_ids("caf\ufffd")]


def test_compressed_text_file_is_one_document(tmp_path):
    with gzip.open(tmp_path / "notes.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[2])
    prepare([tmp_path / "notes.txt.gz"], tmp_path / "out", valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids(DOCS[2])]


def test_jsonl_text_field_option_and_folder_of_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "01.jsonl", [{"content": DOCS[1]}])
    write_jsonl(tmp_path / "shards" / "00.jsonl.gz", [{"content": DOCS[0]}], gzip.open)
    prepare([tmp_path / "shards"], tmp_path / "out", text_field="content", valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids(DOCS[0]), byte_ids(DOCS[1])]


def test_local_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the dev extra; install tokenformer[datasets]")
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "ds"))
    prepare(None, tmp_path / "a", hf_dataset=str(tmp_path / "ds"), valid_fraction=0.0)
    assert read_split(tmp_path / "a", "train") == [byte_ids(d) for d in DOCS]

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS[:2]}),
                                   "validation": datasets.Dataset.from_dict({"body": DOCS[2:]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    meta = prepare(None, tmp_path / "b", hf_dataset=str(tmp_path / "dd"), hf_split="validation",
                   text_field="body", valid_fraction=0.0)
    assert read_split(tmp_path / "b", "train") == [byte_ids(d) for d in DOCS[2:]]
    assert meta["inputs"] == [] and meta["hf_dataset"] == {"name": str(tmp_path / "dd"), "config": None,
                                                           "split": "validation"}

    with pytest.raises(TokenFormerError, match="has no split 'test'.*train, validation"):
        prepare(None, tmp_path / "c", hf_dataset=str(tmp_path / "dd"), hf_split="test")
    with pytest.raises(TokenFormerError, match="has no 'text' column.*body"):
        prepare(None, tmp_path / "c", hf_dataset=str(tmp_path / "dd"))
    with pytest.raises(TokenFormerError, match="Hugging Face dataset directory .*nope does not exist"):
        prepare(None, tmp_path / "c", hf_dataset=str(tmp_path / "nope"))
    (tmp_path / "no-data").mkdir()
    with pytest.raises(TokenFormerError, match="could not load Hugging Face dataset .*no-data"):
        prepare(None, tmp_path / "c", hf_dataset=str(tmp_path / "no-data"))


def test_hugging_face_load_dataset_on_a_data_folder(tmp_path, monkeypatch, offline_hub):
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "train.jsonl", [{"text": d} for d in DOCS[:3]])
    prepare(None, tmp_path / "out", hf_dataset=str(tmp_path / "raw"), valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids(d) for d in DOCS[:3]]
    # a Hub dataset: name, configuration and split go to load_dataset, streamed (no download of it all)
    datasets, asked = sys.modules["datasets"], []
    real = datasets.Dataset.from_dict({"text": ["from the hub"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or real)
    main(["prepare", "--hf-dataset", "Salesforce/wikitext", "--hf-config", "wikitext-2-raw-v1", "--hf-split", "test",
          "--out", str(tmp_path / "hub"), "--quiet"])
    assert asked == [(("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test", "streaming": True})]
    assert read_split(tmp_path / "hub", "train") == [byte_ids("from the hub")]


def test_stdlib_is_the_default_corpus(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = documents.stdlib_files()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative) and len(files) > 500  # a real corpus, in a fixed order
    assert {"os.py", "json/__init__.py"} <= set(relative) and not any("site-packages" in r for r in relative)
    expected = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            expected.append(text)
        if len(expected) == 6:
            break
    meta = prepare(out=tmp_path / "out", max_documents=6, valid_fraction=0.0)
    assert read_split(tmp_path / "out", "train") == [byte_ids(t) for t in expected]
    assert meta["inputs"] == [f"stdlib:{root}"] and meta["max_documents"] == 6


# ----------------------------------------------------------------------------- tokenizers

def test_trained_bpe_is_saved_loadable_and_round_trips(tmp_path):
    corpus = [f"{DOCS[i % 4]} the tokens attend to the parameter tokens {i}\n" * 3 for i in range(40)]
    (tmp_path / "c").mkdir()
    for i, text in enumerate(corpus):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(text)
    meta = prepare([tmp_path / "c"], tmp_path / "out", tokenizer="bpe", vocab_size=320, valid_fraction=0.1)
    tok = load_tokenizer(tmp_path / "out")
    assert not isinstance(tok, ByteTokenizer) and 257 < tok.vocab_size <= 320
    assert tok.vocab_size == meta["vocab_size"]
    assert tok.eos_id == meta["eod_id"] == tok.backend.token_to_id("<|endoftext|>")
    for text in DOCS + corpus[:3]:
        assert tok.decode(tok.encode(text)) == text
    train, valid = read_back(tmp_path / "out")
    assert sorted(train + valid) == sorted(tok.encode(t) + [tok.eos_id] for t in corpus)
    # an earlier dataset's folder is a tokenizer too: the same ids again, without training
    again = prepare([tmp_path / "c"], tmp_path / "again", tokenizer=str(tmp_path / "out"), valid_fraction=0.1)
    assert read_back(tmp_path / "again") == (train, valid) and again["tokenizer"] == "file"
    # merges were learned: far fewer tokens than bytes
    assert meta["tokens"] < 0.6 * sum(len(t.encode()) for t in corpus)


def test_hub_names_go_to_load_tokenizer(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(prep, "load_tokenizer", lambda spec: asked.append(spec) or ByteTokenizer())
    (tmp_path / "a.txt").write_text("hub")
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer="EleutherAI/gpt-neox-20b")
    assert asked == ["EleutherAI/gpt-neox-20b"] and meta["tokenizer"] == "hub"
    with pytest.raises(TokenFormerError, match="unknown tokenizer 'missing/tokenizer.json'"):
        prepare([tmp_path / "a.txt"], tmp_path / "out2", tokenizer="missing/tokenizer.json")


def test_gpt_neox_tokenizer_file(tmp_path, neox_tokenizer_path):
    (tmp_path / "hello.txt").write_text("Hello world")
    (tmp_path / "other.txt").write_text("TokenFormer scales by tokens.")
    meta = prepare([tmp_path / "hello.txt", tmp_path / "other.txt"], tmp_path / "out",
                   tokenizer=str(neox_tokenizer_path), valid_fraction=0.0)
    train = read_split(tmp_path / "out", "train")
    assert train[0] == [12092, 1533, 0]
    assert meta["tokenizer"] == "file" and meta["vocab_size"] == 50277 and meta["eod_id"] == 0
    assert meta["dtype"] == "uint16"
    assert load_tokenizer(tmp_path / "out").decode(train[1][:-1]) == "TokenFormer scales by tokens."


# ----------------------------------------------------------------------------- split and streaming

def test_split_is_disjoint_covering_and_follows_the_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_DOCUMENTS", 7)  # several chunks
    docs = [f"document number {i}: " + "x" * i for i in range(60)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs + docs[:5]])  # 5 duplicates
    meta = prepare([path], tmp_path / "out", valid_fraction=0.25, seed=3)
    train, valid = read_back(tmp_path / "out")
    expected_valid = [d for d in docs + docs[:5] if hand_score(d, 3) < 0.25]
    assert 5 < len(expected_valid) < 30
    assert valid == [byte_ids(d) for d in expected_valid]
    assert train == [byte_ids(d) for d in docs + docs[:5] if hand_score(d, 3) >= 0.25]  # input order kept
    assert not {tuple(t) for t in train} & {tuple(v) for v in valid}  # duplicates never straddle
    assert meta["splits"]["valid"]["documents"] == len(valid) and meta["documents"] == 65
    prepare([path], tmp_path / "other", valid_fraction=0.25, seed=4)
    assert read_split(tmp_path / "other", "valid") != valid


def test_at_least_one_validation_document(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS[:3]])
    assert all(hand_score(d, 0) >= 1e-9 for d in DOCS[:3])
    prepare([path], tmp_path / "a", valid_fraction=1e-9)
    assert read_back(tmp_path / "a") == ([byte_ids(d) for d in DOCS[:2]], [byte_ids(DOCS[2])])
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": DOCS[0]}])
    meta = prepare([one], tmp_path / "b", valid_fraction=0.5 if hand_score(DOCS[0], 0) >= 0.5 else 1e-9)
    assert read_back(tmp_path / "b") == ([byte_ids(DOCS[0])], []) and meta["splits"]["valid"]["tokens"] == 0
    prepare([path], tmp_path / "c", valid_fraction=0.0)
    assert read_split(tmp_path / "c", "valid") == []
    # the hash sends every document to validation: the last one trains instead
    high = 1 - 1e-9
    assert all(hand_score(d, 0) < high for d in DOCS[:3])
    prepare([path], tmp_path / "d", valid_fraction=high)
    assert read_back(tmp_path / "d") == ([byte_ids(DOCS[2])], [byte_ids(d) for d in DOCS[:2]])
    prepare([one], tmp_path / "e", valid_fraction=high)
    assert read_back(tmp_path / "e") == ([byte_ids(DOCS[0])], [])


# ----------------------------------------------------------------------------- crashes and errors

def test_output_is_replaced_only_when_complete(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in DOCS])
    prepare([good], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 3 + [{"body": "no text"}])
    with pytest.raises(TokenFormerError):
        prepare([good, bad], tmp_path / "out")  # fails after having written part of the data
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]  # no leftovers
    prepare([good], tmp_path / "out", tokenizer="bpe", vocab_size=300)  # an earlier dataset is replaced
    assert prep.load_prepared(tmp_path / "out")["tokenizer"] == "bpe"
    with pytest.raises(TokenFormerError, match="is not a prepared dataset"):
        prep.load_prepared(tmp_path)


def test_interrupt_mid_write_keeps_the_previous_dataset(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS * 4])
    prepare([path], tmp_path / "out", valid_fraction=0.0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(prep, "CHUNK_DOCUMENTS", 4)
    calls, encode = [], prep._encode_chunk

    def interrupted(tokenizer, texts):
        calls.append(len(texts))
        if len(calls) == 3:  # two chunks are on disk by now
            raise KeyboardInterrupt
        return encode(tokenizer, texts)

    monkeypatch.setattr(prep, "_encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([path], tmp_path / "out", tokenizer="byte", valid_fraction=0.5)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]


def test_bad_inputs_fail_in_one_sentence(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    missing_field = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"content": "x", "id": 1}])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    cases = [
        (dict(inputs=[tmp_path / "nope.txt"]), r"input .*nope.txt does not exist"),
        (dict(inputs=[tmp_path / "empty.txt"]), r"the corpus is empty: .*empty.txt holds no non-empty documents"),
        (dict(inputs=[tmp_path / "empty.txt"], tokenizer="bpe"), r"the corpus is empty"),
        (dict(inputs=[tmp_path / "empty"]), r"folder .*empty has no files matching"),
        (dict(inputs=[missing_field]), r"m.jsonl line 2 has no 'text' field \(it has: content, id\)"),
        (dict(inputs=[tmp_path / "broken.jsonl"]), r"broken.jsonl line 2 is not valid JSON"),
        (dict(inputs=[missing_field], tokenizer="gpt9"), r"unknown tokenizer 'gpt9'"),
        (dict(inputs=[missing_field], tokenizer="bpe", vocab_size=100), r"--vocab-size 100 is too small"),
        (dict(inputs=[missing_field], tokenizer="bpe", vocab_size=10**9), r"--vocab-size 1,000,000,000 is larger than 1,048,576"),
        (dict(inputs=[missing_field], valid_fraction=1.0), r"--valid-fraction must be in \[0, 1\)"),
        (dict(inputs=[missing_field], out=tmp_path / "user"), r"output .*user exists and is not a prepared dataset"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("out", tmp_path / "out")
        with pytest.raises(TokenFormerError, match=message):
            prepare(**kwargs)
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_command_line(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    assert main(["prepare", str(path), "--out", str(tmp_path / "out"), "--valid-fraction", "0.3", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    train, valid = read_back(tmp_path / "out")
    assert sorted(train + valid) == sorted(byte_ids(d) for d in DOCS) and len(valid) >= 1
    assert main(["prepare", "--out", str(tmp_path / "std"), "--max-documents", "2", "--quiet"]) == 0
    assert capsys.readouterr().out == "" and len(read_split(tmp_path / "std", "train")) + \
        len(read_split(tmp_path / "std", "valid")) == 2
    (tmp_path / "here").mkdir()  # `--out .` in an empty folder
    monkeypatch.chdir(tmp_path / "here")
    assert main(["prepare", str(path), "--out", ".", "--quiet"]) == 0
    assert prep.load_prepared(tmp_path / "here")["documents"] == len(DOCS)
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: input" in err and "missing.txt does not exist" in err and len(err.strip().splitlines()) == 1


def test_tokens_fit_the_dtype_and_file_is_uint16(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    prepare([path], tmp_path / "out", valid_fraction=0.0)
    ds = IndexedDataset(tmp_path / "out" / "train_text_document")
    assert ds.dtype == np.uint16 and ds.num_tokens == sum(len(byte_ids(d)) for d in DOCS)


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TokenFormerError, match=r"needs the zstandard package: pip install 'tokenformer\[zstd\]'"):
        prepare([tmp_path / "d.jsonl.zst"], tmp_path / "out")
    with pytest.raises(TokenFormerError, match=r"needs the datasets package: pip install 'tokenformer\[datasets\]'"):
        prepare(None, tmp_path / "out", hf_dataset="some/dataset")


def test_real_pile_shaped_jsonl_with_gpt_neox(tmp_path, neox_tokenizer_path):
    sotu = shared_file("sotu/sotu.jsonl.gz")
    with gzip.open(sotu, "rt") as f:
        speeches = [json.loads(next(f))["text"] for _ in range(4)]
    meta = prepare([sotu], tmp_path / "out", tokenizer=str(neox_tokenizer_path), max_documents=4, valid_fraction=0.3)
    tok = load_tokenizer(neox_tokenizer_path)
    train, valid = read_back(tmp_path / "out")
    assert sorted(train + valid) == sorted(tok.encode(s) + [0] for s in speeches) and len(valid) >= 1
    assert meta["tokens"] == sum(len(t) for t in train + valid) and meta["documents"] == 4
