"""The CLIP TokenFormer (tokenformer.models.clip), its contrastive loss over ranks
(tokenformer.training.contrastive), its training task, retrieval and zero-shot evaluation
(tokenformer.evaluation.retrieval) and the train-clip / evaluate-clip commands."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokenformer as tf
from tokenformer.__main__ import main
from tokenformer.checkpoint import load_model
from tokenformer.data.images import write_idx
from tokenformer.data.tokenizer import ByteTokenizer
from tokenformer.models.captioner import Captioner, CaptionerConfig
from tokenformer.models.clip import CLIP_PRESETS, CLIPConfig, CLIPTokenFormer, tokenize_captions
from tokenformer.training.config import ClipTrainConfig
from tokenformer.training.contrastive import clamp_logit_scale, clip_loss, scale_gradient
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny(**overrides) -> CLIPTokenFormer:
    return CLIPTokenFormer(CLIPConfig.from_name("tiny", **overrides)).eval()


def batch(model: CLIPTokenFormer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v = model.config.vision
    ids, lengths = tokenize_captions(ByteTokenizer(), captions, model.config.text.seq_length)
    return torch.randn(len(captions), v.num_channels, v.image_size, v.image_size), ids, lengths


CAPTIONS = ["a red circle", "two blue squares", "a green ring at the top left", "one cross"]


# ---- the model ----------------------------------------------------------------------------------

def test_forward_shapes_normalised_features_and_parameter_count():
    model = tiny()
    image_features, text_features, scale = model(*batch(model, CAPTIONS))
    assert image_features.shape == text_features.shape == (4, 64)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert math.isclose(float(scale.detach()), 1 / 0.07, rel_tol=1e-6)
    assert model.num_parameters() == model.config.num_parameters
    for name in CLIP_PRESETS:  # the count from shapes, by hand for the towers' extras
        with torch.device("meta"):
            big = CLIPTokenFormer(CLIPConfig.from_name(name))
        c = big.config
        assert big.num_parameters() == c.num_parameters
        assert c.num_parameters == (c.vision.num_parameters + c.text.num_parameters + 1
                                    + c.text_projection_slot_num * (c.text.hidden_size + c.embed_dim))


def test_b16_preset_has_open_clip_shapes():
    c = CLIPConfig.from_name("B/16")
    assert (c.vision.image_size, c.vision.patch_size, c.vision.hidden_size, c.vision.num_layers) == (224, 16, 768, 12)
    assert (c.text.seq_length, c.text.hidden_size, c.text.num_attention_heads, c.text.num_layers) == (77, 512, 8, 12)
    assert c.embed_dim == c.vision.num_classes == 512
    assert (c.text.qkv_slot_num, c.text.proj_slot_num, c.text.ffn_slot_num) == (512, 512, 2048)
    assert (c.vision.qkv_slot_num, c.vision.ffn_slot_num) == (768, 3072)


def test_text_tower_pools_at_the_end_of_text_and_ignores_padding():
    model = tiny()
    tok = ByteTokenizer()
    ids, lengths = tokenize_captions(tok, ["a cat"], 32)
    assert lengths.tolist() == [6] and ids[0, 5] == tok.eos_id
    alone = model.encode_text(ids[:, :6], lengths)  # no padding at all
    garbage = ids.clone()
    garbage[0, 6:] = 7                              # anything after the end-of-text token
    assert torch.allclose(model.encode_text(ids, lengths), alone, atol=1e-6)
    assert torch.allclose(model.encode_text(garbage, lengths), alone, atol=1e-6)
    # by hand: the final-normed hidden state at the end-of-text position, then the projection
    hidden = model.text.run_layers(model.text.word_embeddings(ids))[0, 5]
    assert torch.allclose(model.text.projection(model.text.final_norm(hidden)), alone[0], atol=1e-6)
    with pytest.raises(tf.TokenFormerError, match="lengths"):
        model.encode_text(ids, torch.tensor([0]))


def test_tokenize_captions_truncates_keeping_the_end_of_text_token():
    tok = ByteTokenizer()
    ids, lengths = tokenize_captions(tok, ["abcdefgh", "ab"], 5)
    assert ids.tolist() == [[97, 98, 99, 100, 256], [97, 98, 256, 256, 256]]
    assert lengths.tolist() == [5, 3]
    ids, _ = tokenize_captions(tok, ["ab"], 4, pad_id=0)
    assert ids.tolist() == [[97, 98, 256, 0]]


def test_config_round_trip_merged_overrides_and_checks():
    c = CLIPConfig.from_name("tiny", vision={"num_layers": 3}, embed_dim=32, text_projection_slot_num=16)
    assert c.vision.num_layers == 3 and c.vision.image_size == 32 and c.vision.num_classes == 32
    assert CLIPConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(tf.TokenFormerError, match="num_classes"):
        CLIPConfig.from_name("tiny", vision={"num_classes": 10})
    with pytest.raises(tf.TokenFormerError, match="CLIP preset"):
        CLIPConfig.from_name("huge")


def test_save_load_round_trip_with_tokenizer(tmp_path):
    model = tiny()
    inputs = batch(model, CAPTIONS)
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is CLIPTokenFormer and loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded(*inputs), model(*inputs)))
    assert tf.load_tokenizer(tmp_path / "m").vocab_size == 257


def test_exact_growth_keeps_both_towers_features(tmp_path):
    model = tiny(text={"ffn_slot_num": 96})
    inputs = batch(model, CAPTIONS)
    grown = tf.grow(model, factor=2, mode="exact", seed=0)
    v, t = grown.config.vision, grown.config.text
    assert (v.qkv_slot_num, v.proj_slot_num, v.ffn_slot_num) == (128, 128, 512)
    assert (t.qkv_slot_num, t.proj_slot_num, t.ffn_slot_num) == (128, 128, 192)  # each tower by its own counts
    assert (v.qkv_scale_num, t.ffn_scale_num) == (64, 96) and len(v.growth_history) == len(t.growth_history) == 1
    assert grown.visual.layers[0].mlp.num_tokens == 512 and grown.text.layers[1].mlp.num_tokens == 192
    assert grown.visual.head.num_tokens == 64 and grown.text.projection.num_tokens == 64  # projections keep theirs
    assert model.config.vision.qkv_slot_num == 64  # the original is untouched
    before, after = model(*inputs), grown(*inputs)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)
    grown.save_pretrained(tmp_path / "g")  # the config written back states the new counts
    again = load_model(tmp_path / "g")
    assert again.config.text.ffn_slot_num == 192 and torch.allclose(again(*inputs)[1], before[1], atol=1e-5)
    official = tf.grow(model, factor=2, mode="official", seed=0)
    assert not torch.allclose(official(*inputs)[0], before[0], atol=1e-3)


def test_grow_command_on_a_clip_checkpoint(tmp_path, capsys):
    tiny().save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    assert main(["grow", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "g"), "--factor", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual qkv 128" in out and "text qkv 128" in out
    assert load_model(tmp_path / "g").config.vision.ffn_slot_num == 512


def test_every_parameter_gets_a_gradient():
    """DDP without find_unused_parameters needs every parameter in the graph of every step."""
    model = tiny().train()
    clip_loss(*model(*batch(model, CAPTIONS))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


# ---- the loss ------------------------------------------------------------------------------------

def hand_clip_loss(image: np.ndarray, text: np.ndarray, scale: float) -> float:
    """The symmetric InfoNCE by explicit loops in float64."""
    n = len(image)
    logits = [[scale * sum(image[i][d] * text[j][d] for d in range(image.shape[1])) for j in range(n)]
              for i in range(n)]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            top = max(row)
            total += top + math.log(sum(math.exp(v - top) for v in row)) - row[i]
        return total / n

    columns = [[logits[i][j] for i in range(n)] for j in range(n)]
    return (cross_entropy(logits) + cross_entropy(columns)) / 2


def test_loss_equals_a_hand_computation():
    torch.manual_seed(3)
    image = F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    scale = torch.tensor(4.5, dtype=torch.float64)
    expected = hand_clip_loss(image.numpy(), text.numpy(), 4.5)
    assert math.isclose(float(clip_loss(image, text, scale)), expected, rel_tol=1e-6)
    # matched pairs score a loss near 0 at a high scale, and worse than random when shuffled
    assert float(clip_loss(image, image, torch.tensor(100.0))) < 1e-3


def test_scale_gradient_keeps_the_value_bit_for_bit():
    x = torch.randn(6, 3, requires_grad=True)
    y = scale_gradient(x, 3)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_logit_scale_clamp():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == 2.0


DDP_SCRIPT = r"""
import json
import sys
import torch
from torch.nn.parallel import DistributedDataParallel
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer
from tokenformer.training.config import ClipTrainConfig
from tokenformer.training.contrastive import clip_loss
from tokenformer.training.distributed import init_distributed, shutdown
from tokenformer.training.loop import train

env = init_distributed("cpu")
# 1. one loss and its gradients, rank r holding pairs 4r .. 4r + 3 of the global 8
torch.manual_seed(0)
model = CLIPTokenFormer(CLIPConfig.from_name("tiny")).train()
images, ids, lengths = torch.load(sys.argv[1])
mine = slice(env.rank * 4, env.rank * 4 + 4)
ddp = DistributedDataParallel(model)  # kept: its hooks all-reduce the gradients in backward
loss = clip_loss(*ddp(images[mine], ids[mine], lengths[mine]), env)
loss.backward()
if env.rank == 0:
    torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}, sys.argv[2])
# 2. a whole train-clip run in the same process group (its metrics.jsonl is compared)
train(ClipTrainConfig(**json.loads(sys.argv[3])))
shutdown()
"""


def clip_run_fields(scenes: Path, save: Path) -> dict:
    return dict(model="tiny", data=str(scenes / "train"), val_data=str(scenes / "val"), epochs=1, batch_size=16,
                eval_batch_size=5, max_val_samples=15, lr=2e-3, save=str(save), progress=False, plot=False,
                log_interval=1, device="cpu", num_threads=1)


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
def test_two_ranks_give_the_loss_gradients_and_run_of_one_process(tmp_path, scenes):
    """One torchrun launch: (1) the gathered loss and every DDP-averaged gradient equal one process's
    on the same global batch; (2) a train-clip run's per-step losses and its validation (features
    gathered over ranks whose shards differ in size: 15 pairs, 8 and 7, in batches of 5) equal one process's."""
    torch.manual_seed(0)
    model = CLIPTokenFormer(CLIPConfig.from_name("tiny")).train()
    captions = CAPTIONS + ["a blue triangle", "three red rings", "a square", "two crosses at the bottom"]
    inputs = batch(model, captions)
    torch.save(inputs, tmp_path / "batch.pt")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    fields = json.dumps(clip_run_fields(scenes, tmp_path / "ranks"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "ddp.py"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), fields],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "out.pt")
    loss = clip_loss(*model(*inputs))  # one process, the whole global batch
    loss.backward()
    assert float(ranks["loss"]) == pytest.approx(float(loss.detach()), abs=1e-6)
    for name, p in model.named_parameters():
        # all-reduce and summation order: float32 rounding only
        assert torch.allclose(ranks["grads"][name], p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max())), name
    assert torch.allclose(ranks["grads"]["logit_scale"], model.logit_scale.grad, rtol=1e-5)

    alone = train(ClipTrainConfig(**clip_run_fields(scenes, tmp_path / "alone")))
    records = read_metrics(tmp_path / "ranks" / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == sorted(alone["losses"]) == [1, 2, 3]
    for step, value in alone["losses"].items():
        assert abs(losses[step] - value) <= 1e-5, (step, losses[step], value)
    validation = next(r for r in records if "val_loss" in r)
    for key, value in alone["validation"].items():
        if key.startswith(("val_loss", "image_to", "text_to")):
            assert validation[key] == pytest.approx(value, abs=1e-5), key


# ---- retrieval and zero-shot evaluation ----------------------------------------------------------

def test_retrieval_recall_against_a_hand_count():
    from tokenformer.evaluation.retrieval import retrieval_recall

    torch.manual_seed(1)
    image = F.normalize(torch.randn(6, 4), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(6, 4), dim=-1)
    similarity = (image @ text.T).tolist()

    def hits(rows, k):  # row i's own column among the k largest of the row
        return sum(sorted(range(len(row)), key=lambda j: -row[j]).index(i) < k for i, row in enumerate(rows))

    columns = [list(c) for c in zip(*similarity)]
    recall = retrieval_recall(image, text, ks=(1, 2, 10))
    for k in (1, 2, 10):
        assert recall[f"image_to_text_recall@{k}"] == pytest.approx(hits(similarity, k) / 6)
        assert recall[f"text_to_image_recall@{k}"] == pytest.approx(hits(columns, k) / 6)
    assert recall["image_to_text_recall@10"] == 1.0

    # several captions per image: texts 0, 1 of image 0, text 2 of image 1; image 0 is closest to text 2
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[0.2, 1.0], [0.1, 1.0], [1.0, 0.1]]), dim=-1)
    recall = retrieval_recall(image, text, ks=(1, 2), text_image=torch.tensor([0, 0, 1]))
    # image 0's top text is 2 (not its own), top-2 adds text 0 (its own); image 1's top is text 0 (not its own),
    # then text 1 (not its own) -> image->text R@1 = 0, R@2 = 1/2
    assert recall["image_to_text_recall@1"] == 0.0 and recall["image_to_text_recall@2"] == 0.5
    # texts 0, 1 are nearest image 1 (wrong), text 2 nearest image 0 (wrong): R@1 = 0, R@2 = 1 (two images)
    assert recall["text_to_image_recall@1"] == 0.0 and recall["text_to_image_recall@2"] == 1.0
    with pytest.raises(tf.TokenFormerError, match="text_image"):
        retrieval_recall(image, text)


def test_zero_shot_classifier_and_accuracy_by_hand():
    from tokenformer.data.prompts import format_prompts
    from tokenformer.evaluation.retrieval import zero_shot_accuracy, zero_shot_classifier

    model, tok = tiny(), ByteTokenizer()
    classnames, templates = ["circle", "square", "ring"], ["a {}.", "a photo of the {}."]
    classifier = zero_shot_classifier(model, tok, classnames, templates)
    for c, prompts in enumerate(format_prompts(classnames, templates)):
        ids, lengths = tokenize_captions(tok, prompts, model.config.text.seq_length)
        with torch.no_grad():
            mean = F.normalize(model.encode_text(ids, lengths), dim=-1).mean(0)
        assert torch.allclose(classifier[c], mean / mean.norm(), atol=1e-6)
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]), dim=-1)
    classes = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -1.0]]), dim=-1)
    # nearest classes: image 0 -> 0, 1; image 1 -> 1, 0; image 2 -> 0 and 1 tie, 2 last; image 3 -> 2, 1
    labels = torch.tensor([0, 1, 2, 1])
    accuracy = zero_shot_accuracy(features, labels, classes, ks=(1, 2))
    scores = features @ classes.T
    top1 = (scores.argmax(1) == labels).float().mean().item()
    assert accuracy["top1"] == pytest.approx(top1) and accuracy["top1"] == 0.5
    assert accuracy["top2"] == pytest.approx(0.75)  # images 0, 1 and 3 (its second best); image 2's class is last


# ---- training ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from tokenformer.data.scenes import write_scene_dataset

    out = tmp_path_factory.mktemp("scenes")
    write_scene_dataset(out, train=48, val=16, seed=0)
    return out


def train_clip_cli(scenes: Path, save: Path, *extra: str) -> int:
    return main(["train-clip", "--model", "tiny", "--data", str(scenes / "train"), "--val_data", str(scenes / "val"),
                 "--epochs", "2", "--batch_size", "16", "--lr", "2e-3", "--save", str(save), "--progress", "false",
                 "--num_threads", "1", "--log_interval", "1", "--keep_last_n", "3", "--plot", "false", *extra])


def test_train_clip_cli_resumes_exactly_and_evaluate_clip_agrees(scenes, tmp_path, capsys):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert train_clip_cli(scenes, run) == 0
    assert "trained 2 epochs (6 steps" in capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = [r for r in records if "val_loss" in r]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in evals] == [1, 2]
    assert all(0.0 <= r["logit_scale"] <= 100.0 for r in records if "logit_scale" in r)
    model = load_model(run / "model")
    assert isinstance(model, CLIPTokenFormer) and (run / "model" / "tokenizer.json").is_file()

    # lose the last epoch, resume: the same losses and weights bit for bit
    last = load_file(str(run / "step_00000006" / "model.safetensors"))
    shutil.rmtree(run / "step_00000006")
    (run / "latest").unlink(missing_ok=True)
    assert train_clip_cli(scenes, run, "--resume", "true") == 0
    resumed = load_file(str(run / "step_00000006" / "model.safetensors"))
    assert all(torch.equal(resumed[k], last[k]) for k in last)
    again = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert again == losses

    # evaluate-clip recomputes the last validation's recall from model/ on its own
    capsys.readouterr()
    assert main(["evaluate-clip", "--checkpoint", str(run / "model"), "--data", str(scenes / "val")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 16
    for key in ("image_to_text_recall@1", "text_to_image_recall@5", "image_to_text_recall@10"):
        assert result[key] == pytest.approx(evals[-1][key])


def write_toy_fashion_mnist(directory: Path, train: int = 60, test: int = 30) -> None:
    """IDX files of 28x28 images whose class (0..9) is a bright horizontal band at row 2 * label."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        pictures = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            pictures[i, 2 * label:2 * label + 4] = 250
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", pictures)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


def test_fashion_mnist_zero_shot_on_held_out_classes(tmp_path, capsys):
    from tokenformer.data.prompts import FASHION_MNIST_CLASSES, TRAIN_TEMPLATES, format_prompts
    from tokenformer.training.distributed import DistEnv
    from tokenformer.training.tasks.base import TaskContext
    from tokenformer.training.tasks.clip import ClipTask

    write_toy_fashion_mnist(tmp_path / "fmnist")
    cfg = ClipTrainConfig(model="tiny-28", data=str(tmp_path / "fmnist"), classes=[0, 1, 2, 3, 4, 5, 6, 7],
                          epochs=1, batch_size=16, save=str(tmp_path / "run"), progress=False, plot=False,
                          device="cpu", num_threads=1)
    task = ClipTask(cfg)
    assert task.data.num_train == 48  # 60 images, 12 of them of labels 8 and 9
    model = task.build_model()
    task.prepare(model, TaskContext(DistEnv()))
    images, ids, lengths = task.train_batch(0, 16)
    captions = [task.tokenizer.decode(row[:n - 1].tolist()) for row, n in zip(ids, lengths)]
    allowed = {p for prompts in format_prompts(FASHION_MNIST_CLASSES[:8], TRAIN_TEMPLATES) for p in prompts}
    assert images.shape == (16, 1, 28, 28) and set(captions) <= allowed and len(set(captions)) > 1
    assert torch.equal(task.train_batch(0, 16)[1], ids)  # a function of the position: the same again

    result = train(cfg)
    record = result["validation"]
    assert {"zero_shot_top1", "zero_shot_top5", "zero_shot_unseen_top1", "val_loss"} <= set(record)
    capsys.readouterr()
    assert main(["evaluate-clip", "--checkpoint", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "fmnist"),
                 "--zero-shot", "fashion-mnist"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 30 and printed["templates"] == "held-out"
    assert printed["top1"] == pytest.approx(record["zero_shot_top1"])
    assert printed["top5"] == pytest.approx(record["zero_shot_top5"])
    # --templates train --max-samples 7: the first 7 test images, each class the mean of its
    # normalised training-template prompt embeddings; top-1 by hand
    assert main(["evaluate-clip", "--checkpoint", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "fmnist"),
                 "--zero-shot", "fashion-mnist", "--templates", "train", "--max-samples", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 7 and printed["templates"] == "train"
    from tokenformer.data.images import load_mnist, make_transform
    from tokenformer.data.prompts import fill

    clip = load_model(tmp_path / "run" / "model").eval()
    tokenizer = tf.load_tokenizer(tmp_path / "run" / "model" / "tokenizer.json")
    x, labels = load_mnist(tmp_path / "fmnist", "test")
    with torch.no_grad():
        image = F.normalize(clip.encode_image(make_transform(False, "none", [0.5], [0.5], 28)(x[:7])), dim=-1)
        classes = []
        for name in FASHION_MNIST_CLASSES:
            prompts = [fill(template, name) for template in TRAIN_TEMPLATES]
            ids, lengths = tokenize_captions(tokenizer, prompts, clip.config.text.seq_length)
            classes.append(F.normalize(F.normalize(clip.encode_text(ids, lengths), dim=-1).mean(0), dim=-1))
    predicted = (image @ torch.stack(classes).T).argmax(dim=1)
    assert printed["top1"] == pytest.approx(float((predicted == labels[:7]).float().mean()), abs=1e-6)  # printed to 6 places


class LinearClip(nn.Module):
    """An open_clip-shaped stand-in with the CLIP interface: linear image projection, mean of token
    embeddings up to the end of text."""

    model_type = "linear_clip_test"

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        v = config.vision
        self.image = nn.Linear(v.num_channels * v.image_size ** 2, config.embed_dim)
        self.embedding = nn.Embedding(config.text.padded_vocab_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))

    def encode_image(self, images):
        return self.image(images.flatten(1))

    def encode_text(self, ids, lengths):
        keep = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()  # (B, L)
        return (self.embedding(ids) * keep[..., None]).sum(1) / lengths[:, None]

    def forward(self, images, ids, lengths):
        return (F.normalize(self.encode_image(images), dim=-1), F.normalize(self.encode_text(ids, lengths), dim=-1),
                self.logit_scale.exp())


def test_train_clip_trains_another_model_with_the_same_interface(scenes):
    cfg = ClipTrainConfig(model="tiny", data=str(scenes / "train"), val_data=str(scenes / "val"), epochs=1,
                          batch_size=16, tokenizer="byte", progress=False, plot=False, device="cpu", num_threads=1,
                          lr=1e-2)
    from tokenformer.training.tasks.clip import model_config

    baseline = LinearClip(model_config(cfg))
    assert baseline.config.text.vocab_size == 257  # the byte tokenizer's; a BPE run's is bpe_vocab_size
    assert model_config(ClipTrainConfig(bpe_vocab_size=300)).text.vocab_size == 300
    before = baseline.image.weight.detach().clone()
    result = train(cfg, model=baseline)
    assert result["step"] == 3 and "image_to_text_recall@1" in result["validation"]
    assert not torch.equal(baseline.image.weight, before)
    assert result["num_parameters"] == sum(p.numel() for p in baseline.parameters())


def test_train_clip_config_errors(tmp_path):
    with pytest.raises(tf.TokenFormerError, match="needs `data`"):
        train(ClipTrainConfig(progress=False))
    with pytest.raises(tf.TokenFormerError, match="batch_size"):
        ClipTrainConfig(batch_size=1)
    with pytest.raises(tf.TokenFormerError, match="unknown train-clip config field"):
        ClipTrainConfig.from_dict({"epoch": 3})


def test_the_trained_normalisation_travels_with_the_model(scenes, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_clip_cli(scenes, run, "--epochs", "1", "--mean", "0.9", "--std", "0.1") == 0
    assert json.loads((run / "model" / "config.json").read_text())["vision"]["image_std"] == [0.1]
    validation = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    capsys.readouterr()
    # no --mean/--std: the model's own, so the recall is the one its training validation measured
    assert main(["evaluate-clip", "--checkpoint", str(run), "--data", str(scenes / "val")]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = [k for k in result if "recall" in k]
    assert len(keys) == 6 and all(result[k] == pytest.approx(validation[k]) for k in keys)
    assert main(["evaluate-clip", "--checkpoint", str(run), "--data", str(scenes / "val"),
                 "--mean", "0.5", "--std", "0.5"]) == 0  # the old default: other pixels, other features
    assert json.loads(capsys.readouterr().out) != result



@pytest.mark.parametrize("build, parts", [(tiny, ("visual", "text")),
                                          (lambda: Captioner(CaptionerConfig.from_name("tiny")), ("lm", "vision"))])
def test_gradient_checkpointing_reaches_both_parts(build, parts):
    model = build()  # CLIP's towers, the captioner's language model and image tower
    for value in (True, False):
        model.gradient_checkpointing = value  # as the training loop sets it
        assert [model.gradient_checkpointing, *(getattr(model, name).gradient_checkpointing for name in parts)] \
            == [value] * 3
