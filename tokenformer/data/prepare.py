"""Preparing a corpus for training: raw text -> tokens -> GPT-NeoX indexed files (`tokenformer prepare`).

Inputs are whatever `tokenformer.data.documents` reads: text and JSONL files, folders of them, a
Hugging Face dataset, or by default the standard-library source of the running Python. The
output directory is the contract the trainer reads:

    OUT/train_text_document.bin + .idx    one item per document, end-of-text token appended
    OUT/valid_text_document.bin + .idx    the validation documents (same layout)
    OUT/tokenizer.json                    always written, so `load_tokenizer(OUT)` works
    OUT/prepare.json                      metadata: tokenizer, vocab_size, eod_id, dtype, counts

Documents stream through in chunks (a corpus larger than memory works) and each chunk is encoded
with `tokenizers`' batch encoder, which uses every core. Everything is written into a hidden
temporary directory that is renamed to OUT at the end, so OUT is either complete or absent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tokenformer.console import progress_bar
from tokenformer.data.documents import DEFAULT_GLOB, iter_documents, resolve_inputs
from tokenformer.data.indexed import IndexedDatasetWriter, best_dtype
from tokenformer.data.tokenizer import BYTE_VOCAB_SIZE, END_OF_TEXT, ByteTokenizer, Tokenizer, load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.files import PREPARE_METADATA_FILE, SPLIT_PREFIXES, TOKENIZER_FILE, current_umask, fsync_dir
from tokenformer.inputs import read_json
from tokenformer.outputs import MARKER_FILE, owner_of

CHUNK_DOCUMENTS = 1024          # documents per encode_batch call ...
CHUNK_CHARACTERS = 8_000_000    # ... or fewer, so that a chunk stays a few tens of MB
# the largest BPE vocabulary trained: 4x the largest published ones (~256k); the trainer reserves memory
# by the asked size (10^8 aborted the process under a 4 GiB address-space limit, 2^24 did not)
MAX_BPE_VOCAB = 1 << 20


# ----------------------------------------------------------------------------- tokenizers

def train_bpe(texts: Iterable[str], vocab_size: int = 2048, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation, every byte in the base alphabet, so no
    unknown tokens) trained on `texts`, with `<|endoftext|>` as its first token (id 0)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB_SIZE:
        raise TokenFormerError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{BYTE_VOCAB_SIZE} (256 bytes + {END_OF_TEXT})")
    if vocab_size > MAX_BPE_VOCAB:
        raise TokenFormerError(f"--vocab-size {vocab_size:,} is larger than {MAX_BPE_VOCAB:,}, the most a BPE is "
                               f"trained to here (published vocabularies stay under 300,000)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    backend.train_from_iterator(_batched(texts, 1000), trainer=trainer)
    return Tokenizer(backend, name="bpe")


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _resolve_tokenizer(spec: str | Tokenizer) -> tuple[str, Tokenizer | None]:
    """(kind, tokenizer) for a `--tokenizer` value; the BPE is trained later, on the corpus."""
    if isinstance(spec, Tokenizer):
        return ("byte" if isinstance(spec, ByteTokenizer) else "object"), spec
    spec = str(spec)
    if spec == "bpe":
        return "bpe", None
    if spec == "byte":
        return "byte", ByteTokenizer()
    path = Path(spec)
    if path.exists():
        tokenizer = load_tokenizer(path)
        return ("byte" if isinstance(tokenizer, ByteTokenizer) else "file"), tokenizer
    if spec.count("/") == 1 and not path.suffix and not spec.startswith((".", "/", "~")):
        return "hub", load_tokenizer(spec)  # e.g. EleutherAI/gpt-neox-20b: needs internet
    raise TokenFormerError(
        f"unknown tokenizer {spec!r}: give 'byte', 'bpe' (train one on the corpus), the path of a "
        f"tokenizer.json (or of a folder holding one) or a Hugging Face Hub name")


def _encode_chunk(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of every text (no end-of-text yet), one array each."""
    if isinstance(tokenizer, ByteTokenizer):  # the ids are the UTF-8 bytes: no tokenizer needed
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    encode = getattr(tokenizer.backend, "encode_batch_fast", tokenizer.backend.encode_batch)  # no offsets
    return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]


# ----------------------------------------------------------------------------- the split

def validation_score(text: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the document's content and the seed; documents scoring below
    the validation fraction go to validation. Identical documents always land in the same split,
    so a duplicated document cannot leak from training into validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk, characters = [], 0
    for text in documents:
        chunk.append(text)
        characters += len(text)
        if len(chunk) >= CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
            yield chunk
            chunk, characters = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- the job

def load_prepared(directory: str | Path) -> dict:
    """The metadata of a prepared dataset directory; refuses a directory `prepare` did not finish."""
    path = Path(directory) / PREPARE_METADATA_FILE
    if not path.is_file():
        raise TokenFormerError(
            f"{directory} is not a prepared dataset (no {PREPARE_METADATA_FILE}); create it with `tokenformer prepare`")
    fix = f"the prepared dataset {directory} is damaged: prepare it again with `tokenformer prepare`"
    metadata = read_json(path, "prepare metadata", fix)
    for name in ("vocab_size", "eod_id"):
        value = metadata.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "vocab_size" else 0):
            raise TokenFormerError(f"prepare metadata {path} has {name} {value!r}: {fix}")
    return metadata


def _check_output(out: Path) -> None:
    """`out` is new, empty, or an earlier output of `prepare` (its marker, or its metadata file)."""
    usable = out.is_dir() and (not any(p.name != MARKER_FILE for p in out.iterdir()) or owner_of(out) == "prepare"
                               or (owner_of(out) is None and (out / PREPARE_METADATA_FILE).is_file()))
    if out.exists() and not usable:
        raise TokenFormerError(
            f"output {out} exists and is not a prepared dataset; choose another --out or remove it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the files of the finished temporary directory into `out`, replacing those of an earlier
    prepared dataset and keeping anything else there. The metadata file goes first and comes back
    last, so that a folder with it is complete."""
    _check_output(out)  # again: something may have appeared there while we worked
    out.mkdir(exist_ok=True)
    (out / PREPARE_METADATA_FILE).unlink(missing_ok=True)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == PREPARE_METADATA_FILE):
        os.replace(path, out / path.name)
    fsync_dir(out)


def prepare(inputs: Iterable[str | Path] | None = None, out: str | Path = "data/prepared", *,
            tokenizer: str | Tokenizer = "byte", vocab_size: int = 2048, text_field: str = "text",
            valid_fraction: float = 0.01, hf_dataset: str | None = None, hf_split: str = "train",
            hf_config: str | None = None,
            glob: str = DEFAULT_GLOB, seed: int = 0, max_documents: int | None = None,
            progress: bool | None = None) -> dict:
    """Tokenize a corpus into `out` (the layout in the module docstring) and return its metadata.

    `inputs`: text/JSONL files and folders (none and no `hf_dataset`: the stdlib source).
    `tokenizer`: "byte", "bpe" (trained on the training documents, `vocab_size` tokens), a
    tokenizer.json path (or a folder holding one) or a `Tokenizer`. A document goes to validation when `validation_score(text, seed)` is below
    `valid_fraction`; if that picks none among two or more documents, the last document does, and
    if it picks them all, the last one goes to training instead.
    `max_documents` keeps only the first documents. `progress`: a bar on stderr (default: if a TTY).
    """
    start = time.perf_counter()
    out = Path(os.path.abspath(out))  # "." or "data/" must still have a name and a parent to rename within
    if isinstance(inputs, (str, Path)):  # one input given bare
        inputs = [inputs]
    inputs = [str(i) for i in inputs or []]
    if not 0.0 <= valid_fraction < 1.0:
        raise TokenFormerError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    if max_documents is not None and max_documents < 1:
        raise TokenFormerError(f"--max-documents must be at least 1, got {max_documents}")
    if progress is None:
        progress = sys.stderr.isatty()
    kind, tok = _resolve_tokenizer(tokenizer)
    _check_output(out)
    resolve_inputs(inputs, glob)  # fail on a missing input now, not after training a tokenizer

    def documents() -> Iterator[str]:
        docs = iter_documents(inputs, text_field=text_field, glob=glob, hf_dataset=hf_dataset,
                              hf_split=hf_split, hf_config=hf_config)
        return itertools.islice(docs, max_documents) if max_documents else docs

    if tok is None:
        # Trained on the training documents only, so validation text stays unseen.
        tok = train_bpe((t for t in documents() if validation_score(t, seed) >= valid_fraction),
                        vocab_size, show_progress=progress)
    dtype = best_dtype(tok.vocab_size)
    eod = np.asarray([tok.eos_id], dtype=np.int64)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the dataset is an ordinary folder
        counts = _write_splits(documents(), tok, tmp, dtype, eod, valid_fraction, seed, progress)
        total_tokens = counts["train"]["tokens"] + counts["valid"]["tokens"]
        total_documents = counts["train"]["documents"] + counts["valid"]["documents"]
        if total_documents == 0:
            where = ", ".join(inputs + ([hf_dataset] if hf_dataset else [])) or "the standard library"
            raise TokenFormerError(f"the corpus is empty: {where} holds no non-empty documents")
        tok.save(tmp / TOKENIZER_FILE)
        seconds = time.perf_counter() - start
        metadata = {
            "tokenizer": kind,
            "tokenizer_source": tokenizer.name if isinstance(tokenizer, Tokenizer) else str(tokenizer),
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eos_id,
            "dtype": dtype.name,
            "splits": {split: {"prefix": SPLIT_PREFIXES[split], **counts[split]} for split in SPLIT_PREFIXES},
            "documents": total_documents,
            "tokens": total_tokens,
            "inputs": inputs or ([] if hf_dataset else [f"stdlib:{sysconfig.get_paths()['stdlib']}"]),
            "hf_dataset": None if hf_dataset is None else {"name": hf_dataset, "config": hf_config,
                                                           "split": hf_split},
            "text_field": text_field,
            "valid_fraction": valid_fraction,
            "seed": seed,
            "max_documents": max_documents,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(total_tokens / seconds, 1),
        }
        # Written last: a directory with prepare.json is complete.
        (tmp / PREPARE_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return metadata


def _write_splits(documents: Iterator[str], tok: Tokenizer, directory: Path, dtype: np.dtype,
                  eod: np.ndarray, valid_fraction: float, seed: int, progress: bool) -> dict:
    """Encode chunk by chunk into the two indexed files; returns documents and tokens per split."""
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLIT_PREFIXES}
    writers = {split: IndexedDatasetWriter(directory / prefix, dtype) for split, prefix in SPLIT_PREFIXES.items()}

    def add(split: str, ids: np.ndarray) -> None:
        writers[split].add_item(ids)
        counts[split]["documents"] += 1
        counts[split]["tokens"] += int(ids.size)

    # The last document of each split is held back until the end, so that a split the hash left
    # empty can still get one: validation when there are two or more documents, training always.
    held: dict[str, np.ndarray | None] = {"train": None, "valid": None}
    bar = progress_bar(desc="prepare", unit=" docs", enabled=progress)
    start, tokens = time.perf_counter(), 0
    try:
        for chunk in _chunks(documents):
            flags = [validation_score(t, seed) < valid_fraction for t in chunk]
            for ids, to_valid in zip(_encode_chunk(tok, chunk), flags):
                ids = np.concatenate([ids.astype(np.int64, copy=False), eod])
                tokens += ids.size
                split = "valid" if to_valid else "train"
                if held[split] is not None:
                    add(split, held[split])
                held[split] = ids
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
        valid_empty = counts["valid"]["documents"] == 0 and held["valid"] is None
        train_empty = counts["train"]["documents"] == 0 and held["train"] is None
        if valid_empty and valid_fraction > 0 and counts["train"]["documents"] >= 1:
            held["valid"], held["train"] = held["train"], None
        elif train_empty:
            held["train"], held["valid"] = held["valid"], None
        for split, ids in held.items():
            if ids is not None:
                add(split, ids)
    except BaseException:
        for writer in writers.values():
            writer.__exit__(*sys.exc_info())
        raise
    finally:
        bar.close()
    for writer in writers.values():
        writer.close()
    return counts
