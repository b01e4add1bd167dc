"""The growth experiment's accounting (`experiments/growth`): compute per arm, the frontier
arithmetic against hand numbers, the Transformer control and its widening, and a --quick run."""

import dataclasses
import json
import math

import pytest
import torch

from experiments.growth.__main__ import main
from experiments.growth.protocol import (Protocol, Reach, arm_flops, arms, branch_interval, branch_step,
                                         compute_to_reach, flops_at, loss_at, ratios, smaller)
from experiments.growth.report import compute_to_target
from experiments.growth.run import run_arm
from experiments.growth.transformer import Transformer, TransformerConfig, matched_ffn_width, widen_ffn
from tokenformer import Config, TokenFormer
from tokenformer.flops import tokenformer_flops
from tokenformer.training import growth_schedule
from tokenformer.training.config import TrainConfig
from tokenformer.training.distributed import DistEnv
from tokenformer.training.loop import start_run, train_step
from tokenformer.training.tasks.language import LanguageModelTask
from tests.test_train import TEXTS, text_docs, tiny_config, write_corpus


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


def test_an_in_run_arm_costs_each_shape_for_its_own_steps():
    p = Protocol.in_run()
    small, medium, large = (p.step_flops("tf", size) for size in ("small", "medium", "large"))
    # by hand: the medium TokenFormer has twice the small one's tokens, 64/64/256 at width 32
    h, T = 32, 64
    per_token = 2 * (2 * 2 * h * (3 * 64 + 64 + 256)) + 2 * (2 * 2 * T * h) + 2 * h * 384
    assert medium == 3 * per_token * p.tokens_per_step
    by_name = {a.name: a for a in arms(p)}
    carry = by_name["tf/in-run-carry@0.25/1N/seed0"]
    assert arm_flops(p, carry) == {"base": 2000 * small, "stage": 6000 * large, "cumulative": 2000 * small + 6000 * large}
    two = by_name["tf/in-run-2step@0.25+0.5/1N/seed0"]
    assert arm_flops(p, two)["cumulative"] == 2000 * small + 2000 * medium + 4000 * large
    assert flops_at(p, two, 3000) == 2000 * small + 1000 * medium
    widen = by_name["t/widen-carry@0.75/1N/seed0"]
    assert arm_flops(p, widen)["cumulative"] == 6000 * p.step_flops("t", "small") + 2000 * p.step_flops("t", "large")


def test_wsd_arms_branch_from_their_trunk_where_their_lr_leaves_the_peak():
    p = Protocol.in_run()
    by_name = {a.name: a for a in arms(p)}
    trunk = "tf/small/2.5N/seed1"
    assert by_name[trunk].prefix is None and by_name["tf/large/1N/seed1"].prefix is None
    assert by_name["tf/small/1N/seed1"].prefix == trunk and by_name["tf/in-run-noise@0.5/1N/seed1"].prefix == trunk
    # 8000 steps, the last 20% decay: the N-step run's lr leaves the peak after step 6400
    assert branch_step(p, by_name["tf/small/1N/seed1"]) == 6400 == \
        TrainConfig(train_iters=8000, lr_decay_style="wsd", wsd_decay_fraction=0.2).schedule.stable_until
    assert branch_step(p, by_name["tf/large/0.25N/seed1"]) == 1600
    assert branch_step(p, by_name["tf/in-run-carry@0.75/1N/seed1"]) == 6000
    # the trunk keeps a checkpoint at every step an arm branches from: 3200, 6400, 9600, 2000, 4000, 6000
    assert branch_interval(p, arms(p), by_name[trunk]) == 400
    # a cosine protocol has no trunks
    assert all(a.prefix is None for a in arms(Protocol()))


def test_compute_to_the_large_models_loss_is_read_on_the_arms_curve():
    p = Protocol.in_run()
    arm = next(a for a in arms(p) if a.name == "tf/in-run-carry@0.5/1N/seed0")
    curve = [(0, 5.0), (4000, 2.0), (6000, 1.6), (8000, 1.2)]
    # 1.4 is reached half way from step 6000 to 8000: 4000 small steps and 3000 large ones
    expected = 4000 * p.step_flops("tf", "small") + 3000 * p.step_flops("tf", "large")
    assert compute_to_target(p, arm, curve, 1.4) == pytest.approx(expected)
    assert compute_to_target(p, arm, curve, 1.1) is None
    assert compute_to_target(p, arm, curve, 2.0) == pytest.approx(4000 * p.step_flops("tf", "small"))


def test_the_transformer_control_grows_inside_a_run_with_carried_moments(tmp_path):
    corpus = write_corpus(tmp_path, text_docs(TEXTS), text_docs(TEXTS[::7]))
    model = Transformer(TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_width=48,
                                          seq_length=32))
    cfg = tiny_config(corpus, model=None, grow_at=[2], grow_to=[{"ffn_width": 80}], lr_decay_style="wsd")
    task = LanguageModelTask(cfg)
    run = start_run(cfg, model, DistEnv(), task, cfg)
    for step in (1, 2):
        train_step(run, step)
    old = {n: {k: v.clone() for k, v in run.optimizer.state[p].items()} for n, p in run.model.named_parameters()}
    batch = task.train_batch(run.consumed_samples, 2)
    with torch.no_grad():
        before = task.loss(run.model, batch)[0].item()
    growth_schedule.grow_run(run, 0)
    with torch.no_grad():
        assert task.loss(run.model, batch)[0].item() == pytest.approx(before, abs=1e-6, rel=0)  # exact widening
    assert run.model.config.ffn_width == 80
    state = {n: run.optimizer.state[p] for n, p in run.model.named_parameters()}
    for key in ("exp_avg", "exp_avg_sq"):
        fc1, fc2 = state["layers.1.fc1.weight"][key], state["layers.1.fc2.weight"][key]  # (80, 32), (32, 80)
        assert torch.equal(fc1[:48], old["layers.1.fc1.weight"][key]) and not fc1[48:].any()
        assert torch.equal(fc2[:, :48], old["layers.1.fc2.weight"][key]) and not fc2[:, 48:].any()
        assert torch.equal(state["layers.0.query.weight"][key], old["layers.0.query.weight"][key])
    train_step(run, 3)
    assert run.model.layers[0].fc2.weight[:, 48:].abs().sum() > 0


def test_quick_runs_every_arm_end_to_end(tmp_path):
    assert main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "growth.json").read_text())
    p = Protocol.quick()
    assert set(report["arms"]) == {a.name for a in arms(p)}
    assert (tmp_path / "out" / "growth.png").stat().st_size > 0
    tf = report["results"]["tf"]
    # exact growth starts where its base ended; official growth does not
    for name, row in tf["seeds"]["0"]["grown"].items():
        if row["kind"].startswith("grown-"):
            same = abs(row["loss_right_after_growth"] - row["loss_before_growth"]) < 1e-4
            assert same == (row["kind"] == "grown-exact"), name
    assert all(math.isfinite(row["R_best"]["mean"]) for row in tf["summary"].values())
    # the in-run arms grow to the large model (the two-step one through the medium), the control too
    large = {f: TokenFormer(Config(**p.model("tf", "large"))).num_parameters() if f == "tf" else
             Transformer(TransformerConfig(**p.model("t", "large"))).num_parameters() for f in ("tf", "t")}
    grown = {name: arm["growths"] for name, arm in report["arms"].items() if "@" in name}
    assert len(grown) == 7
    for name, growths in grown.items():
        assert len(growths) == (2 if "2step" in name else 1), name
        assert growths[-1]["parameters"] == large[name[:name.index("/")]], name
    # starting an in-run arm from its trunk's checkpoint gives what training it whole gives
    arm = next(a for a in arms(p) if a.name == "tf/in-run-carry@0.5/1N/seed0")
    assert arm.prefix and report["arms"][arm.name]["branched_from"]
    whole = run_arm(p, arm, report["lr"]["tf"], tmp_path / "work" / "data", tmp_path / "whole", reuse_prefix=False)
    assert [list(point) for point in whole["curve"]] == report["arms"][arm.name]["curve"]
    # a second invocation reuses every finished arm, and trains again an arm killed before its outcome
    # file (its folder left with checkpoints): the same curve
    began, killed = report["wall_time_s"], "tf/large/1N/seed0"
    (tmp_path / "work" / "runs" / killed / "outcome.json").unlink()
    assert main(["--quick", "--jobs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    again = json.loads((tmp_path / "out" / "growth.json").read_text())
    assert again["wall_time_s"] < began and again["arms"][killed]["curve"] == report["arms"][killed]["curve"]



def test_the_seed_diagnostic_seeds_init_and_data_apart_and_counts_the_tokens_in_use(tmp_path):
    """`experiments.growth.diagnose`: the large TokenFormer of the in-run protocol with its init and
    data order seeded apart; the tokens in use, against the first Pattention computed by hand."""
    import numpy as np
    import torch.nn.functional as F

    from experiments.growth.diagnose import ACTIVE, active_shares, parse_run, run_one

    rng = np.random.default_rng(0)
    valid = [list(rng.integers(0, 256, 2000)) for _ in range(40)]
    data = write_corpus(tmp_path / "data", [list(rng.integers(0, 256, 2000)) for _ in range(60)], valid)
    name, settings = parse_run("i2d0:init=2,data=0,lr=1e-3")
    assert settings == {"init": 2, "data": 0, "lr": 1e-3}
    with pytest.raises(Exception, match="unknown setting 'beta'"):
        parse_run("x:beta=3")
    out = tmp_path / "work"
    (out / "i2d0").mkdir(parents=True)
    (out / "i2d0" / "notes.txt").write_text("mine")  # a folder of the user's own where a run would go
    with pytest.raises(Exception, match="is not a training run's output"):
        run_one(name, settings, steps=4, measure_at=2, data=data, work=out)
    assert (out / "i2d0" / "notes.txt").read_text() == "mine"
    (out / "i2d0" / "notes.txt").unlink()
    result = run_one(name, settings, steps=4, measure_at=2, data=data, work=out)
    assert [s for s, _ in result["val"]] == [0, 4]
    assert json.loads((out / "i2d0.json").read_text()) == json.loads(json.dumps(result))
    # step 0's loss is the seed-2 init's whatever the data order; another init gives another
    same_init = run_one("i2d1", {"init": 2, "data": 1}, steps=2, measure_at=2, data=data, work=out)
    other_init = run_one("i1d0", {"init": 1, "data": 0}, steps=2, measure_at=2, data=data, work=out)
    assert same_init["val"][0][1] == result["val"][0][1] != other_init["val"][0][1]
    # tokens in use, by hand: the first Pattention reads the parameter-free LayerNorm of the embedding
    p = Protocol.in_run()
    torch.manual_seed(0)
    model = TokenFormer(Config(**p.model("tf", "large")))
    shares = active_shares(model, data, p)
    tokens = torch.tensor(np.concatenate(valid)[:16 * p.seq_length]).view(16, p.seq_length)
    x = F.layer_norm(model.word_embeddings(tokens), (p.hidden_size,), eps=1e-5)
    s = x @ model.layers[0].attention.query.key_param_tokens.T
    w = F.gelu(s / s.norm(dim=-1, keepdim=True) * s.shape[-1] ** 0.5)
    assert set(shares) == {n for n, m in model.named_modules() if hasattr(m, "key_param_tokens")}
    assert shares["layers.0.attention.query"] == pytest.approx(float((w > ACTIVE).float().mean()))


def test_only_picks_the_matching_arms_and_what_they_start_from():
    from experiments.growth.__main__ import only

    p = dataclasses.replace(Protocol.in_run(), tf_seeds=(0, 4))
    picked = only(arms(p), ["tf/in-run-official@0.25/*/seed4"])
    # the arm, and its trunk (the small model's longest run of that seed), nothing of seed 0
    assert [a.name for a in picked] == ["tf/small/2.5N/seed4", "tf/in-run-official@0.25/1N/seed4"]
    assert picked[1].prefix == picked[0].name
