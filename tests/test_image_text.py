"""Image-caption data (tokenformer/data/image_text.py): WebDataset shards written and read back
exactly, against the `webdataset` package's own writer and reader, brace patterns, rank
sharding, caption folders, and the one-sentence errors for broken data."""

import csv
import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenformer.data.image_text import (ImageTextSamples, expand_braces, iter_shards, open_image_text,
                                         split_member_name, take_image_text, write_shards)
from tokenformer.data.images import make_transform
from tokenformer.errors import TokenFormerError

Image = pytest.importorskip("PIL.Image", reason="Pillow is in the vision and dev extras")

CAPTIONS = ["a cat", "ein Hund, über der Wiese", "", "  spaces kept  ", "ünïcødé 猫", "line\ninside"]


def make_samples(n: int, seed: int = 0) -> list[tuple]:
    """RGB images of varied sizes, unicode captions, extras on every other sample."""
    rng = np.random.default_rng(seed)
    return [(f"{i:06d}", rng.integers(0, 256, (3 + i % 4, 5 + i % 3, 3), dtype=np.uint8),
             CAPTIONS[i % len(CAPTIONS)] + f" #{i}", {"index": i, "tags": ["x"] * (i % 3)} if i % 2 else None)
             for i in range(n)]


def pixels(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)


def assert_same(samples: ImageTextSamples, expected: list[tuple]) -> None:
    assert len(samples) == len(expected)
    for i, (key, image, caption, extra) in enumerate(expected):
        assert samples.key(i) == key
        assert samples.caption(i) == caption
        assert samples.extra(i) == extra
        got = samples.image(i)
        assert got.dtype == torch.uint8
        np.testing.assert_array_equal(pixels(got), image)


def test_member_names_split_like_webdataset():
    assert split_member_name("000123.jpg") == ("000123", "jpg")
    assert split_member_name("part/000123.seg.PNG") == ("part/000123", "seg.png")
    assert split_member_name("a.b/c.txt") == ("a.b/c", "txt")


def test_shards_round_trip_exactly(tmp_path):
    expected = make_samples(11)
    paths = write_shards(expected, tmp_path, shard_size=4)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tar:  # the WebDataset member layout, samples in order
        assert tar.getnames()[:5] == ["000000.png", "000000.txt", "000001.png", "000001.txt", "000001.json"]
    samples = open_image_text(tmp_path)
    assert_same(samples, expected)
    assert samples.captions == [c for _, _, c, _ in expected]
    # grey (H, W) arrays, (C, H, W) tensors and already-encoded bytes are written too
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    write_shards([("g", grey, "grey", None), ("t", torch.from_numpy(grey[None].copy()), "tensor", None),
                  ("b", buffer.getvalue(), "bytes", None)], tmp_path / "grey")
    grey_samples = open_image_text(tmp_path / "grey", channels=1)
    for i in range(3):
        np.testing.assert_array_equal(grey_samples.image(i)[0].numpy(), grey)


def test_the_same_samples_give_the_same_bytes(tmp_path):
    first = write_shards(make_samples(5), tmp_path / "a")
    second = write_shards(make_samples(5), tmp_path / "b")
    assert first[0].read_bytes() == second[0].read_bytes()


def test_shards_of_the_webdataset_writer_read_by_ours(tmp_path):
    wds = pytest.importorskip("webdataset", reason="webdataset is in the dev extra")
    expected = make_samples(7, seed=1)
    with wds.TarWriter(str(tmp_path / "theirs-0.tar")) as writer:
        for key, image, caption, extra in expected:
            record = {"__key__": f"dir/{key}", "png": image, "txt": caption}
            if extra is not None:
                record["json"] = extra
            writer.write(record)
    samples = open_image_text(tmp_path / "theirs-0.tar")
    assert_same(samples, [(f"dir/{k}", image, caption, extra) for k, image, caption, extra in expected])
    streamed = list(iter_shards(tmp_path / "theirs-0.tar"))
    assert [s[0] for s in streamed] == [f"dir/{k}" for k, *_ in expected]
    np.testing.assert_array_equal(pixels(streamed[3][1]), expected[3][1])


def test_our_shards_read_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset", reason="webdataset is in the dev extra")
    expected = make_samples(6, seed=2)
    paths = write_shards(expected, tmp_path, shard_size=4)
    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8")
    records = list(dataset)
    assert [r["__key__"] for r in records] == [k for k, *_ in expected]
    for record, (_, image, caption, extra) in zip(records, expected):
        np.testing.assert_array_equal(record["png"], image)
        assert record["txt"] == caption
        assert record.get("json") == extra
    long_key = "folder/" + "é" * 60 + "-x" * 40  # past tar's 100-byte name field, and not ASCII
    (path,) = write_shards([(long_key, expected[0][1], "long", None)], tmp_path / "long")
    assert next(iter(wds.WebDataset(str(path), shardshuffle=False)))["__key__"] == long_key
    assert open_image_text(path).key(0) == long_key


def test_brace_patterns(tmp_path):
    assert expand_braces("s/{008..011}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar", "s/011.tar"]
    assert expand_braces("{1..2}-{a,b}") == ["1-a", "1-b", "2-a", "2-b"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(TokenFormerError, match="unbalanced brace"):
        expand_braces("s/{000..002.tar")
    expected = make_samples(9)
    write_shards(expected, tmp_path, shard_size=3)
    assert_same(open_image_text(f"{tmp_path}/shard-{{000000..000002}}.tar"), expected)
    assert_same(open_image_text(f"{tmp_path}/shard-{{000001..000002}}.tar"), expected[3:])
    with pytest.raises(FileNotFoundError, match="shard-000003.tar"):
        open_image_text(f"{tmp_path}/shard-{{000000..000003}}.tar")


def test_iter_shards_gives_each_rank_its_shards_and_every_sample_once(tmp_path):
    expected = make_samples(10)
    paths = write_shards(expected, tmp_path, shard_size=3)  # 4 shards: 3, 3, 3, 1 samples
    ranks = [list(iter_shards(tmp_path, rank, 2)) for rank in (0, 1)]
    keys = [[key for key, *_ in stream] for stream in ranks]
    assert keys[0] == ["000000", "000001", "000002", "000006", "000007", "000008"]  # shards 0 and 2
    assert keys[1] == ["000003", "000004", "000005", "000009"]                      # shards 1 and 3
    assert sorted(keys[0] + keys[1]) == [k for k, *_ in expected]
    by_key = {key: (image, caption, extra) for key, image, caption, extra in ranks[0] + ranks[1]}
    for key, image, caption, extra in expected:
        np.testing.assert_array_equal(pixels(by_key[key][0]), image)
        assert by_key[key][1:] == (caption, extra)
    # a gzipped shard streams too (random access refuses it: it cannot seek)
    gz = tmp_path / "zipped" / "s.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(paths[0].read_bytes()))
    assert [k for k, *_ in iter_shards(gz)] == ["000000", "000001", "000002"]
    cut_gz = gz.with_name("cut.tar.gz")
    cut_gz.write_bytes(gz.read_bytes()[:-5])  # only the gzip trailer (checksum) lost: still an error
    with pytest.raises(TokenFormerError, match="cut.tar.gz"):
        list(iter_shards(cut_gz))
    with pytest.raises(TokenFormerError, match="compressed"):
        open_image_text(gz)
    with pytest.raises(TokenFormerError, match="rank 2"):
        next(iter_shards(tmp_path, 2, 2))


def write_png_folder(folder: Path, expected: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, image, _, _ in expected:
        Image.fromarray(image).save(folder / f"{key}.png")


def test_captions_csv_and_jsonl_folders(tmp_path):
    expected = make_samples(5)
    write_png_folder(tmp_path / "csv" / "img", expected)
    with open(tmp_path / "csv" / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption", "source"])
        writer.writerows([f"img/{key}.png", caption, f"s{i}"] for i, (key, _, caption, _) in enumerate(expected))
    samples = open_image_text(tmp_path / "csv")
    assert_same(samples, [(f"img/{k}", image, caption, {"source": f"s{i}"})
                          for i, (k, image, caption, _) in enumerate(expected)])
    write_png_folder(tmp_path / "jsonl", expected)
    lines = [json.dumps({"image": f"{key}.png", "text": caption} | (extra or {})) for key, _, caption, extra in expected]
    (tmp_path / "jsonl" / "captions.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert_same(open_image_text(tmp_path / "jsonl"), expected)
    assert [k for k, *_ in iter_shards(tmp_path / "jsonl", 1, 2)] == ["000001", "000003"]
    (tmp_path / "jsonl" / "captions.jsonl").write_text(lines[0] + '\n{"image": "000001.png"}\n')
    with pytest.raises(TokenFormerError, match=r"line 2 .*no caption/text column"):
        open_image_text(tmp_path / "jsonl")


def one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_sample_without_caption_or_image_is_an_error_naming_shard_and_key(tmp_path):
    expected = make_samples(3)
    write_shards(expected, tmp_path / "good")
    with tarfile.open(tmp_path / "good" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members["._000000.png"] = b"AppleDouble"  # hidden members (macOS archives) are skipped, not an error
    assert_same(open_image_text(write_tar(tmp_path / "hidden.tar", members)), expected)
    for dropped, what in (("000001.txt", "an image but no caption"), ("000002.png", "a caption but no image")):
        shard = write_tar(tmp_path / f"without-{dropped}.tar", {k: v for k, v in members.items() if k != dropped})
        for read in (open_image_text, lambda path: list(iter_shards(path))):
            with pytest.raises(TokenFormerError) as error:
                read(shard)
            message = one_sentence(error)
            assert str(shard) in message and repr(dropped[:6]) in message and what in message


def test_truncated_or_damaged_shards_are_one_sentence_naming_the_file(tmp_path):
    (path,) = write_shards(make_samples(4), tmp_path)
    data = path.read_bytes()
    samples = open_image_text(path)
    members_end = int(max(samples.spans[:, [1, 3]].max(), samples.spans[:, 5].max())) + 1
    # every cut inside the members, at block boundaries and at odd bytes, is detected
    for cut in sorted({*range(512, members_end, 512), *range(100, members_end, 777)}):
        broken = tmp_path / "cut" / f"cut-{cut}.tar"
        broken.parent.mkdir(exist_ok=True)
        broken.write_bytes(data[:cut])
        for read in (open_image_text, lambda p: list(iter_shards(p))):
            with pytest.raises(TokenFormerError) as error:
                read(broken)
            assert str(broken) in one_sentence(error), cut
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(TokenFormerError, match="garbage.tar"):
        open_image_text(garbage)
    # a damaged image is found when it is decoded, and names its sample
    image_offset, image_size = int(samples.spans[2, 1]), int(samples.spans[2, 2])
    damaged = bytearray(data)
    damaged[image_offset + 20:image_offset + image_size] = b"\0" * (image_size - 20)
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(TokenFormerError) as error:
        open_image_text(tmp_path / "damaged.tar").image(2)
    assert "'000002'" in one_sentence(error) and "damaged.tar" in str(error.value)


def test_samples_pickle_and_reopen_their_files(tmp_path):
    expected = make_samples(6)
    write_shards(expected, tmp_path, shard_size=2)
    samples = open_image_text(tmp_path)
    samples.image(5)  # opens a handle, which must not travel
    clone = pickle.loads(pickle.dumps(samples))
    assert clone._handles == {}
    assert_same(clone, expected)
    handle = samples._handles[2]
    samples._pid = -1  # as in a forked worker: the parent's handles are not reused
    np.testing.assert_array_equal(pixels(samples.image(4)), expected[4][1])
    assert samples._handles[2] is not handle


def test_take_image_text_mirrors_images_take(tmp_path):
    rng = np.random.default_rng(0)
    expected = [(f"{i:03d}", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), f"c{i}", None) for i in range(5)]
    write_shards(expected, tmp_path)
    samples = open_image_text(tmp_path)
    index = torch.tensor([3, 0, 4])
    images, captions = take_image_text(samples, index)
    assert captions == ["c3", "c0", "c4"]
    reference = torch.from_numpy(np.stack([expected[i][1] for i in index])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(images, reference)
    transform = make_transform(train=True, augment="crop-flip", mean=(0.5,) * 3, std=(0.5,) * 3)
    x, _ = take_image_text(samples, index, transform, torch.Generator().manual_seed(1))
    in_memory = (torch.from_numpy(np.stack([e[1] for e in expected])).permute(0, 3, 1, 2), [e[2] for e in expected])
    y, memory_captions = take_image_text(in_memory, index, transform, torch.Generator().manual_seed(1))
    assert torch.equal(x, y)
    assert memory_captions == captions
    mixed = open_image_text(write_shards(make_samples(3), tmp_path / "mixed")[0])  # three sizes
    with pytest.raises(TokenFormerError, match="transform to one size"):
        take_image_text(mixed, torch.arange(3))
    resized, _ = take_image_text(mixed, torch.arange(3), make_transform(train=False, image_size=4))
    assert resized.shape == (3, 3, 4, 4)
