"""Shrinking's edges: the calibrated n of each normalisation against hand formulas, the mean over a
slot group, a pinned n in the config, scores far from 0, and the calibration input's forms."""

import math

import pytest
import torch

import tokenformer as tf
from tokenformer.models.pattention import Pattention

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
             qkv_slot_num=8, proj_slot_num=8, ffn_slot_num=16, vocab_size=257)


class FeedForwards(torch.nn.Module):
    """Bare ffn Pattentions of 2-d inputs, one slot group, each fed the input directly (summed)."""

    def __init__(self, norm: str, scores: list[list[float]], scale_num: int | None = None) -> None:
        super().__init__()
        n = len(scores[0])
        self.config = tf.Config(**{**SMALL, "ffn_slot_num": n, "norm_activation_type": norm,
                                   "ffn_scale_num": scale_num})
        self.mlps = torch.nn.ModuleList(Pattention(2, 3, n, norm, scale_num) for _ in scores)
        with torch.no_grad():
            for mlp, s in zip(self.mlps, scores):
                mlp.key_param_tokens.zero_()
                mlp.key_param_tokens[:, 0] = torch.tensor(s)  # the input [1, 0] scores s exactly
                mlp.value_param_tokens.copy_(torch.arange(3 * n, dtype=torch.float32).reshape(n, 3))

    def pattention_groups(self):
        return {"qkv_slot_num": {}, "proj_slot_num": {},
                "ffn_slot_num": {f"mlps.{i}": m for i, m in enumerate(self.mlps)}}

    def forward(self, x):
        return sum(mlp(x) for mlp in self.mlps)


ONE = torch.tensor([[[1.0, 0.0]] * 3])  # (B=1, T=3, 2): every position scores the keys' column 0


def gelu(x: float) -> float:
    return x * 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_softmax_calibrated_n_keeps_the_weights_even_far_from_zero():
    # exp(s) in the ratio 4:2:1:1 (offset by 1000, where exp overflows without the row-max shift):
    # the top two carry 6/8 of the mass, so n = 4 * 3/4 = 3 and softmax * n gives them 2 and 1 again.
    logs = [math.log(4), math.log(2), 0.0, 0.0]
    for offset in (0.0, 1000.0):
        model = FeedForwards("softmax", [[offset + s for s in logs]])
        shrunk = tf.shrink(model, ffn_slot_num=2, calibration=ONE)
        assert shrunk.config.ffn_scale_num == 3 and shrunk.mlps[0].scale_num == 3
        torch.testing.assert_close(shrunk.mlps[0].key_param_tokens[:, 0], torch.tensor(logs[:2]) + offset)
        # the kept weights [2, 1] times the kept values [[0, 1, 2], [3, 4, 5]]
        torch.testing.assert_close(shrunk(torch.tensor([[1.0, 0.0]])), torch.tensor([[3.0, 6.0, 9.0]]),
                                   atol=1e-3, rtol=1e-4)


def test_gelu_l2_norm_calibrated_n_uses_the_gelu_mass():
    # Under ||gelu(s)|| a token adds gelu(s)^2 to the normaliser: keeping s = 2, 1 of [2, 1, -1, 0]
    # keeps (g(2)^2 + g(1)^2) / (g(2)^2 + g(1)^2 + g(-1)^2) of it; the config pins n = 1000.
    model = FeedForwards("gelu_l2_norm", [[2.0, 1.0, -1.0, 0.0]], scale_num=1000)
    shrunk = tf.shrink(model, ffn_slot_num=2, calibration=ONE)
    kept = gelu(2) ** 2 + gelu(1) ** 2
    expected = round(1000 * kept / (kept + gelu(-1) ** 2))
    assert expected == 994
    assert shrunk.config.ffn_scale_num == expected and shrunk.mlps[0].scale_num == expected
    # l2_norm_gelu: the mass is s^2, 5/6 of it kept
    model = FeedForwards("l2_norm_gelu", [[2.0, 1.0, -1.0, 0.0]], scale_num=1000)
    assert tf.shrink(model, ffn_slot_num=2, calibration=ONE).config.ffn_scale_num == round(1000 * 5 / 6)


def test_calibrated_n_is_the_mean_share_of_the_group():
    # Two Pattentions of one group keep 6/8 and 4/8 of their exp mass (exp ratios 4:2:1:1 and
    # 2:2:2:2); the group's one n is 8 * (3/4 + 1/2) / 2 = 5, set in both and in the config.
    model = FeedForwards("softmax", [[math.log(4), math.log(2), 0.0, 0.0], [0.0] * 4], scale_num=8)
    shrunk = tf.shrink(model, ffn_slot_num=2, calibration=ONE)
    assert shrunk.config.ffn_scale_num == 5
    assert [m.scale_num for m in shrunk.mlps] == [5, 5]
    assert shrunk.config.growth_history[-1]["mode"] == "shrink"
    assert model.mlps[0].num_tokens == 4 and model.config.ffn_scale_num == 8  # the original untouched


def test_calibration_forms_and_the_mode_is_restored():
    model = tf.TokenFormer(tf.Config(**SMALL)).train()
    x = torch.randint(0, 257, (12,), generator=torch.Generator().manual_seed(3))
    one_d, two_d = tf.token_scores(model, x), tf.token_scores(model, [x[None]])
    assert model.training  # scored in eval mode, given back in train mode
    assert one_d.keys() == two_d.keys()
    for name in one_d:
        assert one_d[name].dtype == torch.float64 and one_d[name].shape == (model.pattentions()[name].num_tokens,)
        torch.testing.assert_close(one_d[name], two_d[name])
    model.eval()
    tf.token_scores(model, x)
    assert not model.training
    for empty in ([], torch.empty(1, 0, dtype=torch.long)):
        with pytest.raises(tf.TokenFormerError, match="calibration data is empty"):
            tf.shrink(model, factor=0.5, calibration=empty)


def test_token_scores_are_the_mean_absolute_weight_by_hand():
    # softmax of [ln 4, ln 2, 0, 0] times n = 4 is [2, 1, 0.5, 0.5] at every position
    model = FeedForwards("softmax", [[math.log(4), math.log(2), 0.0, 0.0]])
    scores = tf.token_scores(model, [ONE, ONE[:, :1]])
    torch.testing.assert_close(scores["mlps.0"], torch.tensor([2.0, 1.0, 0.5, 0.5], dtype=torch.float64))


def test_shrink_pattention_keeping_every_token_in_order_leaves_the_layer_alone():
    # The same Parameter objects (an optimizer holding them still trains them) and n still unpinned,
    # so a later growth lets n follow the count; a reordering does replace the rows and pin n.
    layer = Pattention(2, 3, 4)
    keys, values = layer.key_param_tokens, layer.value_param_tokens
    assert tf.shrink_pattention(layer, torch.arange(4)) is layer
    assert layer.key_param_tokens is keys and layer.value_param_tokens is values and layer.scale_num is None
    tf.shrink_pattention(layer, torch.tensor([3, 2, 1, 0]))
    assert layer.scale_num == 4 and torch.equal(layer.key_param_tokens, keys.detach().flip(0))
    assert torch.equal(layer.value_param_tokens, values.detach().flip(0))


def test_the_history_records_the_scale_choice():
    model = FeedForwards("softmax", [[math.log(4), math.log(2), 0.0, 0.0]])
    for scale in ("calibrated", "pinned", "count"):
        entry = tf.shrink(model, ffn_slot_num=2, calibration=ONE, scale=scale).config.growth_history[-1]
        assert entry["mode"] == "shrink" and entry["scale"] == scale
        assert entry["from"]["ffn_slot_num"] == 4 and entry["to"]["ffn_slot_num"] == 2
