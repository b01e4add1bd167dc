"""The image captioner (tokenformer.models.captioner), its generation, its training task and CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenformer as tf
from tokenformer.checkpoint import load_model
from tokenformer.data import scenes
from tokenformer.generate import generate_caption
from tokenformer.models.captioner import Captioner, CaptionerConfig, caption_loss
from tokenformer.training.tasks.caption import accuracy_record, attribute_matches, caption_rows

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny(**text) -> Captioner:
    config = CaptionerConfig.resolve({"name": "tiny", "text": text})
    return Captioner(config).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


# ---- the model ----------------------------------------------------------------------------------

def test_tokens_keep_the_class_token_features():
    vision = tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28")).eval()
    x = torch.randn(3, 1, 28, 28)
    # the old features(): blocks over [cls; patches] + positions, the final norm of the class token
    h = vision.patch_embed(vision.patchify(x))
    h = torch.cat([vision.cls_token.expand(3, -1, -1), h], dim=1) + vision.position_embeddings
    for block in vision.layers:
        h = block(h, None, None)
    old = vision.final_norm(h[:, 0])
    tokens = vision.tokens(x)
    assert tokens.shape == (3, 1 + vision.config.num_patches, 32)
    assert torch.allclose(tokens[:, 0], old, atol=1e-6) and torch.allclose(vision.features(x), old, atol=1e-6)


def test_config_parts_presets_and_errors():
    config = CaptionerConfig.from_name("tiny")
    assert config.vision.num_classes == config.text.hidden_size == 64 and config.prefix_length == 17
    assert config.caption_room == config.text.seq_length - 17 - 1  # the end-of-text token that opens a caption
    assert Captioner(config).num_parameters() == config.num_parameters
    big = CaptionerConfig.from_name("B/16-150M")
    assert (big.prefix_length, big.vision.num_classes, big.text.num_layers) == (197, 768, 12)
    again = CaptionerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(tf.TokenFormerError, match="must equal the language model's hidden_size 64"):
        CaptionerConfig.resolve({"name": "tiny", "vision": {"num_classes": 10}})
    with pytest.raises(tf.TokenFormerError, match="leaves no room for a caption"):
        CaptionerConfig.resolve({"name": "tiny", "text": {"seq_length": 18}})


def test_projector_is_the_head_on_every_token_and_every_parameter_gets_a_gradient():
    model = tiny().train()
    x, ids = images(), torch.randint(0, 257, (2, 5))
    prefix = model.image_prefix(x)
    assert torch.allclose(prefix, model.vision.head(model.vision.tokens(x)))
    assert prefix.shape == (2, 17, 64)
    caption_loss(model, x, ids, torch.tensor([5, 3])).backward()
    # DDP without find_unused_parameters: nothing may be left out of the graph
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cache_decoding_equals_the_full_forward():
    model = tiny()
    x, ids = images(3), torch.randint(0, 257, (3, 9))
    full = model(x, ids)  # (3, 9, V)
    assert full.shape == (3, 9, model.config.text.padded_vocab_size)
    cache = model.allocate_cache(3, 9)
    steps = [model(x, ids[:, :4], cache=cache)] + [model(None, ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    assert cache.length == 17 + 9
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.allclose(model(x, ids, last_only=True), full[:, -1:], atol=1e-6)
    with pytest.raises(tf.TokenFormerError, match="needs its images"):
        model(None, ids)


def greedy_without_cache(model, image, eos: int, steps: int) -> list[int]:
    """Greedy decoding by running the whole sequence again for every token (no cache)."""
    ids = [eos]
    for _ in range(steps):
        logits = model(image[None], torch.tensor([ids]))[0, -1]
        logits[257:] = float("-inf")
        token = int(logits.argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[1:]


def test_generate_caption_is_greedy_decoding_batched_or_not():
    model = tiny()
    # a bias towards a few bytes makes the greedy path visit several different tokens
    with torch.no_grad():
        model.lm.word_embeddings.weight[100:110] *= 4
    tok = tf.ByteTokenizer()
    x = images(3)
    batched = generate_caption(model, tok, x, max_new_tokens=12)
    for row in range(3):
        expected = tok.decode(greedy_without_cache(model, x[row], tok.eos_id, 12))
        assert batched[row] == expected == generate_caption(model, tok, x[row:row + 1], max_new_tokens=12)[0]
    with pytest.raises(tf.TokenFormerError, match="give at most"):
        generate_caption(model, tok, x, max_new_tokens=200)


def test_caption_loss_is_the_hand_computed_mean_over_caption_tokens():
    model = tiny()
    x = images(2)
    ids = torch.tensor([[256, 10, 11, 12, 256, 256, 256], [256, 20, 256, 256, 256, 256, 256]])  # (2, 7)
    lengths = torch.tensor([5, 3])  # [bos, 3 words, eos] and [bos, 1 word, eos], then padding
    loss = caption_loss(model, x, ids, lengths)
    terms = []
    for b in range(2):
        n = int(lengths[b])
        logp = F.log_softmax(model(x[b:b + 1], ids[b:b + 1, :n - 1])[0], dim=-1)  # (n - 1, V)
        terms += [-logp[t, ids[b, t + 1]] for t in range(n - 1)]  # bos -> first word ... last word -> eos
    assert len(terms) == 6
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    assert torch.allclose(caption_loss(model, x, ids, lengths, reduction="sum"), torch.stack(terms).sum(), atol=1e-4)
    padded = ids.clone()
    padded[0, 5:], padded[1, 3:] = 7, 9  # whatever the padding holds, it is not counted
    assert torch.allclose(caption_loss(model, x, padded, lengths), loss, atol=1e-6)
    # caption_rows writes exactly such rows
    rows, counted = caption_rows([[10, 11, 12], [20]], 256)
    assert torch.equal(rows, ids[:, :5]) and torch.equal(counted, lengths)


def test_save_load_round_trip(tmp_path):
    model = tiny(vocab_size=300)
    model.save_pretrained(tmp_path / "captioner", tokenizer=tf.ByteTokenizer())
    values = json.loads((tmp_path / "captioner" / "config.json").read_text())
    assert values["model_type"] == "tokenformer_captioner" and values["text"]["vocab_size"] == 300
    loaded = load_model(tmp_path / "captioner")
    assert isinstance(loaded, Captioner) and loaded.config == model.config
    x, ids = images(), torch.randint(0, 300, (2, 6))
    assert torch.equal(loaded(x, ids), model(x, ids))


def test_from_parts_keeps_both_parts_and_adds_a_projector(tmp_path):
    tower = tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28", hidden_size=48, num_classes=10))
    lm = tf.TokenFormer(tf.Config.from_name("tiny"))
    tower.save_pretrained(tmp_path / "vision")
    lm.save_pretrained(tmp_path / "lm")
    model = Captioner.from_parts(tmp_path / "vision", tmp_path / "lm")
    assert model.config.vision.num_classes == 64 and model.vision.head.value_param_tokens.shape[1] == 64
    for name, value in lm.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], value)
    for name, value in tower.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.vision.state_dict()[name], value)
    assert model(torch.randn(1, 1, 28, 28), torch.tensor([[256, 1]])).shape == (1, 2, 256 + 128)


# ---- growing --------------------------------------------------------------------------------------

def test_grow_exact_keeps_the_logits_and_grows_the_parts_separately(tmp_path):
    from tokenformer.__main__ import main

    model = tiny()
    x, ids = images(), torch.randint(0, 257, (2, 6))
    before = model(x, ids)
    grown = tf.grow(model, factor=2)
    assert grown.lm.layers[0].mlp.num_tokens == 512 and grown.vision.layers[0].mlp.num_tokens == 512
    assert grown.vision.head.num_tokens == 64  # the projector keeps its own count
    assert torch.allclose(grown(x, ids), before, atol=1e-5)
    tower_only = tf.grow(model, vision_ffn_slot_num=300)
    assert (tower_only.config.vision.ffn_slot_num, tower_only.config.text.ffn_slot_num) == (300, 256)
    assert tower_only.config.vision.ffn_scale_num == 256 and tower_only.config.text.ffn_scale_num is None
    assert tower_only.vision.layers[1].mlp.num_tokens == 300 and tower_only.lm.layers[1].mlp.num_tokens == 256
    assert torch.allclose(tower_only(x, ids), before, atol=1e-5)
    with pytest.raises(tf.TokenFormerError, match="has no text_ffn_slot_num"):
        tf.grow(model, text_ffn_slot_num=300)

    model.save_pretrained(tmp_path / "small")
    assert main(["grow", "--checkpoint", str(tmp_path / "small"), "--out", str(tmp_path / "big"),
                 "--qkv-slot-num", "96"]) == 0
    big = load_model(tmp_path / "big")
    assert big.config.text.qkv_slot_num == 96 and big.config.vision.qkv_slot_num == 64
    assert big.config.growth_history[-1]["to"]["qkv_slot_num"] == 96
    assert torch.allclose(big(x, ids), before, atol=1e-5)


# ---- scoring ----------------------------------------------------------------------------------------

def test_attribute_matches_by_hand():
    truth = [(2, "red", "circle", "top left"), (1, "blue", "square", "bottom right")]
    assert attribute_matches(truth, list(reversed(truth))).tolist() == [1, 2, 2, 2, 2, 2]  # order does not matter
    wrong_colour = [(2, "green", "circle", "top left"), (1, "blue", "square", "bottom right")]
    assert attribute_matches(truth, wrong_colour).tolist() == [0, 2, 1, 2, 2, 2]
    extra = truth + [(1, "red", "ring", "top right")]  # an invented group counts against every attribute
    assert attribute_matches(truth, extra).tolist() == [0, 2, 2, 2, 2, 3]
    assert attribute_matches(truth, []).tolist() == [0, 0, 0, 0, 0, 2]
    record = accuracy_record(attribute_matches(truth, wrong_colour) + attribute_matches(truth, []), 2)
    assert record == {"exact_match": 0.0, "count_accuracy": 0.5, "colour_accuracy": 0.25,
                      "shape_accuracy": 0.5, "position_accuracy": 0.5}


# ---- training and the command line ----------------------------------------------------------------

def run_train_captioner(data, save, *extra):
    from tokenformer.__main__ import main

    return main(["train-captioner", "--data", str(data / "train"), "--val_data", str(data / "val"),
                 "--epochs", "2", "--batch_size", "16", "--lr", "3e-3", "--save", str(save), "--progress", "false",
                 "--num_threads", "1", "--log_interval", "2", "--keep_last_n", "3", "--caption_samples", "4",
                 "--max_new_tokens", "8", "--bpe_vocab_size", "280", "--plot", "false", *extra])


def test_train_captioner_resumes_exactly_and_generate_captions_images(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from tokenformer.__main__ import main

    scenes.write_scene_dataset(tmp_path / "scenes", train=32, val=4)
    run = tmp_path / "run"
    assert run_train_captioner(tmp_path / "scenes", run) == 0
    assert "validation caption loss" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert {"exact_match", "colour_accuracy", "captioned"} <= set(evals[-1])
    captions = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and all(set(c) == {"key", "reference", "caption"} for c in captions)
    checkpoints = sorted(run.glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]

    # lose the second epoch, resume: the same weights as the uninterrupted run, bit for bit
    last = load_file(str(checkpoints[-1] / "model.safetensors"))
    shutil.rmtree(checkpoints[-1])
    (run / "latest").unlink(missing_ok=True)
    assert run_train_captioner(tmp_path / "scenes", run, "--resume", "true") == 0
    resumed = load_file(str(run / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(resumed[k], last[k]) for k in last)

    # generate --image: one caption a line, what generate_caption gives the same images
    paths = []
    for i in range(2):
        scene = scenes.random_scene(np.random.default_rng(i))
        paths.append(tmp_path / f"scene{i}.png")
        Image.fromarray(scenes.draw(scene, 32)).save(paths[-1])
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run / "model"), "--image", str(paths[0]), "--image", str(paths[1]),
                 "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model, tok = load_model(run / "model"), tf.load_tokenizer(run / "model")
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])
    assert printed == generate_caption(model, tok, (pixels.float() / 255 - 0.5) / 0.5, 12)

    lm = tmp_path / "lm"
    tf.TokenFormer(tf.Config.from_name("tiny")).save_pretrained(lm, tokenizer=tf.ByteTokenizer())
    for argv, message in ((["--checkpoint", str(run / "model"), "--prompt", "a"], "give the images to caption"),
                          (["--checkpoint", str(lm), "--image", str(paths[0])], "with a captioner checkpoint")):
        assert main(["generate", *argv]) == 2
        assert message in capsys.readouterr().err

