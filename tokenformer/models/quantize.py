"""Weight-only int8 for inference: a matrix stored as int8 rows with one float scale per row.

    W (N, K)  ~  q * s[:, None]      q int8 in [-127, 127],  s = max|W[r]| / 127  (per row r)
    x @ W.T   =  (x @ q.T) * s       the scale of an output column factors out of the product

Decoding one token reads every weight once, so a quarter of the fp32 bytes is the whole point.
Used by `tokenformer.decode` for the Pattention key/value parameter tokens and the tied head; the
normalisation between them is left in the compute dtype, exactly the model's.

The rounding error of one weight is at most s / 2 = max|W[r]| / 254 (0.4% of the row's largest
weight); over a dot product of K terms these errors are independent, so the relative error of a
product is of order 0.4% / sqrt(3) ~ 0.2%, far below what changes a trained model's choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows `q` (N, K) and float scales `s` (N,) with `q * s[:, None]` ~ `weight` (N, K).

    Symmetric, per row: the row's largest magnitude maps to 127. An all-zero row gets scale 1 so
    that dividing by it stays finite (its int8 row is zero either way).
    """
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0  # (N,)
    scales = scales.masked_fill(scales == 0, 1.0)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()  # (N, K)
    return q, scales.to(weight.dtype)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float matrix (N, K) that int8 rows `q` and scales `s` stand for."""
    return q.to(dtype) * scales.to(dtype)[:, None]


def packed_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `aten._weight_int8pack_mm` (the kernel gpt-fast uses on CPU) runs here for `dtype`
    activations: it exists in recent torch builds, on CPU (and some GPUs) and only for some dtypes."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 64, device=device, dtype=dtype)
        q = torch.ones(8, 64, device=device, dtype=torch.int8)
        out = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.all(out == 64))


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, packed: bool) -> torch.Tensor:
    """`x @ (q * s[:, None]).T` for x (..., K), q (N, K) int8, s (N,) in x's dtype: (..., N).

    `packed`: the fused int8 kernel (reads the int8 bytes only); otherwise the weights are
    dequantised on the fly (correct everywhere, but it writes a float copy of the matrix).
    """
    if packed:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scales)  # (M, N)
        return out.view(*x.shape[:-1], q.shape[0])  # (..., N)
    return F.linear(x, q.to(x.dtype)) * scales
