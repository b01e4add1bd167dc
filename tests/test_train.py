"""The trainer: recipe pieces against hand formulas, exact resume, crash-safe checkpoints, config
handling, bad input, outputs. Tiny models and a few steps each, on a corpus built here."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenformer.train as T
from tokenformer import ByteTokenizer, Config, TokenFormer, TokenFormerError
from tokenformer.__main__ import main as cli
from tokenformer.indexed_dataset import IndexedDatasetWriter
from tokenformer.train import (CheckpointManager, TrainConfig, WindowDataset, build_optimizer, lr_at,
                               micro_batch_start, train)


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_corpus(directory: Path, train_docs, valid_docs=None) -> Path:
    """A `tokenformer prepare`-shaped directory: indexed files, tokenizer.json, prepare.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train_docs), ("valid", valid_docs)):
        if docs is None:
            continue
        writer = IndexedDatasetWriter(directory / f"{name}_text_document", dtype=np.uint16)
        for doc in docs:
            writer.add_item(doc)
        writer.close()
    tokenizer = ByteTokenizer()
    tokenizer.save(directory / "tokenizer.json")
    (directory / "prepare.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size,
                                                        "eod_id": tokenizer.eos_id}))
    return directory


def text_docs(texts):
    tok = ByteTokenizer()
    return [tok.encode(t) + [tok.eos_id] for t in texts]


TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), text_docs(TEXTS), text_docs(TEXTS[::7]))


def tiny_config(corpus, save=None, **changes) -> TrainConfig:
    values = dict(model={"name": "tiny", "seq_length": 32}, data_path=str(corpus), train_iters=6,
                  train_micro_batch_size_per_gpu=2, eval_interval=3, eval_iters=2, save_interval=3,
                  log_interval=1, lr=3e-3, warmup_iters=2, progress=False, plot=False, device="cpu",
                  save=str(save) if save else None, seed=7)
    values.update(changes)
    return TrainConfig(**values)


# ---- the pieces ---------------------------------------------------------------------------------

def test_lr_schedule_matches_hand_formula():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, train_iters=110)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    # halfway through the decay the cosine is at the midpoint
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    # warmup as a fraction of the decay steps, the official 1%
    assert TrainConfig(train_iters=143000).num_warmup_iters == 1430
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=0, train_iters=100, lr_decay_style="linear")
    assert lr_at(25, linear) == pytest.approx(0.75)


def test_weight_decay_groups_cover_tokens_and_embedding_not_final_norm():
    model = TokenFormer(Config.from_name("tiny"))
    optimizer = build_optimizer(model, TrainConfig())
    by_decay = {g["weight_decay"]: set(g["param_names"]) for g in optimizer.param_groups}
    assert by_decay[0.0] == {"final_norm.weight", "final_norm.bias"}
    decayed = by_decay[0.1]
    assert "word_embeddings.weight" in decayed
    assert {n for n in decayed if n.endswith("_param_tokens")} == \
        {n for n, _ in model.named_parameters() if n.endswith("_param_tokens")}
    assert len(decayed) + 2 == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_windows_overlap_by_one_token_and_cover_the_stream(tmp_path):
    docs = [list(range(1, 11)), list(range(11, 31)), list(range(31, 36))]
    data = write_corpus(tmp_path / "d", docs)
    ordered = WindowDataset([str(data / "train_text_document")], seq_length=4, shuffle=False)
    stream = np.concatenate(docs)
    assert ordered.windows_per_epoch == (len(stream) - 1) // 4
    for i in range(ordered.windows_per_epoch):
        assert ordered.window(i).tolist() == stream[4 * i: 4 * i + 5].tolist()
    shuffled = WindowDataset([str(data / "train_text_document")], seq_length=4, seed=3)
    again = WindowDataset([str(data / "train_text_document")], seq_length=4, seed=3)
    n = shuffled.windows_per_epoch
    assert [again.window(i).tolist() for i in range(2 * n)] == [shuffled.window(i).tolist() for i in range(2 * n)]
    # each window is a run of consecutive tokens from some document order
    for i in range(2 * n):
        assert len(shuffled.window(i)) == 5


def test_ranks_share_the_global_batch():
    # 2 ranks x 1 micro-step take the same samples as 1 rank x 2 micro-steps
    two_ranks = sorted(micro_batch_start(8, 0, r, 2, 2) for r in range(2))
    one_rank = sorted(micro_batch_start(8, m, 0, 1, 2) for m in range(2))
    assert two_ranks == one_rank == [8, 10]


# ---- training -----------------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch(tmp_path):
    data = write_corpus(tmp_path / "d", text_docs(["the quick brown fox jumps over the lazy dog. " * 2]))
    cfg = tiny_config(data, train_iters=60, lr=1e-2, warmup_iters=0, lr_decay_style="constant",
                      eval_interval=1000, model={"name": "tiny", "seq_length": 16},
                      train_micro_batch_size_per_gpu=5)
    summary = train(cfg)
    assert summary["losses"][1] > 4.0
    assert summary["train_loss"] < 0.5, summary["losses"]


def test_resume_gives_the_same_losses_exactly(corpus, tmp_path):
    # the interrupted run stops at step 3 of the same 6-step schedule
    straight = train(tiny_config(corpus, tmp_path / "a", lr_decay_iters=6))
    first = train(tiny_config(corpus, tmp_path / "b", lr_decay_iters=6, train_iters=3))
    resumed = train(tiny_config(corpus, tmp_path / "b", lr_decay_iters=6, resume=True))
    assert resumed["resumed_from"].endswith("step_00000003")
    assert list(resumed["losses"]) == [4, 5, 6]
    both = {**first["losses"], **resumed["losses"]}
    assert both == straight["losses"]  # bit-for-bit
    assert resumed["val_loss"] == straight["val_loss"]
    # the metrics file reads as one run
    steps = [r["step"] for r in T.read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_the_larger_batch(corpus):
    one = TokenFormer(Config.from_name("tiny", seq_length=32))
    two = TokenFormer(Config.from_name("tiny", seq_length=32))
    two.load_state_dict(one.state_dict())
    big = train(tiny_config(corpus, train_iters=3, train_micro_batch_size_per_gpu=4, eval_iters=0), model=one)
    acc = train(tiny_config(corpus, train_iters=3, train_micro_batch_size_per_gpu=2,
                            gradient_accumulation_steps=2, eval_iters=0), model=two)
    for step in (1, 2, 3):
        assert acc["losses"][step] == pytest.approx(big["losses"][step], abs=1e-5)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
