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


# ---- the custom autograd function of l2_norm_gelu -------------------------------------------------

def plain_l2_norm_gelu(x, K, V, n):
    """The guarded formula through plain autograd (what the custom backward must reproduce)."""
    from tokenformer.models.pattention import normalise

    return normalise(x @ K.T, "l2_norm_gelu", n) @ V


@pytest.mark.parametrize("memory_lean", [False, True])
@pytest.mark.parametrize("scale_num", [None, 5])
def test_custom_function_passes_gradcheck(memory_lean, scale_num):
    from tokenformer.models.pattention import L2NormGeluPattention

    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    K = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    V = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    n = scale_num or 7
    assert torch.autograd.gradcheck(lambda *a: L2NormGeluPattention.apply(*a, n, memory_lean), (x, K, V))


@pytest.mark.parametrize("memory_lean", [False, True])
@pytest.mark.parametrize("zero_row", [False, True])
def test_custom_gradients_equal_plain_autograd(memory_lean, zero_row):
    layer = Pattention(6, 5, 9, scale_num=4, memory_lean=memory_lean, dtype=torch.float64)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    if zero_row:
        x[1, 2] = 0  # the guard: norm 0 replaced by 1
    x.requires_grad_(True)
    grad_out = torch.randn(3, 4, 5, dtype=torch.float64)
    y = layer(x)
    got = torch.autograd.grad(y, (x, layer.key_param_tokens, layer.value_param_tokens), grad_out)
    x2 = x.detach().requires_grad_(True)
    K2 = layer.key_param_tokens.detach().requires_grad_(True)
    V2 = layer.value_param_tokens.detach().requires_grad_(True)
    y2 = plain_l2_norm_gelu(x2, K2, V2, 4)
    want = torch.autograd.grad(y2, (x2, K2, V2), grad_out)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if zero_row:  # the zero row's input gradient is sqrt(n) dw * gelu'(0) @ K = 2 * 0.5 * (grad_out @ V.T) @ K
        expected = (grad_out[1, 2] @ V2.T.detach()) @ K2.detach()
        torch.testing.assert_close(got[0][1, 2], expected)


def test_lean_equals_default_and_keeps_less():
    torch.manual_seed(1)
    default = Pattention(16, 16, 64)
    lean = Pattention(16, 16, 64, memory_lean=True)
    lean.load_state_dict(default.state_dict())
    x = torch.randn(4, 8, 16, requires_grad=True)

    def run(layer):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))
        return y, grads, sum(t.numel() for t in saved if t.shape[-1] == 64 and t.dim() == 3)

    y1, g1, kept1 = run(default)
    y2, g2, kept2 = run(lean)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert kept1 == 2 * 4 * 8 * 64 and kept2 == 4 * 8 * 64  # score-sized tensors kept for backward


def test_only_needed_gradients_are_computed():
    layer = Pattention(6, 5, 9)
    layer.key_param_tokens.requires_grad_(False)
    x = torch.randn(2, 6)  # no grad for x either: only the values learn
    layer(x).sum().backward()
    assert layer.key_param_tokens.grad is None and layer.value_param_tokens.grad is not None


def test_custom_function_under_autocast():
    layer = Pattention(16, 8, 32)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.key_param_tokens))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), (x, layer.key_param_tokens))
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.02)
    for g, r in zip(grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.99
