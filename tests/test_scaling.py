"""Growing and shrinking by parameter tokens: exactness, gradients, optimizer state, freezing, CLI."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import tokenformer as tf
from tokenformer.__main__ import main
from tokenformer.models.pattention import Pattention, normalise
from tokenformer.scaling.freeze import FrozenOldTokens
from tokenformer.data.documents import token_documents
from tokenformer.data.windows import token_windows
from tokenformer.evaluation.scoring import mean_loss
from tokenformer.scaling.grow import pattention_groups

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
             qkv_slot_num=8, proj_slot_num=8, ffn_slot_num=16, vocab_size=257)


def small_model(norm="l2_norm_gelu", **overrides) -> tf.TokenFormer:
    return tf.TokenFormer(tf.Config(**{**SMALL, "norm_activation_type": norm, **overrides}))


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


def counts(model):
    return {f: getattr(model.config, f) for f in ("qkv_slot_num", "proj_slot_num", "ffn_slot_num")}


# ---- exact growth -------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_exact_growth_keeps_the_logits(norm):
    model = small_model(norm).eval()
    x = ids()
    grown = tf.grow(model, qkv_slot_num=12, proj_slot_num=10, ffn_slot_num=40, seed=0)
    assert counts(grown) == dict(qkv_slot_num=12, proj_slot_num=10, ffn_slot_num=40)
    assert grown.layers[1].attention.key.key_param_tokens.shape == (12, 32)
    assert grown.layers[0].mlp.value_param_tokens.shape == (40, 32)
    assert (grown.config.qkv_scale_num, grown.config.proj_scale_num, grown.config.ffn_scale_num) == (8, 8, 16)
    assert grown.num_parameters() == grown.config.num_parameters > model.num_parameters()
    # old rows copied, new keys zero, new values non-zero
    mlp_old, mlp_new = model.layers[0].mlp, grown.layers[0].mlp
    assert torch.equal(mlp_new.key_param_tokens[:16], mlp_old.key_param_tokens)
    assert torch.equal(mlp_new.value_param_tokens[:16], mlp_old.value_param_tokens)
    assert torch.count_nonzero(mlp_new.key_param_tokens[16:]) == 0
    assert torch.count_nonzero(mlp_new.value_param_tokens[16:]) == 24 * 32
    assert (grown(x) - model(x)).abs().max() <= 1e-5
    assert model.config.qkv_slot_num == 8 and model.config.growth_history == []  # untouched


def test_exact_growth_survives_save_and_load(tmp_path):
    model = small_model().eval()
    grown = tf.grow(model, factor=2, seed=0)
    grown.save_pretrained(tmp_path / "grown")
    loaded = tf.TokenFormer.from_pretrained(tmp_path / "grown")
    assert loaded.config.qkv_scale_num == 8 and len(loaded.config.growth_history) == 1
    x = ids()
    assert (loaded(x) - model(x)).abs().max() <= 1e-5


def test_softmax_cannot_grow_exactly():
    # With softmax a zero key has weight exp(0) / sum > 0: the new token takes weight from the old
    # ones whatever its key (no finite key has score -inf for every input). Built by hand here:
    layer = Pattention(16, 16, 8, norm_activation_type="softmax")
    x = torch.randn(5, 16)
    keys = torch.cat([layer.key_param_tokens, torch.zeros(4, 16)])
    values = torch.cat([layer.value_param_tokens, 0.02 * torch.randn(4, 16)])
    pinned = normalise(x @ keys.T, "softmax", 8) @ values
    assert (pinned - layer(x)).abs().max() > 1e-3
    # even with zero new values the old tokens' weights shrink, so the output does change
    zero_values = torch.cat([layer.value_param_tokens, torch.zeros(4, 16)])
    assert (normalise(x @ keys.T, "softmax", 8) @ zero_values - layer(x)).abs().max() > 1e-3
    with pytest.raises(tf.TokenFormerError, match="official"):
        tf.grow(small_model("softmax"), factor=2)
    with pytest.raises(tf.TokenFormerError, match="official"):
        tf.grow_pattention(layer, 12, "exact")
    grown = tf.grow(small_model("softmax"), factor=2, mode="official")  # allowed, not exact
    assert grown.config.qkv_slot_num == 16


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_official_growth_changes_the_logits(norm):
    model = small_model(norm).eval()
    grown = tf.grow(model, factor=2, mode="official", seed=0)
    x = ids()
    assert (grown(x) - model(x)).abs().max() > 1e-3
    assert grown.config.qkv_scale_num is None and grown.layers[0].mlp.scale_num is None
    # new rows drawn from the init distributions: keys N(0, 0.02), values N(0, 2 / L / sqrt(h))
    new_keys = torch.cat([p.key_param_tokens[16:] for p in (b.mlp for b in grown.layers)])
    assert abs(new_keys.std().item() - 0.02) < 0.004
    new_values = torch.cat([p.value_param_tokens[16:] for p in (b.mlp for b in grown.layers)])
    assert abs(new_values.std().item() - 2 / 2 / math.sqrt(32)) < 0.03


def test_growing_twice_records_history_and_keeps_the_logits():
    model = small_model().eval()
    x = ids()
    once = tf.grow(model, qkv_slot_num=10, seed=0)
    twice = tf.grow(once, factor=2, seed=1)
    history = twice.config.growth_history
    assert [h["mode"] for h in history] == ["exact", "exact"]
    assert history[0]["from"] == dict(qkv_slot_num=8, proj_slot_num=8, ffn_slot_num=16)
    assert history[0]["to"] == dict(qkv_slot_num=10, proj_slot_num=8, ffn_slot_num=16)
    assert history[1]["from"] == history[0]["to"]
    assert history[1]["to"] == dict(qkv_slot_num=20, proj_slot_num=16, ffn_slot_num=32)
    assert all("date" in h for h in history)
    # the scale stays at the original n, not the intermediate count
    assert (twice.config.qkv_scale_num, twice.config.proj_scale_num, twice.config.ffn_scale_num) == (8, 8, 16)
    assert tf.old_slot_counts(twice.config) == history[1]["from"]
    assert (twice(x) - model(x)).abs().max() <= 1e-5


def test_same_seed_same_rows_and_unchanged_counts_are_a_copy():
    model = small_model()
    a, b = tf.grow(model, factor=2, seed=3), tf.grow(model, factor=2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    same = tf.grow(model, qkv_slot_num=8)
    assert same is not model and same.config.growth_history == []
    assert all(torch.equal(p, q) for p, q in zip(same.parameters(), model.parameters()))


class LanguageModelWithHead(torch.nn.Module):
    """A model with a Pattention outside the slot groups (like the vision model's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_model()
        self.config = self.body.config
        self.head = Pattention(257, 5, 6)

    def forward(self, x):
        return self.head(self.body(x)[..., :257])


def test_growth_leaves_pattentions_outside_the_slot_groups_alone():
    model = LanguageModelWithHead().eval()
    grown = tf.grow(model, factor=2, seed=0)
    assert grown.head.num_tokens == 6 and torch.equal(grown.head.key_param_tokens, model.head.key_param_tokens)
    assert grown.body.layers[0].attention.query.num_tokens == 16
    x = ids()
    assert (grown(x) - model(x)).abs().max() <= 1e-5
    with pytest.raises(tf.TokenFormerError, match="no Pattention for qkv_slot_num"):
        pattention_groups(torch.nn.Sequential(Pattention(4, 4, 2)))


# ---- gradients at the grown point ---------------------------------------------------------------

def test_new_tokens_receive_gradient_in_exact_mode():
    # One Pattention: the new keys' gradient is dL/dy . v_j * gelu'(0) * sqrt(n_old) / ||s|| * x,
    # with gelu'(0) = 1/2; the new values' gradient is exactly 0 because their weight is gelu(0) = 0.
    layer = Pattention(16, 12, 6)
    old_keys = layer.key_param_tokens.detach().clone()
    tf.grow_pattention(layer, 10, "exact", generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 16)
    upstream = torch.randn(7, 12)
    (layer(x) * upstream).sum().backward()
    s_norm = (x @ old_keys.T).norm(dim=-1, keepdim=True)  # (7, 1)
    v_new = layer.value_param_tokens.detach()[6:]  # (4, 12)
    expected = ((upstream @ v_new.T) * 0.5 * math.sqrt(6) / s_norm).T @ x  # (4, 16)
    torch.testing.assert_close(layer.key_param_tokens.grad[6:], expected)
    assert torch.count_nonzero(layer.value_param_tokens.grad[6:]) == 0


def test_new_keys_and_values_train_in_a_grown_model():
    grown = tf.grow(small_model(), factor=2, seed=0)
    x = ids()
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        logits = grown(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        mlp = grown.layers[0].mlp
        grads.append((mlp.key_param_tokens.grad[16:].abs().max().item(),
                      mlp.value_param_tokens.grad[16:].abs().max().item()))
        optimizer.step()
    (key0, value0), (key1, value1) = grads
    assert key0 > 0 and value0 == 0  # step 0: keys only (weights are gelu(0) = 0)
    assert key1 > 0 and value1 > 0   # once the keys moved, the values learn too


# ---- optimizer state ----------------------------------------------------------------------------

def _train(model, optimizer, steps=3):
    for step in range(steps):
        x = ids(seed=10 + step)
        optimizer.zero_grad()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        optimizer.step()


@pytest.mark.parametrize("named", [True, False])
def test_optimizer_state_carries_over_to_the_grown_model(named):
    model = small_model()
    params = (lambda m: m.named_parameters()) if named else (lambda m: m.parameters())
    optimizer = torch.optim.AdamW(params(model), lr=1e-3, weight_decay=0.1)
    _train(model, optimizer)
    grown = tf.grow(model, qkv_slot_num=12, ffn_slot_num=20, seed=0)
    state = tf.grow_optimizer_state(optimizer.state_dict(), model, grown)
    new_optimizer = torch.optim.AdamW(params(grown), lr=1e-3, weight_decay=0.1)
    new_optimizer.load_state_dict(state)
    old_params = dict(model.named_parameters())
    for name, param in grown.named_parameters():
        old, new = optimizer.state[old_params[name]], new_optimizer.state[param]
        n = old_params[name].shape[0]
        assert torch.equal(new["step"], old["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert new[key].shape == param.shape
            assert torch.equal(new[key][:n], old[key])
            assert torch.count_nonzero(new[key][n:]) == 0
    assert new_optimizer.state[grown.layers[0].mlp.key_param_tokens]["exp_avg"].shape == (20, 32)
    _train(grown, new_optimizer, steps=1)  # the carried state is usable


# ---- freezing the old tokens ----------------------------------------------------------------------

def test_freezing_keeps_old_rows_bit_identical_under_adamw_weight_decay():
    grown = tf.grow(small_model(), qkv_slot_num=12, ffn_slot_num=24, seed=0)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.1)
    frozen = tf.freeze_old_tokens(grown, optimizer=optimizer)  # old counts from the history
    _train(grown, optimizer, steps=4)
    after = grown.state_dict()
    old = tf.old_slot_counts(grown.config)
    for name, layer in grown.pattentions().items():
        group = "ffn_slot_num" if name.endswith("mlp") else (
            "proj_slot_num" if name.endswith("proj") else "qkv_slot_num")
        n = old[group]
        for t in ("key_param_tokens", "value_param_tokens"):
            assert torch.equal(after[f"{name}.{t}"][:n], before[f"{name}.{t}"][:n])
            if layer.num_tokens > n:
                assert not torch.equal(after[f"{name}.{t}"][n:], before[f"{name}.{t}"][n:])
    assert torch.equal(after["word_embeddings.weight"], before["word_embeddings.weight"])
    assert torch.equal(after["final_norm.bias"], before["final_norm.bias"])
    frozen.remove()
    assert all(p.requires_grad for p in grown.parameters())


def test_masking_gradients_alone_does_not_freeze_under_adamw():
    # Why FrozenOldTokens restores rows: with zero gradients AdamW's weight decay still moves them.
    grown = tf.grow(small_model(), factor=2, seed=0)
    frozen = FrozenOldTokens(grown)  # hooks zero the old rows' gradients; nothing restores yet
    optimizer = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    old_rows = grown.layers[0].mlp.key_param_tokens.detach()[:16].clone()
    _train(grown, optimizer, steps=2)
    moved = grown.layers[0].mlp.key_param_tokens.detach()[:16]
    assert torch.equal(grown.layers[0].mlp.key_param_tokens.grad[:16], torch.zeros(16, 32))
    assert not torch.equal(moved, old_rows)
    torch.testing.assert_close(moved, old_rows * (1 - 1e-2 * 0.1) ** 2)  # pure decay
    frozen.restore()
    assert torch.equal(grown.layers[0].mlp.key_param_tokens.detach()[:16], old_rows)


# ---- shrinking ----------------------------------------------------------------------------------

def test_shrink_to_full_size_is_the_identity():
    model = small_model().eval()
    same = tf.shrink(model, qkv_slot_num=8, ffn_slot_num=16, calibration=ids())
    assert same.config == model.config
    for (name, p), (_, q) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(p, q), name


def test_shrink_keeps_the_highest_scored_tokens():
    # In every Pattention a known set of tokens gets zero keys: their weight is gelu(0) = 0 on any
    # input, so their score is 0 and they, exactly, must go; removing them changes nothing.
    model = small_model().eval()
    dead = {}
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in model.pattentions().items():
            drop = layer.num_tokens // 4
            dead[name] = torch.randperm(layer.num_tokens, generator=generator)[:drop].sort().values
            layer.key_param_tokens[dead[name]] = 0
    calibration = [ids(seed=2), ids(seed=3)]
    scores = tf.token_scores(model, calibration)
    for name, s in scores.items():
        assert torch.all(s[dead[name]] == 0)
        alive = torch.ones_like(s, dtype=torch.bool)
        alive[dead[name]] = False
        assert torch.all(s[alive] > 0)
    shrunk = tf.shrink(model, qkv_slot_num=6, proj_slot_num=6, ffn_slot_num=12, calibration=calibration)
    assert counts(shrunk) == dict(qkv_slot_num=6, proj_slot_num=6, ffn_slot_num=12)
    assert shrunk.config.ffn_scale_num == 16 and shrunk.config.growth_history[-1]["mode"] == "shrink"
    for name, layer in shrunk.pattentions().items():
        original = model.pattentions()[name]
        keep = [i for i in range(original.num_tokens) if i not in dead[name].tolist()]
        assert torch.equal(layer.key_param_tokens, original.key_param_tokens[keep])
        assert torch.equal(layer.value_param_tokens, original.value_param_tokens[keep])
    x = ids(seed=9)
    assert (shrunk(x) - model(x)).abs().max() <= 1e-5


class OneFeedForward(torch.nn.Module):
    """A bare ffn Pattention fed directly, with its own pattention_groups() (the vision model's hook)."""

    def __init__(self, ffn_slot_num: int) -> None:
        super().__init__()
        self.config = tf.Config(**{**SMALL, "ffn_slot_num": ffn_slot_num})
        self.mlp = Pattention(32, 32, ffn_slot_num)

    def pattention_groups(self):
        return {"qkv_slot_num": {}, "proj_slot_num": {}, "ffn_slot_num": {"mlp": self.mlp}}

    def forward(self, x):
        return self.mlp(x)


def test_calibrated_scale_keeps_the_kept_weights():
    # 17 tokens and 17 quarter-size copies of their keys, on inputs with all scores positive (so
    # the copies score lower: gelu grows there). The copies carry 0.25^2 of the mass s^2 at every
    # position, so the kept share is 1 / (1 + 1/16) = 16/17 and the calibrated n is 34 * 16/17 = 32,
    # which leaves every kept weight exactly as it was.
    model = OneFeedForward(34)
    with torch.no_grad():
        model.mlp.key_param_tokens.uniform_(0.1, 1.0)
        model.mlp.key_param_tokens[17:] = 0.25 * model.mlp.key_param_tokens[:17]
    calibration, h = torch.rand(4, 10, 32), torch.rand(6, 32)
    shrunk = tf.shrink(model, ffn_slot_num=17, calibration=calibration)
    assert torch.equal(shrunk.mlp.key_param_tokens, model.mlp.key_param_tokens[:17])
    assert shrunk.config.ffn_scale_num == 32 and shrunk.config.qkv_scale_num is None
    kept_weights = normalise(h @ model.mlp.key_param_tokens.T, "l2_norm_gelu", 34)[:, :17]  # (6, 17)
    torch.testing.assert_close(shrunk(h), kept_weights @ model.mlp.value_param_tokens[:17])
    # the other scale choices
    pinned = tf.shrink(model, ffn_slot_num=17, calibration=calibration, scale="pinned")
    assert pinned.config.ffn_scale_num == 34 and pinned.mlp.scale_num == 34
    counted = tf.shrink(model, ffn_slot_num=17, calibration=calibration, scale="count")
    assert counted.config.ffn_scale_num is None and counted.mlp.effective_scale_num == 17
    with pytest.raises(tf.TokenFormerError, match="unknown shrink scale"):
        tf.shrink(model, ffn_slot_num=17, calibration=calibration, scale="zoom")


def test_exact_grow_then_shrink_back_recovers_the_original():
    model = small_model().eval()
    grown = tf.grow(model, factor=2, seed=0)
    back = tf.shrink(grown, factor=0.5, calibration=ids())
    for (name, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), name


def test_shrinking_by_score_beats_the_opposite_choice():
    # Removing the lowest-scored quarter changes the output, but less than keeping the lowest scored.
    model = small_model().eval()
    x = ids(batch=4, length=24, seed=4)
    best = tf.shrink(model, factor=0.75, calibration=x)
    err_best = (best(x) - model(x)).abs().mean()
    assert err_best > 0
    scores = tf.token_scores(model, x)
    worst = tf.grow(model, qkv_slot_num=8)  # an unchanged copy
    for name, layer in worst.pattentions().items():
        keep = torch.topk(-scores[name], math.ceil(layer.num_tokens * 0.75)).indices.sort().values
        tf.shrink_pattention(layer, keep)
    assert (worst(x) - model(x)).abs().mean() > err_best


# ---- errors -------------------------------------------------------------------------------------

def test_growth_errors_are_one_clear_sentence():
    model = small_model()
    with pytest.raises(tf.TokenFormerError, match="use shrink"):
        tf.grow(model, qkv_slot_num=4)
    with pytest.raises(tf.TokenFormerError, match="use shrink"):
        tf.grow(model, factor=0.5)
    with pytest.raises(tf.TokenFormerError, match="unknown growth mode"):
        tf.grow(model, factor=2, mode="zoom")
    with pytest.raises(tf.TokenFormerError, match="not both"):
        tf.grow(model, factor=2, qkv_slot_num=16)
    with pytest.raises(tf.TokenFormerError, match="nothing to grow"):
        tf.grow(model)
    with pytest.raises(tf.TokenFormerError, match="use grow"):
        tf.shrink(model, qkv_slot_num=16, calibration=ids())
    with pytest.raises(tf.TokenFormerError, match="calibration"):
        tf.shrink(model, qkv_slot_num=4)
    with pytest.raises(tf.TokenFormerError, match="no growth"):
        tf.freeze_old_tokens(model)
    shrunk_after_growth = tf.shrink(tf.grow(model, factor=2), factor=0.75, calibration=ids())
    with pytest.raises(tf.TokenFormerError, match="not a growth"):
        tf.old_slot_counts(shrunk_after_growth.config)


# ---- command line -------------------------------------------------------------------------------

def test_cli_grow_then_shrink_round_trip(tiny_checkpoint, tmp_path, capsys):
    grown_dir, shrunk_dir = tmp_path / "grown", tmp_path / "shrunk"
    assert main(["grow", "--checkpoint", str(tiny_checkpoint), "--out", str(grown_dir), "--factor", "2"]) == 0
    out = capsys.readouterr().out
    model, grown = tf.TokenFormer.from_pretrained(tiny_checkpoint), tf.TokenFormer.from_pretrained(grown_dir)
    assert f"old: {model.num_parameters():,} parameters" in out
    assert f"new: {grown.num_parameters():,} parameters" in out
    assert counts(grown) == dict(qkv_slot_num=64, proj_slot_num=64, ffn_slot_num=256)
    assert (grown_dir / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    x = ids()
    assert (grown(x) - model(x)).abs().max() <= 1e-5

    # JSONL data: 3000 bytes of text make enough 33-token windows for 4 + 4
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                            for i in range(50)))
    assert main(["shrink", "--checkpoint", str(grown_dir), "--out", str(shrunk_dir), "--factor", "0.5",
                 "--data", str(data), "--seq-length", "32", "--calibration-windows", "4",
                 "--validation-windows", "4"]) == 0
    out = capsys.readouterr().out
    shrunk = tf.TokenFormer.from_pretrained(shrunk_dir)
    assert counts(shrunk) == counts(model)
    assert (shrunk_dir / "tokenizer.json").is_file()
    assert [h["mode"] for h in shrunk.config.growth_history] == ["exact", "shrink"]
    # the zero-key tokens of the exact growth score 0, so shrinking removes exactly them
    assert torch.equal(shrunk.layers[0].mlp.key_param_tokens, model.layers[0].mlp.key_param_tokens)
    before, after = [float(v) for v in re.findall(r"(?:before|after) (\d+\.\d+)", out)]
    assert before == pytest.approx(after, abs=1e-4) and before > 0
    documents = (ids for ids, _ in token_documents(data, tf.ByteTokenizer()))
    windows = token_windows(documents, tf.ByteTokenizer().eos_id, 32)
    assert before == pytest.approx(mean_loss(model, windows[-4:].split(4)), abs=1e-4)


def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["grow", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--factor", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'gpt2'" in err and "cannot load" in err and len(err.splitlines()) == 1
    config["model_type"] = "tokenformer"
    (tiny_checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["grow", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x"),
                 "--qkv-slot-num", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "use shrink" in err and len(err.splitlines()) == 1
    assert main(["shrink", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "y"),
                 "--factor", "0.5", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
