"""Documents: the one reader of every text source the package takes.

Text sources give one string per document: plain-text files (one document per file, `.gz` and
`.zst` decompressed by suffix), JSONL files (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, one document
per line, the text in `text_field`, as in the Pile or OpenWebText2), folders of them, a Hugging
Face `datasets` dataset, or the standard-library source of the running Python (a real corpus of
a few thousand files on every machine). `token_documents` adds GPT-NeoX indexed files (and
`tokenformer prepare` directories) and gives token ids: what evaluation and the loss reports of
`grow` and `shrink` read.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import re
import sysconfig
import zlib
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tokenformer.data.indexed import IndexedDataset, strip_suffix
from tokenformer.data.tokenizer import load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.files import SPLIT_PREFIXES, TOKENIZER_FILE
from tokenformer.inputs import require_file, special_kind

DEFAULT_GLOB = "*.txt,*.md,*.rst,*.py,*.jsonl,*.jsonl.gz,*.jsonl.zst"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".md", ".rst", ".py")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# A text file longer than this is read as several documents of at most this many characters, cut
# after a line end where there is one, so that one huge file prepares in bounded memory; a JSONL
# line longer than this is refused.
MAX_DOCUMENT_CHARS = 1 << 24
# A compressed file may expand this many times its size (text compresses 3-10 times), or up to
# MAX_DECOMPRESSED_FLOOR bytes whatever its size; more is a decompression bomb, refused by name.
MAX_EXPANSION, MAX_DECOMPRESSED_FLOOR = 100, 64 << 20


class _BoundedReader(io.RawIOBase):
    """A decompressing stream that stops with one sentence past `limit` bytes."""

    def __init__(self, raw, path: Path, limit: int) -> None:
        self.raw, self.path, self.limit, self.count = raw, path, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self.count += len(data)
        if self.count > self.limit:
            raise TokenFormerError(f"{self.path} expands to more than {self.limit:,} bytes ({MAX_EXPANSION} times "
                                   f"its size): it looks like a decompression bomb; decompress it yourself if it "
                                   f"is real")
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, decompressing `.gz` / `.zst` by suffix (to a bounded size); a leading
    byte-order mark is dropped and undecodable bytes become U+FFFD."""
    if path.name.endswith((".gz", ".zst")):
        if path.name.endswith(".gz"):
            raw = gzip.open(path, "rb")
        else:
            try:
                import zstandard
            except ImportError:
                raise TokenFormerError(
                    f"reading {path} needs the zstandard package: pip install 'tokenformer[zstd]'") from None
            raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                             read_across_frames=True)  # concatenated shards
        limit = max(MAX_DECOMPRESSED_FLOOR, MAX_EXPANSION * path.stat().st_size)
        stream = io.BufferedReader(_BoundedReader(raw, path, limit))
        return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace")


def _text_pieces(f: io.TextIOBase, limit: int = MAX_DOCUMENT_CHARS) -> Iterator[str]:
    """The text of `f` as one document, or in pieces of at most `limit` characters when longer."""
    pending = ""
    while chunk := f.read(limit):
        pending += chunk
        while len(pending) > limit:
            cut = pending.rfind("\n", 0, limit) + 1 or limit
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is read: the OS, gzip (OSError, EOFError, zlib.error),
    zstandard."""
    try:
        import zstandard
    except ImportError:
        return OSError, EOFError, zlib.error
    return OSError, EOFError, zlib.error, zstandard.ZstdError


@contextlib.contextmanager
def _reading(path: Path, where: Callable[[], str]) -> Iterator[None]:
    """Turn a read error of `path` into one sentence; `where` says how far the reading got."""
    try:
        yield
    except _read_errors() as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenFormerError(f"{path} cannot be read{where()} ({reason}): the file is damaged, truncated or "
                               f"unreadable; replace it or leave it out of the inputs") from None


def jsonl_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The `text_field` string of every line of a JSONL file (blank lines skipped)."""
    line_number = 0
    with _reading(path, lambda: f" after line {line_number}" if line_number else ""), _open_text(path) as f:
        for line_number, line in enumerate(iter(lambda: f.readline(MAX_DOCUMENT_CHARS + 1), ""), start=1):
            if len(line) > MAX_DOCUMENT_CHARS:
                raise TokenFormerError(f"{path} line {line_number} is longer than {MAX_DOCUMENT_CHARS:,} characters: "
                                       f"split that document, or leave the file out of the inputs")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                reason = getattr(e, "msg", "nested too deeply")
                raise TokenFormerError(f"{path} line {line_number} is not valid JSON ({reason}): fix or remove "
                                       f"that line") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise TokenFormerError(
                    f"{path} line {line_number} has no {text_field!r} field (it has: {fields}); "
                    f"name the text field with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise TokenFormerError(
                    f"{path} line {line_number}: field {text_field!r} is a {type(text).__name__}, not a string")
            yield text


def file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per line of a JSONL file, or the whole file as one document otherwise (in
    pieces of `MAX_DOCUMENT_CHARS` when longer)."""
    if _is_jsonl(path):
        yield from jsonl_documents(path, text_field)
    else:
        with _reading(path, lambda: ""), _open_text(path) as f:
            yield from _text_pieces(f)


def resolve_inputs(inputs: Iterable[str | Path], glob: str = DEFAULT_GLOB) -> list[Path]:
    """Every input file in order: files as given, folders searched recursively (sorted, hidden
    entries skipped) for names matching any of the comma-separated `glob` patterns."""
    patterns = [p.strip() for p in glob.split(",") if p.strip()]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and any(fnmatch(p.name, pattern) for pattern in patterns))
            if not found:
                raise TokenFormerError(f"folder {path} has no files matching {glob!r}; change --glob")
            files.extend(found)
        elif special_kind(path):
            raise TokenFormerError(f"input {path} is {special_kind(path)}, not a file: give text/JSONL files or "
                                   f"folders")
        else:
            raise TokenFormerError(f"input {path} does not exist; give existing text/JSONL files or folders")
    return files


def stdlib_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # pruned: site-packages can be huge
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents() -> Iterator[str]:
    """One document per standard-library source file; files that are not UTF-8 (test data for
    bad encodings) are skipped."""
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text


def hf_documents(name: str, split: str = "train", text_field: str = "text",
                 config: str | None = None) -> Iterator[str]:
    """The `text_field` column of a Hugging Face dataset: a directory written by `save_to_disk`, or
    anything `datasets.load_dataset` accepts (a Hub name with its `config`, a folder of data
    files), streamed."""
    try:
        import datasets
    except ImportError:
        raise TokenFormerError(
            "reading a Hugging Face dataset needs the datasets package: pip install 'tokenformer[datasets]'") from None
    path = Path(name)
    if not path.exists() and name.startswith(("/", ".", "~")):
        raise TokenFormerError(f"Hugging Face dataset directory {name} does not exist")
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise TokenFormerError(
                        f"Hugging Face dataset {name} has no split {split!r} (it has: {', '.join(dataset)}); "
                        f"choose one with --hf-split")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except TokenFormerError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, hub errors ...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenFormerError(f"could not load Hugging Face dataset {name!r} split {split!r} ({message})") from None
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise TokenFormerError(
            f"Hugging Face dataset {name} has no {text_field!r} column (it has: {', '.join(columns)}); "
            f"name the text column with --text-field")
    for batch in dataset.select_columns([text_field]).iter(batch_size=1000):
        yield from batch[text_field]


def iter_documents(inputs: Iterable[str | Path] | None = None, *, text_field: str = "text",
                   glob: str = DEFAULT_GLOB, hf_dataset: str | None = None,
                   hf_split: str = "train", hf_config: str | None = None) -> Iterator[str]:
    """Every non-empty document of the inputs in a fixed order; the stdlib corpus when there are none."""
    files = resolve_inputs(inputs or [], glob)
    sources: list[Iterable[str]] = [file_documents(p, text_field) for p in files]
    if hf_dataset is not None:
        sources.append(hf_documents(hf_dataset, hf_split, text_field, hf_config))
    if not files and hf_dataset is None:
        sources.append(stdlib_documents())
    for text in itertools.chain.from_iterable(sources):
        if not text:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (JSON can hold them) are no valid UTF-8: replace them
            text = LONE_SURROGATE.sub("\ufffd", text)
        yield text


# ---- token documents (evaluation, the loss reports of grow and shrink) -------------------------

def resolve_indexed_prefix(path: str | Path) -> str | None:
    """The indexed-dataset prefix that `path` names, or None: a directory from `tokenformer prepare`
    (its valid split), `PREFIX`, `PREFIX.bin`/`.idx`, or `PREFIX` standing for `PREFIX_text_document`."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / SPLIT_PREFIXES["valid"]]
    else:
        prefix = strip_suffix(path)
        candidates = [Path(prefix), Path(prefix + "_text_document")]
    for prefix in candidates:
        if Path(f"{prefix}.idx").is_file():
            return str(prefix)
    return None


def token_documents(path: str | Path, tokenizer, text_field: str = "text",
                    limit: int | None = None) -> Iterator[tuple[list[int], int]]:
    """`(token ids, UTF-8 bytes of the text)` per document of a JSONL file, a text file (one
    document), an indexed dataset or a `tokenformer prepare` directory (its valid split).

    Text is encoded with `tokenizer`. Indexed documents are used as stored (a trailing end-of-text
    token, as GPT-NeoX's preprocessing appends, stays); their byte count is that of the decoded
    text without end-of-text tokens, and they must come from the same tokenizer. The path is
    checked at once; the documents are read as they are consumed.
    """
    path = Path(path)
    if path.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES) or special_kind(path):
        require_file(path, "data file", "give a .jsonl or .txt file, an indexed dataset or a prepared folder")
        texts = itertools.islice(file_documents(path, text_field), limit)
        return ((tokenizer.encode(text), len(text.encode("utf-8"))) for text in texts)
    prefix = resolve_indexed_prefix(path)
    if prefix is None:
        raise FileNotFoundError(
            f"{path} is neither a .jsonl or .txt file, an indexed dataset prefix (PREFIX.bin + PREFIX.idx) "
            f"nor a directory written by `tokenformer prepare`")
    _check_data_tokenizer(Path(prefix).parent, tokenizer)
    return _indexed_documents(IndexedDataset(prefix), tokenizer, limit)


def count_documents(path: str | Path, text_field: str = "text", limit: int | None = None) -> int:
    """How many documents `token_documents(path, ...)` yields (at most `limit`), without tokenizing:
    an indexed dataset's index says it, a JSONL file is read once."""
    path = Path(path)
    if path.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
        return sum(1 for _ in itertools.islice(file_documents(path, text_field), limit))
    prefix = resolve_indexed_prefix(path)
    count = len(IndexedDataset(prefix).doc_idx) - 1 if prefix is not None else 0
    return count if limit is None else min(count, limit)


def _indexed_documents(dataset: IndexedDataset, tokenizer, limit: int | None):
    doc_starts = dataset.doc_idx  # document d is items doc_starts[d] .. doc_starts[d + 1]
    for d in range(len(doc_starts) - 1):
        if limit is not None and d >= limit:
            return
        ids = [int(t) for i in range(int(doc_starts[d]), int(doc_starts[d + 1])) for t in dataset[i]]
        text = tokenizer.decode(t for t in ids if t != tokenizer.eos_id)
        yield ids, len(text.encode("utf-8"))


def _check_data_tokenizer(directory: Path, tokenizer) -> None:
    """Refuse data tokenized with another vocabulary than the model's (the scores would be noise)."""
    if not (directory / TOKENIZER_FILE).is_file():
        return
    data_tokenizer = load_tokenizer(directory)
    if data_tokenizer.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise TokenFormerError(
            f"the data in {directory} was tokenized with another tokenizer than the checkpoint's: "
            f"prepare it again with the checkpoint's tokenizer.json")
