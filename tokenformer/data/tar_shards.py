"""The WebDataset tar layout that image-caption data is stored in (DataComp, img2dataset): member
names and keys, where shards are (files, folders, brace patterns), and writing shards.

A sample is consecutive members `KEY.png|jpg|jpeg|webp` (the image), `KEY.txt` (the caption) and
optionally `KEY.json` (extra metadata). `tokenformer.data.image_text` reads them.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tokenformer.data.images import _pillow
from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_path
from tokenformer.inputs import MissingFileError, require_dir, require_file

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
CAPTION_SUFFIX, EXTRA_SUFFIX = "txt", "json"
CAPTION_FILES = ("captions.csv", "captions.jsonl")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SHARD_FIX = "write the shard again, or move it out of the folder"


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), the WebDataset rule (suffix lower-cased)."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..009}` (zero-padded like its first bound) and `{a,b}` in a shard pattern,
    every brace in turn: `s/{0..1}-{a,b}.tar` -> s/0-a.tar, s/0-b.tar, s/1-a.tar, s/1-b.tar."""
    match = BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise TokenFormerError(f"unbalanced brace in shard pattern {pattern!r}: write e.g. shards/{{000..009}}.tar")
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
        if not choices:
            raise TokenFormerError(f"empty range {{{body}}} in shard pattern {pattern!r}: the first bound is above the last")
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def shard_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The tar shards of `source`: a shard, a directory of shards (sorted by name), a brace
    pattern, or a list of these."""
    if isinstance(source, (list, tuple)):
        return [path for item in source for path in shard_paths(item)]
    text = str(source)
    if "{" in text:
        paths = [Path(p) for p in expand_braces(text)]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise MissingFileError(f"shard {missing[0]} of pattern {text} does not exist "
                                   f"({len(missing)} of {len(paths)} missing): check the pattern's range")
        return [require_file(p, "shard", SHARD_FIX) for p in paths]
    path = Path(source)
    if path.is_dir():
        require_dir(path, "image-text folder")
        # a directory (or an empty file) named like a shard is a shard gone wrong: not skipped in silence
        shards = [require_file(p, "shard", SHARD_FIX)
                  for p in sorted(path.iterdir()) if p.name.endswith(SHARD_SUFFIXES)]
        if not shards:
            nested = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.tar")))
            hint = f" (its sub-folders {', '.join(nested)} hold shards: give one of them)" if nested else ""
            raise TokenFormerError(f"folder {path} holds no .tar shards and no {' or '.join(CAPTION_FILES)}{hint}: "
                                   f"give WebDataset shards or a folder of images with a captions file")
        return shards
    if not path.exists():
        raise MissingFileError(f"image-text data {path} does not exist: check the path")
    if not path.name.endswith(SHARD_SUFFIXES):
        raise TokenFormerError(f"{path} is not a tar shard (.tar, .tar.gz, .tgz) nor a captions file: "
                               f"give shards, a folder of them or a folder with {' or '.join(CAPTION_FILES)}")
    return [path]


def encode_image(image: np.ndarray | torch.Tensor | bytes) -> tuple[bytes, str]:
    """(file bytes, suffix): uint8 arrays (H, W, C) / (H, W), or tensors (C, H, W), as PNG; encoded
    PNG, JPEG or WebP bytes as they are."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        if data.startswith(b"\x89PNG"):
            return data, "png"
        if data.startswith(b"\xff\xd8\xff"):
            return data, "jpg"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return data, "webp"
        raise TokenFormerError("encoded image bytes are not PNG, JPEG or WebP: pass the pixels as a uint8 array instead")
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()  # (H, W, C)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise TokenFormerError(f"an image to write must be uint8 (H, W), (H, W, 1|3|4) or encoded bytes, "
                               f"got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    _pillow().fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same samples give the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[tuple[str, Any, str, dict | None]], out_dir: str | Path, shard_size: int = 1000,
                 prefix: str = "shard") -> list[Path]:
    """Write `(key, image, caption, extra)` samples as WebDataset shards `out_dir/PREFIX-000000.tar`
    of `shard_size` samples each (KEY.png|jpg|webp, KEY.txt, KEY.json when extra is not None),
    each shard written atomically. Returns the shard paths."""
    if shard_size < 1:
        raise TokenFormerError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    samples, paths = iter(samples), []
    for first in samples:  # each pass writes one shard: `first`, then up to shard_size - 1 more
        path = out_dir / f"{prefix}-{len(paths):06d}.tar"
        # the GNU format: names longer than 100 bytes and UTF-8 names work, and every reader knows it
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            seen: set[str] = set()
            for key, image, caption, extra in itertools.chain([first], itertools.islice(samples, shard_size - 1)):
                if not key or "." in key.rpartition("/")[2] or key in seen:
                    raise TokenFormerError(f"sample key {key!r} is empty, repeated or has a dot in its base name "
                                           f"(the dot starts the extension): use unique keys such as 000123")
                if not isinstance(caption, str):
                    raise TokenFormerError(f"the caption of sample {key!r} is a {type(caption).__name__}, not a string")
                seen.add(key)
                data, suffix = encode_image(image)
                _add_member(tar, f"{key}.{suffix}", data)
                _add_member(tar, f"{key}.{CAPTION_SUFFIX}", caption.encode("utf-8"))
                if extra is not None:
                    _add_member(tar, f"{key}.{EXTRA_SUFFIX}", json.dumps(extra).encode("utf-8"))
        paths.append(path)
    return paths
