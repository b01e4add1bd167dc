"""int8 rows: the scales come back in the weight's dtype, and the probe of the packed kernel says
what trying the kernel on a random case here says (it runs, and gives the dequantised product)."""

import pytest
import torch

from tokenformer.models.quantize import dequantize_rows, packed_kernel_works, quantize_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_come_back_in_the_weights_dtype(dtype):
    weight = torch.randn(6, 10).to(dtype)
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (6,)
    expected = (weight.float().abs().amax(dim=1) / 127).to(dtype)  # the largest magnitude maps to 127
    assert torch.equal(scales, expected)


def kernel_gives_the_product(dtype: torch.dtype) -> bool:
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(dtype)
    q = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8)
    scales = (torch.rand(16, generator=g) / 64).to(dtype)
    try:
        out = torch.ops.aten._weight_int8pack_mm(x, q, scales)
    except (RuntimeError, NotImplementedError):
        return False
    reference = x.float() @ dequantize_rows(q, scales, torch.float32).T
    return torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_packed_kernel_probe_agrees_with_trying_the_kernel(dtype):
    assert packed_kernel_works(torch.device("cpu"), dtype) == kernel_gives_the_product(dtype)
