"""Evaluation: sliding-window perplexity, the lm-eval adapter against direct computations from the
model's logits, the harness end to end on task files written here (offline), and the CLI."""

import atexit
import json
import math
import os
import shutil
import tempfile

import pytest
import torch

import tokenformer as tf
from tokenformer.evaluation.published import comparison_table, nearest_published, task_scores
from tokenformer.evaluation.scoring import perplexity, sliding_windows

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
    from tokenformer.evaluation.lm_eval import TokenFormerLM

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
    from tokenformer.evaluation.lm_eval import TokenFormerLM

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


# ---- the command line -----------------------------------------------------------------------------

def run_cli(argv, capsys):
    from tokenformer.__main__ import main

    code = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_perplexity_on_jsonl_indexed_prefix_and_prepared_directory(model, checkpoint, tmp_path, capsys):
    from tokenformer.data.indexed import IndexedDatasetWriter

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    output = tmp_path / "ppl.json"
    code, out, _ = run_cli(["--checkpoint", checkpoint, "--data", jsonl, "--text-field", "body",
                            "--stride", 16, "--output", output], capsys)
    assert code == 0 and "bits per byte" in out
    report = json.loads(output.read_text())
    docs = [(list(t.encode()), len(t.encode())) for t in TEXTS]
    expected = perplexity(model, docs, prefix_id=256, stride=16, progress=False)
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert report["tokens"] == sum(len(t) for t in TEXTS) and report["documents"] == len(TEXTS)

    text_file = tmp_path / "one.txt"
    text_file.write_text(TEXTS[0])
    code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", text_file, "--output", output], capsys)
    assert code == 0
    one = perplexity(model, docs[:1], prefix_id=256, progress=False)
    assert json.loads(output.read_text())["loss"] == pytest.approx(one.loss, rel=1e-6)

    # The same texts as `tokenformer prepare` writes them: one item per document, ending with end-of-text.
    prepared = tmp_path / "prepared"
    with IndexedDatasetWriter(prepared / "valid_text_document") as writer:
        for text in TEXTS:
            writer.add_item(list(text.encode()) + [256])
    tf.ByteTokenizer().save(prepared / "tokenizer.json")
    with_eod = perplexity(model, [(ids + [256], n) for ids, n in docs], prefix_id=256, progress=False)
    for data in (prepared, prepared / "valid", prepared / "valid_text_document", prepared / "valid_text_document.bin"):
        code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", data, "--output", output], capsys)
        assert code == 0
        report = json.loads(output.read_text())
        assert report["tokens"] == with_eod.tokens and report["bytes"] == with_eod.bytes
        assert report["loss"] == pytest.approx(with_eod.loss, rel=1e-6)


def test_cli_refuses_data_tokenized_with_another_tokenizer(checkpoint, tmp_path, capsys):
    from tokenformer.data.indexed import IndexedDatasetWriter
    from tokenizers import Tokenizer, models

    with IndexedDatasetWriter(tmp_path / "valid_text_document") as writer:
        writer.add_item([1, 2, 3])
    other = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    other.add_special_tokens(["<|endoftext|>"])
    other.save(str(tmp_path / "tokenizer.json"))
    code, _, err = run_cli(["--checkpoint", checkpoint, "--data", tmp_path, "--output", tmp_path / "o.json"], capsys)
    assert code == 2 and "another tokenizer" in err and len(err.strip().splitlines()) == 1


def test_cli_tasks_print_the_table_and_write_the_results(checkpoint, task_folder, tmp_path, capsys):
    output = tmp_path / "results.json"
    code, out, _ = run_cli(["--checkpoint", checkpoint, "--tasks", "tiny_choice,tiny_lambada",
                            "--include-path", task_folder, "--no-builtin-tasks", "--batch-size", 2,
                            "--limit", 2, "--output", output], capsys)
    assert code == 0
    assert "| task | metric | ours (" in out and "| TokenFormer-150M | Pythia-160M |" in out
    assert "| tiny_choice | acc |" in out
    report = json.loads(output.read_text())
    assert set(report["scores"]) == {"tiny_choice", "tiny_lambada"}
    assert 0.0 <= report["scores"]["tiny_choice"]["acc"] <= 1.0
    assert report["lm_eval"]["results"]["tiny_lambada"]["acc,none"] == report["scores"]["tiny_lambada"]["acc"]
    assert report["limit"] == 2 and report["num_fewshot"] == 0


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "unknown task", "missing task folder",
                                  "missing data", "bad stride"])
def test_cli_bad_input_ends_in_one_clear_sentence(case, checkpoint, task_folder, tmp_path, capsys):
    argv = {
        "missing checkpoint": ["--checkpoint", tmp_path / "nope"],
        "not a checkpoint": ["--checkpoint", tmp_path],
        "unknown task": ["--checkpoint", checkpoint, "--tasks", "tiny_choice,no_such_task",
                         "--include-path", task_folder, "--no-builtin-tasks"],
        "missing task folder": ["--checkpoint", checkpoint, "--include-path", tmp_path / "no-tasks"],
        "missing data": ["--checkpoint", checkpoint, "--data", tmp_path / "none.jsonl"],
        "bad stride": ["--checkpoint", checkpoint, "--data", tmp_path / "none.jsonl", "--stride", 0],
    }[case]
    code, _, err = run_cli(argv + ["--output", tmp_path / "o.json"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tokenformer evaluate: error: ")
    expected = {"missing checkpoint": "does not exist", "not a checkpoint": "config.json",
                "unknown task": "unknown task no_such_task", "missing task folder": "no-tasks",
                "missing data": "none.jsonl", "bad stride": "--stride"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "o.json").exists()


def test_missing_lm_eval_names_the_extra(checkpoint, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without lm-eval sees
    code, _, err = run_cli(["--checkpoint", checkpoint, "--output", tmp_path / "o.json"], capsys)
    assert code == 2 and 'pip install "tokenformer[eval]"' in err and len(err.strip().splitlines()) == 1


def test_tokenformer_lm_eval_without_lm_eval_names_the_extra(capsys, monkeypatch):
    import sys

    from tokenformer.cli.evaluate import lm_eval_main as lm_eval_cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SystemExit) as e:
        lm_eval_cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'pip install "tokenformer[eval]"' in err[0]


def test_tokenformer_lm_eval_runs_lm_evals_own_command_line(checkpoint, task_folder, tmp_path, capsys, monkeypatch):
    import functools
    import sys

    import lm_eval.__main__
    import lm_eval.tasks

    from tokenformer.evaluation.lm_eval import main

    # Only to save the ~10 s of indexing lm-eval's own tasks: the command line is lm-eval's.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    monkeypatch.setattr(lm_eval.__main__, "setup_logging", lambda: None)  # leave logging as it was
    monkeypatch.setattr(sys, "argv", ["tokenformer-lm-eval"])  # main() rewrites it for lm-eval's parser
    output = tmp_path / "lm-eval-out"
    main(["--model", "tokenformer", "--model_args", f"pretrained={checkpoint},dtype=float32,batch_size=3",
          "--tasks", "tiny_lambada", "--include_path", str(task_folder), "--device", "cpu",
          "--output_path", str(output)])
    out = capsys.readouterr().out
    assert "tiny_lambada" in out and "tokenformer (" in out
    written = list(output.rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert 0.0 <= results["results"]["tiny_lambada"]["acc,none"] <= 1.0
    assert results["config"]["model_num_parameters"] == tf.TokenFormer.from_pretrained(checkpoint).num_parameters()


def test_model_args_win_over_lm_evals_own_defaults_and_unknown_ones_are_refused(checkpoint):
    from tokenformer.evaluation.lm_eval import TokenFormerLM

    # lm-eval's command line always adds its --batch_size (default 1) and --device (default cuda:0).
    lm = TokenFormerLM.create_from_arg_string(f"pretrained={checkpoint},batch_size=8,max_length=16",
                                              {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert lm.batch_size == 8 and lm.max_length == 16 and lm.tokenizer.name == "byte"
    assert lm.model.word_embeddings.weight.dtype == torch.float32
    assert TokenFormerLM(pretrained=checkpoint, dtype="bfloat16").model.word_embeddings.weight.dtype == torch.bfloat16
    half = tf.TokenFormer.from_pretrained(checkpoint, dtype=torch.bfloat16)
    lm = TokenFormerLM(pretrained=half, tokenizer=tf.ByteTokenizer())  # a model object keeps its dtype
    assert lm.model.word_embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(tf.TokenFormerError, match="unknown model_args trust_remote_code"):
        TokenFormerLM.create_from_arg_string(f"pretrained={checkpoint},trust_remote_code=True")
    with pytest.raises(tf.TokenFormerError, match="pretrained=CHECKPOINT_DIR"):
        TokenFormerLM.create_from_arg_string("batch_size=2")
    with pytest.raises(tf.TokenFormerError, match="max_length"):
        TokenFormerLM.create_from_arg_string(f"pretrained={checkpoint},max_length={SEQ + 1}")


@pytest.mark.parametrize("task, folder", [("lambada_openai", "lambada"), ("hellaswag", "hellaswag"), ("piqa", "piqa"),
                                          ("arc_easy", "arc"), ("arc_challenge", "arc"), ("winogrande", "winogrande")])
def test_the_official_tasks_exist_in_the_pinned_lm_eval_with_the_published_metric(task, folder):
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from tokenformer.evaluation.published import OFFICIAL_TASKS, TABLE_METRICS

    assert task in OFFICIAL_TASKS
    folder = Path(lm_eval.__file__).parent / "tasks" / folder
    assert task in TaskManager(include_path=str(folder), include_defaults=False).all_tasks
    config, = [p.read_text() for p in folder.glob("*.yaml") if f"\ntask: {task}\n" in "\n" + p.read_text()]
    for line in config.splitlines():  # `include: other.yaml` brings in the metrics of the other file
        if line.startswith("include: "):
            config += (folder / line.split(": ", 1)[1].strip()).read_text()
    assert f"metric: {TABLE_METRICS[task]}\n" in config
    if task == "lambada_openai":
        assert "metric: perplexity\n" in config


def test_gpt_neox_tokenizer_requests_split_at_the_word_boundary(neox_tokenizer_path):
    from tokenformer.evaluation.lm_eval import TokenFormerLM

    model = tf.TokenFormer(tf.Config.from_name("tiny", seq_length=SEQ, vocab_size=50277)).eval()
    lm = TokenFormerLM(pretrained=model, tokenizer=tf.load_tokenizer(neox_tokenizer_path), batch_size=2)
    assert lm.tok_encode("Hello world") == [12092, 1533] and lm.eot_token_id == 0
    # A trailing space of the context moves to the continuation, as lm-eval does for every model.
    (a, _), (b, _) = lm.loglikelihood(requests("loglikelihood", [("Hello", " world"), ("Hello ", "world")]),
                                      disable_tqdm=True)
    expected, _ = direct_log_likelihood(model, [12092], [1533])
    assert a == pytest.approx(expected, abs=1e-4) and b == pytest.approx(expected, abs=1e-4)


def test_evaluate_reads_what_tokenformer_prepare_writes(model, checkpoint, tmp_path, capsys):
    from tokenformer.data.indexed import IndexedDataset

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    meta = tf.prepare([corpus], tmp_path / "prepared", tokenizer="byte", valid_fraction=0.5, progress=False)
    output = tmp_path / "ppl.json"
    code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", tmp_path / "prepared", "--output", output], capsys)
    assert code == 0
    report = json.loads(output.read_text())
    valid = meta["splits"]["valid"]
    assert report["documents"] == valid["documents"] >= 1 and report["tokens"] == valid["tokens"]
    # The validation documents are some of TEXTS, each stored with an end-of-text token after it.
    stored = IndexedDataset(tmp_path / "prepared" / "valid_text_document")
    docs = [[int(t) for t in stored[i]] for i in range(len(stored))]
    assert all(d[-1] == 256 and bytes(d[:-1]).decode() in TEXTS for d in docs)
    expected = perplexity(model, [(d, len(d) - 1) for d in docs], prefix_id=256, progress=False)
    assert report["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)


def test_cli_perplexity_in_bfloat16_is_close_to_float32(checkpoint, tmp_path, capsys):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", jsonl, "--dtype", dtype,
                              "--output", tmp_path / f"{dtype}.json"], capsys)
        assert code == 0
        losses[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.05)
    assert losses["bfloat16"] != losses["float32"]  # it really ran in bfloat16
