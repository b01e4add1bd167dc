"""Captioning images with a trained captioner: `caption_images`, what `tokenformer generate --image`
prints (`tokenformer train-captioner` is one of the training commands, `tokenformer.cli.train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tokenformer.checkpoint import checkpoint_tokenizer, load_model
from tokenformer.data import images
from tokenformer.data.tokenizer import check_vocab_fits
from tokenformer.errors import TokenFormerError
from tokenformer.generate import generate_caption
from tokenformer.models.captioner import Captioner
from tokenformer.training.distributed import resolve_device


def caption_images(checkpoint: str | Path, paths: list[Path], max_new_tokens: int | None, device: torch.device,
                   dtype: torch.dtype, tokenizer: str | None = None, **sampling) -> list[str]:
    """One caption per image file, from a captioner checkpoint directory; the images are read as the
    captioner's channels, resized and centre-cropped to its size, normalised as in training."""
    model = load_model(checkpoint, device=device, dtype=dtype)
    if not isinstance(model, Captioner):
        raise TokenFormerError(f"--image captions images with a captioner checkpoint, and {checkpoint} holds a "
                               f"{model.model_type!r} model: give a `tokenformer train-captioner` checkpoint")
    tok = checkpoint_tokenizer(checkpoint, tokenizer)
    check_vocab_fits(tok.vocab_size, model.config.text.padded_vocab_size,
                     fix="give the checkpoint's own tokenizer (--tokenizer)")
    config = model.config
    transform = images.make_transform(False, "none", config.image_mean, config.image_std, config.vision.image_size)
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
    pixels = torch.cat([transform(images.read_image(p, config.vision.num_channels)[None]) for p in paths])
    # a caption ends at its end-of-text token: the context left after the image prefix is the most it can use
    room = config.caption_room
    return generate_caption(model, tok, pixels, room if max_new_tokens is None else min(max_new_tokens, room),
                            **sampling)


def caption_main(args: argparse.Namespace) -> None:
    """`tokenformer generate` with a captioner checkpoint or `--image`: one caption a line."""
    if not args.image:
        raise TokenFormerError(f"{args.checkpoint} is an image captioner: give the images to caption with "
                               f"--image PATH (instead of --prompt / --input-file)")
    if args.prompt is not None or args.input_file is not None:
        raise TokenFormerError("--image captions images and takes no --prompt or --input-file: give one or the other")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for caption in caption_images(args.checkpoint, args.image, args.max_new_tokens, resolve_device(args.device),
                                  getattr(torch, args.dtype), args.tokenizer, **sampling):
        print(caption)
