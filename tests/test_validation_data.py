"""Which tokens the language model validates on: `valid_data_paths` (or data_path's valid split),
never the training prefixes; the windows in file order; and the loss the hand formula gives on them.

    windows i = 0 .. W - 1 of the concatenated valid documents: tokens [32 i, 32 i + 33)
    val_loss = mean over every predicted token of -log softmax(logits)[target]
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenformer.training.config import TrainConfig
from tokenformer.training.distributed import DistEnv
from tokenformer.training.tasks.base import TaskContext
from tokenformer.training.tasks.language import LanguageModelTask, validation_batches
from tokenformer.data.windows import WindowDataset

from tests.conftest import write_indexed as write

pytestmark = pytest.mark.usefixtures("one_thread_module")

SEQ = 32


@pytest.fixture
def corpus(tmp_path):
    """Training documents of token ids 1..99, validation documents of ids 150..249: any window
    shows where it was read from."""
    rng = np.random.default_rng(0)
    train = [rng.integers(1, 100, size=int(n)).tolist() + [256] for n in rng.integers(20, 60, size=30)]
    valid = [rng.integers(150, 250, size=int(n)).tolist() + [256] for n in rng.integers(20, 60, size=8)]
    return {"train": write(tmp_path / "train_text_document", train), "valid": write(tmp_path / "valid_text_document", valid),
            "valid_tokens": [t for d in valid for t in d]}


def task_for(corpus, **changes):
    fields = dict(model={"name": "tiny", "seq_length": SEQ}, train_data_paths=[corpus["train"]],
                  valid_data_paths=[corpus["valid"]], tokenizer="byte", eval_iters=2,
                  train_micro_batch_size_per_gpu=3, device="cpu", progress=False, plot=False)
    cfg = TrainConfig(**{**fields, **changes})
    task = LanguageModelTask(cfg)
    model = task.build_model().eval()
    task.prepare(model, TaskContext(DistEnv()))
    return task, model


def hand_windows(tokens, count):
    return torch.tensor([tokens[SEQ * i:SEQ * i + SEQ + 1] for i in range(count)])


def test_validation_reads_valid_data_paths_in_file_order(corpus):
    task, model = task_for(corpus)
    assert task.sources.valid_prefixes == [corpus["valid"]] and task.sources.train_prefixes == [corpus["train"]]
    batches, weights = task._validation
    assert weights == [1.0, 1.0] and [b.shape for b in batches] == [(3, SEQ + 1)] * 2
    windows = torch.cat(batches)
    assert int(windows.min()) >= 150  # validation tokens only (and the end-of-text 256)
    torch.testing.assert_close(windows, hand_windows(corpus["valid_tokens"], 6), rtol=0, atol=0)
    # the loss: cross-entropy of the model's next-token logits over the 6 x 32 predicted tokens
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    result = task.evaluate(model, TaskContext(DistEnv()))
    assert result["val_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert result["val_ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-6)


def test_no_valid_data_paths_or_no_eval_iters_means_no_validation(corpus):
    task, model = task_for(corpus, eval_iters=0)
    assert task.evaluate(model, TaskContext(DistEnv())) is None
    cfg = TrainConfig(model={"name": "tiny", "seq_length": SEQ}, train_data_paths=[corpus["train"]],
                      tokenizer="byte", device="cpu", progress=False, plot=False)
    task = LanguageModelTask(cfg)
    task.prepare(task.build_model(), TaskContext(DistEnv()))
    assert task.sources.valid_prefixes == [] and task.evaluate(model, TaskContext(DistEnv())) is None


def test_validation_batches_split_across_ranks_and_pad_with_zero_weight(corpus):
    dataset = WindowDataset([corpus["valid"]], SEQ, shuffle=False, name="validation")
    windows = dataset.windows_per_epoch
    assert windows == (len(corpus["valid_tokens"]) - 1) // SEQ
    # 3 micro-batches of 2 over 2 ranks: rank 0 takes batches 0 and 2, rank 1 batch 1 and a padding
    # batch of weight 0 (so both run the same number of forwards)
    shares = [validation_batches(dataset, 3, 2, DistEnv(rank=r, world_size=2, local_rank=r)) for r in (0, 1)]
    expected = hand_windows(corpus["valid_tokens"], 6)
    (b0, w0), (b1, w1) = shares
    assert w0 == [1.0, 1.0] and w1 == [1.0, 0.0]
    torch.testing.assert_close(torch.cat([b0[0], b1[0], b0[1]]), expected, rtol=0, atol=0)
    # more micro-batches than the data hold: every window once, the last batch short
    batches, weights = validation_batches(dataset, 100, 4, DistEnv())
    assert sum(len(b) for b in batches) == windows and weights == [1.0] * len(batches)
    torch.testing.assert_close(torch.cat(batches), hand_windows(corpus["valid_tokens"], windows), rtol=0, atol=0)
