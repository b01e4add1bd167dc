"""The official Pattention operation sequence, written naively from the spec: for benchmarks only.

This is the yardstick that `bench.compare` measures our Pattention against: one PyTorch op per step
of the official code path for `l2_norm_gelu`, each leaving its own tensor (and its own saved
tensors for the backward): matmul, norm, divide, scale, GELU, a multiply by an all-ones bias,
dropout at p=0, matmul. It computes the same numbers as `tokenformer.Pattention` (without the
zero-norm guard).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tokenformer.models.pattention import Pattention


def official_pattention(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        scale_num: int) -> torch.Tensor:
    """`gelu(s / ||s|| * sqrt(n)) @ V` with `s = x @ K.T`, step by step as the official code runs it."""
    scores = torch.matmul(x, keys.transpose(-2, -1))  # (..., n); the score scale 1.0 is a no-op
    norm = torch.norm(scores, p=2, dim=-1, keepdim=True)  # (..., 1)
    weights = scores / norm  # (..., n)
    weights = weights * math.sqrt(scale_num)
    weights = F.gelu(weights)
    bias = torch.ones(weights.shape[-2:], dtype=weights.dtype, device=weights.device)  # (T, n)
    weights = weights * bias
    weights = F.dropout(weights, p=0.0, training=True)
    return torch.matmul(weights, values)  # (..., d_out)


def official_forward(layer: Pattention, x: torch.Tensor) -> torch.Tensor:
    return official_pattention(x, layer.key_param_tokens, layer.value_param_tokens,
                               layer.effective_scale_num)


@contextmanager
def official_pattentions():
    """Within this block every Pattention (of any model) runs the official sequence."""
    original = Pattention.forward
    Pattention.forward = official_forward
    try:
        yield
    finally:
        Pattention.forward = original
