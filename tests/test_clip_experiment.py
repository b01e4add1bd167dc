"""The CLIP experiment (`experiments/clip.py`) and its open_clip-shaped baseline
(`experiments/clip_baseline.py`): the baseline's interface against the CLIP TokenFormer's, its
pooling and causal blocks against hand computations, its parameter count against OpenAI CLIP's
published one, training through `train` (train-clip), and the experiment end to end on a few scenes."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from experiments import clip as experiment
from experiments.clip_baseline import CLIPBaseline, num_parameters_by_hand
from experiments.vit import ViTBlock
from tokenformer.data.scenes import write_scene_dataset
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer
from tokenformer.training.config import ClipTrainConfig
from tokenformer.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny() -> CLIPConfig:
    return CLIPConfig.from_name("tiny")


def test_the_baseline_has_the_interface_of_the_clip_tokenformer():
    config = tiny()
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(0, 257, (3, 12))
    lengths = torch.tensor([12, 5, 1])
    for model in (CLIPTokenFormer(config), CLIPBaseline(config)):
        image_features, text_features, scale = model(images, ids, lengths)
        assert image_features.shape == text_features.shape == (3, config.embed_dim)
        assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-6)
        assert torch.allclose(text_features.norm(dim=-1), torch.ones(3), atol=1e-6)
        assert math.isclose(float(scale.detach()), 1 / 0.07, rel_tol=1e-6)  # open_clip's init, exponentiated
        assert model.logit_scale.shape == ()
        assert torch.allclose(F.normalize(model.encode_image(images), dim=-1), image_features, atol=1e-6)
        assert torch.allclose(F.normalize(model.encode_text(ids, lengths), dim=-1), text_features, atol=1e-6)
    with pytest.raises(Exception, match="context length"):
        CLIPBaseline(config).encode_text(torch.zeros(1, config.text.seq_length + 1, dtype=torch.long),
                                         torch.tensor([1]))


def test_the_text_features_are_those_of_the_end_of_text_token_of_each_caption_alone():
    """Batched and right-padded, each caption's features equal those of the caption encoded alone,
    unpadded: causal attention and pooling at lengths - 1 keep the padding out."""
    model = CLIPBaseline(tiny()).eval()
    ids, lengths = torch.randint(0, 257, (3, 10)), torch.tensor([10, 4, 1])
    batched = model.encode_text(ids, lengths)
    for row, n in enumerate(lengths.tolist()):
        alone = model.encode_text(ids[row:row + 1, :n], torch.tensor([n]))
        assert torch.allclose(batched[row], alone[0], atol=1e-5)
    changed = ids.clone()
    changed[1, 0] = (changed[1, 0] + 1) % 257  # a token inside caption 1 does change it
    assert not torch.allclose(model.encode_text(changed, lengths)[1], batched[1], atol=1e-4)


def test_the_causal_block_is_a_masked_attention_written_by_hand():
    torch.manual_seed(1)
    config = tiny().text
    block = ViTBlock(config, causal=True).eval()
    x = torch.randn(2, 6, config.hidden_size)
    B, T, h = x.shape
    H = config.num_attention_heads
    q, k, v = block.qkv(block.norm1(x)).split(h, dim=-1)
    q, k, v = (t.view(B, T, H, h // H).transpose(1, 2) for t in (q, k, v))      # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(h // H)                          # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, h)                 # (B, T, h)
    a = x + block.proj(y)
    expected = a + block.fc2(F.gelu(block.fc1(block.norm2(a))))
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert not torch.allclose(ViTBlock(config).eval()(x), block(x), atol=1e-3)  # the image tower's sees all


def test_parameter_counts_by_hand_and_openai_clip_vit_b32():
    config = tiny()
    model = CLIPBaseline(config)
    assert model.num_parameters() == num_parameters_by_hand(config)
    # OpenAI CLIP's ViT-B/32 has 151,277,313 parameters (the count its notebook prints); this
    # baseline at that shape lacks ln_pre (2 x 768) and has a patch-embedding bias (768).
    b32 = CLIPConfig.from_name("B/16", vision={"patch_size": 32})
    assert num_parameters_by_hand(b32) == 151_277_313 - 2 * 768 + 768
    # the same width, depth and embedding; the projections differ, and so do the counts
    assert CLIPTokenFormer(config).num_parameters() == config.num_parameters != model.num_parameters()


def test_save_pretrained_round_trip(tmp_path):
    model = CLIPBaseline(tiny()).eval()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "clip_baseline"
    loaded = CLIPBaseline.from_pretrained(tmp_path / "m")
    images, ids, lengths = torch.randn(2, 3, 32, 32), torch.randint(0, 257, (2, 8)), torch.tensor([8, 3])
    for a, b in zip(model(images, ids, lengths), loaded(images, ids, lengths)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    write_scene_dataset(out, train=32, val=16, seed=0)
    return out


def test_train_clip_lowers_the_loss_of_both_models_on_one_batch(scenes, tmp_path):
    """Every step sees the same 32 pairs (one batch an epoch; the loss does not depend on their
    order), so the loss of the last step is comparable with the first."""
    for kind in experiment.MODELS:
        values = dict(experiment.RECIPE, model={"name": "tiny", "text": {"vocab_size": 512}}, batch_size=32,
                      epochs=6, warmup_epochs=0.0, data=str(scenes / "train"), val_data=str(scenes / "val"),
                      save=str(tmp_path / kind), progress=False, plot=False)
        cfg = ClipTrainConfig.from_dict(values)
        model = experiment.build(kind, cfg)
        result = train(cfg, model)
        losses = result["losses"]
        assert type(model).__name__ == kind and len(losses) == 6
        assert losses[6] < losses[1] - 0.1, (kind, losses)
        assert result["num_parameters"] == model.num_parameters()


def test_per_class_accuracy_by_hand():
    predicted = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    assert experiment.per_class_accuracy(predicted, labels, 4) == [0.5, 0.5, 1.0, None]


def test_the_experiment_end_to_end_on_a_few_scenes(tmp_path, monkeypatch):
    monkeypatch.setitem(experiment.RECIPE, "batch_size", 16)
    report = experiment.run_part("scenes", dict(train=32, val=16, epochs=2), tmp_path, sequential=True)
    results = report["scenes"]["results"]
    assert set(results) == set(experiment.MODELS)
    for kind, result in results.items():
        assert [r["epoch"] for r in result["history"]] == [1, 2]
        assert 0.0 <= result["history"][-1]["image_to_text_recall@1"] <= 1.0
        assert result["step"] == 2 * 32 // 16
    assert results["CLIPTokenFormer"]["num_parameters"] != results["CLIPBaseline"]["num_parameters"]
    assert experiment.plot(report, tmp_path / "clip.png").stat().st_size > 0
