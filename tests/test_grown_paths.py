"""A grown or token-tuned model keeps `n` pinned at its old value (`scale_num`) on every path that
normalises: one Pattention against the hand formula with that `n`, and the whole model against the
model it was grown from (an exact growth computes the same function) on the eager training path
(the custom autograd function), inference (no grad), autocast bf16 (the mixed-precision branch),
`tf.Decoder` static, compiled and int8, the transformers model and a block-compiled model.

A path that normalised with the current token count instead (sqrt(2n) for sqrt(n) after a growth
by 2) would scale every GELU input by 1.41: logits off by tens of percent, far outside the
tolerances below, each derived from the dtype of the path.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tokenformer as tf
from tokenformer.decode import Decoder
from tokenformer.models.pattention import Pattention
from tokenformer.scaling.grow import grow, grow_pattention
from tokenformer.scaling.tune import add_tuning_tokens

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64, qkv_slot_num=8,
             proj_slot_num=8, ffn_slot_num=16, vocab_size=257)
BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding is within half of this, relative


def hand_pattention(x, keys, values, n, norm):
    """`theta(x K^T) V` written out with the given `n` (float64)."""
    s = x.double() @ keys.double().T
    if norm == "l2_norm_gelu":
        w = F.gelu(s / s.norm(dim=-1, keepdim=True) * math.sqrt(n))
    else:  # gelu_l2_norm
        g = F.gelu(s)
        w = g / g.norm(dim=-1, keepdim=True) * math.sqrt(n)
    return w @ values.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_a_grown_pattention_with_trained_new_keys_uses_the_pinned_n_on_each_path(norm):
    layer = Pattention(24, 20, 8, norm_activation_type=norm, key_std=0.5, value_std=0.5)
    grow_pattention(layer, 16, "exact")
    assert layer.scale_num == 8 and layer.num_tokens == 16
    with torch.no_grad():  # as after training: the new keys leave zero and the new tokens matter
        layer.key_param_tokens[8:] = torch.randn(8, 24) * 0.5
    x = torch.randn(3, 5, 24, requires_grad=True)
    reference = hand_pattention(x.detach(), layer.key_param_tokens.detach(), layer.value_param_tokens.detach(), 8, norm)
    wrong = hand_pattention(x.detach(), layer.key_param_tokens.detach(), layer.value_param_tokens.detach(), 16, norm)
    assert relative_error(wrong, reference) > 0.2  # what a path using the token count would give
    torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-6)  # training (autograd)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference, rtol=1e-5, atol=1e-6)  # inference
    # bf16 autocast: inputs, keys, values and the output rounded to bf16 (4 roundings of at most
    # eps/2 each, plus the products' accumulation): within 4 eps relative
    for grad in (True, False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, reference) < 4 * BF16_EPS


def grown_models():
    """The base model and, from it, a model grown by 2 and a token-tuned one (both exact)."""
    base = tf.TokenFormer(tf.Config(**SMALL)).eval()
    return base, {"grown": grow(base, factor=2, mode="exact", value_std=0.0),
                  "tuned": add_tuning_tokens(base, 8, value_std=0.0)}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base, changed = grown_models()
    for model in changed.values():
        assert model.config.qkv_scale_num == 8 and model.config.ffn_scale_num == 16
        assert model.layers[0].mlp.num_tokens in (24, 32) and model.layers[0].mlp.effective_scale_num == 16
    return base, changed


IDS = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("which", ["grown", "tuned"])
def test_eager_inference_and_autocast_paths_give_the_base_logits(models, which):
    base, changed = models
    model = changed[which]
    with torch.no_grad():
        reference = base(IDS)
        torch.testing.assert_close(model(IDS), reference, rtol=1e-5, atol=1e-5)  # inference
    model.train()  # no dropout in these configs: the training path is deterministic
    try:
        out = model(IDS)  # grad enabled: the custom autograd function
        assert out.requires_grad
        torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
        # bf16 autocast, with grad (mixed-precision training) and without (evaluation): the grown
        # model rounds the same numbers as the base (its new tokens add exact zeros), so the two
        # agree far more closely than either agrees with fp32
        for grad in (True, False):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                grown_bf16, base_bf16 = model(IDS).float(), base(IDS).float()
            assert relative_error(base_bf16, reference) < 0.05  # bf16 vs fp32: a few % after ~10 roundings
            assert relative_error(grown_bf16, base_bf16) < 2 * BF16_EPS
    finally:
        model.eval()


def decoder_logits(decoder: Decoder, ids: torch.Tensor, split: int = 12) -> torch.Tensor:
    """Logits (B, T, V): a prefill of `split` tokens, then one-token steps (the step `compile` traces)."""
    cache = decoder.allocate_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        pieces = [decoder(ids[:, :split], cache=cache)]
        pieces += [decoder(ids[:, t:t + 1], cache=cache) for t in range(split, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("which", ["grown", "tuned"])
def test_decoder_static_int8_and_bf16_give_the_base_logits(models, which):
    base, changed = models
    model = changed[which]
    with torch.no_grad():
        reference = base(IDS)
    torch.testing.assert_close(decoder_logits(Decoder(model), IDS), reference, rtol=1e-5, atol=1e-5)
    # int8: the new keys are zero rows and (value_std 0) the new values zero columns, so every row
    # keeps the base's int8 numbers and scales: the grown decoder equals the base's int8 decoder
    torch.testing.assert_close(decoder_logits(Decoder(model, int8=True), IDS),
                               decoder_logits(Decoder(base, int8=True), IDS), rtol=1e-5, atol=1e-5)
    bf16 = decoder_logits(Decoder(model, dtype=torch.bfloat16), IDS)
    assert relative_error(bf16, decoder_logits(Decoder(base, dtype=torch.bfloat16), IDS)) < 2 * BF16_EPS


def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend: dynamo and functionalisation as inductor traces
    them, without code generation (seconds, not a minute)."""
    compile_ = torch.compile

    def compile_with_aot_eager(fn=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in ("fullgraph", "dynamic")}
        return compile_(fn, backend="aot_eager", **kwargs) if fn is not None else \
            (lambda f: compile_(f, backend="aot_eager", **kwargs))

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)


def test_compiled_decoder_and_compiled_blocks_give_the_base_logits(models, monkeypatch):
    aot_eager(monkeypatch)
    base, changed = models
    model = changed["grown"]
    with torch.no_grad():
        reference = base(IDS[:1])
    torch.testing.assert_close(decoder_logits(Decoder(model, compile=True), IDS[:1]), reference,
                               rtol=1e-5, atol=1e-5)
    compiled = grow(base, factor=2, mode="exact")
    for block in compiled.layers:  # what training's `compile: true` does, block by block, in place
        block.compile(backend="aot_eager")
    compiled.train()
    out = compiled(IDS[:1])
    torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["grown", "tuned"])
def test_transformers_model_gives_the_base_logits(models, which):
    hf = pytest.importorskip("tokenformer.hf", reason="the hf extra (transformers) is in the dev extra")
    base, changed = models
    with torch.no_grad():
        reference = base(IDS)
        hf_model = hf.to_hf(changed[which], eos_token_id=256).eval()
        assert hf_model.config.qkv_scale_num == 8 and hf_model.config.ffn_scale_num == 16
        logits = hf_model(IDS).logits  # the real vocabulary's columns (the padding rows are no tokens)
        torch.testing.assert_close(logits, reference[..., :logits.shape[-1]], rtol=1e-5, atol=1e-5)
        assert logits.shape[-1] in (SMALL["vocab_size"], reference.shape[-1])
