"""The MMIDIDX indexed format: a file laid out by hand from the published layout, and round trips."""

import struct

import numpy as np
import pytest

from tokenformer import TokenFormerError
from tokenformer.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype


def write_by_hand(prefix, docs, code=8, dtype="<u2"):
    """The published layout, byte by byte, independent of our writer."""
    sizes = [len(d) for d in docs]
    item = np.dtype(dtype).itemsize
    pointers = [sum(sizes[:i]) * item for i in range(len(docs))]
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        f.write(struct.pack(f"<{len(docs)}i", *sizes))
        f.write(struct.pack(f"<{len(docs)}q", *pointers))
        f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))


DOCS = [[5, 6, 7, 0], [1000, 0], [65000, 1, 2, 3, 4, 0]]


def test_reads_a_file_written_to_the_published_layout(tmp_path):
    write_by_hand(tmp_path / "c_text_document", DOCS)
    ds = IndexedDataset(tmp_path / "c_text_document")
    assert len(ds) == 3 and ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(3)] == DOCS
    assert ds.tokens.tolist() == sum(DOCS, [])
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_is_byte_identical_to_the_published_layout(tmp_path, dtype, code):
    write_by_hand(tmp_path / "ref", DOCS, code=code, dtype=np.dtype(dtype).newbyteorder("<"))
    with IndexedDatasetWriter(tmp_path / "ours", dtype=dtype) as w:
        for d in DOCS:
            w.add_item(d)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_dtype_rule():
    assert best_dtype(50277) == np.uint16 and best_dtype(100_000) == np.int32


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.idx does not exist"):
        IndexedDataset(tmp_path / "missing")
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(TokenFormerError, match="not a GPT-NeoX/Megatron MMIDIDX"):
        IndexedDataset(tmp_path / "bad")
    write_by_hand(tmp_path / "trunc", DOCS)
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "trunc.bin").read_bytes()[:-2])
    with pytest.raises(TokenFormerError, match="damaged or mismatched"):
        IndexedDataset(tmp_path / "trunc.bin")
    with pytest.raises(TokenFormerError, match="out of range"):
        with IndexedDatasetWriter(tmp_path / "x", dtype=np.uint16) as w:
            w.add_item([70000])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.tmp").exists()
