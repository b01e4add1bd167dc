"""Options that no other test ran, each checked for what it does: `grow --value-std` and
`--data-tokens`, `convert --dtype`, `generate --tokenizer`."""

import json
import re

import pytest
import torch

import tokenformer as tf
from tokenformer.__main__ import main
from tokenformer.data.documents import token_documents
from tokenformer.data.windows import token_windows
from tokenformer.evaluation.scoring import mean_loss
from tokenformer.generate import generate_text
from tokenformer.training.distributed import DistEnv
from tokenformer.training.tasks.base import TaskContext

pytestmark = pytest.mark.usefixtures("one_thread_module")


def new_value_rows(model: tf.TokenFormer, old: tf.TokenFormer) -> torch.Tensor:
    """Every value row the growth appended, across all Pattentions of the slot groups, flattened."""
    rows = [layer.value_param_tokens[old_layer.num_tokens:].flatten()
            for (name, layer), (_, old_layer) in zip(model.named_modules(), old.named_modules())
            if isinstance(layer, tf.Pattention)]
    return torch.cat(rows).detach()


def test_grow_value_std_sets_the_spread_of_the_new_value_rows(tiny_checkpoint, tmp_path, capsys):
    old = tf.TokenFormer.from_pretrained(tiny_checkpoint)
    for std in (0.0, 0.5):
        out = tmp_path / f"grown-{std}"
        assert main(["grow", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--factor", "2",
                     "--value-std", str(std), "--seed", "3"]) == 0
        grown = tf.TokenFormer.from_pretrained(out)
        values = new_value_rows(grown, old)
        assert values.numel() > 10_000
        if std == 0:
            assert torch.equal(values, torch.zeros_like(values))
        else:
            # the sample std of N normal draws has std sigma / sqrt(2N): 5 of those is < 0.005 here
            assert abs(float(values.std()) - std) < 5 * std / (2 * values.numel()) ** 0.5
        assert grown.config.growth_history[-1]["value_std"] == std
        x = torch.randint(0, 257, (1, 12))
        torch.testing.assert_close(grown(x), old(x), rtol=1e-5, atol=1e-5)  # exact growth, whatever the values
    capsys.readouterr()


def test_grow_data_tokens_scores_the_windows_covering_the_first_n_tokens(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                            for i in range(40)))
    assert main(["grow", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "grown"), "--factor", "2",
                 "--data", str(data), "--seq-length", "32", "--data-tokens", "100"]) == 0
    out = capsys.readouterr().out
    # 100 tokens need ceil(100 / 32) = 4 windows of 32 (+1) tokens
    assert "(4 windows of 32 tokens)" in out
    before, after = [float(v) for v in re.findall(r"(?:before growing|after) (\d+\.\d+)", out)]
    documents = (ids for ids, _ in token_documents(data, tf.ByteTokenizer()))
    windows = token_windows(documents, tf.ByteTokenizer().eos_id, 32)[:4]
    model = tf.TokenFormer.from_pretrained(tiny_checkpoint)
    assert before == pytest.approx(mean_loss(model, [windows]), abs=1e-5)
    assert after == pytest.approx(before, abs=1e-5)


def test_convert_dtype_writes_the_official_file_in_that_dtype(tiny_checkpoint, tmp_path, capsys):
    files = {}
    for dtype in ("float32", "bfloat16", None):
        path = tmp_path / f"{dtype}.bin"
        assert main(["convert", str(tiny_checkpoint), str(path), *(["--dtype", dtype] if dtype else [])]) == 0
        files[dtype] = torch.load(path, weights_only=True)
    capsys.readouterr()
    state = lambda f: f.get("module", f) if isinstance(f, dict) else f  # noqa: E731
    reference = {k: v for k, v in state(files["float32"]).items() if torch.is_tensor(v) and v.is_floating_point()}
    assert reference and all(v.dtype == torch.float32 for v in reference.values())
    for dtype, expected in (("bfloat16", torch.bfloat16), (None, torch.float16)):  # the default: float16
        converted = state(files[dtype])
        for name, tensor in reference.items():
            assert converted[name].dtype == expected
            assert torch.equal(converted[name], tensor.to(expected)), name


def test_generate_tokenizer_overrides_the_checkpoints(tmp_path, capsys):
    model = tf.TokenFormer(tf.Config.from_name("tiny")).eval()
    model.save_pretrained(tmp_path / "bare")  # no tokenizer.json beside the weights
    args = ["generate", "--checkpoint", str(tmp_path / "bare"), "--prompt", "hi", "--max-new-tokens", "6"]
    assert main(args) == 2  # nothing to encode the prompt with
    assert "tokenizer" in capsys.readouterr().err
    assert main(args + ["--tokenizer", "byte"]) == 0
    expected = generate_text(model, tf.ByteTokenizer(), "hi", 6)
    assert capsys.readouterr().out == "hi" + expected + "\n"


# ---- train-vision: label_smoothing and crop_padding ---------------------------------------------------

def vision_task(tmp_path, **fields):
    from tests.test_vision import write_toy_mnist
    from tokenformer.training.config import VisionTrainConfig
    from tokenformer.training.tasks.vision import VisionTask

    write_toy_mnist(tmp_path, n_train=8, n_test=4)
    task = VisionTask(VisionTrainConfig(model="tiny-28", data=str(tmp_path), batch_size=4, **fields))
    model = tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28"))
    task.prepare(model, TaskContext(DistEnv()))
    return task, model


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_mixes_the_uniform_target_into_the_loss(tmp_path, smoothing):
    task, model = vision_task(tmp_path, augment="none", label_smoothing=smoothing)
    model.eval()
    x, y = task.train_batch(0, 4)
    with torch.no_grad():
        loss, count = task.loss(model, (x, y), TaskContext(DistEnv()))
        log_p = torch.log_softmax(model(x).double(), dim=-1)  # (4, classes)
    # target (1 - e) on the label plus e / K on every class
    nll, uniform = -log_p[torch.arange(4), y].mean(), -log_p.mean(dim=-1).mean()
    assert count == 4
    assert float(loss) == pytest.approx(float((1 - smoothing) * nll + smoothing * uniform), rel=1e-5)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_crop_padding_bounds_the_shift_of_the_random_crop(tmp_path, padding):
    task, _ = vision_task(tmp_path, augment="crop", crop_padding=padding)
    white = torch.full((300, 1, 28, 28), 255, dtype=torch.uint8)
    x = task.train_transform(white, torch.Generator().manual_seed(0))  # white -> 1, zero padding -> -1
    padded_rows = (x == -1).all(dim=-1).sum(dim=-1).flatten()  # per image: rows the crop took from the padding
    padded_cols = (x == -1).all(dim=-2).sum(dim=-1).flatten()
    # a shift of d in [0, 2p] shows |d - p| padding rows: at most p, and with 300 images every value occurs
    assert set(padded_rows.tolist()) == set(range(padding + 1)) == set(padded_cols.tolist())


# ---- train-captioner: the tokenizer of lm_from ------------------------------------------------------

def test_captioner_takes_the_tokenizer_of_lm_from_unless_one_is_given(tmp_path):
    from tokenformer.training.config import CaptionTrainConfig
    from tokenformer.training.tasks.caption import resolve_tokenizer

    lm = tmp_path / "lm"
    tf.TokenFormer(tf.Config.from_name("tiny")).save_pretrained(lm, tokenizer=tf.ByteTokenizer())
    captions = ["one red circle on the left", "two blue squares at the top"] * 20
    fields = dict(data=str(tmp_path / "data"), vision_from=str(tmp_path / "vision"), lm_from=str(lm), bpe_vocab_size=300)
    taken = resolve_tokenizer(CaptionTrainConfig(**fields), captions)
    assert taken.vocab_size == 257 and taken.encode("ab") == [97, 98]  # the byte tokenizer lm_from was saved with
    (lm / "tokenizer.json").unlink()  # without one: a BPE trained on the captions
    trained = resolve_tokenizer(CaptionTrainConfig(**fields), captions)
    assert trained.vocab_size > 257 and len(trained.encode(captions[0])) < len(captions[0])
    given = resolve_tokenizer(CaptionTrainConfig(**fields, tokenizer="byte"), captions)  # an explicit one wins
    assert given.vocab_size == 257
