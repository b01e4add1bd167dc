"""The scoring functions against sums written out here: `mean_loss` over weighted batches of
unequal sizes and across "ranks", `next_token_loss`'s options, `score_windows` on windows of
mixed lengths (one at a time, unpadded, by hand), and `perplexity` over documents with an empty
one among them and texts of no bytes."""

import math

import pytest
import torch

from tokenformer import TokenFormerError
from tokenformer.evaluation.scoring import mean_loss, next_token_loss, perplexity, score_windows

from tests.conftest import tiny_model


def hand_token_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """-log p(next token) at every position of (B, T + 1) windows, one window at a time, float64."""
    rows = []
    for window in batch:
        log_p = model(window[None, :-1])[0].double().log_softmax(-1)  # (T, V)
        rows.append(-log_p[torch.arange(len(window) - 1), window[1:]])
    return torch.stack(rows)


def test_mean_loss_is_the_weighted_token_mean_and_the_ranks_totals_ratio():
    model = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 257, (b, 9), generator=g) for b in (3, 1, 2)]
    weights = [1.0, 0.5, 0.0]
    sums = [hand_token_losses(model, b).sum().item() for b in batches]
    counts = [b[:, 1:].numel() for b in batches]
    expected = sum(w * s for w, s in zip(weights, sums)) / sum(w * c for w, c in zip(weights, counts))
    assert mean_loss(model, batches, weights=weights) == pytest.approx(expected, rel=1e-6)
    assert model.training  # put back as it was
    # `reduce` sums the (loss sum, count) totals over ranks: another rank's totals added by hand
    other = torch.tensor([10.0, 4.0], dtype=torch.float64)
    got = mean_loss(model, batches, weights=weights, reduce=lambda total: total + other)
    assert got == pytest.approx((expected * 28 + 10.0) / (28 + 4.0), rel=1e-6)  # 28 = 3 * 8 + 0.5 * 8
    with pytest.raises(TokenFormerError) as error:
        mean_loss(model, batches, weights=[0.0, 0.0, 0.0])
    assert str(error.value) == "no samples to evaluate the loss on"


def test_next_token_loss_options_against_the_hand_sum():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[0, 2] = -100  # not scored
    keep = targets != -100
    log_p = logits[..., :7].log_softmax(-1)  # scored over the first 7 logits only
    per_token = -log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep]
    assert next_token_loss(logits, targets, vocab_size=7).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert next_token_loss(logits, targets, vocab_size=7, num_items=4).item() == \
        pytest.approx(per_token.sum().item() / 4, rel=1e-6)
    full = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep]
    assert next_token_loss(logits, targets).item() == pytest.approx(full.mean().item(), rel=1e-6)


def hand_window_score(model, context, continuation):
    tokens = (list(context) + list(continuation))[-(model.config.seq_length + 1):]
    log_p = model(torch.tensor([tokens[:-1]]))[0].double().log_softmax(-1)
    positions = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
    return sum(log_p[p, t].item() for p, t in zip(positions, continuation)), \
        all(log_p[p].argmax().item() == t for p, t in zip(positions, continuation))


def test_score_windows_of_mixed_lengths_equal_each_window_scored_alone():
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    lengths = [(3, 2), (9, 4), (1, 1), (20, 3), (6, 6), (70, 2)]  # later windows longer; the last cut on the left
    windows = [(torch.randint(0, 257, (c,), generator=g).tolist(), torch.randint(0, 257, (k,), generator=g).tolist())
               for c, k in lengths]
    got = score_windows(model, windows, batch_size=2)
    for (context, continuation), (score, greedy) in zip(windows, got):
        hand_score, hand_greedy = hand_window_score(model, context, continuation)
        assert score == pytest.approx(hand_score, abs=1e-4) and greedy == hand_greedy
    with pytest.raises(TokenFormerError) as error:
        score_windows(model, [([1, 2], [])])
    assert str(error.value) == "a window has an empty continuation: there is nothing to score"


def test_perplexity_skips_an_empty_document_and_reads_on():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    first, last = torch.randint(0, 256, (12,), generator=g).tolist(), torch.randint(0, 256, (7,), generator=g).tolist()
    result = perplexity(model, [(first, 12), ([], 0), (last, 7)], prefix_id=256, progress=False)
    hand = hand_window_score(model, [256], first)[0] + hand_window_score(model, [256], last)[0]
    assert (result.tokens, result.bytes, result.documents) == (19, 19, 2)
    assert result.total_log_likelihood == pytest.approx(hand, abs=1e-4)
    assert result.bits_per_byte == pytest.approx(-hand / math.log(2) / 19, rel=1e-5)
    no_bytes = perplexity(model, [(first, 0)], prefix_id=256, progress=False)  # tokens, but a text of no bytes
    assert math.isnan(no_bytes.bits_per_byte) and no_bytes.tokens == 12
    with pytest.raises(TokenFormerError) as error:
        perplexity(model, [([], 0)], prefix_id=256, progress=False)
    assert str(error.value) == "the data holds no tokens to score"
