"""The scenes dataset (tokenformer/data/scenes.py): deterministic, drawn pixels that match the scene
(colours at hand-computed centres, one blob per object, shape areas), captions that parse back
for every phrasing, and `tokenformer make-scenes` end to end through `open_image_text`."""

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest

from tokenformer.__main__ import main
from tokenformer.data import scenes
from tokenformer.data.image_text import open_image_text
from tokenformer.data.scenes import (COLOURS, POSITIONS, SHAPES, Scene, SceneObject, describe, draw, generate,
                                     parse_caption, phrasings, random_scene)
from tokenformer.errors import TokenFormerError

pytest.importorskip("PIL.Image", reason="Pillow (vision and dev extras) encodes the shards")


def some_scenes(n: int, seed: int = 0, max_objects: int = 3) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, max_objects) for _ in range(n)]


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: sum((float(a) - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean image (a plain flood fill: the reference for blob counts)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        found.append(pixels)
    return found


def test_generation_is_deterministic_and_prefix_stable():
    first = list(generate(6, seed=3))
    again = list(generate(6, seed=3))
    longer = list(generate(9, seed=3))
    other = list(generate(6, seed=4))
    for a, b, c in zip(first, again, longer):
        assert a[0] == b[0] == c[0] and a[2] == b[2] == c[2] and a[3] == b[3] == c[3]
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[1], c[1])
    assert [s[2] for s in first] != [s[2] for s in other]
    key, image, caption, attributes = first[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert sorted(parse_caption(caption)) == sorted(tuple(g) for g in attributes["groups"])
    assert next(generate(1, seed=3, image_size=48))[1].shape == (48, 48, 3)


def test_random_scenes_respect_counts_and_capacity():
    for scene in some_scenes(300, max_objects=3):
        assert 1 <= len(scene.objects) <= 3
    many = some_scenes(200, max_objects=16)
    assert max(len(s.objects) for s in many) > 10
    for scene in many:
        per_position = Counter(o.position for o in scene.objects)
        assert max(per_position.values()) <= 4
    assert any(g[0] > 1 for s in some_scenes(100) for g in s.groups())  # counts do occur
    with pytest.raises(TokenFormerError, match="max_objects"):
        random_scene(np.random.default_rng(0), max_objects=17)


def test_attributes_are_json_and_agree_with_the_objects():
    scene = Scene([SceneObject("circle", "red", "top left")] * 2 + [SceneObject("ring", "blue", "bottom right"),
                                                                     SceneObject("circle", "red", "bottom right")])
    attributes = json.loads(json.dumps(scene.attributes()))
    assert attributes["counts"] == {"blue ring": 1, "red circle": 3}
    assert attributes["groups"] == [[2, "red", "circle", "top left"], [1, "red", "circle", "bottom right"],
                                    [1, "blue", "ring", "bottom right"]]
    assert len(attributes["objects"]) == 4 and attributes["objects"][2] == {"shape": "ring", "colour": "blue",
                                                                           "position": "bottom right"}
    assert describe(scene) == ("two red circles in the top left, a red circle in the bottom right "
                               "and a blue ring in the bottom right")


def canonical_centre(position: str, slot: int, alone: bool, size: int) -> tuple[float, float]:
    """Where the canonical layout puts an object: the quadrant's middle, or its sub-cell `slot`."""
    row, col = POSITIONS[position]
    cell = size / 2
    if alone:
        return row * cell + cell / 2, col * cell + cell / 2
    return row * cell + (slot // 2 + 0.5) * cell / 2, col * cell + (slot % 2 + 0.5) * cell / 2


@pytest.mark.parametrize("size", [32, 40])
def test_canonical_drawing_puts_each_colour_at_its_object(size):
    for scene in some_scenes(60, seed=size, max_objects=6):
        image = draw(scene, size)
        slots = Counter()
        for obj in sorted(scene.objects, key=lambda o: list(POSITIONS).index(o.position)):
            alone = sum(o.position == obj.position for o in scene.objects) == 1
            cy, cx = canonical_centre(obj.position, slots[obj.position], alone, size)
            slots[obj.position] += 1
            radius = scenes.CANONICAL_RADIUS_SHARE * (size / 2 if alone else size / 4)
            if obj.shape == "ring":  # its middle is a hole: look on the ring itself
                cx += 0.8 * radius
            assert tuple(image[int(cy), int(cx)]) == COLOURS[obj.colour], (obj, cy, cx)
        present = {tuple(rgb) for rgb in image.reshape(-1, 3).tolist()}
        assert present == {(0, 0, 0)} | {COLOURS[o.colour] for o in scene.objects}  # exact colours on black
        assert (image.max(axis=2) == 0).sum() > 0.5 * size * size


def test_shapes_cover_their_expected_areas():
    """Pixel counts of lone canonical objects against each shape's area formula."""
    size = 64
    radius = scenes.CANONICAL_RADIUS_SHARE * size / 2
    arm = max(0.6, 0.3 * radius)
    areas = {"circle": math.pi * radius ** 2, "ring": math.pi * radius ** 2 * (1 - 0.55 ** 2),
             "square": (1.6 * radius) ** 2, "triangle": 0.5 * (1.8 * radius) ** 2,
             "cross": 2 * (2 * arm) * (2 * radius) - (2 * arm) ** 2}
    for shape in SHAPES:
        image = draw(Scene([SceneObject(shape, "white", "top left")]), size)
        covered = int((image.max(axis=2) > 0).sum())
        assert abs(covered - areas[shape]) < 0.12 * areas[shape], (shape, covered, areas[shape])
    ring = draw(Scene([SceneObject("ring", "white", "top left")]), size)
    circle = draw(Scene([SceneObject("circle", "white", "top left")]), size)
    assert ring[16, 16].max() == 0 and circle[16, 16].max() > 0


def test_noisy_drawings_show_one_blob_per_object_in_its_quadrant_and_colour():
    rng = np.random.default_rng(7)
    for _ in range(80):
        scene = random_scene(rng, max_objects=8)
        image = draw(scene, 32, rng)
        blobs = components(image.max(axis=2) > 100)  # the background stays below 36 + noise
        assert len(blobs) == len(scene.objects)
        seen = Counter()
        for blob in blobs:
            ys, xs = zip(*blob)
            quadrant = next(p for p, (row, col) in POSITIONS.items()
                            if row == int(np.mean(ys) >= 16) and col == int(np.mean(xs) >= 16))
            seen[quadrant, nearest_colour(image[ys, xs].mean(axis=0))] += 1
        assert seen == Counter((o.position, o.colour) for o in scene.objects)


def test_parse_caption_inverts_every_phrasing():
    options = phrasings()
    assert len(options) == len(set(options)) > 100
    for scene in some_scenes(25, seed=1, max_objects=6):
        expected = sorted(scene.groups())
        for phrasing in options:
            assert sorted(parse_caption(describe(scene, phrasing=phrasing))) == expected, phrasing
    rng = np.random.default_rng(2)
    captions = set()
    for scene in some_scenes(300, seed=3):
        caption = describe(scene, rng)
        captions.add(caption)
        assert sorted(parse_caption(caption)) == sorted(scene.groups()), caption
    assert len(captions) > 250  # phrasings vary


def test_parse_caption_reads_hand_written_captions_and_skips_nonsense():
    assert parse_caption("There are two red circles at the top left corner, and a blue square in the bottom right.") \
        == [(2, "red", "circle", "top left"), (1, "blue", "square", "bottom right")]
    assert parse_caption("a photo of an purple cross in the top right") == [(1, "purple", "cross", "top right")]
    assert parse_caption("three green crosses in the bottom left and a banana on a table") == [
        (3, "green", "cross", "bottom left")]
    assert parse_caption("") == [] and parse_caption("red red red") == []


def shard_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.tar")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_make_scenes_end_to_end(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["make-scenes", "--out", str(out), "--train", "40", "--val", "12", "--seed", "5",
                 "--shard-size", "16", "--quiet"]) == 0
    metadata = json.loads((out / "scenes.json").read_text())
    assert metadata["train"] == 40 and metadata["val"] == 12 and metadata["image_size"] == 32
    assert [p.name for p in sorted((out / "train").glob("*.tar"))] == [f"shard-00000{i}.tar" for i in range(3)]
    train, val = open_image_text(out / "train"), open_image_text(out / "val")
    assert len(train) == 40 and len(val) == 12
    expected = list(generate(40, seed=5))
    for i in (0, 17, 39):  # train is generate(train, seed)
        key, image, caption, attributes = expected[i]
        assert train.key(i) == key and train.caption(i) == caption and train.extra(i) == attributes
        assert np.array_equal(train.image(i).permute(1, 2, 0).numpy(), image)
    train_sets = {tuple(tuple(g) for g in train.extra(i)["groups"]) for i in range(len(train))}
    val_sets = [tuple(tuple(g) for g in val.extra(i)["groups"]) for i in range(len(val))]
    assert metadata["val_overlap"] == sum(s in train_sets for s in val_sets) == 0
    for i in range(len(val)):
        assert sorted(parse_caption(val.caption(i))) == sorted(val_sets[i])
    assert sum(metadata["objects_per_scene"]["val"].values()) == 12
    # the same command again gives the same bytes (with --overwrite: without, the earlier output is
    # refused); a smaller dataset leaves no stale shards
    digest = shard_digest(out)
    capsys.readouterr()
    assert main(["make-scenes", "--out", str(out), "--train", "4", "--quiet"]) == 2
    assert "earlier output of `tokenformer make-scenes`: pass --overwrite" in capsys.readouterr().err
    assert main(["make-scenes", "--out", str(out), "--train", "40", "--val", "12", "--seed", "5",
                 "--shard-size", "16", "--quiet", "--overwrite"]) == 0
    assert shard_digest(out) == digest
    assert main(["make-scenes", "--out", str(out), "--train", "10", "--val", "2", "--quiet", "--overwrite"]) == 0
    assert len(open_image_text(out / "train")) == 10 and len(list((out / "train").glob("*.tar"))) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a usage error of argparse, the range declared with the option
        main(["make-scenes", "--out", str(out), "--train", "3", "--val", "1", "--image-size", "8"])
    assert e.value.code == 2 and "argument --image-size: must be at least 16, got 8" in capsys.readouterr().err
