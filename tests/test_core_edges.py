"""Behaviour the mutation run (reliability/mutants.py) found unchecked in the core modules: each test
here kills mutants that survived the rest of the suite, against values written out by hand."""

import pytest
import torch

from tokenformer import TokenFormerError
from tokenformer.models.pattention import Pattention, normalise

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---- models/pattention.py ---------------------------------------------------------------------------

def test_pattention_repr_states_sizes_normalisation_pinned_n_and_lean_mode():
    assert repr(Pattention(4, 6, 8)) == "Pattention(4 -> 6, num_tokens=8, l2_norm_gelu)"
    layer = Pattention(4, 6, 8, norm_activation_type="softmax", scale_num=3, memory_lean=True)
    assert repr(layer) == "Pattention(4 -> 6, num_tokens=8, softmax, scale_num=3, memory_lean)"


def test_unknown_normalisation_is_named_in_the_error():
    with pytest.raises(TokenFormerError, match="unknown norm_activation_type 'relu'"):
        normalise(torch.ones(2, 3), "relu", 3)


def test_lean_mode_holds_under_autocast_too():
    """The mixed-precision branch passes memory_lean on: one score-sized tensor kept, not two."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    kept = {}
    for lean in (False, True):
        layer = Pattention(16, 8, 32, memory_lean=lean)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        kept[lean] = [t for t in saved if t.shape == (2, 5, 32)]
        assert all(t.dtype == torch.bfloat16 for t in saved)
    assert len(kept[False]) == 2 and len(kept[True]) == 1


# ---- generate.py ------------------------------------------------------------------------------------

class Scripted(torch.nn.Module):
    """A stand-in language model that makes greedy decoding emit `script`, one token per forward pass."""

    def __init__(self, script: list[int], vocab: int = 257, seq_length: int = 64) -> None:
        super().__init__()
        self.config = type("Config", (), {"seq_length": seq_length})()
        self.word_embeddings = torch.nn.Embedding(vocab, 1)
        self.script, self.calls, self.vocab = script, 0, vocab
        self.caches, self.forwards = [], []  # allocate_cache arguments; (tokens, last_only) of each forward

    def allocate_cache(self, batch_size, max_length=None):
        self.caches.append((batch_size, max_length))
        return None

    def forward(self, ids, cache=None, last_only=False, **kwargs):
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        self.forwards.append((ids.shape[1], last_only))
        logits = torch.full((ids.shape[0], 1 if last_only else ids.shape[1], self.vocab), -1e9)
        logits[..., token] = 0.0
        return logits


def test_streaming_holds_back_a_partial_character_and_sends_each_piece_once():
    from tokenformer import ByteTokenizer
    from tokenformer.generate import generate_text

    script = list("aé b".encode()) + [256]  # é is two bytes: after the first, the text ends in U+FFFD
    pieces = []
    text = generate_text(Scripted(script), ByteTokenizer(), "x", max_new_tokens=10, on_text=pieces.append)
    assert text == "aé b"
    assert pieces == ["a", "é", " ", "b"]
    # a text cut inside a character: the held-back rest is sent once at the end, as decoded
    pieces = []
    text = generate_text(Scripted(list("ab".encode()) + [0xC3]), ByteTokenizer(), "x", max_new_tokens=3,
                         on_text=pieces.append)
    assert text == "ab\ufffd" and pieces == ["a", "b", "\ufffd"]


def test_empty_prompts_are_refused_in_one_sentence():
    from tokenformer.generate import generate_batch, generate_tokens

    model = Scripted([1])
    with pytest.raises(TokenFormerError) as error:
        generate_batch(model, [[1], []], 4)
    assert str(error.value) == "every prompt needs at least one token (and the batch at least one prompt)"
    with pytest.raises(TokenFormerError) as error:
        list(generate_tokens(model, [], 4))
    assert str(error.value) == "the prompt is empty: give at least one token"


def test_generation_sizes_the_cache_to_its_need_and_prefills_only_the_last_position():
    from tokenformer.generate import generate_batch, generate_tokens

    model = Scripted([5, 6, 7, 8, 9])
    assert list(generate_tokens(model, [1, 2, 3], 5)) == [5, 6, 7, 8, 9]
    assert model.caches == [(1, 3 + 5)]  # the prompt and the new tokens, not the whole context
    assert model.forwards == [(3, True)] + [(1, False)] * 4  # the last token needs no forward of its own
    model = Scripted([5, 6, 7])
    assert generate_batch(model, [[1, 2], [3]], 3) == [[5, 6, 7], [5, 6, 7]]
    assert model.caches == [(2, 2 + 3)] and model.forwards == [(2, True), (1, False), (1, False)]


# ---- decode.py --------------------------------------------------------------------------------------

def test_decode_layout_rule_is_cpu_float32_with_more_outputs_than_inputs():
    from tokenformer.decode import Product, columns_layout

    cpu = torch.device("cpu")
    assert columns_layout(40, 24, cpu, torch.float32)
    assert not columns_layout(24, 24, cpu, torch.float32)  # square: rows as long either way, stored as is
    assert not columns_layout(40, 24, cpu, torch.bfloat16) and not columns_layout(24, 40, cpu, torch.float32)
    assert not columns_layout(40, 24, torch.device("meta"), torch.float32)  # not a CPU
    weight = torch.randn(40, 24)
    for dtype, columns in ((torch.float32, True), (torch.bfloat16, False)):
        product = Product(weight, dtype)
        assert product.columns is columns and product.weight.dtype == dtype
        assert product.weight.shape == ((24, 40) if columns else (40, 24)) and product.weight.is_contiguous()
    assert Product(weight, torch.float32, int8=True).columns is False  # int8 rows are the (out, in) rows


def test_static_cache_fills_to_its_last_position_and_the_step_is_traced_without_a_mode_on_cpu(monkeypatch):
    from tokenformer import Config, TokenFormer
    from tokenformer.decode import Decoder

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    model = TokenFormer(Config.from_name("tiny", seq_length=64)).eval()
    decoder = Decoder(model, compile=True)
    assert seen == [{"mode": None, "fullgraph": True, "dynamic": False}]
    Decoder(model, compile=True, compile_mode="max-autotune")
    assert seen[1]["mode"] == "max-autotune"
    cache = decoder.allocate_cache(1, 64)
    assert cache.max_length == 64 and decoder.rotary[0].shape[0] == 64
    ids = torch.randint(0, 257, (1, 64))
    with torch.no_grad():
        reference = model(ids)
        logits = torch.cat([decoder(ids[:, :63], cache=cache), decoder(ids[:, 63:], cache=cache)], dim=1)
    assert cache.length == 64  # every position used: the last one-token step still fits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(TokenFormerError, match="holds 64 positions but 65 are needed"):
        decoder(ids[:, :1], cache=cache)
    with torch.no_grad():  # last_only: the logits of the last position alone
        short = decoder(ids[:, :10], cache=decoder.allocate_cache(1, 10), last_only=True)
    assert short.shape == (1, 1, reference.shape[-1])
    torch.testing.assert_close(short[:, 0], reference[:, 9], rtol=1e-5, atol=1e-5)


def test_captions_default_to_32_new_tokens_and_take_images_of_any_float_dtype():
    from tokenformer import ByteTokenizer
    from tokenformer.generate import generate_caption
    from tests.test_captioner import greedy_without_cache, images, tiny

    model = tiny()
    with torch.no_grad():  # a bias towards a few bytes: a greedy path that does not end early
        model.lm.word_embeddings.weight[100:110] *= 4
    tok, x = ByteTokenizer(), images(1)
    with torch.no_grad():
        expected = greedy_without_cache(model, x[0], tok.eos_id, 32)
        longer = greedy_without_cache(model, x[0], tok.eos_id, 33)
    assert len(expected) == 32 and len(longer) == 33  # no end-of-text within 33 tokens
    assert generate_caption(model, tok, x) == [tok.decode(expected)]
    assert generate_caption(model, tok, x.double(), max_new_tokens=5) == [tok.decode(expected[:5])]  # cast to the model's


def test_captions_sample_with_top_p_and_run_one_forward_per_new_token():
    from tokenformer import ByteTokenizer
    from tokenformer.generate import generate_caption
    from tests.test_captioner import images, tiny

    model = tiny()
    with torch.no_grad():
        model.lm.word_embeddings.weight[100:110] *= 4
    tok, x = ByteTokenizer(), images(2)
    greedy = generate_caption(model, tok, x, max_new_tokens=6)
    # a tiny top_p keeps only the most likely token: sampling at any temperature is then greedy
    assert generate_caption(model, tok, x, max_new_tokens=6, temperature=1.5, top_p=1e-6, seed=1) == greedy
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        generate_caption(model, tok, x, max_new_tokens=6)
    finally:
        handle.remove()
    assert all(len(c) == 6 for c in greedy) and len(calls) == 6  # the prefill, then 5 steps: the last token needs none


def test_decoder_dtype_int8_buffers_and_cache_placement():
    from tokenformer import Config, TokenFormer
    from tokenformer.decode import Decoder, Product, StaticKVCache

    model = TokenFormer(Config.from_name("tiny", seq_length=64)).eval()
    assert Decoder(model).dtype == torch.float32
    bf16 = Decoder(model, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.allocate_cache(1, 8).keys[0].dtype == torch.bfloat16
    int8 = Decoder(model, int8=True)
    products = [m for m in int8.modules() if isinstance(m, Product)]
    # per layer: the stacked q/k/v keys and their 3 values, proj keys and values, ffn keys and values; the head
    assert len(products) == 1 + 8 * model.config.num_layers and all(p.int8 for p in products)
    # the decode copies are buffers of the Decoder only: its state dict is the model's own tables
    assert set(int8.state_dict()) == {"word_embeddings.weight", "final_norm.weight", "final_norm.bias"}
    cache = StaticKVCache.allocate(model.config, 2, 64, device="meta", dtype=torch.float16)
    assert all(t.device.type == "meta" and t.dtype == torch.float16 and t.shape == (2, 4, 64, 16)
               for t in cache.keys + cache.values) and len(cache.keys) == len(cache.values) == model.config.num_layers


def test_a_bfloat16_model_decodes_in_float32():
    from tokenformer import Config, TokenFormer
    from tokenformer.decode import Decoder

    model = TokenFormer(Config.from_name("tiny", seq_length=64)).eval()
    half = TokenFormer(Config.from_name("tiny", seq_length=64)).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    rounded = TokenFormer(Config.from_name("tiny", seq_length=64)).eval()
    rounded.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the bf16 weights, in fp32
    ids = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        expected = rounded(ids)
        decoder = Decoder(half, dtype=torch.float32)
        logits = decoder(ids, cache=decoder.allocate_cache(1, 20))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

