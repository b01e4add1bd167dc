"""Evaluating a contrastive image-text model (`CLIPTokenFormer`, or any model with its
`encode_image` / `encode_text` interface): batched features, retrieval recall@k in both directions,
and zero-shot classification from prompt templates (open_clip's recipe: a class is the mean of its
normalised template embeddings, renormalised).

The functions take features already computed, so that a data-parallel run can compute each rank's
share and gather them first (`tokenformer.training.tasks.clip`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.data.prompts import format_prompts
from tokenformer.errors import TokenFormerError
from tokenformer.models.clip import tokenize_captions


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text features (N, E) of `texts`, `batch_size` at a time."""
    device, context = model_device(model), model.config.text.seq_length
    features = []
    for start in range(0, len(texts), batch_size):
        ids, lengths = tokenize_captions(tokenizer, texts[start:start + batch_size], context)
        features.append(F.normalize(model.encode_text(ids.to(device), lengths.to(device)).float(), dim=-1))
    if not features:
        raise TokenFormerError("no texts to encode")
    return torch.cat(features)


@torch.no_grad()
def encode_images(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Normalised image features (N, E) of image batches (B, C, H, W), already transformed as the
    model expects."""
    device = model_device(model)
    features = [F.normalize(model.encode_image(x.to(device)).float(), dim=-1) for x in batches]
    if not features:
        raise TokenFormerError("no images to encode")
    return torch.cat(features)


@torch.no_grad()
def encode_dataset(model: nn.Module, tokenizer,
                   batches: Iterable[tuple[torch.Tensor, Sequence[str]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and caption features, (N, E) each, of `(images (B, C, H, W), captions)`
    batches (already transformed as the model expects). The model is evaluated in eval mode."""
    was_training = model.training
    model.eval()
    image_features, text_features = [], []
    for x, captions in batches:
        image_features.append(encode_images(model, [x]))
        text_features.append(encode_texts(model, tokenizer, captions, batch_size=max(len(captions), 1)))
    model.train(was_training)
    if not image_features:
        raise TokenFormerError("no image-caption batches to encode")
    return torch.cat(image_features), torch.cat(text_features)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     text_image: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k of retrieval in both directions over normalised features: `image_to_text_recall@k`
    (an image's hit: one of its captions is among the k most similar texts) and
    `text_to_image_recall@k` (a caption's hit: its image is among the k most similar images).

    One caption per image (row i of each belongs together) unless `text_image` (T,) gives the index of
    each text's image, for several captions per image. k beyond the candidates counts every one."""
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if text_image is None:
        if n_images != n_texts:
            raise TokenFormerError(f"{n_images} images and {n_texts} texts: give text_image, the image of each text")
        text_image = torch.arange(n_texts)
    text_image = text_image.to(image_features.device)
    similarity = image_features.float() @ text_features.float().T                          # (I, T)
    belongs = text_image[None, :] == torch.arange(n_images, device=similarity.device)[:, None]  # (I, T)
    recall = {}
    for k in ks:
        top_texts = similarity.topk(min(k, n_texts), dim=1).indices                         # (I, k)
        recall[f"image_to_text_recall@{k}"] = belongs.gather(1, top_texts).any(1).float().mean().item()
        top_images = similarity.T.topk(min(k, n_images), dim=1).indices                     # (T, k)
        recall[f"text_to_image_recall@{k}"] = (top_images == text_image[:, None]).any(1).float().mean().item()
    return recall


@torch.no_grad()
def zero_shot_classifier(model: nn.Module, tokenizer, classnames: Sequence[str],
                         templates: Sequence[str]) -> torch.Tensor:
    """Class embeddings (C, E): each class's prompts (every template filled with its name) encoded
    and normalised, averaged, renormalised (the prompt ensemble of CLIP and open_clip)."""
    was_training = model.training
    model.eval()
    prompts = format_prompts(classnames, templates)  # C x len(templates)
    classes = [F.normalize(encode_texts(model, tokenizer, texts).mean(0), dim=-1) for texts in prompts]
    model.train(was_training)
    return torch.stack(classes)


def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (`top1`, `top5`) of classifying normalised image features (N, E) by the most
    similar class embedding of `classifier` (C, E); `labels` (N,) are class indices."""
    if len(labels) == 0:
        raise TokenFormerError("no images to classify")
    scores = image_features.float() @ classifier.float().T.to(image_features.device)  # (N, C)
    labels = labels.to(scores.device)
    return {f"top{k}": (scores.topk(min(k, scores.shape[1]), dim=1).indices == labels[:, None]).any(1)
            .float().mean().item() for k in ks}
