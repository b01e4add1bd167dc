"""Text prompts for zero-shot classification with a contrastive (CLIP) TokenFormer, and captions
that turn a labelled image set into an image-text one.

Fashion-MNIST has no captions: `fashion_mnist_captions` writes one per image from a class name and
a prompt template, so the contrastive trainer can read the IDX files (`images.load_mnist`) as
image-caption pairs. Zero-shot evaluation embeds every class's prompts (`format_prompts`: classes x
templates, averaged per class as open_clip does) and picks the nearest class. The training and
held-out template lists are disjoint, so zero-shot accuracy is not measured on the exact sentences
the text tower was trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tokenformer.errors import TokenFormerError

# the official label order 0-9 (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
# Sneaker, Bag, Ankle boot), in lower-case words that read well inside a sentence
FASHION_MNIST_CLASSES = ("t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")

TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a black and white photo of a {}.",
    "a product photo of a {}.",
    "this is a {}.",
)
HELD_OUT_TEMPLATES = (
    "a low resolution photo of a {}.",
    "a blurry photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a photo of my {}.",
    "a grayscale image of a {}.",
    "a small picture of the {}.",
)


def fill(template: str, classname: str) -> str:
    """`template` with `classname` in its `{}`; "a {}" becomes "an {}" before a vowel sound's letter."""
    if template.count("{}") != 1:
        raise TokenFormerError(f"prompt template {template!r} needs exactly one {{}} for the class name")
    if classname[:1].lower() in "aeiou" and "a {}" in template:
        template = template.replace("a {}", "an {}")  # "a photo of an ankle boot."
    return template.format(classname)


def format_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """prompts[c][t]: class c in template t (what a zero-shot classifier embeds and averages per class)."""
    if not templates:
        raise TokenFormerError("no prompt templates given: pass e.g. prompts.HELD_OUT_TEMPLATES")
    return [[fill(t, name) for t in templates] for name in classnames]


def fashion_mnist_captions(labels: Sequence[int] | np.ndarray | torch.Tensor, templates: Sequence[str] = TRAIN_TEMPLATES,
                           rng: np.random.Generator | None = None,
                           classnames: Sequence[str] = FASHION_MNIST_CLASSES) -> list[str]:
    """One caption per label: its class name in a template drawn by `rng` (the first template
    without rng)."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise TokenFormerError(f"labels must lie in 0..{len(classnames) - 1} ({len(classnames)} classes), "
                               f"got {labels.min()}..{labels.max()}")
    prompts = format_prompts(classnames, templates)
    choice = rng.integers(0, len(templates), labels.size) if rng is not None else np.zeros(labels.size, np.int64)
    return [prompts[label][t] for label, t in zip(labels.tolist(), choice.tolist())]
