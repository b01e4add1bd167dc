"""The GPT-NeoX / Megatron indexed token format ("mmap" implementation): `PREFIX.bin` + `PREFIX.idx`.

`PREFIX.bin` holds the token ids of every item back to back in one dtype; `PREFIX.idx` is a
little-endian header (magic `MMIDIDX\\x00\\x00`, version 1, dtype code, item count N, document-index
length D) followed by N int32 sizes, N int64 byte pointers and D int64 document starts. Files
written here are byte-compatible with GPT-NeoX's tools and the Pile as they distribute it.
"""

from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

from tokenformer.errors import TokenFormerError
from tokenformer.inputs import require_file

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float32, 7: np.float64, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, N, D
REPREPARE = "write it again with `tokenformer prepare` (or GPT-NeoX's preprocess_data.py)"


def best_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as for GPT-NeoX-20B), else int32: GPT-NeoX's rule."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def strip_suffix(prefix: str | Path) -> str:
    """Accept `PREFIX`, `PREFIX.bin` or `PREFIX.idx` and return `PREFIX`."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class IndexedDatasetWriter:
    """Streams items (one per document) into `PREFIX.bin`, then writes `PREFIX.idx` on close.

    Both files are written under temporary names and renamed at the end, so an interrupted run
    never leaves a half-written dataset that looks complete.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise TokenFormerError(f"dtype {self.dtype} cannot be stored in an indexed dataset")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(self.prefix + ".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.sizes = array("i")  # 4 bytes per item, not a Python int: the Pile has ~200M documents
        self.num_tokens = 0

    def add_item(self, ids: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise TokenFormerError(f"token id out of range for {self.dtype} in an indexed dataset")
        self._bin.write(array.astype(self.dtype).tobytes())
        self.sizes.append(int(array.size))
        self.num_tokens += int(array.size)

    def close(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # one item per document
        idx_tmp = Path(self.prefix + ".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        self._bin_tmp.replace(self.prefix + ".bin")
        idx_tmp.replace(self.prefix + ".idx")

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no partial files behind
            self._bin.close()
            self._bin_tmp.unlink(missing_ok=True)


class IndexedDataset:
    """Memory-mapped reader: `len(ds)` items, `ds[i]` the ids of item i, `ds.tokens` the whole stream."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = strip_suffix(prefix)
        idx_path, bin_path = Path(self.prefix + ".idx"), Path(self.prefix + ".bin")
        fix = "give the prefix without .bin/.idx, e.g. data/corpus_text_document"
        require_file(idx_path, "indexed dataset file", fix)
        require_file(bin_path, "indexed dataset file", fix, empty_ok=True)
        n, d = self._read_header(idx_path)
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_BYTES
        self.sizes = np.frombuffer(index, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self.pointers = np.frombuffer(index, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self.doc_idx = np.frombuffer(index, dtype="<i8", count=d, offset=offset)
        self._check_index(idx_path, bin_path)
        expected_bytes = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if expected_bytes else \
            np.zeros(0, dtype=self.dtype)

    def _read_header(self, idx_path: Path) -> tuple[int, int]:
        """The item count N and document-index length D of `idx_path`, its header and length checked."""
        damaged = f"the index is damaged: {REPREPARE}"
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:9] != MAGIC:
            raise TokenFormerError(f"{idx_path} is not a GPT-NeoX/Megatron MMIDIDX index file (no {MAGIC!r} "
                                   f"header): give the .idx written with its .bin, or {REPREPARE}")
        version, = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise TokenFormerError(f"{idx_path} has index version {version}; only version 1 is supported: {damaged}")
        code, = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise TokenFormerError(f"{idx_path} has unknown dtype code {code}: {damaged}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", header[18:34])
        size = idx_path.stat().st_size
        if n > size or d > size or size < HEADER_BYTES + 12 * n + 8 * d:
            raise TokenFormerError(f"{idx_path} holds {size} bytes but its header ({n} items, {d} document starts) "
                                   f"needs {HEADER_BYTES + 12 * n + 8 * d}: {damaged}")
        return n, d

    def _check_index(self, idx_path: Path, bin_path: Path) -> None:
        """Sizes, pointers and document starts consistent with each other and with `bin_path`."""
        damaged = f"the index is damaged: {REPREPARE}"
        n = len(self.sizes)
        if n and int(self.sizes.min()) < 0:
            raise TokenFormerError(f"{idx_path} has a negative item size: {damaged}")
        # pointers are the running byte offsets; checking the first and the last keeps this O(1)
        if n and (int(self.pointers[0]) != 0 or int(self.pointers[-1]) < 0):
            raise TokenFormerError(f"{idx_path} has item pointers that do not start at byte 0: {damaged}")
        if len(self.doc_idx) and (int(self.doc_idx[0]) != 0 or int(self.doc_idx[-1]) != n
                                  or int(self.doc_idx.min()) < 0 or int(self.doc_idx.max()) > n):
            raise TokenFormerError(f"{idx_path} has a document index that does not run from item 0 to {n}: "
                                   f"{damaged}")
        expected_bytes = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        last_end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_path.stat().st_size != expected_bytes or last_end != expected_bytes:
            raise TokenFormerError(
                f"{bin_path} holds {bin_path.stat().st_size} bytes but its index {idx_path.name} describes "
                f"{expected_bytes}: the pair is damaged or mismatched; {REPREPARE}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])
