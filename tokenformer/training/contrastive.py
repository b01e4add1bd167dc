"""The contrastive loss of CLIP training over the global batch, under torchrun too, and the clamp
of the learned logit scale (open_clip's recipe).

    logits = scale * I @ T.T                       I, T: (N, E) normalised features of the global batch
    loss   = (CE(logits, arange N) + CE(logits.T, arange N)) / 2

Under torchrun each rank holds B = N / world_size pairs. Every rank gathers the others' features
(no gradient flows back through them) and puts its own, grad-carrying ones in its slice, so that
it computes the value of the global loss, and its backward reaches its own features. DDP then
averages the ranks' gradients; `clip_loss` scales each rank's feature gradients so that this
average is the single-process gradient of the global batch exactly (see `scale_gradient`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenformer.training.distributed import DistEnv


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` with the same value (bit for bit: `x - x.detach()` is exactly 0) whose gradient is
    multiplied by `factor` on the way back."""
    return x.detach() + (x - x.detach()) * factor


def gather_rows(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The rows of every rank, in rank order: (sum of the ranks' rows, ...). Ranks may hold different
    numbers of rows (evaluation shards): they are padded to the longest for the collective. No
    gradient flows through the result."""
    if not env.distributed:
        return local.detach()
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(count) for _ in range(env.world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = local.detach().new_zeros((longest,) + tuple(local.shape[1:]))  # (longest, ...)
    padded[:local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:int(c.item())] for part, c in zip(parts, counts)])


def gather_with_local_grad(local: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's features (world_size * B, E) in rank order, the others' detached and this rank's
    slice the grad-carrying `local` (B, E) itself: the loss of the global batch, differentiable in
    this rank's features."""
    if not env.distributed:
        return local
    parts = list(gather_rows(local, env).split(local.shape[0]))  # world_size x (B, E)
    parts[env.rank] = local
    return torch.cat(parts)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE of N pairs (row i of each belongs together), in float32."""
    logits = logit_scale.float() * image_features.float() @ text_features.float().T  # (N, N) image -> text
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              env: DistEnv | None = None) -> torch.Tensor:
    """The contrastive loss of the global batch: this rank's normalised features (B, E) and the
    exponentiated scale (`CLIPTokenFormer.forward`'s outputs); its value is the same on every rank.

    Why the gradient scaling: this rank's loss reaches only its own B rows of features, so its
    feature gradients are its share of the global ones and DDP's mean over ranks would give
    1/world_size of the single-process gradient; multiplied by world_size here, the mean is the sum
    of the shares, i.e. exactly the global gradient. The logit scale is not scaled: every rank
    already sees all N x N logits depend on it, so each rank's gradient of it is the whole one and
    their mean is too (scaling the loss instead would make it world_size times too large).
    """
    env = env or DistEnv()
    if env.distributed:
        image_features = scale_gradient(image_features, env.world_size)
        text_features = scale_gradient(text_features, env.world_size)
    return contrastive_loss(gather_with_local_grad(image_features, env), gather_with_local_grad(text_features, env),
                            logit_scale)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep `model.logit_scale` (log space) in [0, log(config.max_logit_scale)], in place: open_clip
    clamps it after every optimizer step, so that the temperature cannot fall below 1/100."""
    model.logit_scale.clamp_(0.0, math.log(model.config.max_logit_scale))
