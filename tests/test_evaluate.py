"""Evaluation: sliding-window perplexity, the lm-eval adapter against direct computations from the
model's logits, the harness end to end on task files written here (offline), and the CLI."""

import json
import math
import os
import shutil
import tempfile
import atexit

import pytest
import torch
import torch.nn.functional as F

import tokenformer as tf
from tokenformer.evaluate import (comparison_table, load_documents, nearest_published, perplexity,
                                  sliding_windows, task_scores)

# The harness must never reach the network here: local JSON files only, in a private cache.
_HF_CACHE = tempfile.mkdtemp(prefix="tokenformer-test-datasets-")
atexit.register(shutil.rmtree, _HF_CACHE, True)
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = _HF_CACHE

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")

SEQ = 32  # the tiny model's context: short, so that truncation and windows are cheap to exercise

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran far away from home",
    "hello there my old friend",
    "pattention layers attend over parameter tokens instead of weights",
    "x",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny forward passes: one thread is faster than two that wait for each other on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny")
    tf.TokenFormer(tf.Config.from_name("tiny", seq_length=SEQ)).save_pretrained(directory, tokenizer=tf.ByteTokenizer())
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return tf.TokenFormer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def lm(model):
    from tokenformer.lm_eval_adapter import TokenFormerLM

    return TokenFormerLM(pretrained=model, tokenizer=tf.ByteTokenizer(), batch_size=4)


def direct_log_likelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) by one unpadded forward pass over the last SEQ + 1 tokens."""
    tokens = (context + continuation)[-(SEQ + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].double()  # (T, padded_vocab)
    log_probs = torch.log_softmax(logits, dim=-1)[-len(continuation):]
    target = torch.tensor(continuation)
    return log_probs[torch.arange(len(continuation)), target].sum().item(), \
        bool((log_probs.argmax(-1) == target).all())


def requests(kind: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


# ---- sliding windows and perplexity ---------------------------------------------------------------

@pytest.mark.parametrize("n_tokens, context, stride", [(1, 8, 8), (7, 8, 8), (8, 8, 8), (30, 8, 8), (30, 8, 3), (30, 8, 1), (17, 5, 5)])
def test_sliding_windows_score_every_token_once_with_at_most_context_tokens(n_tokens, context, stride):
    tokens = list(range(100, 100 + n_tokens))
    windows = sliding_windows(tokens, prefix_id=0, context=context, stride=stride)
    assert [t for _, continuation in windows for t in continuation] == tokens
    sequence = [0] + tokens
    for i, (ctx, continuation) in enumerate(windows):
        reads = ctx + continuation[:-1]
        assert len(reads) <= context
        start = sequence.index(continuation[0])
        assert ctx == sequence[start - len(ctx):start]  # the context is what precedes the window
        if i > 0:
            assert len(continuation) <= stride
            assert len(reads) == min(context, start + len(continuation) - 1)  # full context when there is one


def test_perplexity_with_stride_equal_to_context_is_independent_chunks(model):
    torch.manual_seed(1)
    doc = torch.randint(0, 256, (3 * SEQ,)).tolist()  # a multiple of the context: plain chunks
    sequence = [256] + doc
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(doc), SEQ):
            chunk = torch.tensor([sequence[start:start + SEQ]])
            log_probs = torch.log_softmax(model(chunk)[0].double(), dim=-1)
            target = torch.tensor(sequence[start + 1:start + SEQ + 1])
            expected += log_probs[torch.arange(SEQ), target].sum().item()
    result = perplexity(model, [(doc, len(doc))], prefix_id=256, stride=SEQ, batch_size=2, progress=False)
    assert result.tokens == len(doc)
    assert result.total_log_likelihood == pytest.approx(expected, abs=1e-4)
    assert result.loss == pytest.approx(-expected / len(doc), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(-expected / len(doc)), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(-expected / len(doc) / math.log(2), rel=1e-6)


def test_perplexity_with_stride_one_scores_each_token_once_with_full_context(model):
    torch.manual_seed(2)
    context = 8
    doc = torch.randint(0, 256, (20,)).tolist()
    sequence = [256] + doc
    expected = 0.0
    with torch.no_grad():
        for j in range(1, len(sequence)):  # each token, read after its own last `context` tokens
            window = sequence[max(0, j - context):j] if j > context else sequence[:context]
            position = len(window) - 1 if j > context else j - 1
            log_probs = torch.log_softmax(model(torch.tensor([window]))[0, position].double(), dim=-1)
            expected += log_probs[sequence[j]].item()
    result = perplexity(model, [(doc, 40)], prefix_id=256, context=context, stride=1, batch_size=3, progress=False)
    assert result.tokens == len(doc) and result.bytes == 40
    assert result.total_log_likelihood == pytest.approx(expected, abs=1e-4)
    assert result.bits_per_byte == pytest.approx(-expected / 40 / math.log(2), rel=1e-6)


def test_perplexity_refuses_a_bad_stride_or_context(model):
    with pytest.raises(tf.TokenFormerError, match="stride"):
        perplexity(model, [([1, 2, 3], 3)], prefix_id=256, stride=SEQ + 1, progress=False)
    with pytest.raises(tf.TokenFormerError, match="seq_length"):
        perplexity(model, [([1, 2, 3], 3)], prefix_id=256, context=SEQ + 1, progress=False)


# ---- the adapter against direct computations -------------------------------------------------------

def test_loglikelihood_equals_direct_computation_and_batch_size_does_not_matter(model, lm):
    from tokenformer.lm_eval_adapter import TokenFormerLM

    pairs = [("the cat sat on the", " mat"), ("hello", " there my friend"), ("a", "b"),
             ("x" * 50, " long context, cut on the left"),  # longer than SEQ: left truncation
             ("", "empty context"), ("q" * (SEQ + 5), "z" * SEQ)]
    results = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, results):
        context_ids = list(context.encode()) or [256]  # an empty context is the end-of-text token
        expected, expected_greedy = direct_log_likelihood(model, context_ids, list(continuation.encode()))
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    one_by_one = TokenFormerLM(pretrained=model, tokenizer=tf.ByteTokenizer(), batch_size=1)
    again = one_by_one.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(results, again):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_left_truncation_keeps_the_last_seq_length_plus_one_tokens(lm):
    # The model reads the last SEQ + 1 tokens of context + continuation: whatever comes before
    # does not change the score, and the first kept token does.
    tail, continuation = "y" * (SEQ - 2), " ok"  # exactly SEQ + 1 tokens together
    scores = [s for s, _ in lm.loglikelihood(requests("loglikelihood", [
        ("A" * 40 + tail, continuation), ("B" * 9 + tail, continuation), (tail, continuation),
        ("C" + tail[1:], continuation), ("D" + tail[1:], continuation)]), disable_tqdm=True)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and scores[0] == pytest.approx(scores[2], abs=1e-6)
    assert scores[3] != pytest.approx(scores[4], abs=1e-4)


def test_a_continuation_longer_than_the_context_is_refused(lm):
    with pytest.raises(tf.TokenFormerError, match="does not fit"):
        lm.loglikelihood(requests("loglikelihood", [("a", "b" * (SEQ + 1))]), disable_tqdm=True)


def test_rolling_loglikelihood_equals_the_perplexity_path(model, lm):
    texts = [TEXTS[0] * 3, TEXTS[2], "z", "q" * SEQ, "w" * (SEQ + 1)]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, total in zip(texts, rolling):
        ids = list(text.encode())
        result = perplexity(model, [(ids, len(ids))], prefix_id=256, batch_size=2, progress=False)
        assert total == pytest.approx(result.total_log_likelihood, abs=1e-4)
    assert rolling[0] < rolling[1] < 0  # a longer text has the lower log-likelihood


def test_generate_until_stops_at_until_strings_and_matches_greedy_generation(model, lm):
    from tokenformer.generate import generate_tokens

    free = lm.generate_until(requests("generate_until", [("hello", {"until": [], "max_gen_toks": 12})]),
                             disable_tqdm=True)[0]
    expected = bytes(generate_tokens(model, list(b"hello"), 12, eos_id=256, vocab_size=257)).decode("utf-8", "replace")
    assert free == expected
    assert len(free) > 2
    stop = free[2]
    cut, = lm.generate_until(requests("generate_until", [("hello", {"until": [stop], "max_gen_toks": 12})]),
                             disable_tqdm=True)
    assert cut == free.split(stop)[0] and stop not in cut


# ---- the harness end to end, offline --------------------------------------------------------------

def write_tasks(folder, data_folder):
    """A multiple-choice task, a LAMBADA-style loglikelihood task and a rolling (perplexity) task."""
    choices = [{"question": "Which animal barks?", "choices": ["dog", "cat", "fish"], "answer": 0},
               {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1},
               {"question": "The sky is", "choices": ["green", "blue", "loud", "up"], "answer": 1}]
    (data_folder / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choices))
    (data_folder / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {data_folder / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "tiny_lambada.yaml").write_text(
        f"task: tiny_lambada\n{common}dataset_kwargs:\n  data_files:\n    test: {data_folder / 'lambada.jsonl'}\n"
        "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {data_folder / 'lambada.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, tmp_path_factory.mktemp("task-data"))
    return folder


def test_harness_runs_local_tasks_end_to_end(model, lm, task_folder):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_choice", "tiny_lambada", "tiny_rolling"], num_fewshot=0,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    scores = task_scores(out["results"])
    for task, metric in (("tiny_choice", "acc"), ("tiny_choice", "acc_norm"), ("tiny_lambada", "acc")):
        assert 0.0 <= scores[task][metric] <= 1.0
    assert scores["tiny_lambada"]["perplexity"] > 1.0

    # Every LAMBADA-style request equals the direct computation; acc is the share of greedy ones.
    greedy = []
    for sample in out["samples"]["tiny_lambada"]:
        words = sample["doc"]["text"].split(" ")
        context, continuation = " ".join(words[:-1]), " " + words[-1]
        expected, expected_greedy = direct_log_likelihood(model, list(context.encode()), list(continuation.encode()))
        (score, is_greedy), = sample["resps"][0]
        assert score == pytest.approx(expected, abs=1e-4) and is_greedy == expected_greedy
        greedy.append(expected_greedy)
    assert scores["tiny_lambada"]["acc"] == pytest.approx(sum(greedy) / len(greedy))

    # Multiple choice picks the answer of the highest log-likelihood.
    for sample in out["samples"]["tiny_choice"]:
        doc = sample["doc"]
        context = f"Question: {doc['question']}\nAnswer:"
        lls = [direct_log_likelihood(model, list(context.encode()), list((" " + c).encode()))[0] for c in doc["choices"]]
        assert sample["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"])

    # The harness's bits per byte of whole texts equals our perplexity path's.
    docs = [(list(t.encode()), len(t.encode())) for t in TEXTS[:4]]
    ours = perplexity(model, docs, prefix_id=256, progress=False)
    assert scores["tiny_rolling"]["bits_per_byte"] == pytest.approx(ours.bits_per_byte, rel=1e-5)


# ---- the table ------------------------------------------------------------------------------------

def test_nearest_published_sizes_by_parameter_count():
    assert nearest_published(90_000) == ("TokenFormer-150M", "Pythia-160M")
    assert nearest_published(400_000_000) == ("TokenFormer-450M", "Pythia-410M")
    assert nearest_published(1_000_000_000) == ("TokenFormer-900M", "Pythia-1B")
    assert nearest_published(2_000_000_000) == ("TokenFormer-1.5B", "Pythia-1B")


def test_comparison_table_puts_our_scores_beside_the_published_ones():
    scores = {"lambada_openai": {"acc": 0.45, "perplexity": 16.0}, "hellaswag": {"acc": 0.3, "acc_norm": 0.355},
              "piqa": {"acc": 0.649}, "arc_easy": {"acc": 0.473}, "arc_challenge": {"acc": 0.2, "acc_norm": 0.249},
              "winogrande": {"acc": 0.504}, "mine": {"acc": 0.5}}
    table = comparison_table(scores, 151_881_216)
    lines = table.strip().splitlines()
    assert lines[0] == "| task | metric | ours (152M params) | TokenFormer-150M | Pythia-160M |"
    assert "| lambada_openai | perplexity | 16.00 | 16.38 | 37.25 |" in lines
    assert "| hellaswag | acc_norm | 35.5 | 35.5 | 30.3 |" in lines
    assert "| arc_challenge | acc_norm | 24.9 | 24.9 | 23.6 |" in lines
    assert lines[-2] == "| average | acc | 44.7 | 44.7 | 40.1 |"  # the published average is reproduced
    assert lines[-1] == "| mine | acc | 50.0 | - | - |"
