"""Training windows against the token stream written out here: `WindowDataset` over two indexed
files (in order, shuffled per epoch from (seed, epoch), across epochs), its errors, and
`token_windows`' end-of-text and `max_windows` rules."""

import numpy as np
import pytest
import torch

from tokenformer import TokenFormerError
from tokenformer.data.windows import WindowDataset, token_windows

from tests.conftest import write_indexed as write


@pytest.fixture
def two_files(tmp_path):
    """Documents of distinct ids: 3 in the first file, 2 in the second (sizes 5, 1, 7 | 4, 6)."""
    first = [list(range(100, 105)), [110], list(range(120, 127))]
    second = [list(range(200, 204)), list(range(210, 216))]
    return [write(tmp_path / "a", first), write(tmp_path / "b", second)], first + second


def test_windows_in_order_are_the_concatenated_stream_cut_with_one_token_of_overlap(two_files):
    prefixes, docs = two_files
    stream = [t for d in docs for t in d]  # 23 tokens
    data = WindowDataset(prefixes, seq_length=4, shuffle=False)
    assert data.num_tokens == 23 and data.windows_per_epoch == 5  # (23 - 1) // 4
    for i in range(5):
        assert data.window(i).tolist() == stream[4 * i:4 * i + 5]
        assert data.window(5 + i).tolist() == stream[4 * i:4 * i + 5]  # the next epoch, the same order
    assert data.window(0).dtype == np.int64
    batch = data.batch(3, 3)
    assert batch.dtype == torch.int64 and batch.tolist() == [stream[12:17], stream[16:21], stream[0:5]]


def test_shuffled_epochs_follow_the_documented_permutations_of_seed_and_epoch(two_files):
    prefixes, docs = two_files
    data = WindowDataset(prefixes, seq_length=3, seed=11)
    n = data.windows_per_epoch
    assert n == 7
    seen = []
    for epoch in (0, 1, 0):  # back to epoch 0 after 1: the same windows again
        rng = np.random.default_rng([11, epoch])
        stream = [t for d in rng.permutation(5) for t in docs[d]]
        window_order = rng.permutation(n)
        expected = [stream[3 * w:3 * w + 4] for w in window_order]
        got = [data.window(epoch * n + i).tolist() for i in range(n)]
        assert got == expected
        seen.append(got)
    assert seen[0] == seen[2] and seen[0] != seen[1]
    again = WindowDataset(prefixes, seq_length=3, seed=11)  # a fresh dataset (a resume) reads the same
    assert again.window(n + 4).tolist() == seen[1][4]


def test_window_data_errors_name_the_data_and_the_fix(tmp_path):
    empty = write(tmp_path / "empty", [])
    with pytest.raises(TokenFormerError) as error:
        WindowDataset([empty], seq_length=4, name="validation")
    assert str(error.value) == f"the validation data {empty} hold no tokens: the corpus is empty"
    short = write(tmp_path / "short", [[1, 2, 3, 4]])
    with pytest.raises(TokenFormerError) as error:
        WindowDataset([short], seq_length=4)
    assert str(error.value) == ("the training data hold 4 tokens, fewer than one window of seq_length + 1 = 5: "
                                "use more text or a shorter seq_length")
    assert WindowDataset([write(tmp_path / "five", [[1, 2, 3, 4, 5]])], seq_length=4).windows_per_epoch == 1


def test_token_windows_add_end_of_text_once_and_stop_at_max_windows():
    eos = 9
    docs = [[1, 2], [3, eos], [4, 5, 6]]
    # stream: 1 2 9 3 9 4 5 6 9 -> windows of 3 tokens
    assert token_windows(docs, eos, 2).tolist() == [[1, 2, 9], [3, 9, 4], [5, 6, 9]]
    assert token_windows(docs, eos, 3).tolist() == [[1, 2, 9, 3], [9, 4, 5, 6]]  # the rest is dropped
    assert token_windows(docs, eos, 2, max_windows=1).tolist() == [[1, 2, 9]]
    read = []

    def counted():
        for doc in docs:
            read.append(doc)
            yield doc
    assert token_windows(counted(), eos, 2, max_windows=1).tolist() == [[1, 2, 9]]
    assert len(read) == 1  # stopped reading once the window was exactly full
    assert token_windows([[]], eos, 2).shape == (0, 3)
