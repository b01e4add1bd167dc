"""Scenes: an image-caption dataset the project draws itself, with captions that can be checked.

Each image (default 32x32 RGB, drawn with numpy) shows 1-3 objects on a dark, slightly noisy
background. An object has a shape (`SHAPES`), a colour (`COLOURS`) and a position, one of the four
quadrants (`POSITIONS`). A quadrant holds up to four objects: one object alone sits in the middle
of it, several share its 2x2 sub-cells (and are drawn smaller). Objects never touch, so a count
of coloured blobs is a count of objects.

Captions list the scene's groups of identical objects (same colour, shape and quadrant) in this
grammar, which `parse_caption` reads back:

    caption  := [prefix] group {", " group} [" and " group] ["."]     (first letter maybe capitalised)
    prefix   := "a photo of " | "an image of " | "a picture of " | "a drawing of " | "this image shows " |
                "there is " | "there are "   (are: when the first group has several objects)
    group    := count " " colour " " shape["s" | "es"] " " ("in the " | "at the ") position [" corner"]
    count    := "a" | "an" | "one" | "two" | "three" | "four"

e.g. "two red circles in the top left and a blue square in the bottom right", "A photo of a
yellow triangle at the top right corner." `describe(scene)` gives the canonical phrasing (groups
in the order of `POSITIONS`, then colour, then shape; no prefix, "a", "in the", no period); with
an rng it draws a phrasing and shuffles the groups.

`write_scene_dataset` writes train and val splits as WebDataset shards (`tar_shards.write_shards`,
each sample's `Scene.attributes()` as KEY.json); val scenes avoid the object sets of train scenes
(the count that could not is in scenes.json).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tokenformer.console import progress_bar
from tokenformer.data.tar_shards import write_shards
from tokenformer.errors import TokenFormerError
from tokenformer.files import atomic_write_text
from tokenformer.inputs import require_memory
from tokenformer.outputs import owner_of

SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 235),
           "yellow": (235, 215, 40), "purple": (170, 60, 210), "white": (235, 235, 235)}
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}  # (row, col)
SLOTS_PER_POSITION = 4  # the 2x2 sub-cells of a quadrant
MAX_OBJECTS = SLOTS_PER_POSITION * len(POSITIONS)  # a scene holds at most four per quadrant
MIN_IMAGE_SIZE = 16  # pixels: below it a sub-cell's shape is no longer recognisable
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# "there is " becomes "there are " before a first group of several
PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "there is ", "this image shows ")
PARSED_PREFIXES = PREFIXES + ("there are ",)
# object size as a share of its cell, and the background (dark) and noise of a drawn scene
RADIUS_SHARE, CANONICAL_RADIUS_SHARE = (0.30, 0.375), 0.34
BACKGROUND_MAX, NOISE_STD, DIMMING = 36, 3.0, (0.85, 1.0)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str


Group = tuple[int, str, str, str]  # (count, colour, shape, position)


@dataclass
class Scene:
    objects: list[SceneObject]

    def groups(self) -> list[Group]:
        """(count, colour, shape, position) of each group of identical objects, in canonical order."""
        counts = Counter((o.colour, o.shape, o.position) for o in self.objects)
        return sorted(((n, c, s, p) for (c, s, p), n in counts.items()), key=_group_order)

    def attributes(self) -> dict:
        """JSON-able: the objects, the groups (what `parse_caption` of a caption gives) and the
        count of each "colour shape" over the whole image."""
        counts = Counter(f"{o.colour} {o.shape}" for o in self.objects)
        return {"objects": [{"shape": o.shape, "colour": o.colour, "position": o.position} for o in self.objects],
                "groups": [list(g) for g in self.groups()],
                "counts": dict(sorted(counts.items()))}


def _group_order(group: Group) -> tuple[int, int, int]:
    _, colour, shape, position = group
    return list(POSITIONS).index(position), list(COLOURS).index(colour), SHAPES.index(shape)


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
    """1 to `max_objects` objects (at most 16: four per quadrant) in random groups of identical ones."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise TokenFormerError(f"max_objects must be between 1 and {MAX_OBJECTS} (four per quadrant), got {max_objects}")
    remaining = int(rng.integers(1, max_objects + 1))
    free = dict.fromkeys(POSITIONS, SLOTS_PER_POSITION)
    objects: list[SceneObject] = []
    while remaining:
        open_positions = [p for p, n in free.items() if n]
        position = open_positions[int(rng.integers(len(open_positions)))]
        count = int(rng.integers(1, min(remaining, free[position]) + 1))
        colour, shape = list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        objects += [SceneObject(shape, colour, position)] * count
        free[position] -= count
        remaining -= count
    return Scene(objects)


# ---- drawing -------------------------------------------------------------------------------------

def layout(scene: Scene, image_size: int = 32,
           rng: np.random.Generator | None = None) -> list[tuple[SceneObject, float, float, float]]:
    """(object, centre row, centre column, radius) in pixels: alone in its quadrant an object is
    centred in it, else each takes a sub-cell (in order without rng, at random with one). Sizes
    and a jitter vary with rng, always leaving a pixel of background between objects."""
    cell = image_size / 2
    placed = []
    for position in POSITIONS:
        objects = [o for o in scene.objects if o.position == position]
        if len(objects) > SLOTS_PER_POSITION:
            raise TokenFormerError(f"the {position} quadrant holds {len(objects)} objects, more than "
                                   f"{SLOTS_PER_POSITION}: spread them over the quadrants")
        row, col = POSITIONS[position]
        if len(objects) == 1:
            slots, size = [(row * cell + cell / 2, col * cell + cell / 2)], cell
        else:
            size = cell / 2
            order = rng.permutation(SLOTS_PER_POSITION).tolist() if rng is not None else range(SLOTS_PER_POSITION)
            slots = [(row * cell + (k // 2 + 0.5) * size, col * cell + (k % 2 + 0.5) * size) for k in order]
        for obj, (cy, cx) in zip(objects, slots):
            if rng is None:
                placed.append((obj, cy, cx, CANONICAL_RADIUS_SHARE * size))
                continue
            share, dy, dx = rng.random(3).tolist()
            radius = (RADIUS_SHARE[0] + share * (RADIUS_SHARE[1] - RADIUS_SHARE[0])) * size
            # every shape stays within `radius` of its centre along each axis: 1 px from the cell's edge
            room = max(0.0, size / 2 - radius - 1.0)
            placed.append((obj, cy + (2 * dy - 1) * room, cx + (2 * dx - 1) * room, radius))
    return placed


def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """The pixels (offsets `dy`, `dx` of their centres from the object's centre) a shape covers;
    each shape lies within `radius` of its centre along both axes."""
    r2 = dy ** 2 + dx ** 2
    if shape == "circle":
        return r2 <= radius ** 2
    if shape == "ring":
        return (r2 <= radius ** 2) & (r2 >= (0.55 * radius) ** 2)
    if shape == "square":
        return (abs(dy) <= 0.8 * radius) & (abs(dx) <= 0.8 * radius)
    if shape == "cross":
        arm = max(0.6, 0.3 * radius)
        return (((abs(dx) <= arm) & (abs(dy) <= radius)) | ((abs(dy) <= arm) & (abs(dx) <= radius)))
    if shape == "triangle":  # pointing up: apex at -radius, base at +0.8 radius, 1.8 radius wide
        return (dy <= 0.8 * radius) & (abs(dx) <= 0.9 * radius * (dy + radius) / (1.8 * radius))
    raise TokenFormerError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")


def draw(scene: Scene, image_size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as uint8 (H, W, 3). Without rng: black background, exact colours, canonical
    layout; with one: a dark random background with noise, dimmed colours, varied layout."""
    if image_size < MIN_IMAGE_SIZE:
        raise TokenFormerError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    for obj in scene.objects:
        if obj.colour not in COLOURS or obj.position not in POSITIONS:
            raise TokenFormerError(f"unknown colour {obj.colour!r} or position {obj.position!r}: use "
                                   f"{', '.join(COLOURS)} and {', '.join(POSITIONS)}")
    image = np.zeros((image_size, image_size, 3), np.float64)
    if rng is not None:
        image += rng.integers(0, BACKGROUND_MAX, 3)
    for obj, cy, cx, radius in layout(scene, image_size, rng):
        # only the pixels of the object's bounding box (the shape lies within `radius` on each axis)
        top, left = max(0, int(cy - radius) - 1), max(0, int(cx - radius) - 1)
        bottom, right = min(image_size, int(cy + radius) + 2), min(image_size, int(cx + radius) + 2)
        dy = np.arange(top, bottom)[:, None] + 0.5 - cy   # pixel centres relative to the object's
        dx = np.arange(left, right)[None, :] + 0.5 - cx
        mask = shape_mask(obj.shape, dy, dx, radius)       # (h, w) of the box
        dimming = DIMMING[0] + float(rng.random()) * (DIMMING[1] - DIMMING[0]) if rng is not None else 1.0
        image[top:bottom, left:right][mask] = np.asarray(COLOURS[obj.colour], np.float64) * dimming
    if rng is not None:
        image += rng.normal(0.0, NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---- captions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phrasing:
    """How a caption is worded (see the module's grammar)."""

    prefix: str = ""
    single: str = "a"             # the count word of one object: "a" (or "an") / "one"
    preposition: str = "in"       # "in the top left" / "at the top left"
    corner: bool = False          # "... top left corner"
    commas: bool = True           # "A, B and C" / "A and B and C"
    capitalise: bool = False
    period: bool = False


@functools.cache
def phrasings() -> tuple[Phrasing, ...]:
    """Every phrasing `describe` can draw."""
    return tuple(Phrasing(*choice) for choice in itertools.product(
        PREFIXES, ("a", "one"), ("in", "at"), (False, True), (True, False), (False, True), (False, True)))


def random_phrasing(rng: np.random.Generator) -> Phrasing:
    options = phrasings()
    return options[int(rng.integers(len(options)))]


def describe(scene: Scene, rng: np.random.Generator | None = None, phrasing: Phrasing | None = None) -> str:
    """A caption of the scene: canonical without rng; with rng a random phrasing (unless one is
    given) and the groups in random order."""
    groups = scene.groups()
    if not groups:
        raise TokenFormerError("a scene without objects has no caption: give it at least one object")
    if rng is not None:
        phrasing = phrasing or random_phrasing(rng)
        groups = [groups[i] for i in rng.permutation(len(groups))]
    phrasing = phrasing or Phrasing()
    parts = []
    for count, colour, shape, position in groups:
        word = COUNT_WORDS[count] if count > 1 or phrasing.single == "one" else (
            "an" if colour[0] in "aeiou" else "a")
        place = f"{phrasing.preposition} the {position}{' corner' if phrasing.corner else ''}"
        parts.append(f"{word} {colour} {shape if count == 1 else PLURALS[shape]} {place}")
    body = " and ".join(parts) if not phrasing.commas or len(parts) < 2 else ", ".join(parts[:-1]) + " and " + parts[-1]
    prefix = "there are " if phrasing.prefix == "there is " and groups[0][0] > 1 else phrasing.prefix
    text = prefix + body + ("." if phrasing.period else "")
    return text[0].upper() + text[1:] if phrasing.capitalise else text


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


GROUP_PATTERN = re.compile(
    rf"(?P<count>a|an|{_alternatives(COUNT_WORDS.values())}) (?P<colour>{_alternatives(COLOURS)}) "
    rf"(?P<shape>{_alternatives(list(PLURALS.values()) + list(SHAPES))}) (?:in|at) the "
    rf"(?P<position>{_alternatives(POSITIONS)})(?: corner)?")
SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def parse_caption(text: str) -> list[Group]:
    """(count, colour, shape, position) of each group a caption names, in its order: the inverse
    of `describe`. Parts that do not follow the grammar (a model's mistakes) are skipped."""
    text = " ".join(text.lower().split()).rstrip(".").strip()
    for prefix in sorted(PARSED_PREFIXES, key=len, reverse=True):
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
            break
    words = {w: n for n, w in COUNT_WORDS.items()} | {"a": 1, "an": 1}
    singular = {p: s for s, p in PLURALS.items()} | {s: s for s in SHAPES}
    groups = []
    for part in SEPARATOR.split(text):
        match = GROUP_PATTERN.fullmatch(part.strip())
        if match:
            groups.append((words[match["count"]], match["colour"], singular[match["shape"]], match["position"]))
    return groups


# ---- datasets ------------------------------------------------------------------------------------

def scene_sample(rng: np.random.Generator, image_size: int = 32,
                 max_objects: int = 3) -> tuple[Scene, np.ndarray, str]:
    """A random scene, its image and a caption, all drawn from `rng`."""
    scene = random_scene(rng, max_objects)
    return scene, draw(scene, image_size, rng), describe(scene, rng)


def generate(count: int, seed: int, image_size: int = 32,
             max_objects: int = 3) -> Iterator[tuple[str, np.ndarray, str, dict]]:
    """`(key, image uint8 (H, W, 3), caption, attributes)` of `count` scenes; scene i depends on
    (seed, i) alone, so a shorter run is a prefix of a longer one."""
    for i in range(count):
        scene, image, caption = scene_sample(np.random.default_rng([seed, i]), image_size, max_objects)
        yield f"{i:08d}", image, caption, scene.attributes()


def signature(attributes: dict) -> tuple:
    """A scene's object set (its groups), comparable across scenes."""
    return tuple(tuple(g) for g in attributes["groups"])


VAL_STREAM, VAL_ATTEMPTS = 1 << 20, 50  # the val rng stream's tag; draws per val scene to avoid train's


def write_scene_dataset(out: str | Path, train: int = 20000, val: int = 1000, seed: int = 0, image_size: int = 32,
                        shard_size: int = 1000, max_objects: int = 3, progress: bool = False) -> dict:
    """Write `out/train/shard-*.tar`, `out/val/shard-*.tar` and `out/scenes.json` (returned).

    Train is `generate(train, seed, ...)`. Each val scene is redrawn (up to 50 times) until its
    object set is not one of train's; scenes.json counts those that still are (`val_overlap`) and
    the objects per scene of each split, since avoiding train's sets favours larger scenes."""
    if train < 1 or val < 0:
        raise TokenFormerError(f"need at least one train scene and no negative val count, got train={train} val={val}")
    # a scene is drawn in float64 with a noise image beside it: 48 bytes a pixel, and some room
    require_memory(64 * image_size ** 2, f"drawing a {image_size}x{image_size} scene")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TokenFormerError(f"output {out} is a file, not a directory: give a new or existing directory")
    bar = progress_bar(train + val, desc="scenes", unit="scene", enabled=progress)
    seen: set[tuple] = set()
    sizes = {"train": Counter(), "val": Counter()}
    overlap = 0

    def train_samples():
        for key, image, caption, attributes in generate(train, seed, image_size, max_objects):
            seen.add(signature(attributes))
            sizes["train"][len(attributes["objects"])] += 1
            bar.update(1)
            yield key, image, caption, attributes

    def val_samples():
        nonlocal overlap
        for i in range(val):
            for attempt in range(VAL_ATTEMPTS):
                rng = np.random.default_rng([seed, VAL_STREAM, i, attempt])
                scene = random_scene(rng, max_objects)
                if signature(scene.attributes()) not in seen:
                    break
            else:
                overlap += 1
            sizes["val"][len(scene.objects)] += 1
            bar.update(1)
            yield f"{i:08d}", draw(scene, image_size, rng), describe(scene, rng), scene.attributes()

    with bar:
        files = {"train": write_shards(train_samples(), out / "train", shard_size),
                 "val": write_shards(val_samples(), out / "val", shard_size)}
    for split, written in files.items():  # shards of an earlier, larger dataset in the same folder
        for stale in set((out / split).glob("shard-*.tar")) - set(written) if owner_of(out) == "make-scenes" else ():
            stale.unlink()  # only in a folder marked as make-scenes' output: never a user's own shards
    metadata = {
        "format": "webdataset shards: KEY.png, KEY.txt (caption), KEY.json (Scene.attributes())",
        "train": train, "val": val, "seed": seed, "image_size": image_size, "max_objects": max_objects,
        "shard_size": shard_size, "val_overlap": overlap,
        "objects_per_scene": {split: {str(k): v for k, v in sorted(c.items())} for split, c in sizes.items()},
        "shards": {split: [p.relative_to(out).as_posix() for p in paths] for split, paths in files.items()},
        "vocabulary": {"shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
                       "positions": list(POSITIONS), "counts": COUNT_WORDS}}
    atomic_write_text(out / "scenes.json", json.dumps(metadata, indent=2) + "\n")
    return metadata
