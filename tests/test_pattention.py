"""Pattention against its formulas, written out independently here."""

import math

import pytest
import torch

from tokenformer import Pattention


def reference(x, K, V, kind, n):
    s = x @ K.T
    if kind == "l2_norm_gelu":
        z = s / torch.sqrt((s * s).sum(-1, keepdim=True)) * math.sqrt(n)
        w = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    elif kind == "gelu_l2_norm":
        g = 0.5 * s * (1 + torch.erf(s / math.sqrt(2)))
        w = g / torch.sqrt((g * g).sum(-1, keepdim=True)) * math.sqrt(n)
    else:
        e = torch.exp(s)
        w = e / e.sum(-1, keepdim=True) * n
    return w @ V


@pytest.mark.parametrize("kind", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_formula(kind, dtype, tol):
    layer = Pattention(16, 24, 40, norm_activation_type=kind, dtype=dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    expected = reference(x.double(), layer.key_param_tokens.double(),
                         layer.value_param_tokens.double(), kind, 40)
    torch.testing.assert_close(layer(x).double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_fixed_scale_replaces_token_count(kind):
    layer = Pattention(8, 8, 20, norm_activation_type=kind, scale_num=7, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = reference(x, layer.key_param_tokens, layer.value_param_tokens, kind, 7)
    torch.testing.assert_close(layer(x), expected)
    assert layer.effective_scale_num == 7


def test_shapes_and_names():
    layer = Pattention(12, 20, 9)
    assert layer.key_param_tokens.shape == (9, 12)
    assert layer.value_param_tokens.shape == (9, 20)
    assert [n for n, _ in layer.named_parameters()] == ["key_param_tokens", "value_param_tokens"]
    assert layer(torch.randn(2, 3, 12)).shape == (2, 3, 20)


@pytest.mark.parametrize("kind", ["l2_norm_gelu", "gelu_l2_norm"])
def test_zero_rows_give_zero_not_nan(kind):
    layer = Pattention(8, 6, 10, norm_activation_type=kind)
    x = torch.randn(3, 8)
    x[1] = 0
    x.requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[1], torch.zeros(6))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.key_param_tokens.grad).all()


def test_softmax_is_stable_for_large_scores():
    layer = Pattention(4, 4, 6, norm_activation_type="softmax")
    x = torch.full((2, 4), 1e4)
    assert torch.isfinite(layer(x)).all()


def test_new_zero_key_tokens_get_gradient():
    # GELU'(0) = 0.5: a zero key still learns when its value is non-zero (what exact growth relies on).
    layer = Pattention(8, 8, 6, scale_num=4)
    with torch.no_grad():
        layer.key_param_tokens[4:] = 0
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    assert layer.key_param_tokens.grad[4:].abs().sum() > 0


def test_init_statistics():
    layer = Pattention(256, 256, 4096, key_std=0.02, value_std=0.005)
    assert abs(layer.key_param_tokens.std().item() - 0.02) < 0.001
    assert abs(layer.value_param_tokens.std().item() - 0.005) < 0.0003
