"""Image-caption pairs, for the contrastive (CLIP) TokenFormer and the captioner.

Two layouts are read, both with the standard library only (Pillow decodes the images):

- WebDataset tar shards, as DataComp and img2dataset write them: members `KEY.jpg|jpeg|png|webp`
  (the image), `KEY.txt` (the caption) and optionally `KEY.json` (extra metadata), consecutive in
  the tar. The key is the member name up to the first dot of its base name, directory included
  (`part/000123.seg.png` has key `part/000123`); members with other extensions (`.cls`, ...) are
  ignored.
- A folder of images with `captions.csv` (columns `file` or `image`, and `caption` or `text`) or
  `captions.jsonl` (one object per line with the same keys); file names are relative to the folder
  and the other columns are a sample's extra metadata.

The tar layout itself (member names, shard paths and brace patterns, `write_shards`) is in
`tokenformer.data.tar_shards`. `open_image_text` gives random access (`ImageTextSamples`): the
tar headers are indexed once (offsets and sizes, payloads untouched) and a sample is read by
seeking, so a batch is a function of the sample indices alone (exact resume, any number of ranks). `iter_shards` streams shards
(also gzipped ones) split over ranks, for corpora too big to index. `take_image_text` makes a
batch the way `images.take` does.

Captions are UTF-8; a caption file's trailing line breaks are dropped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import tarfile
import threading
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from tokenformer.data.images import ImageFolder, Transform, _pillow, to_float
from tokenformer.data.tar_shards import (CAPTION_FILES, CAPTION_SUFFIX, EXTRA_SUFFIX, IMAGE_SUFFIXES, encode_image,
                                         expand_braces, shard_paths, split_member_name, write_shards)
from tokenformer.errors import TokenFormerError
from tokenformer.inputs import require_file

# the writing half lives in tar_shards; it is named here too, so that one import serves a user
__all__ = ["ImageTextSamples", "TarSamples", "FolderSamples", "open_image_text", "iter_shards", "take_image_text",
           "decode_image", "write_shards", "encode_image", "expand_braces", "shard_paths", "split_member_name"]

FILE_COLUMNS, CAPTION_COLUMNS = ("file", "image"), ("caption", "text")
TAR_BLOCK = 512

Sample = tuple[str, torch.Tensor, str, "dict | None"]  # (key, image uint8 (C, H, W), caption, extra)


def captions_file(source: str | Path) -> Path | None:
    """The captions.csv / captions.jsonl that `source` is or holds, if any."""
    path = Path(source)
    if path.is_file() and path.name.endswith((".csv", ".jsonl")):
        return path
    if path.is_dir():
        return next((path / name for name in CAPTION_FILES if (path / name).is_file()), None)
    return None


# ---- random access -------------------------------------------------------------------------------

class ImageTextSamples(ABC):
    """Image-caption samples by index: `key(i)`, `caption(i)`, `image(i)` (uint8 (C, H, W), RGB or
    grey by `channels`), `extra(i)` (a dict or None) and `captions` (all of them)."""

    channels = ImageFolder.channels  # the same settable property: 1 (grey) or 3 (RGB)

    def __init__(self, keys: list[str], channels: int = 3) -> None:
        self.keys = keys
        self.channels = channels
        self._captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    @abstractmethod
    def caption(self, index: int) -> str:
        """The caption of sample `index`."""

    @abstractmethod
    def extra(self, index: int) -> dict | None:
        """The extra metadata of sample `index` (a dict), or None."""

    @abstractmethod
    def image_bytes(self, index: int) -> bytes:
        """The encoded image file of sample `index`."""

    @abstractmethod
    def where(self, index: int) -> str:
        """Where sample `index` is, for error messages."""

    @property
    def captions(self) -> list[str]:
        """Every caption in sample order (read once, then kept: captions are small)."""
        if self._captions is None:
            self._captions = [self.caption(i) for i in range(len(self))]
        return self._captions

    def image(self, index: int) -> torch.Tensor:
        return decode_image(self.image_bytes(index), self.channels, self.where(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.image(index), self.caption(index)


def _reason(error: BaseException) -> str:
    """The first line of an exception's message (tarfile and Pillow write several), without the
    in-memory file Pillow names (`<_io.BytesIO object at 0x...>`)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decode_image(data: bytes, channels: int, where: str) -> torch.Tensor:
    """Encoded image bytes as uint8 (C, H, W), RGB or grey as `images.read_image` reads files; a
    damaged image is one sentence naming `where`."""
    Image = _pillow()
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ... depending on the damage
        raise TokenFormerError(f"the image of {where} cannot be decoded ({_reason(e)}): the file is damaged "
                               f"or not an image; replace it") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def _decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise TokenFormerError(f"the caption of {where} is not UTF-8 text: re-encode it as UTF-8") from None


def _decode_json(data: bytes, where: str) -> dict:
    try:
        extra = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenFormerError(f"the metadata (.json) of {where} is not valid JSON ({e}): rewrite it") from None
    except RecursionError:  # `[[[[...` nested deeper than Python's stack
        raise TokenFormerError(f"the metadata (.json) of {where} nests too deeply to be metadata: rewrite it") from None
    if not isinstance(extra, dict):
        raise TokenFormerError(f"the metadata (.json) of {where} is a {type(extra).__name__}, not an object")
    return extra


class TarSamples(ImageTextSamples):
    """The samples of uncompressed WebDataset shards, found by their indexed member offsets."""

    # columns of `spans`: shard, then (offset, size) of the image, the caption and the extra (-1: none)
    def __init__(self, shards: list[Path], keys: list[str], spans: np.ndarray, channels: int = 3) -> None:
        super().__init__(keys, channels)
        self.shards = shards
        self.spans = spans  # (N, 7) int64
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # open files cannot be pickled, and a forked worker must not share their offsets: reopen
        state = dict(self.__dict__, _handles={}, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _pid=os.getpid())

    def _read(self, index: int, column: int) -> bytes | None:
        shard, offset, size = int(self.spans[index, 0]), int(self.spans[index, column]), int(self.spans[index, column + 1])
        if size < 0:
            return None
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's file offsets are shared, so reopen
                self._handles, self._pid = {}, os.getpid()
            handle = self._handles.get(shard)
            try:
                if handle is None:
                    handle = self._handles[shard] = open(self.shards[shard], "rb")
                handle.seek(offset)
                data = handle.read(size)
            except OSError as e:  # moved, deleted or unreadable since it was indexed
                raise TokenFormerError(f"shard {self.shards[shard]} cannot be read any more ({_reason(e)}): "
                                       f"restore it, or open the samples again") from None
        if len(data) != size:
            raise TokenFormerError(f"shard {self.shards[shard]} is shorter than when it was indexed "
                                   f"(sample {self.keys[index]!r}): it was truncated or rewritten; open it again")
        return data

    def where(self, index: int) -> str:
        return f"sample {self.keys[index]!r} of shard {self.shards[int(self.spans[index, 0])]}"

    def image_bytes(self, index: int) -> bytes:
        return self._read(index, 1)

    def caption(self, index: int) -> str:
        return _decode_text(self._read(index, 3), self.where(index))

    def extra(self, index: int) -> dict | None:
        data = self._read(index, 5)
        return None if data is None else _decode_json(data, self.where(index))


class FolderSamples(ImageTextSamples):
    """A folder of image files with a captions.csv / captions.jsonl naming them."""

    def __init__(self, files: list[Path], keys: list[str], captions: list[str], extras: list[dict | None],
                 channels: int = 3) -> None:
        super().__init__(keys, channels)
        self.files, self._captions, self.extras = files, captions, extras

    def where(self, index: int) -> str:
        return f"image {self.files[index]}"

    def image_bytes(self, index: int) -> bytes:
        try:
            return self.files[index].read_bytes()
        except OSError as e:
            raise TokenFormerError(f"image {self.files[index]} cannot be read ({e.strerror}): check the file") from None

    def caption(self, index: int) -> str:
        return self._captions[index]

    def extra(self, index: int) -> dict | None:
        return self.extras[index]


def open_image_text(path: str | Path | Sequence[str | Path], channels: int = 3) -> ImageTextSamples:
    """Random access to the image-caption samples of `path`: a .tar shard, a directory of shards,
    a brace pattern (`shards/{000000..000009}.tar`), a list of these, or a folder of images with
    captions.csv / captions.jsonl (or that file itself)."""
    table = None if isinstance(path, (list, tuple)) else captions_file(path)
    if table is not None:
        return _open_caption_table(table, channels)
    shards = shard_paths(path)
    keys, spans = [], []
    for number, shard in enumerate(shards):
        if not shard.name.endswith(".tar"):
            raise TokenFormerError(f"shard {shard} is compressed, and random access needs an uncompressed .tar: "
                                   f"decompress it (gunzip) or stream it with iter_shards")
        for key, members in _index_shard(shard):
            keys.append(key)
            spans.append((number, *members))
    if not keys:
        raise TokenFormerError(f"{path} holds no image-caption samples: check that its shards are not empty")
    return TarSamples(shards, keys, np.asarray(spans, dtype=np.int64).reshape(-1, 7), channels)


# a sample's image or caption is read whole: one larger than this is refused, not allocated
MAX_MEMBER_BYTES = 1 << 28
MAX_TAR_TAIL = 1 << 20  # end-of-archive blocks and the zero padding of the last record (10 kB by default)


def _index_shard(shard: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, (image offset, size, caption offset, size, extra offset, size)) of every sample of an
    uncompressed shard, from its headers alone (tarfile seeks over the payloads)."""
    length = shard.stat().st_size
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
            truncated = _cut_short(tar)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TokenFormerError(f"shard {shard} is not a readable tar file ({_reason(e)}): it is damaged or truncated; "
                               f"write it again") from None
    if truncated or any(offset + size > length for _, offset, size in members):
        raise TokenFormerError(f"shard {shard} is truncated (it ends inside a member or without the tar end "
                               f"marker): download or write it again")
    large = next((name for name, _, size in members if size > MAX_MEMBER_BYTES), None)
    if large is not None:
        raise TokenFormerError(f"shard {shard}: member {large} is larger than {MAX_MEMBER_BYTES:,} bytes, more than "
                               f"any image or caption of a sample needs: leave it out of the shard")
    for key, parts in _group(((name, (offset, size)) for name, offset, size in members), shard):
        image = next(parts[s] for s in IMAGE_SUFFIXES if s in parts)
        yield key, (*image, *parts[CAPTION_SUFFIX], *parts.get(EXTRA_SUFFIX, (0, -1)))


def _cut_short(tar: tarfile.TarFile) -> bool:
    """Whether a tar read to its end lacks the end-of-archive blocks or has non-zero bytes after
    its last member: tarfile silently takes a partial header at the end for the end of the archive.
    The rest (zero padding, a few kB) is read to the end, so a gzip stream's checksum is checked."""
    tar.fileobj.seek(tar.offset)
    rest = tar.fileobj.read(MAX_TAR_TAIL + 1)  # more than a record's padding is not an end marker
    return len(rest) < 2 * TAR_BLOCK or len(rest) > MAX_TAR_TAIL or rest.strip(b"\0") != b""


def _group(members: Iterable[tuple[str, Any]], shard: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The members of each sample (suffix -> payload), consecutive members sharing a key; a sample
    without image or caption, or a key that comes back later, is an error naming shard and key."""
    seen: set[str] = set()
    # hidden members (`._000.jpg` of macOS archives) have no key: skipped, as WebDataset does
    members = (m for m in members if not m[0].rpartition("/")[2].startswith("."))
    for key, group in itertools.groupby(members, key=lambda member: split_member_name(member[0])[0]):
        if key in seen:
            raise TokenFormerError(f"shard {shard}: the members of sample {key!r} are not consecutive; "
                                   f"write each sample's files one after the other")
        seen.add(key)
        parts: dict[str, Any] = {}
        for name, payload in group:
            suffix = split_member_name(name)[1]
            if suffix in parts:
                raise TokenFormerError(f"shard {shard}: sample {key!r} has two {suffix} members; keep one")
            parts[suffix] = payload
        has_image, has_caption = any(s in parts for s in IMAGE_SUFFIXES), CAPTION_SUFFIX in parts
        if not (has_image and has_caption):
            what = ("an image but no caption (.txt)" if has_image else
                    "a caption but no image (.jpg/.jpeg/.png/.webp)" if has_caption else "neither image nor caption")
            raise TokenFormerError(f"shard {shard}: sample {key!r} has {what}; every sample needs both")
        if sum(s in parts for s in IMAGE_SUFFIXES) > 1:
            raise TokenFormerError(f"shard {shard}: sample {key!r} has more than one image; keep one")
        yield key, parts


def _open_caption_table(table: Path, channels: int) -> FolderSamples:
    """A captions.csv / captions.jsonl and the images it names (relative to its folder)."""
    rows = _read_table(table)
    files, keys, captions, extras = [], [], [], []
    for where, row in rows:
        file_column = next((c for c in FILE_COLUMNS if c in row), None)
        caption_column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if file_column is None or caption_column is None:
            raise TokenFormerError(f"{table} {where} has no {'/'.join(FILE_COLUMNS if file_column is None else CAPTION_COLUMNS)} "
                                   f"column (it has: {', '.join(row)}); name the columns file and caption")
        name, caption = row[file_column], row[caption_column]
        if not name:
            raise TokenFormerError(f"{table} {where} has a caption but no image file: add the file or drop the row")
        if not isinstance(name, str):
            raise TokenFormerError(f"{table} {where} gives {name!r} as its image, not a file name: write the image's "
                                   f"path relative to {table.parent} as a string")
        file = require_file(table.parent / name, "image", f"{table} {where} names it; add the image or drop the row "
                                                          f"(paths are relative to its folder)")
        if not isinstance(caption, str) or not caption:
            raise TokenFormerError(f"{table} {where} ({name}) has an image but no caption: add one or drop the row")
        rest = {k: v for k, v in row.items() if k not in (file_column, caption_column)}
        files.append(file)
        keys.append(Path(name).with_suffix("").as_posix())
        captions.append(caption)
        extras.append(rest or None)
    if not files:
        raise TokenFormerError(f"{table} lists no images: add rows of file and caption")
    return FolderSamples(files, keys, captions, extras, channels)


def _read_table(table: Path) -> list[tuple[str, dict]]:
    """("row N" / "line N", row) of a captions.csv (the header is row 1) or captions.jsonl."""
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFormerError(f"captions file {table} cannot be read as UTF-8 text ({e}): check it") from None
    if table.name.endswith(".csv"):
        try:
            rows = [(f"row {number}", row) for number, row in enumerate(csv.DictReader(io.StringIO(text)), start=2)]
        except csv.Error as e:  # a field above csv's size limit, a NUL byte in older Pythons
            raise TokenFormerError(f"captions file {table} is not valid CSV ({e}): check it") from None
        for where, row in rows:
            if None in row:  # csv files the fields beyond the header under the key None
                raise TokenFormerError(f"{table} {where} has {len(row[None])} more fields than the header: quote "
                                       f"captions that hold commas (\"a, b\") or drop the extra fields")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TokenFormerError(f"{table} line {number} is not valid JSON ({e.msg})") from None
        except RecursionError:  # `[[[[...` nested deeper than Python's stack
            raise TokenFormerError(f"{table} line {number} nests too deeply to be a row of file and caption") from None
        if not isinstance(row, dict):
            raise TokenFormerError(f"{table} line {number} is a {type(row).__name__}, not an object with file and caption")
        rows.append((f"line {number}", row))
    return rows


# ---- streaming -----------------------------------------------------------------------------------

def iter_shards(paths: str | Path | Sequence[str | Path], rank: int = 0, world_size: int = 1,
                channels: int = 3) -> Iterator[Sample]:
    """Stream `(key, image uint8 (C, H, W), caption, extra)` from shards read front to back (.tar,
    .tar.gz, .tgz), shard j going to rank j % world_size; a captions folder is split by sample."""
    if not 0 <= rank < world_size:
        raise TokenFormerError(f"rank {rank} is outside world size {world_size}: use 0 <= rank < world_size")
    table = None if isinstance(paths, (list, tuple)) else captions_file(paths)
    if table is not None:
        samples = _open_caption_table(table, channels)
        for i in range(rank, len(samples), world_size):
            yield samples.key(i), samples.image(i), samples.caption(i), samples.extra(i)
        return
    for shard in shard_paths(paths)[rank::world_size]:
        yield from _stream_shard(shard, channels)


def _stream_shard(shard: Path, channels: int) -> Iterator[Sample]:
    def payloads(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise EOFError("unexpected end of data")
                yield member.name, data

    try:
        with tarfile.open(shard, "r:*") as tar:
            for key, parts in _group(payloads(tar), shard):
                where = f"sample {key!r} of shard {shard}"
                image = next(parts[s] for s in IMAGE_SUFFIXES if s in parts)
                extra = parts.get(EXTRA_SUFFIX)
                yield (key, decode_image(image, channels, where), _decode_text(parts[CAPTION_SUFFIX], where),
                       None if extra is None else _decode_json(extra, where))
            truncated = _cut_short(tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise TokenFormerError(f"shard {shard} cannot be read to the end ({_reason(e)}): it is damaged or truncated; "
                               f"write it again") from None
    if truncated:
        raise TokenFormerError(f"shard {shard} is truncated (it ends without the tar end marker): "
                               f"download or write it again")


# ---- batches -------------------------------------------------------------------------------------

def take_image_text(samples: ImageTextSamples | tuple[torch.Tensor, Sequence[str]], index: torch.Tensor,
                    transform: Transform | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[str]]:
    """The images (float (B, C, H, W), through `transform` as `images.take` does) and captions at
    `index` of an ImageTextSamples or an in-memory `(images uint8 (N, C, H, W), captions)` pair.
    Images of one size are transformed as one batch, others one by one (then a transform to one
    size is needed)."""
    if not isinstance(samples, ImageTextSamples):
        images, captions = samples
        x = images[index]
        return (transform(x, generator) if transform is not None else to_float(x)), [captions[int(i)] for i in index]
    items = [samples.image(int(i)) for i in index]
    captions = [samples.caption(int(i)) for i in index]
    if len({tuple(image.shape) for image in items}) <= 1:
        x = torch.stack(items)  # (B, C, H, W)
        return (transform(x, generator) if transform is not None else to_float(x)), captions
    if transform is None:
        raise TokenFormerError("images of different sizes need a transform to one size before batching "
                               "(e.g. images.make_transform(train, image_size=...))")
    return torch.cat([transform(image[None], generator) for image in items]), captions  # (B, C, size, size)
