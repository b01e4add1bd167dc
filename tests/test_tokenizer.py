"""The GPT-NeoX-20B tokenizer from its tokenizer.json, and the byte-level tokenizer."""

import pytest

from tokenformer import ByteTokenizer, TokenFormerError, load_tokenizer


def test_neox_hello_world(neox_tokenizer_path):
    tok = load_tokenizer(neox_tokenizer_path)
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.eos_id == 0 and tok.vocab_size == 50277
    assert tok.decode([12092, 1533]) == "Hello world"
    assert tok.encode_batch(["Hello world", "Hello"]) == [[12092, 1533], [12092]]


def test_byte_tokenizer_ids_are_utf8_bytes():
    tok = ByteTokenizer()
    text = "naïve café ☕\n\ttabs"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 256 and tok.vocab_size == 257
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"


def test_byte_tokenizer_fast_path_equals_its_tokenizers_backend():
    tok = ByteTokenizer()
    text = "".join(chr(c) for c in range(1, 400)) + " spaces  and\nnewlines ☕"
    assert tok.backend.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tok.backend.decode(tok.encode(text)) == text


def test_byte_tokenizer_saved_and_reloaded(tmp_path):
    ByteTokenizer().save(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenFormerError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
