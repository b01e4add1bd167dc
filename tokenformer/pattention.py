"""Pattention: a linear map `d_in -> d_out` replaced by attention over learnable parameter tokens.

    s = x @ K.T          (..., n)      scale 1.0, as in the official code
    w = theta(s)         normalised over the n parameter tokens
    y = w @ V            (..., d_out)

`theta` is one of the three official normalisations below. `scale_num` stands for `n` inside
them; it is normally the token count, and is pinned to the old count when a model is grown so
that the grown model computes the same function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenformer.errors import TokenFormerError


def _l2_normalise(s: torch.Tensor, scale: float) -> torch.Tensor:
    """`s / ||s||_2 * scale` over the last dim; an all-zero row stays zero instead of NaN."""
    norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)  # (..., 1)
    # Replacing a zero norm by 1 changes nothing else (s is 0 there) and keeps gradients finite.
    norm = norm.masked_fill(norm == 0, 1.0)
    return s * (scale / norm)


def normalise(scores: torch.Tensor, norm_activation_type: str, scale_num: int) -> torch.Tensor:
    """The official Pattention normalisations, applied over the last dim of `scores`."""
    if norm_activation_type == "l2_norm_gelu":
        return F.gelu(_l2_normalise(scores, math.sqrt(scale_num)))
    if norm_activation_type == "gelu_l2_norm":
        return _l2_normalise(F.gelu(scores), math.sqrt(scale_num))
    if norm_activation_type == "softmax":
        # `* n` keeps the output variance up; softmax itself subtracts the row max (stable).
        return torch.softmax(scores, dim=-1) * scale_num
    raise TokenFormerError(f"unknown norm_activation_type {norm_activation_type!r}")


class Pattention(nn.Module):
    """Token-parameter attention with `num_tokens` key/value parameter tokens (no bias).

    Parameter names match the official checkpoints: `key_param_tokens` (n, d_in) and
    `value_param_tokens` (n, d_out).
    """

    def __init__(self, in_features: int, out_features: int, num_tokens: int,
                 norm_activation_type: str = "l2_norm_gelu", scale_num: int | None = None,
                 key_std: float = 0.02, value_std: float = 0.02,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.norm_activation_type = norm_activation_type
        self.scale_num = scale_num
        self.key_std = key_std
        self.value_std = value_std
        factory = dict(device=device, dtype=dtype)
        self.key_param_tokens = nn.Parameter(torch.empty(num_tokens, in_features, **factory))
        self.value_param_tokens = nn.Parameter(torch.empty(num_tokens, out_features, **factory))
        if self.key_param_tokens.device.type != "meta":
            self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.key_param_tokens.shape[0]

    @property
    def effective_scale_num(self) -> int:
        """The `n` used by the normalisation: the pinned value if any, else the token count."""
        return self.num_tokens if self.scale_num is None else self.scale_num

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param_tokens, mean=0.0, std=self.key_std)
        nn.init.normal_(self.value_param_tokens, mean=0.0, std=self.value_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.key_param_tokens.T  # (..., n)
        weights = normalise(scores, self.norm_activation_type, self.effective_scale_num)
        return weights @ self.value_param_tokens  # (..., d_out)

    def extra_repr(self) -> str:
        scale = "" if self.scale_num is None else f", scale_num={self.scale_num}"
        return (f"{self.in_features} -> {self.out_features}, num_tokens={self.num_tokens}, "
                f"{self.norm_activation_type}{scale}")
