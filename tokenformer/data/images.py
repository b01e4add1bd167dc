"""Image data for the vision TokenFormer, without torchvision.

- `read_idx`: the IDX format of MNIST / Fashion-MNIST (`*-ubyte`, gzipped or not).
- `ImageFolder`: the ImageNet layout (`root/CLASS/*.jpg`, classes sorted by name), read with Pillow
  (the `vision` extra).
- Transforms on batches of tensors (B, C, H, W): random resized crop, random crop with padding,
  horizontal flip, resize + centre crop for evaluation, normalisation. They run in torch, so a
  batch of small images is augmented in one call.
- `take` / `batches_of`: images by index, or shuffled (or ordered) mini-batches, of an in-memory
  dataset or an ImageFolder through a transform.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tokenformer.errors import TokenFormerError
from tokenformer.inputs import require_file

# ---- the IDX format --------------------------------------------------------------------------
# Big-endian: two zero bytes, a dtype code, the number of dims, then one uint32 per dim, then data.
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not, recognised by its content) as a numpy array of native byte order."""
    fix = "download the MNIST-style *-ubyte(.gz) file again"
    path = require_file(path, "IDX file", fix)
    try:
        with _open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated .gz
        raise TokenFormerError(f"IDX file {path} cannot be read ({str(e) or type(e).__name__}): it is damaged; "
                               f"{fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise TokenFormerError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}): "
                               f"expected an MNIST-style *-ubyte file")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise TokenFormerError(f"{path} holds {len(data)} bytes, too few for its {ndim} dimensions: {fix}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise TokenFormerError(f"{path} holds {len(data)} bytes but its header {shape} needs {expected}: "
                               f"the file is truncated or damaged")
    array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzipped when the name ends in .gz)."""
    codes = {v.newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise TokenFormerError(f"IDX cannot hold dtype {array.dtype}: use uint8, int8, int16, int32, float32 or float64")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[codes[native]]).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def load_mnist(directory: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST / Fashion-MNIST `split` ("train" or "test") from `directory` as uint8 images
    (N, 1, 28, 28) and int64 labels (N,). File names as published (`train-images-idx3-ubyte[.gz]`)."""
    directory = Path(directory)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise TokenFormerError(f"unknown split {split!r}: use 'train' or 'test'")

    def find(kind: str) -> Path:
        # Published names: train-images-idx3-ubyte.gz; some mirrors unpack or use a dot.
        candidates = [f"{prefix}-{kind}-ubyte{gz}" for gz in (".gz", "")]
        candidates += [f"{prefix}-{kind.replace('-', '.')}-ubyte{gz}" for gz in (".gz", "")]
        for name in candidates:
            if (directory / name).is_file():
                return directory / name
        raise FileNotFoundError(f"{directory} has no {candidates[0]} (or unpacked): is it an MNIST-style folder?")

    images, labels = read_idx(find("images-idx3")), read_idx(find("labels-idx1"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise TokenFormerError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return (torch.from_numpy(images.copy()).unsqueeze(1),       # (N, 1, H, W) uint8
            torch.from_numpy(labels.astype(np.int64)))           # (N,)


# ---- ImageFolder -------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise TokenFormerError("reading image files needs Pillow: pip install 'tokenformer[vision]'") from None
    return Image


class ImageFolder:
    """`root/CLASS/IMAGE` (the ImageNet layout): classes are the sub-folders sorted by name.

    `dataset[i]` is `(image, label)` with image a uint8 tensor (C, H, W) at the file's own size,
    converted to RGB (3 channels) or grey (`channels=1`).
    """

    def __init__(self, root: str | Path, channels: int = 3) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.channels = channels
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (path, i) for i, c in enumerate(self.classes)
            for path in sorted((self.root / c).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise TokenFormerError(f"{self.root} holds no images in class sub-folders "
                                   f"(expected root/CLASS/IMAGE with {', '.join(IMAGE_EXTENSIONS)})")

    @property
    def channels(self) -> int:
        """The channel count images are read in: 1 (grey) or 3 (RGB); settable."""
        return self._channels

    @channels.setter
    def channels(self, channels: int) -> None:
        if channels not in (1, 3):
            raise TokenFormerError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self._channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, self.channels), label


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """An image file as uint8 (C, H, W)."""
    Image = _pillow()
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what Pillow raises on bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenFormerError(f"image {path} cannot be read ({reason}): replace it or remove it from the folder") \
            from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


# ---- transforms on batches (B, C, H, W) ---------------------------------------------------------

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32 unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, for float images (B, C, H, W)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    out = images.clone()
    out[flip] = images[flip].flip(-1)
    return out


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `padding` and cut a random crop of the original size from each image."""
    if padding <= 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4)                                    # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None, :])[:, None, :, None]        # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W)[None, :])[:, None, None, :]        # (B, 1, 1, W)
    batch = torch.arange(B)[:, None, None, None]
    channel = torch.arange(C)[None, :, None, None]
    return padded[batch, channel, rows, cols]                                 # (B, C, H, W)


def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The Inception crop: per image a box of random area share `scale` and aspect `ratio`
    (log-uniform), resized bilinearly to `size` x `size`. Float images (B, C, H, W)."""
    B, C, H, W = images.shape
    area = torch.empty(B).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    # Box width/height as shares of the image's; clamped so the box fits (instead of retrying).
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, generator=generator) * (1 - w) + w / 2) * 2 - 1     # centre in [-1, 1]
    cy = (torch.rand(B, generator=generator) * (1 - h) + h / 2) * 2 - 1
    theta = torch.zeros(B, 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(images.device), (B, C, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(images: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Evaluation transform: resize the shorter side to `size / crop_fraction`, cut the centre
    `size` x `size`. Float images (B, C, H, W)."""
    B, C, H, W = images.shape
    short = round(size / crop_fraction)
    new_h, new_w = (short, max(short, round(W * short / H))) if H <= W else (max(short, round(H * short / W)), short)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, :, top:top + size, left:left + size]


Transform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def make_transform(train: bool, augment: str = "none", mean: Sequence[float] = (0.5,),
                   std: Sequence[float] = (0.5,), image_size: int | None = None,
                   crop_padding: int = 2) -> Transform:
    """A batch transform uint8/float (B, C, H, W) -> normalised float (B, C, size, size).

    `augment` (training only): `none`; `flip` (horizontal flip only); `crop-flip` (random crop
    with `crop_padding` + flip, for small images); `crop` (random crop only: for digits, whose mirror images are not digits);
    `inception` (random resized crop to `image_size` + flip, for ImageNet). Evaluation resizes and
    centre-crops to `image_size` when the images have another size.
    """
    if augment not in AUGMENTATIONS:
        raise TokenFormerError(f"unknown augment {augment!r}: use one of {', '.join(AUGMENTATIONS)}")

    def transform(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_float(images)
        if train and augment == "inception":
            x = random_flip(random_resized_crop(x, image_size or x.shape[-1], generator=generator), generator)
        else:
            if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
                x = resize_center_crop(x, image_size)
            if train and augment in ("crop", "crop-flip"):
                x = random_crop(x, crop_padding, generator)
            if train and augment in ("flip", "crop-flip"):
                x = random_flip(x, generator)
        return normalize(x, mean, std)

    return transform


AUGMENTATIONS = ("none", "flip", "crop", "crop-flip", "inception")


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                  drop_last: bool, shard: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
    """The item indices of each mini-batch of one pass over `n` items (shuffled with `generator`).

    `shard=(rank, world_size)`: this rank's contiguous slice of every global batch of `batch_size`.
    With the same generator seed on every rank the slices are disjoint and together make the
    global batch, so a data-parallel step sees the images one process would.
    """
    rank, world_size = shard
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        mine = order[start:start + batch_size].tensor_split(world_size)[rank]
        if len(mine):  # a short last batch may leave a rank nothing (evaluation only: training drops it)
            yield mine


def take(split, index: torch.Tensor, transform: Transform | None = None,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels at `index` of an in-memory `(images, labels)` pair or an ImageFolder,
    transformed as one batch (an ImageFolder's images one by one: their sizes differ)."""
    if isinstance(split, ImageFolder):
        items = [split[int(i)] for i in index]
        if transform is None:
            raise TokenFormerError("images of an ImageFolder need a transform to one size before batching")
        x = torch.cat([transform(image[None], generator) for image, _ in items])  # (B, C, size, size)
        return x, torch.tensor([label for _, label in items])
    images, labels = split
    x = images[index]
    return (transform(x, generator) if transform is not None else to_float(x)), labels[index]


def batches_of(split, batch_size: int, transform: Transform | None = None, shuffle: bool = False,
               generator: torch.Generator | None = None, drop_last: bool = False,
               shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of one pass over a split (see `take`), in the order and shards of
    `batch_indices`; `generator` draws the order, then the augmentation."""
    n = len(split) if isinstance(split, ImageFolder) else len(split[1])
    for index in batch_indices(n, batch_size, shuffle, generator, drop_last, shard):
        yield take(split, index, transform, generator)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform: Transform | None = None,
            **options) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`batches_of` an in-memory dataset."""
    return batches_of((images, labels), batch_size, transform, **options)
