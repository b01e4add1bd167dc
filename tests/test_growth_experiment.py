"""The growth experiment's accounting (`experiments/growth`): compute per arm, the frontier
arithmetic against hand numbers, the Transformer control and its widening, and a --quick run."""

import json
import math

import pytest
import torch

from experiments.growth.__main__ import main
from experiments.growth.protocol import (Protocol, Reach, arm_flops, arms, compute_to_reach, loss_at, ratios,
                                         smaller)
from experiments.growth.transformer import Transformer, TransformerConfig, matched_ffn_width, widen_ffn
from tokenformer import Config, TokenFormer
from tokenformer.flops import tokenformer_flops


def test_every_arm_costs_what_tokenformer_flops_says():
    p = Protocol()
    tokens = p.batch * p.seq_length
    small, large = (Config(**p.model("tf", size)) for size in ("small", "large"))
    for arm in arms(p):
        flops = arm_flops(p, arm)
        if arm.family == "tf":
            per_token = tokenformer_flops(large if arm.size == "large" else small).training().total
            assert flops["stage"] == arm.steps * tokens * per_token
        if arm.grown:  # the base: the small model trained N steps, counted in the cumulative compute
            base = p.steps * tokens * tokenformer_flops(small).training().total if arm.family == "tf" else \
                p.steps * p.step_flops("t", "small")
            assert flops["base"] == base and flops["cumulative"] == flops["stage"] + base
    # by hand, one TF-L step: 2 layers x (2 x 2h x (3 x 192 + 192 + 768)) + attention 2 x 4Th + head 2h x 384
    h, T = 64, 64
    per_token = 2 * (2 * 2 * h * (3 * 192 + 192 + 768)) + 2 * (2 * 2 * T * h) + 2 * h * 384
    assert p.step_flops("tf", "large") == 3 * per_token * tokens


def test_the_transformer_control_matches_tokenformer_in_weights_and_flops():
    p = Protocol()
    for size in ("small", "large"):
        tf_model = TokenFormer(Config(**p.model("tf", size)))
        t_model = Transformer(TransformerConfig(**p.model("t", size)))
        assert t_model.num_parameters() == tf_model.num_parameters() == t_model.config.num_parameters
        assert p.step_flops("t", size) == p.step_flops("tf", size)
    assert matched_ffn_width(64, 64, 64, 256) == 384 == 6 * 64  # 2h(3h + h + 4h) = 4h^2 + 2h f


def test_exact_widening_keeps_the_logits_and_random_widening_does_not():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_width=48))
    x = torch.randint(0, 257, (2, 16))
    exact = widen_ffn(model, 96, "exact")
    assert exact.config.ffn_width == 96 and exact.layers[0].fc1.weight.shape == (96, 32)
    assert torch.allclose(exact(x), model(x), atol=1e-6)
    assert torch.equal(exact.layers[1].fc2.weight[:, :48], model.layers[1].fc2.weight)
    assert (widen_ffn(model, 96, "random")(x) - model(x)).abs().max() > 1e-3
    # the new output weights get gradient at once (zero columns, non-zero gelu of the new units)
    torch.nn.functional.cross_entropy(exact(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    assert exact.layers[0].fc2.weight.grad[:, 48:].abs().sum() > 0


def test_compute_to_reach_and_ratios_by_hand():
    frontier = [(100.0, 3.0), (400.0, 2.0), (1600.0, 1.5)]
    assert compute_to_reach(frontier, 2.0).flops == pytest.approx(400.0)
    # halfway between 3.0 and 2.0 in loss is halfway in log compute: sqrt(100 * 400) = 200
    assert compute_to_reach(frontier, 2.5).flops == pytest.approx(200.0)
    assert compute_to_reach(frontier, 1.0) == Reach(1600.0, ">")   # beyond the ladder: a lower bound
    assert compute_to_reach(frontier, 3.5) == Reach(100.0, "<")
    assert loss_at(frontier, 800.0) == pytest.approx(1.75)
    # a worse point at more compute does not count: the frontier is the lower envelope, (200, 3.0)
    assert compute_to_reach([(100.0, 3.0), (200.0, 3.5), (400.0, 2.0)], 2.5).flops == pytest.approx(math.sqrt(200 * 400))
    flops = {"base": 100.0, "stage": 100.0, "cumulative": 200.0}
    small = [(50.0, 2.6), (200.0, 2.4), (800.0, 2.2)]
    r = ratios(2.5, flops, frontier, small)
    assert r["R_incl"].flops == pytest.approx(1.0) and r["R_excl"].flops == pytest.approx(2.0)
    assert r["R_best"].flops == pytest.approx(100.0 / 200.0)  # the small model reaches 2.5 at 100
    assert smaller(Reach(50.0), Reach(80.0, "<")) == Reach(50.0, "<")
    assert smaller(Reach(50.0, ">"), Reach(80.0)) == Reach(50.0, ">")


def test_quick_runs_every_arm_end_to_end(tmp_path):
    assert main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "growth.json").read_text())
    p = Protocol.quick()
    assert set(report["arms"]) == {a.name for a in arms(p)}
    assert (tmp_path / "out" / "growth.png").stat().st_size > 0
    tf = report["results"]["tf"]
    # exact growth starts where its base ended; official growth does not
    for name, row in tf["seeds"]["0"]["grown"].items():
        same = abs(row["loss_right_after_growth"] - row["loss_before_growth"]) < 1e-4
        assert same == (row["kind"] == "grown-exact"), name
    assert all(math.isfinite(row["R_best"]["mean"]) for row in tf["summary"].values())
    # a second invocation reuses every finished arm
    began = report["wall_time_s"]
    assert main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "growth.json").read_text())["wall_time_s"] < began
