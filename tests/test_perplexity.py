"""Scoring and perplexity without lm-eval: `score_windows` and the sliding windows of `perplexity`
against direct computations from the model's logits, and `tokenformer evaluate --data` (perplexity
mode, which needs no `eval` extra). The lm-eval adapter and harness are in tests/test_evaluate.py."""

import json
import math
import sys

import pytest
import torch

import tokenformer as tf
from tokenformer.evaluation.scoring import perplexity, score_windows, sliding_windows

SEQ = 32  # the tiny model's context: short, so that truncation and windows are cheap to exercise

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran far away from home",
    "hello there my old friend",
    "pattention layers attend over parameter tokens instead of weights",
    "x",
]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def save_tiny_checkpoint(directory):
    """A tiny byte-level TokenFormer with a context of SEQ tokens, saved with its tokenizer."""
    torch.manual_seed(0)
    tf.TokenFormer(tf.Config.from_name("tiny", seq_length=SEQ)).save_pretrained(directory, tokenizer=tf.ByteTokenizer())
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return tf.TokenFormer.from_pretrained(checkpoint)


def direct_log_likelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) by one unpadded forward pass over the last SEQ + 1 tokens."""
    tokens = (context + continuation)[-(SEQ + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].double()  # (T, padded_vocab)
    log_probs = torch.log_softmax(logits, dim=-1)[-len(continuation):]
    target = torch.tensor(continuation)
    return log_probs[torch.arange(len(continuation)), target].sum().item(), \
        bool((log_probs.argmax(-1) == target).all())


def run_cli(argv, capsys):
    from tokenformer.__main__ import main

    try:
        code = main(["evaluate", *map(str, argv)])
    except SystemExit as e:  # argparse's usage errors (a number out of range)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- scoring windows ------------------------------------------------------------------------------

def test_score_windows_equals_direct_computation_in_input_order(model):
    context = list(b"hello there")
    greedy = []  # the model's own greedy continuation of `context`, 3 tokens
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    windows = [(list(b"the cat sat on the"), list(b" mat")),
               (list(b"a"), list(b"b")),
               (list(range(60)), list(b" cut on the left")),  # longer than SEQ: left truncation
               (context, greedy),
               ([256], list(b"y" * SEQ))]  # the longest continuation that fits
    results = score_windows(model, windows, batch_size=2)
    assert len(results) == len(windows)
    for (ctx, continuation), (score, is_greedy) in zip(windows, results):
        expected, expected_greedy = direct_log_likelihood(model, ctx, continuation)
        assert score == pytest.approx(expected, abs=1e-4)
        assert is_greedy == expected_greedy
    assert results[3][1] and not results[0][1]
    # padding and the longest-first order do not change a score
    for (a, greedy_a), (b, greedy_b) in zip(results, score_windows(model, windows, batch_size=1)):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_score_windows_refuses_windows_it_cannot_score(model):
    with pytest.raises(tf.TokenFormerError, match="empty continuation"):
        score_windows(model, [([1, 2], [])])
    with pytest.raises(tf.TokenFormerError, match="does not fit"):
        score_windows(model, [([1], [2] * (SEQ + 1))])
    with pytest.raises(tf.TokenFormerError, match="at least one context token"):
        score_windows(model, [([], [5])])


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


# ---- the command line: `tokenformer evaluate --data` ----------------------------------------------

def test_cli_perplexity_on_jsonl_indexed_prefix_and_prepared_directory(model, checkpoint, tmp_path, capsys,
                                                                       monkeypatch):
    from tokenformer.data.indexed import IndexedDatasetWriter

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # perplexity mode needs no lm-eval
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
    code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", text_file, "--output", output, "--overwrite"], capsys)
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
        code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", data, "--output", output, "--overwrite"], capsys)
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


# The checkpoint is checked before lm-eval is needed, so these hold without the `eval` extra too;
# the task cases are in tests/test_evaluate.py.
@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "missing data", "bad stride"])
def test_cli_bad_input_ends_in_one_clear_sentence(case, checkpoint, tmp_path, capsys):
    argv = {
        "missing checkpoint": ["--checkpoint", tmp_path / "nope"],
        "not a checkpoint": ["--checkpoint", tmp_path],
        "missing data": ["--checkpoint", checkpoint, "--data", tmp_path / "none.jsonl"],
        "bad stride": ["--checkpoint", checkpoint, "--data", tmp_path / "none.jsonl", "--stride", 0],
    }[case]
    code, _, err = run_cli(argv + ["--output", tmp_path / "o.json"], capsys)
    # a number out of range is argparse's usage error: the usage lines, then the one error line
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tokenformer evaluate: error: ")
    expected = {"missing checkpoint": "does not exist", "not a checkpoint": "config.json",
                "missing data": "none.jsonl", "bad stride": "--stride"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "o.json").exists()


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
    # bf16 keeps 8 bits: each logit (|logit| < 1 here) moves by about 2^-8 x its size, at most ~4e-3,
    # and a token's loss by at most twice that; the mean over ~200 tokens of errors of random sign is
    # far smaller (measured 5e-5). 2e-3 is one token's worst case: a freshly initialised model of
    # another seed is 0.027 to 0.068 away (seeds 1-4), so reading other weights fails here.
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=2e-3)
    assert losses["bfloat16"] != losses["float32"]  # it really ran in bfloat16


def test_cli_progress_has_a_total_and_no_results_file_lands_uninvited(checkpoint, tmp_path, capsys, monkeypatch):
    from tokenformer.evaluation import scoring

    totals = []
    real_bar = scoring.progress_bar

    def recording_bar(total=None, **options):
        if options["desc"] == "perplexity":
            totals.append(total)
        return real_bar(total, **options)

    monkeypatch.setattr(scoring, "progress_bar", recording_bar)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + json.dumps({"text": ""}) + "\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["--checkpoint", checkpoint, "--data", jsonl], capsys)
    assert code == 0 and "bits per byte" in out and "wrote" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # printed only: no eval_results.json
    assert totals == [len(TEXTS) + 1]  # every document of the file, the empty one too
    code, _, _ = run_cli(["--checkpoint", checkpoint, "--data", jsonl, "--limit", 3], capsys)
    assert totals[-1] == 3
