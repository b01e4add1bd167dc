"""Zero-shot prompts (tokenformer/data/prompts.py): the Fashion-MNIST class names in label order,
disjoint template lists, and captions that name each image's class."""

import numpy as np
import pytest
import torch

from tokenformer.data.prompts import (FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES,
                                      fashion_mnist_captions, fill, format_prompts)
from tokenformer.errors import TokenFormerError

# the official labels (Zalando's fashion-mnist README), 0-9
OFFICIAL = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_class_names_follow_the_official_label_order():
    assert len(FASHION_MNIST_CLASSES) == 10
    for ours, official in zip(FASHION_MNIST_CLASSES, OFFICIAL):
        assert ours == ours.lower()
        assert ours.split()[0] == official.lower().split("/")[0].split()[0]


def test_templates_are_disjoint_and_each_take_one_class_name():
    assert 6 <= len(TRAIN_TEMPLATES) <= 8 and 6 <= len(HELD_OUT_TEMPLATES) <= 8
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES)
    assert fill("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert fill("a photo of the {}.", "ankle boot") == "a photo of the ankle boot."
    with pytest.raises(TokenFormerError, match="exactly one"):
        fill("a {} and a {}", "bag")


def test_format_prompts_is_classes_by_templates():
    prompts = format_prompts(FASHION_MNIST_CLASSES, HELD_OUT_TEMPLATES)
    assert len(prompts) == 10 and all(len(row) == len(HELD_OUT_TEMPLATES) for row in prompts)
    assert prompts[8][0] == HELD_OUT_TEMPLATES[0].format("bag")
    assert all(FASHION_MNIST_CLASSES[c] in prompts[c][t] for c in range(10) for t in range(len(HELD_OUT_TEMPLATES)))


def test_captions_name_the_label_in_a_drawn_template():
    labels = torch.tensor([0, 9, 8, 1, 1, 5] * 20)
    captions = fashion_mnist_captions(labels, TRAIN_TEMPLATES, np.random.default_rng(0))
    again = fashion_mnist_captions(labels.numpy(), TRAIN_TEMPLATES, np.random.default_rng(0))
    assert captions == again and len(captions) == len(labels)
    prompts = format_prompts(FASHION_MNIST_CLASSES, TRAIN_TEMPLATES)
    for label, caption in zip(labels.tolist(), captions):
        assert caption in prompts[label]
    assert len(set(captions)) > 12  # several templates per class are drawn
    assert fashion_mnist_captions([3], TRAIN_TEMPLATES) == ["a photo of a dress."]
    with pytest.raises(TokenFormerError, match="0..9"):
        fashion_mnist_captions([10], TRAIN_TEMPLATES)
