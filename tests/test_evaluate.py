"""Evaluation with lm-eval: the adapter against direct computations from the model's logits, the
harness end to end on task files written here (offline), `tokenformer evaluate --tasks` and
`tokenformer-lm-eval`, and what the commands say without lm-eval. Scoring, perplexity and
`tokenformer evaluate --data` need no lm-eval: tests/test_perplexity.py."""

import json

import pytest
import torch

import tokenformer as tf
from tests.test_perplexity import (SEQ, TEXTS, checkpoint, direct_log_likelihood, model,  # noqa: F401 (fixtures)
                                   run_cli)
from tokenformer.evaluation.published import task_scores
from tokenformer.evaluation.scoring import perplexity


@pytest.fixture(scope="module")
def lm_eval():
    """lm-eval, for the tests that need it (the others run without the `eval` extra)."""
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra)")


@pytest.fixture
def offline_hub(lm_eval, offline_hub):
    """The shared offline fixture (tests/conftest.py), for tests that also need lm-eval."""
    return offline_hub


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def lm(lm_eval, model):
    from tokenformer.evaluation.lm_eval import TokenFormerLM

    return TokenFormerLM(pretrained=model, tokenizer=tf.ByteTokenizer(), batch_size=4)


def requests(kind: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


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

CHOICE_DOCS = [{"question": "Which animal barks?", "choices": ["dog", "cat", "fish"], "answer": 0},
               {"question": "Two plus two is", "choices": ["three", "four"], "answer": 1},
               {"question": "The sky is", "choices": ["green", "blue", "loud", "up"], "answer": 1}]


def hand_choice_scores(model, docs) -> tuple[list[float], list[float]]:
    """acc and acc_norm of each multiple-choice doc: the choice of the highest log-likelihood of
    " choice" after "Question: ...\nAnswer:" (acc_norm: divided by the choice's length in characters)."""
    acc, acc_norm = [], []
    for doc in docs:
        context = list(f"Question: {doc['question']}\nAnswer:".encode())
        lls = [direct_log_likelihood(model, context, list((" " + c).encode()))[0] for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["answer"]))
    return acc, acc_norm


def hand_lambada_accuracy(model, texts) -> float:
    """The share of texts whose last word (with its space) is the greedy continuation of the rest."""
    greedy = []
    for text in texts:
        words = text.split(" ")
        greedy.append(direct_log_likelihood(model, list(" ".join(words[:-1]).encode()),
                                            list((" " + words[-1]).encode()))[1])
    return sum(greedy) / len(greedy)


def write_tasks(folder, data_folder):
    """A multiple-choice task, a LAMBADA-style loglikelihood task and a rolling (perplexity) task."""
    (data_folder / "choice.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHOICE_DOCS))
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


def test_harness_runs_local_tasks_end_to_end(model, lm, task_folder, offline_hub):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_choice", "tiny_lambada", "tiny_rolling"], num_fewshot=0,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    scores = task_scores(out["results"])
    acc, acc_norm = hand_choice_scores(model, CHOICE_DOCS)
    assert scores["tiny_choice"]["acc"] == pytest.approx(sum(acc) / 3)
    assert scores["tiny_choice"]["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
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

    # the task data went through the private cache of `offline_hub`, not the user's
    assert offline_hub.is_dir() and "json" in {p.name for p in offline_hub.iterdir()}  # the json builder's cache


# ---- the command line -----------------------------------------------------------------------------

def test_cli_tasks_print_the_table_and_write_the_results(checkpoint, model, task_folder, tmp_path, capsys, offline_hub):
    output = tmp_path / "results.json"
    code, out, _ = run_cli(["--checkpoint", checkpoint, "--tasks", "tiny_choice,tiny_lambada",
                            "--include-path", task_folder, "--no-builtin-tasks", "--batch-size", 2,
                            "--limit", 2, "--output", output], capsys)
    assert code == 0
    assert "| task | metric | ours (" in out and "| TokenFormer-150M | Pythia-160M |" in out
    assert "| tiny_choice | acc |" in out
    report = json.loads(output.read_text())
    assert set(report["scores"]) == {"tiny_choice", "tiny_lambada"}
    assert report["scores"]["tiny_choice"]["acc"] == pytest.approx(sum(hand_choice_scores(model, CHOICE_DOCS[:2])[0]) / 2)
    assert report["lm_eval"]["results"]["tiny_lambada"]["acc,none"] == report["scores"]["tiny_lambada"]["acc"] == \
        pytest.approx(hand_lambada_accuracy(model, TEXTS[:2]))
    assert report["limit"] == 2 and report["num_fewshot"] == 0
    # --num-fewshot 1: every request carries one solved example before its own question (a new output file:
    # the first is not replaced without --overwrite)
    fewshot = tmp_path / "fewshot.json"
    code, _, _ = run_cli(["--checkpoint", checkpoint, "--tasks", "tiny_choice", "--include-path", task_folder,
                          "--no-builtin-tasks", "--limit", 1, "--num-fewshot", 1, "--output", fewshot], capsys)
    assert code == 0
    report = json.loads(fewshot.read_text())
    assert report["num_fewshot"] == 1 and report["lm_eval"]["n-shot"]["tiny_choice"] == 1


# the checkpoint and data cases (no lm-eval needed) are in tests/test_perplexity.py
@pytest.mark.parametrize("case", ["unknown task", "missing task folder"])
def test_cli_bad_tasks_end_in_one_clear_sentence(case, checkpoint, task_folder, tmp_path, capsys, offline_hub):
    argv = {
        "unknown task": ["--checkpoint", checkpoint, "--tasks", "tiny_choice,no_such_task",
                         "--include-path", task_folder, "--no-builtin-tasks"],
        "missing task folder": ["--checkpoint", checkpoint, "--include-path", tmp_path / "no-tasks"],
    }[case]
    code, _, err = run_cli(argv + ["--output", tmp_path / "o.json"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tokenformer evaluate: error: ")
    expected = {"unknown task": "unknown task no_such_task", "missing task folder": "no-tasks"}[case]
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


def test_tokenformer_lm_eval_runs_lm_evals_own_command_line(checkpoint, model, task_folder, tmp_path, capsys,
                                                            monkeypatch, offline_hub):
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
    assert results["results"]["tiny_lambada"]["acc,none"] == pytest.approx(hand_lambada_accuracy(model, TEXTS[:4]))
    assert results["config"]["model_num_parameters"] == tf.TokenFormer.from_pretrained(checkpoint).num_parameters()


def test_model_args_win_over_lm_evals_own_defaults_and_unknown_ones_are_refused(lm_eval, checkpoint):
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
def test_the_official_tasks_exist_in_the_pinned_lm_eval_with_the_published_metric(lm_eval, task, folder):
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


def test_gpt_neox_tokenizer_requests_split_at_the_word_boundary(lm_eval, neox_tokenizer_path):
    from tokenformer.evaluation.lm_eval import TokenFormerLM

    model = tf.TokenFormer(tf.Config.from_name("tiny", seq_length=SEQ, vocab_size=50277)).eval()
    lm = TokenFormerLM(pretrained=model, tokenizer=tf.load_tokenizer(neox_tokenizer_path), batch_size=2)
    assert lm.tok_encode("Hello world") == [12092, 1533] and lm.eot_token_id == 0
    # A trailing space of the context moves to the continuation, as lm-eval does for every model.
    (a, _), (b, _) = lm.loglikelihood(requests("loglikelihood", [("Hello", " world"), ("Hello ", "world")]),
                                      disable_tqdm=True)
    expected, _ = direct_log_likelihood(model, [12092], [1533])
    assert a == pytest.approx(expected, abs=1e-4) and b == pytest.approx(expected, abs=1e-4)
