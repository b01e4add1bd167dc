"""`tokenformer make-scenes`: draw the scenes image-caption dataset (`tokenformer.data.scenes`)."""

from __future__ import annotations

import argparse
import time

from tokenformer.data.scenes import MAX_OBJECTS, MIN_IMAGE_SIZE, write_scene_dataset
from tokenformer.options import MAX_SEED, number


MAX_SCENES = 10**8  # a 32x32 set of that many takes about 100 GB and days to draw


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (OUT/train, OUT/val, OUT/scenes.json)")
    parser.add_argument("--train", type=number(int, minimum=1, maximum=MAX_SCENES), default=20000, help="number of training scenes")
    parser.add_argument("--val", type=number(int, minimum=0, maximum=MAX_SCENES), default=1000, help="number of validation scenes")
    parser.add_argument("--seed", type=number(int, minimum=0, maximum=MAX_SEED), default=0,
                        help="seed: the same seed draws the same scenes")
    parser.add_argument("--image-size", type=number(int, minimum=MIN_IMAGE_SIZE), default=32,
                        help=f"image height and width in pixels (at least {MIN_IMAGE_SIZE})")
    parser.add_argument("--max-objects", type=number(int, minimum=1, maximum=MAX_OBJECTS), default=3,
                        help=f"objects per scene are 1 to this many (at most {MAX_OBJECTS})")
    parser.add_argument("--shard-size", type=number(int, minimum=1), default=1000, help="scenes per tar shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def main(args: argparse.Namespace) -> None:
    """Draw a dataset of simple scenes with compositional captions, as WebDataset shards.

    `tokenformer make-scenes --out data/scenes --train 20000 --val 1000` draws 32x32 RGB images of
    1-3 coloured shapes in the four quadrants, captioned e.g. "two red circles in the top left and
    a blue square in the bottom right", and writes OUT/train/shard-*.tar and OUT/val/shard-*.tar
    (KEY.png, KEY.txt caption, KEY.json attributes) and OUT/scenes.json. Val scenes avoid the
    object sets of train scenes. Read them with tokenformer.data.image_text.open_image_text."""
    start = time.perf_counter()
    metadata = write_scene_dataset(args.out, train=args.train, val=args.val, seed=args.seed,
                                   image_size=args.image_size, shard_size=args.shard_size,
                                   max_objects=args.max_objects, progress=not args.quiet)
    if not args.quiet:
        shards = sum(len(paths) for paths in metadata["shards"].values())
        print(f"wrote {args.out}: {metadata['train']:,} train and {metadata['val']:,} val scenes of "
              f"{metadata['image_size']}x{metadata['image_size']} in {shards} shards "
              f"({metadata['val_overlap']} val object sets also in train) in {time.perf_counter() - start:.1f} s")
