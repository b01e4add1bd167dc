"""The MMIDIDX format byte by byte: a file written here against the layout packed by hand (spec
section 9), the reader on hand-packed indexes of each damage with its exact sentence, and the
writer's dtype rule, range check and clean-up."""

import struct

import numpy as np
import pytest

from tokenformer import TokenFormerError
from tokenformer.data.indexed import REPREPARE, IndexedDataset, IndexedDatasetWriter, best_dtype, strip_suffix

DAMAGED = f"the index is damaged: {REPREPARE}"


def hand_index(sizes, dtype_code=8, version=1, pointers=None, doc_idx=None, itemsize=2, magic=b"MMIDIDX\x00\x00"):
    """An .idx packed by hand: magic, <Q version, <B dtype code, <Q N, <Q D, then N <i4 sizes,
    N <i8 byte pointers, D <i8 document starts."""
    n = len(sizes)
    if pointers is None:
        pointers = [sum(sizes[:i]) * itemsize for i in range(n)]
    if doc_idx is None:
        doc_idx = list(range(n + 1))
    return (magic + struct.pack("<Q", version) + struct.pack("<B", dtype_code) + struct.pack("<QQ", n, len(doc_idx))
            + struct.pack(f"<{n}i", *sizes) + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def test_written_files_are_the_layout_packed_by_hand(tmp_path):
    docs = [[1, 2, 3], [], [65535, 7]]
    with IndexedDatasetWriter(tmp_path / "d.bin", dtype=np.uint16) as writer:  # a suffix is dropped
        for doc in docs:
            writer.add_item(doc)
    assert writer.num_tokens == 5
    assert (tmp_path / "d.idx").read_bytes() == hand_index([3, 0, 2])
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 65535, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temporary left
    data = IndexedDataset(tmp_path / "d.idx")
    assert len(data) == 3 and data.num_tokens == 5 and data.dtype == np.uint16
    assert [data[i].tolist() for i in range(3)] == docs
    with IndexedDatasetWriter(tmp_path / "wide", dtype=np.int32) as writer:
        writer.add_item([70000])
        writer.add_item([1, 2])
    assert (tmp_path / "wide.idx").read_bytes() == hand_index([1, 2], dtype_code=4, itemsize=4)
    assert IndexedDataset(tmp_path / "wide")[1].tolist() == [1, 2]


def test_dtype_rule_suffixes_and_writer_errors(tmp_path):
    assert (best_dtype(65499), best_dtype(65500)) == (np.dtype(np.uint16), np.dtype(np.int32))
    assert [strip_suffix(p) for p in ("a/b.bin", "a/b.idx", "a/b", "a/b.bin.x")] == ["a/b", "a/b", "a/b", "a/b.bin.x"]
    with pytest.raises(TokenFormerError) as error:
        IndexedDatasetWriter(tmp_path / "c", dtype=np.complex64)
    assert str(error.value) == "dtype complex64 cannot be stored in an indexed dataset"
    writer = IndexedDatasetWriter(tmp_path / "r", dtype=np.uint8)
    for bad in ([256], [-1]):
        with pytest.raises(TokenFormerError) as error:
            writer.add_item(bad)
        assert str(error.value) == "token id out of range for uint8 in an indexed dataset"
    writer.add_item([255, 0])
    writer.close()
    assert IndexedDataset(tmp_path / "r")[0].tolist() == [255, 0]
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "broken") as writer:
            writer.add_item([1, 2])
            raise RuntimeError("interrupted")
    assert not list(tmp_path.glob("broken*"))  # nothing half-written is left


@pytest.mark.parametrize("damage, message", [
    (dict(version=2), "{idx} has index version 2; only version 1 is supported: " + DAMAGED),
    (dict(dtype_code=9), "{idx} has unknown dtype code 9: " + DAMAGED),
    (dict(sizes=[2, -1], pointers=[0, 4]), "{idx} has a negative item size: " + DAMAGED),
    (dict(pointers=[2, 6]), "{idx} has item pointers that do not start at byte 0: " + DAMAGED),
    (dict(doc_idx=[0, 1]), "{idx} has a document index that does not run from item 0 to 2: " + DAMAGED),
    (dict(doc_idx=[1, 2]), "{idx} has a document index that does not run from item 0 to 2: " + DAMAGED),
    (dict(doc_idx=[0, 3, 2]), "{idx} has a document index that does not run from item 0 to 2: " + DAMAGED),
    (dict(sizes=[2, 3]), "{bin} holds 8 bytes but its index d.idx describes 10: the pair is damaged or mismatched; "
     + REPREPARE),
    (dict(pointers=[0, 2]), "{bin} holds 8 bytes but its index d.idx describes 8: the pair is damaged or "
     "mismatched; " + REPREPARE),
])
def test_each_damaged_index_is_its_sentence(tmp_path, damage, message):
    (tmp_path / "d.bin").write_bytes(struct.pack("<4H", 1, 2, 3, 4))
    (tmp_path / "d.idx").write_bytes(hand_index(**{"sizes": [2, 2], **damage}))
    with pytest.raises(TokenFormerError) as error:
        IndexedDataset(tmp_path / "d")
    assert str(error.value) == message.format(idx=tmp_path / "d.idx", bin=tmp_path / "d.bin")


def test_a_header_cut_short_or_of_another_format_is_named(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"")
    full = hand_index([2, 2])
    (tmp_path / "d.idx").write_bytes(full[:-8])  # the last document start is missing
    with pytest.raises(TokenFormerError) as error:
        IndexedDataset(tmp_path / "d")
    assert str(error.value) == (f"{tmp_path / 'd.idx'} holds {len(full) - 8} bytes but its header (2 items, 3 document "
                                f"starts) needs {len(full)}: " + DAMAGED)
    (tmp_path / "d.idx").write_bytes(hand_index([2, 2], magic=b"MMIDIDX\x00\x01"))
    with pytest.raises(TokenFormerError) as error:
        IndexedDataset(tmp_path / "d")
    assert str(error.value).startswith(f"{tmp_path / 'd.idx'} is not a GPT-NeoX/Megatron MMIDIDX index file (no ")
    (tmp_path / "d.idx").write_bytes(hand_index([]))
    empty = IndexedDataset(tmp_path / "d")  # an empty dataset with an empty .bin reads as empty
    assert len(empty) == 0 and empty.num_tokens == 0


def test_a_missing_half_of_the_pair_is_named_with_the_fix(tmp_path):
    fix = "give the prefix without .bin/.idx, e.g. data/corpus_text_document"
    with pytest.raises(TokenFormerError) as error:
        IndexedDataset(tmp_path / "none")
    assert str(error.value) == f"indexed dataset file {tmp_path / 'none.idx'} does not exist: {fix}"
    (tmp_path / "d.idx").write_bytes(hand_index([2]))
    with pytest.raises(TokenFormerError) as error:
        IndexedDataset(tmp_path / "d")
    assert str(error.value) == f"indexed dataset file {tmp_path / 'd.bin'} does not exist: {fix}"
