"""Sampling against distributions computed by hand: `sample_next` must hand `torch.multinomial` the
probabilities of the formulas below (temperature divides the logits, top-k keeps the k largest and
their ties, top-p keeps the smallest prefix of the sorted distribution reaching p, the rest renormalised),
and `generate_tokens` / `tokenformer generate` must draw them from the seeded generator.

    p_i = exp(l_i / T) / sum_j exp(l_j / T)      over the tokens kept
"""

import math

import pytest
import torch

from tokenformer import ByteTokenizer, generate_tokens
from tokenformer.__main__ import main
from tokenformer.generate import generate_batch, sample_next

from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")


def hand_softmax(logits: list[float], temperature: float, keep: list[int] | None = None) -> list[float]:
    """exp(l / T) normalised over the kept indices (all when `keep` is None), 0 elsewhere."""
    keep = range(len(logits)) if keep is None else keep
    weights = [math.exp(l / temperature) if i in keep else 0.0 for i, l in enumerate(logits)]
    total = sum(weights)
    return [w / total for w in weights]


@pytest.fixture
def drawn(monkeypatch):
    """The probabilities `sample_next` passes to torch.multinomial, one list per call."""
    seen = []
    multinomial = torch.multinomial

    def spy(probs, num_samples, **kwargs):
        seen.append(probs.detach().clone())
        return multinomial(probs, num_samples, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


LOGITS = [1.0, 3.0, -0.5, 2.0, 0.0]  # unsorted on purpose: the kept set must land on the right ids


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_temperature_divides_the_logits(drawn, temperature):
    sample_next(torch.tensor([LOGITS]), temperature)
    torch.testing.assert_close(drawn[-1][0], torch.tensor(hand_softmax(LOGITS, temperature)))


def test_temperature_zero_or_below_is_greedy_without_drawing(drawn):
    logits = torch.tensor([LOGITS, [5.0, 0.0, 0.0, 0.0, 6.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 4]
    assert sample_next(logits, -1.0).tolist() == [1, 4]
    assert drawn == []


def test_top_k_keeps_the_k_largest_per_row(drawn):
    rows = [LOGITS, [0.0, -1.0, 4.0, 4.5, 1.0]]
    sample_next(torch.tensor(rows), 0.7, top_k=2)
    expected = [hand_softmax(rows[0], 0.7, keep=[1, 3]), hand_softmax(rows[1], 0.7, keep=[2, 3])]
    torch.testing.assert_close(drawn[-1], torch.tensor(expected))


def test_top_k_keeps_ties_with_the_kth_and_a_large_k_keeps_all(drawn):
    logits = [2.0, 1.0, 1.0, 0.0]
    sample_next(torch.tensor([logits]), 1.0, top_k=2)  # the 2nd largest is tied: both stay
    torch.testing.assert_close(drawn[-1][0], torch.tensor(hand_softmax(logits, 1.0, keep=[0, 1, 2])))
    for k in (4, 10):
        sample_next(torch.tensor([logits]), 1.0, top_k=k)
        torch.testing.assert_close(drawn[-1][0], torch.tensor(hand_softmax(logits, 1.0)))


def test_top_p_keeps_the_smallest_prefix_reaching_p(drawn):
    # probabilities 0.15, 0.5, 0.05, 0.3 (ranked: ids 1, 3, 0, 2; cumulative before each: 0, .5, .8, .95)
    probs = [0.15, 0.5, 0.05, 0.3]
    logits = [math.log(p) for p in probs]
    for top_p, keep in [(0.4, [1]), (0.75, [1, 3]), (0.85, [1, 3, 0]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])]:
        sample_next(torch.tensor([logits]), 1.0, top_p=top_p)
        kept = sum(probs[i] for i in keep)
        expected = [probs[i] / kept if i in keep else 0.0 for i in range(4)]
        torch.testing.assert_close(drawn[-1][0], torch.tensor(expected), msg=f"top_p {top_p}")


def test_top_p_acts_on_the_tempered_distribution_after_top_k(drawn):
    logits = [0.0, 2.0, 1.0, -1.0, 1.5]
    # T = 2: weights exp([0, 1, .5, -.5, .75]); top_k 4 drops id 3; the four kept, renormalised and
    # ranked: ids 1, 4, 2, 0 with p = .3632, .2829, .2203, .1336
    kept = hand_softmax(logits, 2.0, keep=[0, 1, 2, 4])
    ranked = sorted(range(5), key=lambda i: -kept[i])
    cumulative, keep = 0.0, []
    for i in ranked:
        if cumulative < 0.6:
            keep.append(i)
        cumulative += kept[i]
    assert keep == [1, 4]  # .3632 < .6 -> keep the next; .6461 >= .6 -> stop
    sample_next(torch.tensor([logits]), 2.0, top_k=4, top_p=0.6)
    torch.testing.assert_close(drawn[-1][0], torch.tensor(hand_softmax(logits, 2.0, keep=keep)))


def test_draws_follow_the_distribution_and_the_generator():
    logits = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])
    g = torch.Generator().manual_seed(11)
    counts = torch.bincount(torch.stack([sample_next(logits, 1.0, generator=g) for _ in range(3000)]).flatten(),
                            minlength=3).tolist()
    # binomial standard deviations sqrt(3000 p (1 - p)): 26.8, 25.1, 16.4; 4 sigma each
    for count, p, sigma in zip(counts, (0.6, 0.3, 0.1), (26.8, 25.1, 16.4)):
        assert abs(count - 3000 * p) < 4 * sigma, counts
    uniform = torch.zeros(1, 1000)
    first = [int(sample_next(uniform, 1.0, generator=torch.Generator().manual_seed(s))) for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]



def hand_generation(model, prompt, steps, temperature, top_k, seed, vocab_size):
    """Sampled tokens without the cache: the whole prefix every step, the hand probabilities over
    the padded vocabulary (0 for the padding rows), one generator seeded with `seed` drawing one
    token a step."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].tolist()
        kth = sorted(logits[:vocab_size], reverse=True)[top_k - 1]
        keep = [i for i, l in enumerate(logits[:vocab_size]) if l >= kth]
        probs = torch.tensor(hand_softmax(logits, temperature, keep=keep))
        ids.append(int(torch.multinomial(probs, 1, generator=g)))
    return ids[len(prompt):]


def test_sampled_generation_equals_hand_sampling_with_the_seed():
    model = tiny_model()
    with torch.no_grad():  # sharper logits than at init, so that temperature and top-k matter
        model.word_embeddings.weight.mul_(5)
    expected = hand_generation(model, [5, 17, 99], 12, 0.7, 5, seed=4, vocab_size=257)
    assert len(set(expected)) > 1
    assert list(generate_tokens(model, [5, 17, 99], 12, temperature=0.7, top_k=5, seed=4, vocab_size=257)) == expected
    assert generate_batch(model, [[5, 17, 99]], 12, temperature=0.7, top_k=5, seed=4, vocab_size=257) == [expected]
    other = list(generate_tokens(model, [5, 17, 99], 12, temperature=0.7, top_k=5, seed=5, vocab_size=257))
    assert other != expected


def test_generate_cli_samples_with_temperature_top_k_top_p_and_seed(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.word_embeddings.weight.mul_(5)
    model.save_pretrained(tmp_path / "ckpt", tokenizer=ByteTokenizer())
    tokenizer = ByteTokenizer()
    # top_p 1.0 keeps everything: the CLI must then draw exactly the hand top-k samples
    expected = hand_generation(model, tokenizer.encode("ab"), 8, 0.7, 5, seed=9, vocab_size=tokenizer.vocab_size)
    expected = expected[:expected.index(tokenizer.eos_id)] if tokenizer.eos_id in expected else expected
    args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "ab", "--max-new-tokens", "8",
            "--temperature", "0.7", "--top-k", "5", "--top-p", "1.0", "--seed", "9"]
    assert main(args) == 0
    assert capsys.readouterr().out == "ab" + tokenizer.decode(expected) + "\n"
    # a tiny top_p keeps only the most likely token: the greedy continuation, whatever the seed
    assert main(args[:-4] + ["--top-p", "0.001", "--seed", "3"]) == 0
    sampled = capsys.readouterr().out
    assert main(args[:7]) == 0  # greedy
    assert sampled == capsys.readouterr().out
