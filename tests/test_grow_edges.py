"""Growth's edges, each checked against a computation written here: the default mode, growing to
the same count, a bf16 model's new rows, the exact error sentences, and `grow_checkpoint` on a
training checkpoint (the optimizer state mapped by hand, the step and data position carried)."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tokenformer as tf
from tokenformer.models.pattention import Pattention
from tokenformer.scaling.grow import (grow_checkpoint, grow_optimizer_state, grow_pattention, old_slot_counts,
                                      pattention_groups, slot_counts)
from tokenformer.training.optim import build_optimizer
from tokenformer.training.config import TrainConfig

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
             qkv_slot_num=8, proj_slot_num=8, ffn_slot_num=16, vocab_size=257)


def small_model(**overrides) -> tf.TokenFormer:
    return tf.TokenFormer(tf.Config(**{**SMALL, **overrides})).eval()


def test_grow_pattention_defaults_to_exact_and_draws_the_values_it_is_seeded_with():
    layer = Pattention(16, 12, 6, value_std=0.3)
    keys, values = layer.key_param_tokens.detach().clone(), layer.value_param_tokens.detach().clone()
    assert grow_pattention(layer, 10, generator=torch.Generator().manual_seed(5)) is layer
    expected_values = torch.randn((4, 12), generator=torch.Generator().manual_seed(5)) * 0.3
    assert torch.equal(layer.key_param_tokens, torch.cat([keys, torch.zeros(4, 16)]))  # exact: zero keys
    assert torch.equal(layer.value_param_tokens, torch.cat([values, expected_values]))
    assert layer.scale_num == 6 and layer.key_param_tokens.requires_grad


def test_growing_a_pattention_to_its_own_count_changes_nothing():
    layer = Pattention(16, 12, 6)
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    assert grow_pattention(layer, 6, "official") is layer
    assert layer.key_param_tokens is keys and layer.value_param_tokens is values and layer.scale_num is None
    with pytest.raises(tf.TokenFormerError, match=re.escape(
            "cannot grow a Pattention of 6 tokens to 5: use shrink to remove tokens")):
        grow_pattention(layer, 5)


def test_a_bfloat16_model_grows_in_bfloat16_with_the_float32_draw_rounded():
    model = small_model().to(torch.bfloat16)
    grown = tf.grow(model, ffn_slot_num=20, seed=4)
    assert all(p.dtype == torch.bfloat16 for p in grown.parameters())
    # the rows are drawn in float32 on the CPU (layer by layer, in module order), then rounded
    generator = torch.Generator().manual_seed(4)
    std = model.layers[0].mlp.value_std
    first = (torch.randn((4, 32), generator=generator, dtype=torch.float32) * std).to(torch.bfloat16)
    assert torch.equal(grown.layers[0].mlp.value_param_tokens[16:], first)


def test_growth_errors_are_these_sentences():
    layer = Pattention(4, 4, 2)
    for call in (lambda: grow_pattention(layer, 3, "zoom"), lambda: tf.grow(small_model(), factor=2, mode="zoom")):
        with pytest.raises(tf.TokenFormerError) as error:
            call()
        assert str(error.value) == "unknown growth mode 'zoom': use one of exact, official"
    model = small_model()
    shrunk = tf.shrink(tf.grow(model, factor=2), factor=0.75, calibration=torch.randint(0, 257, (2, 12)))
    with pytest.raises(tf.TokenFormerError) as error:
        old_slot_counts(shrunk.config)
    assert str(error.value) == ("the last change in growth_history is not a growth: pass the old slot counts "
                                "explicitly")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 257, (1, 5))).sum().backward()
    optimizer.step()
    smaller = small_model(ffn_slot_num=12)  # not a grown `model`: its ffn rows are fewer
    with pytest.raises(tf.TokenFormerError) as error:
        grow_optimizer_state(optimizer.state_dict(), model, smaller)
    assert str(error.value) == ("optimizer state 'exp_avg' of 'layers.0.mlp.key_param_tokens' has shape (16, 32), "
                                "which cannot grow into (12, 32): is new_model a grown old_model?")


def test_grow_checkpoint_carries_a_training_checkpoints_state_into_the_grown_shapes(tmp_path):
    """A `step_N` folder (weights and trainer.pt) grows into `out` without a model handed in: the
    weights are `grow`'s, the optimizer's moments are the old ones padded with zero rows, and the
    step, data position and schedule come along."""
    model = small_model()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    x = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    step_dir = tmp_path / "run" / "step_00000007"
    model.save_pretrained(step_dir, tokenizer=tf.ByteTokenizer())
    state = {"step": 7, "consumed_samples": 56, "rng": {}, "scheduler": {"last_epoch": 7},
             "train_config": {"lr": 1e-3}, "optimizer": optimizer.state_dict(), "not_carried": 1}
    torch.save(state, step_dir / "trainer.pt")
    out = tmp_path / "grown"
    old, grown = grow_checkpoint(step_dir, out, ffn_slot_num=24, seed=2)
    assert torch.equal(old.layers[1].mlp.key_param_tokens, model.layers[1].mlp.key_param_tokens)
    expected = tf.grow(model, ffn_slot_num=24, seed=2)
    loaded = tf.TokenFormer.from_pretrained(out)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), expected.parameters()))
    assert (out / "tokenizer.json").read_bytes() == (step_dir / "tokenizer.json").read_bytes()
    carried = torch.load(out / "trainer.pt", weights_only=True)
    assert {k: carried[k] for k in ("step", "consumed_samples", "scheduler", "train_config", "grown_from")} == \
        {"step": 7, "consumed_samples": 56, "scheduler": {"last_epoch": 7}, "train_config": {"lr": 1e-3},
         "grown_from": str(step_dir)}
    assert "not_carried" not in carried and "rng" not in carried
    names = [n for g in carried["optimizer"]["param_groups"] for n in g["param_names"]]
    moments = dict(zip(names, (carried["optimizer"]["state"][i] for g in carried["optimizer"]["param_groups"]
                                for i in g["params"])))
    old_moment = optimizer.state[model.layers[1].mlp.key_param_tokens]["exp_avg"]
    padded = moments["layers.1.mlp.key_param_tokens"]["exp_avg"]
    assert torch.equal(padded, torch.cat([old_moment, torch.zeros(8, 32)]))
    # growing a plain model directory into the same folder removes the now stale trainer.pt
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    grow_checkpoint(plain, out, factor=2)
    assert not (out / "trainer.pt").exists()


def test_each_tower_of_a_clip_model_gets_every_count_and_option_asked_for():
    from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer

    model = CLIPTokenFormer(CLIPConfig.from_name("tiny")).eval()
    grown = tf.grow(model, qkv_slot_num=80, proj_slot_num=72, ffn_slot_num=300, value_std=0.0, seed=3)
    for tower, old in ((grown.visual, model.visual), (grown.text, model.text)):
        c = tower.config
        assert (c.qkv_slot_num, c.proj_slot_num, c.ffn_slot_num) == (80, 72, 300)
        assert (tower.layers[0].attention.query.num_tokens, tower.layers[0].attention.proj.num_tokens,
                tower.layers[0].mlp.num_tokens) == (80, 72, 300)
        entry = c.growth_history[-1]
        assert (entry["mode"], entry["value_std"], entry["seed"]) == ("exact", 0.0, 3)
        n = old.layers[0].mlp.num_tokens
        assert torch.count_nonzero(tower.layers[0].mlp.value_param_tokens[n:]) == 0  # value_std 0: zero rows
    doubled = tf.grow(model, factor=2, seed=3)  # the factor reaches each tower, which doubles its own counts
    for tower, old in ((doubled.visual, model.visual), (doubled.text, model.text)):
        assert tower.config.ffn_slot_num == 2 * old.config.ffn_slot_num
        assert tower.config.qkv_slot_num == 2 * old.config.qkv_slot_num


def test_a_captioners_slot_counts_are_its_six_fields_read_from_its_parts():
    from tokenformer.models.captioner import CaptionerConfig

    config = CaptionerConfig.resolve({"name": "tiny", "text": {"ffn_slot_num": 96}})
    text, vision = config.text, config.vision
    assert slot_counts(config) == {
        "qkv_slot_num": text.qkv_slot_num, "proj_slot_num": text.proj_slot_num, "ffn_slot_num": 96,
        "vision_qkv_slot_num": vision.qkv_slot_num, "vision_proj_slot_num": vision.proj_slot_num,
        "vision_ffn_slot_num": vision.ffn_slot_num}


def test_slot_count_errors_are_these_sentences():
    model = small_model()
    cases = [
        (lambda: slot_counts(SimpleNamespace()), "SimpleNamespace has no qkv_slot_num field: only models whose config has "
         "qkv/proj/ffn slot and scale counts and a growth_history can be grown or shrunk"),
        (lambda: tf.grow(model, vision_ffn_slot_num=300),
         "Config has no vision_ffn_slot_num: give one of qkv_slot_num, proj_slot_num, ffn_slot_num"),
        (lambda: tf.grow(model, qkv_slot_num=2.5), "qkv_slot_num must be a positive integer, got 2.5"),
        (lambda: tf.grow(model, qkv_slot_num=4), "cannot grow qkv_slot_num from 8 to the smaller 4: use shrink to "
         "remove tokens"),
        (lambda: tf.grow(small_model(norm_activation_type="softmax"), ffn_slot_num=20),
         "exact growth cannot preserve a 'softmax' model (with softmax a new token always takes weight from the old "
         "ones): use mode='official'"),
    ]
    for call, sentence in cases:
        with pytest.raises(tf.TokenFormerError) as error:
            call()
        assert str(error.value) == sentence
    softmax = small_model(norm_activation_type="softmax")
    same = tf.grow(softmax, ffn_slot_num=16)  # no change: nothing to preserve, a copy
    assert same is not softmax and all(torch.equal(p, q) for p, q in zip(same.parameters(), softmax.parameters()))


@dataclasses.dataclass(frozen=True)
class BareConfig:
    """A config of the fields growth needs and nothing else (no normalisation named, no `replace`)."""
    qkv_slot_num: int = 4
    proj_slot_num: int = 4
    ffn_slot_num: int = 6
    qkv_scale_num: int | None = None
    proj_scale_num: int | None = None
    ffn_scale_num: int | None = None
    growth_history: tuple = ()


class BareModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = BareConfig()
        self.attention = nn.ModuleDict({n: Pattention(8, 8, 4) for n in ("query", "key", "value", "proj")})
        self.mlp = Pattention(8, 8, 6)


def test_a_model_whose_config_names_no_normalisation_grows_officially_but_not_exactly():
    model = BareModel()
    grown = tf.grow(model, factor=2, mode="official", seed=0)
    assert dataclasses.astuple(grown.config)[:6] == (8, 8, 12, None, None, None)
    assert grown.attention["proj"].num_tokens == 8 and grown.mlp.num_tokens == 12
    assert [h["to"] for h in grown.config.growth_history] == [{"qkv_slot_num": 8, "proj_slot_num": 8, "ffn_slot_num": 12}]
    with pytest.raises(tf.TokenFormerError) as error:
        tf.grow(model, factor=2)
    assert str(error.value).startswith("exact growth cannot preserve a None model")


def test_a_token_parallel_pattention_grows_its_own_shard_to_the_rows_one_process_draws():
    """In one process of a 1-rank gloo group (the shard is the whole layer): the grown parameters stay
    DTensors sharded on the token axis, trainable, and hold the rows a plain layer grown with the same
    seed holds. (Two ranks, each appending its half, run in tests/test_parallel.py.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from tokenformer.parallel.tokens import shard_tokens

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for mode in ("exact", "official"):
            plain = Pattention(8, 6, 4, value_std=0.5)
            layer = Pattention(8, 6, 4, value_std=0.5)
            layer.load_state_dict(plain.state_dict())
            shard_tokens(layer, init_device_mesh("cpu", (1,)))
            grow_pattention(layer, 10, mode, generator=torch.Generator().manual_seed(1))
            grow_pattention(plain, 10, mode, generator=torch.Generator().manual_seed(1))
            for name in ("key_param_tokens", "value_param_tokens"):
                grown = getattr(layer, name)
                assert isinstance(grown, DTensor) and grown.placements == (Shard(0),) and grown.requires_grad
                assert grown.shape == (10, 8 if name == "key_param_tokens" else 6)
                assert torch.equal(grown.to_local(), getattr(plain, name))
            assert layer.scale_num == plain.scale_num == (4 if mode == "exact" else None)
    finally:
        dist.destroy_process_group()


def test_the_growth_history_is_dated_in_utc():
    import datetime

    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    date = tf.grow(small_model(), ffn_slot_num=20).config.growth_history[-1]["date"]
    assert date.endswith("+00:00")  # an aware time in UTC, seconds precision
    stamped = datetime.datetime.fromisoformat(date)
    assert before <= stamped <= datetime.datetime.now(datetime.timezone.utc)


def test_each_rank_appends_its_share_of_the_new_rows_and_an_uneven_split_is_refused(monkeypatch):
    """The share rule of `_grow_shards` for rank 0 of 2, with the 1-rank group's mesh told it has 2
    ranks (`DeviceMesh.size`): rank 0 appends the first half of the new rows, and new rows that do
    not split evenly over the ranks are refused in one sentence."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from tokenformer.parallel.tokens import shard_tokens

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = Pattention(8, 6, 4)
        old_keys = layer.key_param_tokens.detach().clone()
        shard_tokens(layer, init_device_mesh("cpu", (1,)))
        monkeypatch.setattr(DeviceMesh, "size", lambda self, mesh_dim=None: 2)
        with pytest.raises(tf.TokenFormerError) as error:
            grow_pattention(layer, 7, "official")
        assert str(error.value) == "3 new tokens do not split evenly over tp_size 2: grow by a multiple of 2 tokens"
        grow_pattention(layer, 8, "official", generator=torch.Generator().manual_seed(2))
        drawn = torch.randn((4, 6), generator=torch.Generator().manual_seed(2)) * layer.value_std  # values first
        assert torch.equal(layer.key_param_tokens.to_local()[:4], old_keys)
        assert layer.key_param_tokens.to_local().shape == (6, 8)  # 4 old + its 2 of the 4 new
        assert torch.equal(layer.value_param_tokens.to_local()[4:], drawn[:2])
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "official"])
def test_noise_adds_its_share_of_each_old_tensors_std_drawn_after_the_new_rows(mode):
    layer = Pattention(8, 6, 4, key_std=0.1, value_std=0.3)
    keys, values = layer.key_param_tokens.detach().clone(), layer.value_param_tokens.detach().clone()
    grow_pattention(layer, 7, mode, noise=0.25, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    new_values = torch.randn((3, 6), generator=g) * 0.3
    new_keys = torch.randn((3, 8), generator=g) * 0.1 if mode == "official" else torch.zeros(3, 8)
    noisy_keys = keys + torch.randn((4, 8), generator=g) * (0.25 * keys.std().item())
    noisy_values = values + torch.randn((4, 6), generator=g) * (0.25 * values.std().item())
    assert torch.equal(layer.key_param_tokens, torch.cat([noisy_keys, new_keys]))
    assert torch.equal(layer.value_param_tokens, torch.cat([noisy_values, new_values]))


def test_noise_reaches_every_layer_is_recorded_and_must_not_be_negative():
    model = small_model()
    grown = tf.grow(model, ffn_slot_num=20, mode="official", noise=0.5, seed=0)
    assert grown.config.growth_history[-1]["noise"] == 0.5
    assert not torch.equal(grown.layers[1].mlp.key_param_tokens[:16], model.layers[1].mlp.key_param_tokens)
    assert torch.equal(grown.layers[1].attention.query.key_param_tokens, model.layers[1].attention.query.key_param_tokens)
    assert "noise" not in tf.grow(model, ffn_slot_num=20, seed=0).config.growth_history[-1]  # 0: not recorded
    from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer

    clip = CLIPTokenFormer(CLIPConfig.from_name("tiny")).eval()
    noisy = tf.grow(clip, factor=2, mode="official", noise=0.5, seed=0)
    n = clip.text.layers[0].mlp.num_tokens
    assert not torch.equal(noisy.text.layers[0].mlp.value_param_tokens[:n], clip.text.layers[0].mlp.value_param_tokens)
    with pytest.raises(tf.TokenFormerError) as error:
        tf.grow(model, factor=2, noise=-0.1)
    assert str(error.value) == "noise must be 0 or more (a share of each tensor's std), got -0.1"


def test_noise_on_a_token_parallel_pattention_is_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tokenformer.parallel.tokens import shard_tokens

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = Pattention(8, 6, 4)
        shard_tokens(layer, init_device_mesh("cpu", (1,)))
        with pytest.raises(tf.TokenFormerError) as error:
            grow_pattention(layer, 8, "official", noise=0.1)
        assert str(error.value) == ("noise on the old tokens is not supported for a token-parallel model (each rank "
                                    "holds a shard): grow it with noise 0, or in one process")
    finally:
        dist.destroy_process_group()


def test_optimizer_moments_grow_along_any_dimension_and_refuse_a_shrink():
    old, wide = nn.Linear(2, 3), nn.Linear(4, 3)  # weight (3, 2) -> (3, 4): new columns
    optimizer = torch.optim.AdamW(old.parameters(), lr=0.1)
    old(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = grow_optimizer_state(optimizer.state_dict(), old, wide)
    moment = optimizer.state[old.weight]["exp_avg"]
    grown = state["state"][0]["exp_avg"]
    assert grown.shape == (3, 4) and torch.equal(grown[:, :2], moment) and torch.count_nonzero(grown[:, 2:]) == 0
    assert torch.equal(state["state"][1]["exp_avg"], optimizer.state[old.bias]["exp_avg"])  # same shape: kept
    for other, shape in ((nn.Linear(1, 3), "(3, 1)"), (nn.Bilinear(2, 2, 3), "(3, 2, 2)")):
        with pytest.raises(tf.TokenFormerError) as error:
            grow_optimizer_state(optimizer.state_dict(), old, other)
        assert str(error.value) == (f"optimizer state 'exp_avg' of 'weight' has shape (3, 2), which cannot grow into "
                                    f"{shape}: is new_model a grown old_model?")
    with pytest.raises(tf.TokenFormerError) as error:
        grow_optimizer_state(optimizer.state_dict(), old, nn.Linear(4, 3, bias=False))
    assert str(error.value) == "parameter 'bias' of the old model is missing in the new one"


def test_a_model_without_official_names_is_told_how_to_name_them():
    with pytest.raises(tf.TokenFormerError) as error:
        pattention_groups(nn.Sequential(Pattention(4, 4, 2)))
    assert str(error.value) == ("Sequential has no Pattention for qkv_slot_num: name its modules like the official "
                                "ones (attention.query/key/value/proj, mlp) or define pattention_groups()")


def test_a_count_of_one_token_is_a_count():
    model = small_model(qkv_slot_num=1)
    grown = tf.grow(model, qkv_slot_num=1, ffn_slot_num=20, seed=0)
    assert grown.config.qkv_slot_num == 1 and grown.layers[0].attention.query.num_tokens == 1
    assert grown.config.ffn_slot_num == 20
