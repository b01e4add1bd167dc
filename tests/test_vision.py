"""The vision TokenFormer (tokenformer.models.vision) and its data (tokenformer.data.images)."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenformer as tf
from tokenformer.data import images as vd
from tokenformer.models.lm import Attention
from tokenformer.checkpoint import load_model as load_checkpoint


def tiny(**overrides) -> tf.VisionTokenFormer:
    return tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28", **overrides)).eval()


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28)


# ---- the model ----------------------------------------------------------------------------------

def test_shapes_and_patch_order():
    model = tiny()
    assert model(images(3)).shape == (3, 10)
    assert model.features(images(2)).shape == (2, 32)
    # patch (row 1, col 2) of a 28x28 image with 7x7 patches is pixels [7:14, 14:21], row-major
    x = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28)
    patches = model.patchify(x)  # (1, 16, 49)
    assert patches.shape == (1, 16, 49)
    assert torch.equal(patches[0, 1 * 4 + 2], x[0, 0, 7:14, 14:21].reshape(-1))
    with pytest.raises(tf.TokenFormerError, match="do not fit this model"):
        model(torch.randn(1, 3, 28, 28))


def test_patch_bias_lets_the_embedding_see_brightness():
    """l2_norm_gelu divides out the scale of its input: without the constant input a patch and the
    same patch twice as bright embed alike; with it they do not, and the keys have one more column."""
    x = torch.rand(1, 1, 28, 28) + 0.1
    plain, biased = tiny(), tiny(patch_bias=True)
    brighter = x.clone()
    brighter[..., :7, :7] *= 2.0  # the first patch only
    assert torch.allclose(plain.patch_embed(plain.patchify(brighter)), plain.patch_embed(plain.patchify(x)),
                          atol=1e-6)
    assert not torch.allclose(biased.features(brighter), biased.features(x), atol=1e-4)
    assert biased.patch_embed.key_param_tokens.shape == (16, 49 + 1)
    # by hand: the biased embedding is the Pattention of the patch with a 1 appended
    patch = torch.cat([biased.patchify(x)[0, 0], torch.ones(1)])  # (50,)
    s = patch @ biased.patch_embed.key_param_tokens.T             # (16,)
    by_hand = F.gelu(s / s.norm() * 16 ** 0.5) @ biased.patch_embed.value_param_tokens
    seen = []
    biased.patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(output))
    biased.features(x)
    assert torch.allclose(seen[0][0, 0], by_hand, atol=1e-5)
    assert sum(p.numel() for p in biased.parameters()) == biased.config.num_parameters
    assert biased.config.num_parameters == plain.config.num_parameters + 16


def test_fmnist_preset_parameter_count_by_hand():
    config = tf.VisionConfig.from_name("fmnist-28")
    with torch.device("meta"):
        model = tf.VisionTokenFormer(config)
    h, L = 64, 4
    # patch Pattention (49 pixels + the constant) -> h with 256 tokens, cls + 17 positions, blocks of
    # q/k/v/proj (64 tokens, 2*h*64 each) and ffn (256 tokens), final LayerNorm, head h -> 10 with 64 tokens
    by_hand = 256 * (49 + 1 + h) + h + 17 * h + L * (4 * 2 * h * 64 + 2 * h * 256) + 2 * h + 64 * (h + 10)
    assert config.patch_bias and model.num_parameters() == config.num_parameters == by_hand


def test_config_checks():
    with pytest.raises(tf.TokenFormerError, match="not divisible by patch_size"):
        tf.VisionConfig.from_name("tiny-28", patch_size=5)
    with pytest.raises(tf.TokenFormerError, match="unknown vision preset"):
        tf.VisionConfig.from_name("H/14")
    with pytest.raises(tf.TokenFormerError, match="unknown vision config field"):
        tf.VisionConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("name, expected, paper, paper_tokens",
                         [("B/16", 116_347_456, 109e6, 670), ("L/16", 406_716_992, 407e6, 1024)])
def test_paper_sized_parameter_counts_on_meta(name, expected, paper, paper_tokens):
    config = tf.VisionConfig.from_name(name)
    with torch.device("meta"):
        model = tf.VisionTokenFormer(config)
    h, L, n = config.hidden_size, config.num_layers, config.qkv_slot_num
    f = config.ffn_slot_num

    def by_hand(attention_tokens: int) -> int:
        # patch Pattention 768 -> h, cls + 197 positions, L blocks of q/k/v/proj (2*h*n each) and ffn
        # (2*h*f), final LayerNorm, head Pattention h -> 1000
        return (n * (768 + h) + h + 197 * h + L * (4 * 2 * h * attention_tokens + 2 * h * f) + 2 * h
                + 1000 * (h + 1000))

    assert model.num_parameters() == config.num_parameters == by_hand(n) == expected
    # The paper states 3 significant figures (within 0.5M). L/16 matches with its own token count;
    # B/16 only with ~670 attention tokens instead of 768 (docs/vision.md: the paper lists none)
    assert abs(by_hand(paper_tokens) - paper) < 0.5e6
    assert (paper_tokens == n) == (name == "L/16")


def test_attention_is_bidirectional_in_vision_and_causal_in_the_language_model():
    model = tiny()
    x = images(1)
    changed = x.clone()
    changed[..., 21:, 21:] += 1.0  # the last patch only
    assert (model.features(changed) - model.features(x)).abs().max() > 1e-4
    assert all(not block.attention.causal for block in model.layers)

    # the language model is causal by default: the first position ignores later tokens
    lm = tf.TokenFormer(tf.Config.from_name("tiny")).eval()
    assert all(block.attention.causal for block in lm.layers)
    ids = torch.randint(0, 257, (1, 8))
    later = ids.clone()
    later[0, 5:] = (later[0, 5:] + 1) % 257
    assert torch.equal(lm(ids)[0, :5], lm(later)[0, :5])


def test_bidirectional_attention_matches_a_hand_computation():
    config = tf.Config.from_name("tiny")
    attention = Attention(config, causal=False)
    x = torch.randn(2, 5, config.hidden_size)
    B, T, H, D = 2, 5, config.num_attention_heads, config.head_dim
    q, k, v = (layer(x).view(B, T, H, D).transpose(1, 2) for layer in
               (attention.query, attention.key, attention.value))  # (B, H, T, D)
    weights = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)  # no mask, no rotary
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(B, T, H * D))
    assert torch.allclose(attention(x, None, None), expected, atol=1e-6)


def test_tiny_model_overfits_a_batch(one_thread):
    torch.manual_seed(0)
    model = tiny().train()
    x, y = images(16), torch.arange(16) % 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    initial = F.cross_entropy(model(x), y).item()
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert initial > 2.0 and loss.item() < 0.3  # from chance (ln 10 = 2.3) to memorised
    assert torch.equal(model(x).argmax(-1), y)


def test_exact_growth_preserves_logits_and_leaves_patch_and_head_alone():
    model = tiny()
    grown = tf.grow(model, factor=2, seed=0)
    x = images(4)
    assert (grown(x) - model(x)).abs().max() <= 1e-5
    assert grown.layers[0].attention.query.num_tokens == 32 and grown.layers[1].mlp.num_tokens == 128
    assert grown.patch_embed.num_tokens == 16 and grown.head.num_tokens == 16
    assert torch.equal(grown.head.key_param_tokens, model.head.key_param_tokens)
    assert grown.config.qkv_scale_num == 16 and len(grown.config.growth_history) == 1
    official = tf.grow(model, factor=2, mode="official", seed=0)
    assert (official(x) - model(x)).abs().max() > 1e-3
    # shrinking back, calibrated on images, drops exactly the zero-key tokens the growth added
    back = tf.shrink(grown, factor=0.5, calibration=[images(4)])
    assert torch.equal(back.layers[0].mlp.key_param_tokens, model.layers[0].mlp.key_param_tokens)
    assert (back(x) - model(x)).abs().max() <= 1e-5


def test_save_load_round_trip(tmp_path):
    model = tf.grow(tiny(), factor=2, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "vision_tokenformer"
    loaded = tf.VisionTokenFormer.from_pretrained(tmp_path / "ckpt")
    x = images(2)
    assert torch.equal(loaded(x), model(x))
    assert loaded.config == model.config
    assert isinstance(load_checkpoint(tmp_path / "ckpt"), tf.VisionTokenFormer)  # grow/shrink CLI entry
    with pytest.raises(tf.TokenFormerError, match="holds a 'vision_tokenformer' model, not a 'tokenformer' model"):
        tf.TokenFormer.from_pretrained(tmp_path / "ckpt")
    tf.TokenFormer(tf.Config.from_name("tiny")).save_pretrained(tmp_path / "lm")
    with pytest.raises(tf.TokenFormerError, match="holds a 'tokenformer' model, not a 'vision_tokenformer' model"):
        tf.VisionTokenFormer.from_pretrained(tmp_path / "lm")


# ---- data -----------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX layout written independently: 0, 0, dtype code, ndim, big-endian dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    for name, array, code in (("train-images-idx3-ubyte", pixels, 0x08),
                              ("train-labels-idx1-ubyte", labels, 0x08), ("floats", floats, 0x0D)):
        with opener(tmp_path / f"{name}{suffix}", "wb") as f:
            f.write(idx_bytes(array, code))
    assert np.array_equal(vd.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), pixels)
    assert np.array_equal(vd.read_idx(tmp_path / f"floats{suffix}"), floats)
    x, y = vd.load_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8 and torch.equal(x[:, 0], torch.from_numpy(pixels))
    assert y.tolist() == [3, 1, 4, 1, 5] and y.dtype == torch.int64
    vd.write_idx(tmp_path / f"again{suffix}", floats)
    assert np.array_equal(vd.read_idx(tmp_path / f"again{suffix}"), floats)


def test_idx_reader_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(tf.TokenFormerError, match="not an IDX file"):
        vd.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 4), np.uint8), 0x08)[:-3])
    with pytest.raises(tf.TokenFormerError, match="truncated"):
        vd.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        vd.load_mnist(tmp_path, "test")


def test_image_folder_of_generated_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for cls, sizes in (("cat", [(10, 12), (9, 9)]), ("ant", [(16, 8)])):
        (tmp_path / cls).mkdir()
        for i, (h, w) in enumerate(sizes):
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / cls / f"{i}.png")
            written[(cls, i)] = array
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    folder = vd.ImageFolder(tmp_path)
    assert folder.classes == ["ant", "cat"] and len(folder) == 3
    image, label = folder[1]  # cat/0.png
    assert label == 1 and image.shape == (3, 10, 12) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(written[("cat", 0)]))  # PNG is lossless
    grey, _ = vd.ImageFolder(tmp_path, channels=1)[0]
    assert grey.shape == (1, 16, 8)
    transform = vd.make_transform(train=True, augment="inception", mean=(0.5,) * 3, std=(0.5,) * 3, image_size=8)
    x, y = next(vd.batches_of(folder, 3, transform, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (3, 3, 8, 8) and sorted(y.tolist()) == [0, 1, 1]
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    with pytest.raises(tf.TokenFormerError, match="no images"):
        (tmp_path / "empty" / "a").mkdir(parents=True)
        vd.ImageFolder(tmp_path / "empty")


def test_transforms_shapes_and_ranges():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 20, 30)
    crop = vd.random_resized_crop(x, 16, generator=g)
    assert crop.shape == (6, 3, 16, 16)
    assert crop.min() >= x.min() - 1e-6 and crop.max() <= x.max() + 1e-6  # bilinear stays in the hull
    # the whole image at aspect 1 is a plain resize
    square = torch.rand(2, 1, 16, 16)
    whole = vd.random_resized_crop(square, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    assert torch.allclose(whole, square, atol=1e-5)
    assert vd.resize_center_crop(x, 16).shape == (6, 3, 16, 16)
    assert torch.equal(vd.random_flip(x, g, p=1.0), x.flip(-1))
    # a padded random crop is a shift: every output row is a window of the zero-padded input
    small = torch.rand(8, 1, 6, 6) + 1  # > 0 so that padding is recognisable
    shifted = vd.random_crop(small, 2, g)
    padded = F.pad(small, (2,) * 4)
    for b in range(8):
        assert any(torch.equal(shifted[b], padded[b, :, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))
    normalised = vd.normalize(torch.full((1, 3, 2, 2), 0.5), (0.25, 0.5, 0.75), (0.5, 0.5, 0.25))
    assert normalised[0, :, 0, 0].tolist() == [0.5, 0.0, -1.0]
    transform = vd.make_transform(train=True, augment="crop-flip", mean=(0.5,), std=(0.5,))
    out = transform(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), g)
    assert out.shape == (4, 1, 28, 28) and out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1
    with pytest.raises(tf.TokenFormerError, match="unknown augment"):
        vd.make_transform(train=True, augment="mixup")


def test_batches_cover_the_dataset_once():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    seen = [(xb, yb) for xb, yb in vd.batches(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert [len(yb) for _, yb in seen] == [4, 4, 2]
    assert sorted(torch.cat([yb for _, yb in seen]).tolist()) == list(range(10))
    for xb, yb in seen:  # images stay with their labels
        assert torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
    assert [len(yb) for _, yb in vd.batches(x, y, 4, drop_last=True)] == [4, 4]


def test_rank_shards_split_every_global_batch_and_augment_differently(tmp_path):
    from tokenformer.training.config import VisionTrainConfig
    from tokenformer.training.loop import micro_batch_start
    from tokenformer.training.distributed import DistEnv
    from tokenformer.training.tasks.base import TaskContext, epoch_order
    from tokenformer.training.tasks.vision import VisionTask, augment_generator

    # evaluation keeps the short last batch: 10 items over 4 ranks in batches of 4 leave rank 3 one item
    assert [b.tolist() for b in vd.batch_indices(10, 4, False, None, False, shard=(3, 4))] == [[3], [7]]
    # training: the global batch of a step is one slice of the epoch's order, split over the ranks
    write_toy_mnist(tmp_path, n_train=10, n_test=4)
    task = VisionTask(VisionTrainConfig(model="tiny-28", data=str(tmp_path), batch_size=4, augment="none"))
    task.prepare(tf.VisionTokenFormer(tf.VisionConfig.from_name("tiny-28")), TaskContext(DistEnv()))
    assert task.steps_per_epoch == 2  # drop_last: 10 images make two batches of 4
    order = epoch_order(0, 1, 10)
    for step in range(2):
        first = 8 + 4 * step  # epoch 1
        whole = task.train_batch(micro_batch_start(first, 0, 0, 1, 4), 4)
        halves = [task.train_batch(micro_batch_start(first, 0, rank, 2, 2), 2) for rank in (0, 1)]
        assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
        assert torch.equal(whole[1], task.data.train[1][order[4 * step:4 * step + 4]])
    assert torch.equal(epoch_order(0, 1, 10), order) and not torch.equal(epoch_order(0, 2, 10), order)
    # augmentation: a function of (seed, epoch, position), so ranks differ and a resume draws the same
    draws = [torch.rand(3, generator=augment_generator(5, 2, 8)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.rand(3, generator=augment_generator(5, 2, 10)))
    assert not torch.equal(draws[0], torch.rand(3, generator=augment_generator(5, 3, 8)))


# ---- train-vision ---------------------------------------------------------------------------------

def write_toy_mnist(directory, n_train: int = 64, n_test: int = 32) -> None:
    """An MNIST-style folder of easy classes: vertical stripes, horizontal stripes, a checkerboard,
    noise. (Not brightness: a Pattention normalises its scores, so it cannot see a patch's scale.)"""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, n).astype(np.uint8)
        r, c = np.indices((28, 28))
        patterns = np.stack([c % 2, r % 2, (r + c) % 2, np.zeros((28, 28), int)]) * 180  # (4, 28, 28)
        pixels = (rng.integers(0, 60, (n, 28, 28)) + patterns[labels]).astype(np.uint8)
        vd.write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", pixels)
        vd.write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def run_train_vision(tmp_path, save, *extra):
    from tokenformer.__main__ import main

    return main(["train-vision", "--model", "tiny-28", "--data", str(tmp_path / "data"), "--epochs", "3",
                 "--batch_size", "16", "--lr", "3e-3", "--save", str(save), "--progress", "false",
                 "--num_threads", "1", "--log_interval", "2", "--keep_last_n", "3", *extra])


def test_train_vision_learns_writes_outputs_and_resumes_exactly(tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    (tmp_path / "data").mkdir()
    write_toy_mnist(tmp_path / "data")
    assert run_train_vision(tmp_path, tmp_path / "run", "--ema", "0.9", "--tta_flip", "true") == 0
    assert "test accuracy" in capsys.readouterr().out
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3] and evals[-1]["val_accuracy"] >= 0.9
    assert any("loss" in r and "lr" in r for r in records)
    assert (run / "accuracy.png").stat().st_size > 0
    final = tf.VisionTokenFormer.from_pretrained(run / "model")  # the EMA weights
    checkpoints = sorted(run.glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000004", "step_00000008", "step_00000012"]

    # lose the last epoch, resume: the same weights as the uninterrupted run
    import shutil

    last = load_file(str(checkpoints[-1] / "model.safetensors"))
    shutil.rmtree(checkpoints[-1])
    (run / "latest").unlink(missing_ok=True)
    assert run_train_vision(tmp_path, run, "--ema", "0.9", "--tta_flip", "true", "--resume", "true") == 0
    resumed = load_file(str(run / "step_00000012" / "model.safetensors"))
    assert all(torch.equal(resumed[k], last[k]) for k in last)
    again = tf.VisionTokenFormer.from_pretrained(run / "model")
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), final.parameters()))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "val_accuracy" in r] == [1, 2, 3]  # no duplicated epoch


def test_train_vision_on_an_image_folder_and_bad_input(tmp_path, one_thread, capsys):
    from PIL import Image

    from tokenformer.__main__ import main

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            (tmp_path / "folder" / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                array = rng.integers(0, 60, (20 + i, 24, 3), dtype=np.uint8) + np.array(colour, np.uint8) // 2
                Image.fromarray(array.astype(np.uint8)).save(tmp_path / "folder" / split / f"class{c}" / f"{i}.png")
    model = json.dumps(dict(name="tiny-28", image_size=16, patch_size=8, num_channels=3, num_classes=2))
    args = ["train-vision", "--model", model, "--data", str(tmp_path / "folder"), "--epochs", "2",
            "--batch_size", "4", "--augment", "inception", "--mean", "[0.5, 0.5, 0.5]", "--std", "[0.5, 0.5, 0.5]",
            "--progress", "false", "--num_threads", "1"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    from tokenformer.training.config import VisionTrainConfig

    assert VisionTrainConfig.from_dict({"augment": "none", "mean": "[0.1, 0.2]", "std": "0.3,0.4"}).augment == "none"
    assert VisionTrainConfig.from_dict({"mean": "[0.1, 0.2]", "std": "0.3,0.4"}).std == [0.3, 0.4]
    assert main(args + ["--augment", "mixup"]) == 2
    assert "unknown augment 'mixup'" in capsys.readouterr().err
    assert main(args + ["--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
