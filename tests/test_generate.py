"""Sampling rules and generation with the KV cache, one prompt or a batch."""

import pytest
import torch

from tokenformer import ByteTokenizer, TokenFormerError, generate_text, generate_tokens
from tokenformer.__main__ import main
from tokenformer.generate import generate_batch, sample_next

from tests.conftest import tiny_model



def test_greedy_equals_argmax_of_full_forward():
    model = tiny_model()
    prompt = [5, 17, 99, 3]
    new = list(generate_tokens(model, prompt, 12))
    ids = list(prompt)
    for _ in range(12):  # no cache: the whole prefix every step
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt):]


def test_sampling_is_reproducible_with_seed():
    model = tiny_model()
    a = list(generate_tokens(model, [1, 2, 3], 20, temperature=1.0, seed=7))
    b = list(generate_tokens(model, [1, 2, 3], 20, temperature=1.0, seed=7))
    assert a == b


def test_padding_rows_never_sampled():
    model = tiny_model()
    with torch.no_grad():
        model.word_embeddings.weight[300:] = 50 * model.word_embeddings.weight[0]  # padding rows dominate
    out = list(generate_tokens(model, [1, 2], 30, temperature=1.0, seed=0, vocab_size=257))
    assert max(out) < 257


def test_a_batch_of_prompts_of_different_lengths_gives_each_its_own_output(one_thread):
    model = tiny_model()
    prompts = [[5, 17, 99, 3, 8, 1, 2], [42], [7, 7, 200, 13]]
    alone = [list(generate_tokens(model, p, 15, vocab_size=257)) for p in prompts]
    assert generate_batch(model, prompts, 15, vocab_size=257) == alone
    stop = alone[1][3]  # a token the second row produces: rows stop there, each on its own
    assert generate_batch(model, prompts, 15, eos_id=stop, vocab_size=257) == \
        [list(generate_tokens(model, p, 15, eos_id=stop, vocab_size=257)) for p in prompts]
    sampled = [generate_batch(model, prompts, 10, temperature=1.0, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_batch(model, [[1], []], 4)


def test_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)} == {0, 1}
    # softmax is [0.665, 0.245, 0.090, 0.0002]: top_p 0.8 keeps the first two tokens only
    assert {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)} == {0, 1}
    assert {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} == {0}
    assert int(sample_next(logits, 0.0)) == 0


def test_stops_at_end_of_text():
    model = tiny_model()
    with torch.no_grad():  # make <|endoftext|> (256) the most likely next token everywhere
        model.final_norm.bias.copy_(model.word_embeddings.weight[256] * 100)
    assert list(generate_tokens(model, [1, 2], 10, eos_id=256)) == []


def test_streamed_pieces_add_up_to_the_text():
    model = tiny_model()
    pieces = []
    text = generate_text(model, ByteTokenizer(), "Hi", 25, on_text=pieces.append, temperature=1.0, seed=3)
    assert "".join(pieces) == text


def test_generate_cli(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "ckpt", tokenizer=ByteTokenizer())
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "abc",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("abc")
    (tmp_path / "in.txt").write_text("first\nsecond\n")
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--input-file", str(tmp_path / "in.txt"),
                 "--output-file", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4"]) == 0
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"context": "first"' in lines[0]
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--input-file", str(tmp_path / "in.txt"),
                 "--output-file", str(tmp_path / "batched.jsonl"), "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    assert (tmp_path / "batched.jsonl").read_text().splitlines() == lines  # greedy: the same in a batch
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def sliding_reference(model, prompt: list[int], steps: int, slide: int) -> list[int]:
    """Greedy tokens without a cache: each step reads the whole window, which starts over with its
    oldest `slide` tokens dropped whenever it would exceed the context (nanoGPT's crop for slide 1)."""
    context = model.config.seq_length
    ids, start = list(prompt), max(0, len(prompt) - context)
    for _ in range(steps):
        if len(ids) - start > context:
            start += slide
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids[start:]]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("slide", [1, 5, None])
def test_generation_slides_the_window_past_the_context(one_thread, slide):
    model = tiny_model()  # context 64: 150 new tokens slide the window several times
    prompt = torch.randint(0, 257, (20,)).tolist()
    expected = sliding_reference(model, prompt, 150, slide or 64 // 4)
    assert list(generate_tokens(model, prompt, 150, slide=slide)) == expected
    long_prompt = torch.randint(0, 257, (100,)).tolist()  # longer than the context: its last 64 tokens
    assert list(generate_tokens(model, long_prompt, 10, slide=slide)) == \
        sliding_reference(model, long_prompt[-64:], 10, slide or 16)
    with pytest.raises(TokenFormerError, match="slide 65 must be between 1"):
        list(generate_tokens(model, prompt, 5, slide=65))
