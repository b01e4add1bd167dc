"""The fast decoding paths (`tokenformer.decode`, `tokenformer.models.quantize`): the static cache and
the compiled step give the plain path's greedy tokens, bf16 and int8 stay within a stated distance
of the fp32 logits, and `tokenformer generate` takes the flags."""

import math

import pytest
import torch

from tokenformer import ByteTokenizer, Config, TokenFormer, TokenFormerError, generate_tokens
from tokenformer.__main__ import main
from tokenformer.decode import Decoder, Product, StaticKVCache
from tokenformer.models.quantize import dequantize_rows, int8_matmul, packed_kernel_works, quantize_rows

from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Relative error ||logits - fp32 logits|| / ||fp32 logits|| allowed (why these numbers: see the tests).
BF16_TOLERANCE = 0.03
INT8_TOLERANCE = 0.03



def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference).norm() / reference.norm())


def decoder_logits(decoder: Decoder, ids: torch.Tensor, split: int) -> torch.Tensor:
    """Logits (1, T, V) of `ids` (1, T): a prefill of `split` tokens, then one-token steps."""
    cache = decoder.allocate_cache(1, ids.shape[1])
    with torch.no_grad():
        pieces = [decoder(ids[:, :split], cache=cache)]
        pieces += [decoder(ids[:, t:t + 1], cache=cache) for t in range(split, ids.shape[1])]
    return torch.cat(pieces, dim=1)


def test_product_layouts_compute_x_times_w_transposed():
    x = torch.randn(3, 5, 24)
    for shape in [(40, 24), (16, 24)]:  # out > in: stored transposed (the CPU fp32 rule); out < in: as is
        weight = torch.randn(shape)
        product = Product(weight, torch.float32)
        assert product.columns == (shape[0] > shape[1])
        torch.testing.assert_close(product(x), x @ weight.T)


def test_static_decoder_logits_equal_the_model_and_its_greedy_tokens():
    model = tiny_model()
    ids = torch.randint(0, 257, (1, 40))
    with torch.no_grad():
        reference = model(ids)  # (1, 40, V): the whole sequence at once, no cache
    decoder = Decoder(model)
    # the same numbers up to float32 summation order (the products read transposed, q/k/v stacked)
    torch.testing.assert_close(decoder_logits(decoder, ids, 25), reference, atol=1e-5, rtol=1e-5)
    for prompt in ([5], list(range(3, 20)), torch.randint(0, 257, (70,)).tolist()):
        assert list(generate_tokens(decoder, prompt, 30)) == list(generate_tokens(model, prompt, 30))
    # past the context (64): the static cache slides its window as the model's cache does
    assert list(generate_tokens(decoder, [5, 6], 150, slide=3)) == list(generate_tokens(model, [5, 6], 150, slide=3))


def test_static_cache_is_zeroed_rounded_and_bounded():
    decoder = Decoder(tiny_model())
    cache = decoder.allocate_cache(2, 70)
    assert isinstance(cache, StaticKVCache) and cache.max_length == 128  # rounded up to a multiple of 64
    assert all(bool((k == 0).all()) for k in cache.keys + cache.values)  # masked positions must be finite
    cache.length = 127
    with pytest.raises(TokenFormerError, match="static cache holds 128 positions"):
        decoder(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(TokenFormerError, match="takes a tokenformer.TokenFormer"):
        Decoder(torch.nn.Linear(2, 2))


def test_compiled_step_gives_the_plain_greedy_tokens(monkeypatch):
    # aot_eager traces the step as inductor does (dynamo, functionalised cache writes) but skips
    # code generation: seconds instead of a minute. bench/decode.py runs the inductor build.
    compile_ = torch.compile
    compiled = []

    def compile_with_aot_eager(fn, **kwargs):
        compiled.append(kwargs)
        return compile_(fn, backend="aot_eager", fullgraph=kwargs["fullgraph"], dynamic=kwargs["dynamic"])

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    model = tiny_model()
    decoder = Decoder(model, compile=True)
    assert compiled and compiled[0]["dynamic"] is False  # static shapes: one trace per cache shape
    for prompt in ([1, 2, 3], list(range(40, 60))):  # both fit one 64-position cache: one trace
        assert list(generate_tokens(decoder, prompt, 25)) == list(generate_tokens(model, prompt, 25))


def test_bf16_logits_within_tolerance_of_fp32():
    # bf16 keeps 8 significant bits: each rounding is within 2^-9 = 0.2% relative, and the ~10
    # rounded stages between embedding and logits (norms, products, residual sums) add errors of
    # random sign, about sqrt(10) x 0.2% ~ 0.6%; 3% leaves room for the worst positions.
    model = tiny_model()
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        reference = model(ids)
    error = relative_error(decoder_logits(Decoder(model, dtype=torch.bfloat16), ids, 20), reference)
    assert 0 < error < BF16_TOLERANCE


def test_quantize_rows_rounds_to_half_a_step():
    weight = torch.randn(37, 19)
    weight[3] = 0  # an all-zero row stays zero, with a finite scale
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    expected_scales = weight.abs().amax(dim=1) / 127
    torch.testing.assert_close(scales[expected_scales > 0], expected_scales[expected_scales > 0])
    error = (dequantize_rows(q, scales, torch.float32) - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())  # rounding to the nearest step
    x = torch.randn(4, 19)
    reference = x @ dequantize_rows(q, scales, torch.float32).T
    torch.testing.assert_close(int8_matmul(x, q, scales, packed=False), reference)
    if packed_kernel_works(x.device, torch.float32):
        torch.testing.assert_close(int8_matmul(x, q, scales, packed=True), reference, atol=1e-4, rtol=1e-4)


def test_int8_logits_within_tolerance_of_fp32():
    # each int8 weight is within max|row| / 254 of its value; a product sums n such errors of random
    # sign, so its relative error is about 0.4% / sqrt(3) ~ 0.2% (uniform rounding), compounded over
    # the 5 products of a layer and the head: about 1% with bf16 activations; 3% leaves room.
    model = tiny_model()
    ids = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        reference = model(ids)
    for dtype in (torch.float32, torch.bfloat16):
        error = relative_error(decoder_logits(Decoder(model, dtype=dtype, int8=True), ids, 20), reference)
        assert 0 < error < INT8_TOLERANCE, dtype


def trained_tiny_model() -> TokenFormer:
    """The tiny model after 150 Adam steps on one repeated sentence: confident, like a trained model."""
    model = TokenFormer(Config.from_name("tiny"))
    text = torch.tensor(list(b"the cat sat on the mat. " * 2))  # (48,)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(text[None, :-1])[0], text[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * math.log(257)  # it learned the sentence
    return model.eval()


def test_int8_greedy_tokens_of_a_trained_model_equal_fp32():
    model = trained_tiny_model()
    prompt = list(b"the cat ")
    expected = list(generate_tokens(model, prompt, 24))
    assert bytes(expected).startswith(b"sat on the mat")  # the fp32 model learned the sentence
    for dtype in (torch.float32, torch.bfloat16):
        assert list(generate_tokens(Decoder(model, dtype=dtype, int8=True), prompt, 24)) == expected


def test_generate_cli_takes_the_decode_flags(tmp_path, capsys, monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", fullgraph=True,
                                                                    dynamic=False))
    tiny_model().save_pretrained(tmp_path / "ckpt", tokenizer=ByteTokenizer())
    base = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "abc", "--max-new-tokens", "6"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    for flags in (["--static-cache"], ["--compile"], ["--int8"], ["--int8", "--dtype", "bf16"]):
        assert main(base + flags) == 0
        out = capsys.readouterr().out
        assert out.startswith("abc") and len(out) >= 4
        if flags != ["--int8", "--dtype", "bf16"]:
            assert out == plain, flags  # fp32 paths: the same greedy text on this random model
    (tmp_path / "in.txt").write_text("ab\ncd\n")
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--input-file", str(tmp_path / "in.txt"),
                 "--output-file", str(tmp_path / "out.jsonl"), "--batch-size", "2", "--int8"]) == 2
    assert "--batch-size 1" in capsys.readouterr().err


def test_generate_compile_says_that_it_waits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)  # the message, not the wait
    tiny_model().save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "a", "--max-new-tokens", "2",
                 "--compile"]) == 0
    assert "compiling the one-token step (torch.compile): the first token waits" in capsys.readouterr().err
