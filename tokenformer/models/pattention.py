"""Pattention: a linear map `d_in -> d_out` replaced by attention over learnable parameter tokens.

    s = x @ K.T          (..., n)      scale 1.0, as in the official code
    w = theta(s)         normalised over the n parameter tokens
    y = w @ V            (..., d_out)

`theta` is one of the three official normalisations below. `scale_num` stands for `n` inside
them; it is normally the token count, and is pinned to the old count when a model is grown so
that the grown model computes the same function.

Speed and memory: `l2_norm_gelu` (every released model) runs through `L2NormGeluPattention`, a
custom autograd function that computes the same numbers as the plain formula with fewer
kernels and fewer tensors kept for the backward (see its docstring). The other two
normalisations use plain autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

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
    if norm_activation_type == "softmax" and isinstance(scores, DTensor):
        # Token-parallel (scores sharded over n): the row max and the sum as two all-reduces of one
        # number per row, where torch.softmax would gather every score. The max only stabilises.
        exp = torch.exp(scores - scores.amax(dim=-1, keepdim=True).detach())  # (..., n)
        return exp / exp.sum(dim=-1, keepdim=True) * scale_num
    if norm_activation_type == "softmax":
        # `* n` keeps the output variance up; softmax itself subtracts the row max (stable).
        return torch.softmax(scores, dim=-1) * scale_num
    raise TokenFormerError(f"unknown norm_activation_type {norm_activation_type!r}")


def _scaled_scores(x: torch.Tensor, keys: torch.Tensor, scale_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`u = s * sqrt(n) / ||s||` (..., n) with `s = x @ K.T`, and the per-row scale (..., 1)."""
    scores = x @ keys.T  # (..., n)
    norm = torch.linalg.vector_norm(scores, dim=-1, keepdim=True)  # (..., 1)
    scale = math.sqrt(scale_num) / norm.masked_fill_(norm == 0, 1.0)  # (..., 1)
    return scores.mul_(scale), scale  # in place: the raw scores are not needed again


class L2NormGeluPattention(torch.autograd.Function):
    """`gelu(s / ||s|| * sqrt(n)) @ V` with `s = x @ K.T`, forward and backward written by hand.

    Why: autograd on the plain formula keeps `s`, the norm, the scaled scores and the GELU output
    for the backward (and runs one kernel per step). Here the backward needs only
    `u = s * sqrt(n) / ||s||` and the per-row scale `c = sqrt(n) / ||s||`, because

        du/ds = c (I - u u^T / n)   =>   ds = c (du - u (u . du) / n)

    and both the GELU output `w = gelu(u)` (for dV) and `gelu'(u)` follow from `u`. The default
    mode also keeps `w` (two activation tensors of the score size); `memory_lean=True` keeps only
    `u` and recomputes `w` in the backward (one element-wise GELU: cheap next to the matmuls).
    An all-zero score row gets norm 1 (so `u = 0`), exactly like `_l2_normalise`, and then
    `ds = sqrt(n) du`, the gradient autograd gives for the guarded formula.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale_num: int,
                memory_lean: bool) -> torch.Tensor:
        u, scale = _scaled_scores(x, keys, scale_num)
        w = F.gelu(u)  # (..., n)
        ctx.scale_num = scale_num
        ctx.save_for_backward(x, keys, values, u, scale, *(() if memory_lean else (w,)))
        return w @ values  # (..., d_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, keys, values, u, scale, *kept = ctx.saved_tensors
        need_x, need_keys, need_values = ctx.needs_input_grad[:3]
        grad_x = grad_keys = grad_values = None
        if need_values:
            w = kept[0] if kept else F.gelu(u)  # (..., n)
            grad_values = w.reshape(-1, w.shape[-1]).T @ grad_out.reshape(-1, grad_out.shape[-1])
            del w
        if need_x or need_keys:
            # One score-sized buffer for the whole chain: large fresh allocations cost page faults.
            grad_u = grad_out @ values.T  # (..., n): dw
            torch.ops.aten.gelu_backward.grad_input(grad_u, u, grad_input=grad_u)  # dw * gelu'(u)
            dot = (grad_u * u).sum(dim=-1, keepdim=True).div_(ctx.scale_num)  # (..., 1)
            grad_s = grad_u.addcmul_(u, dot, value=-1.0).mul_(scale)  # (..., n)
            if need_x:
                grad_x = grad_s @ keys  # (..., d_in)
            if need_keys:
                grad_keys = grad_s.reshape(-1, grad_s.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_keys, grad_values, None, None


class Pattention(nn.Module):
    """Token-parameter attention with `num_tokens` key/value parameter tokens (no bias).

    Parameter names match the official checkpoints: `key_param_tokens` (n, d_in) and
    `value_param_tokens` (n, d_out). `memory_lean=True` keeps one score-sized tensor for the
    backward instead of two (`l2_norm_gelu` only; the numbers are the same).
    """

    def __init__(self, in_features: int, out_features: int, num_tokens: int,
                 norm_activation_type: str = "l2_norm_gelu", scale_num: int | None = None,
                 key_std: float = 0.02, value_std: float = 0.02, memory_lean: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.norm_activation_type = norm_activation_type
        self.scale_num = scale_num
        self.key_std = key_std
        self.value_std = value_std
        self.memory_lean = memory_lean
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
        # Token-parallel tokens (DTensors, `tokenformer.parallel.tokens`) take the plain formula,
        # whose collectives DTensor places and differentiates.
        if self.norm_activation_type == "l2_norm_gelu" and not isinstance(self.key_param_tokens, DTensor):
            keys, values = self.key_param_tokens, self.value_param_tokens
            device = x.device.type
            if torch.is_autocast_enabled(device):
                # A custom function's backward runs outside autocast: cast here, where autograd
                # sees the casts, as autocast would have cast the two matmuls.
                dtype = torch.get_autocast_dtype(device)
                with torch.autocast(device, enabled=False):
                    return L2NormGeluPattention.apply(x.to(dtype), keys.to(dtype), values.to(dtype),
                                                      self.effective_scale_num, self.memory_lean)
            if not (torch.is_grad_enabled() and (x.requires_grad or keys.requires_grad
                                                 or values.requires_grad)):
                # Inference (generation): the same numbers without the autograd machinery.
                return F.gelu(_scaled_scores(x, keys, self.effective_scale_num)[0]) @ values
            return L2NormGeluPattention.apply(x, keys, values, self.effective_scale_num,
                                              self.memory_lean)
        scores = x @ self.key_param_tokens.T  # (..., n)
        weights = normalise(scores, self.norm_activation_type, self.effective_scale_num)
        return weights @ self.value_param_tokens  # (..., d_out)

    def extra_repr(self) -> str:
        scale = "" if self.scale_num is None else f", scale_num={self.scale_num}"
        lean = ", memory_lean" if self.memory_lean else ""
        return (f"{self.in_features} -> {self.out_features}, num_tokens={self.num_tokens}, "
                f"{self.norm_activation_type}{scale}{lean}")
