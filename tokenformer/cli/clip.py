"""`tokenformer evaluate-clip`: retrieval recall and zero-shot accuracy of a trained CLIP checkpoint,
as JSON (`tokenformer train-clip` is one of the training commands, `tokenformer.cli.train`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tokenformer.checkpoint import load_model, resolve_checkpoint
from tokenformer.console import rounded
from tokenformer.data import images
from tokenformer.data.image_text import open_image_text, take_image_text
from tokenformer.data.prompts import FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
from tokenformer.data.tokenizer import load_tokenizer
from tokenformer.errors import TokenFormerError
from tokenformer.evaluation.retrieval import (encode_dataset, encode_images, retrieval_recall, zero_shot_accuracy,
                                               zero_shot_classifier)
from tokenformer.files import TOKENIZER_FILE
from tokenformer.options import number
from tokenformer.threads import add_threads_option, use_threads
from tokenformer.training.distributed import resolve_device

TEMPLATES = {"train": TRAIN_TEMPLATES, "held-out": HELD_OUT_TEMPLATES}


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a CLIP checkpoint: a train-clip run's `save` folder (its model/), or a model directory")
    parser.add_argument("--data", required=True,
                        help="image-text samples (.tar shards, a folder of them, a captions.csv folder) for "
                             "recall@1/5/10; with --zero-shot fashion-mnist, a Fashion-MNIST IDX folder")
    parser.add_argument("--zero-shot", choices=["fashion-mnist"], default=None,
                        help="classify the test images of --data among the Fashion-MNIST classes instead")
    parser.add_argument("--templates", choices=sorted(TEMPLATES), default="held-out",
                        help="prompt templates of the zero-shot classes (default: held-out, unseen in training)")
    parser.add_argument("--mean", type=number(float, minimum=-100, maximum=100), nargs="+", default=None,
                        help="override the image normalisation mean (default: the one the model was trained with, "
                        "saved in its config)")
    parser.add_argument("--std", type=number(float, above=0), nargs="+", default=None,
                        help="override the image normalisation std (default: the model's own)")
    parser.add_argument("--batch-size", type=number(int, minimum=1), default=250, help="pairs per forward pass (default 250)")
    parser.add_argument("--max-samples", type=number(int, minimum=1), default=None, help="evaluate the first N samples only")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    add_threads_option(parser)


def evaluate_main(args: argparse.Namespace) -> None:
    """Evaluate a CLIP checkpoint and print its metrics as JSON.

    On image-text samples: image->text and text->image recall@1/5/10 (one caption per image). With
    `--zero-shot fashion-mnist`: top-1/top-5 accuracy on the test images of a Fashion-MNIST IDX
    folder, each class the mean embedding of its prompts (`--templates`). Images are normalised as in
    training (the mean and std saved in the model's config; `--mean` / `--std` override them)."""
    if args.batch_size <= 0 or (args.max_samples is not None and args.max_samples <= 0):
        raise TokenFormerError("--batch-size and --max-samples must be positive")
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    if not (args.checkpoint / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{args.checkpoint} has no {TOKENIZER_FILE}: give the model/ directory of a "
                                f"train-clip run (it is saved with its tokenizer)")
    model = load_model(args.checkpoint, device=resolve_device(args.device))
    use_threads(args.num_threads, model.num_parameters())
    if not hasattr(model, "encode_text"):
        raise TokenFormerError(f"{args.checkpoint} holds a {model.model_type!r} model, not a CLIP: give a "
                               f"train-clip model directory")
    tokenizer = load_tokenizer(args.checkpoint / TOKENIZER_FILE)
    vision = model.config.vision
    if args.mean is not None or args.std is not None:
        vision = dataclasses.replace(vision, image_mean=args.mean or vision.image_mean,
                                     image_std=args.std or vision.image_std)
    mean, std = vision.normalisation()
    transform = images.make_transform(False, "none", mean, std, vision.image_size)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "data": args.data}
    if args.zero_shot:
        x, labels = images.load_mnist(args.data, "test")
        x, labels = x[:args.max_samples], labels[:args.max_samples]
        image_features = encode_images(model.eval(), (transform(chunk) for chunk in x.split(args.batch_size)))
        classifier = zero_shot_classifier(model, tokenizer, list(FASHION_MNIST_CLASSES), TEMPLATES[args.templates])
        result.update(samples=len(labels), templates=args.templates,
                      **zero_shot_accuracy(image_features, labels, classifier))
    else:
        samples = open_image_text(args.data, channels=vision.num_channels)
        index = torch.arange(min(len(samples), args.max_samples or len(samples)))
        batches = (take_image_text(samples, chunk, transform) for chunk in index.split(args.batch_size))
        result.update(samples=len(index), **retrieval_recall(*encode_dataset(model, tokenizer, batches)))
    print(json.dumps(rounded(result), indent=2))
