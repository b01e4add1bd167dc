"""Training from a grown checkpoint (`train --init-from`): freezing the old tokens, carrying the
optimizer state, continuing the schedule, and the loss right after an exact growth, all through
the trainer itself on a corpus built here."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tokenformer import TokenFormerError
from tokenformer.__main__ import main as cli
from tokenformer.checkpoint import load_model as load_checkpoint, read_trainer_state as read_source_state
from tokenformer.scaling.grow import grow_checkpoint
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics
from tokenformer.training.optim import build_optimizer, lr_at
from tokenformer.training.warm_start import prepare_model, start_optimizer

from tests.test_train import tiny_config

GROWN = dict(qkv_slot_num=48, proj_slot_num=40, ffn_slot_num=160)  # tiny is 32/32/128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A tiny model trained 4 steps (checkpoint with optimizer state), and its exact growth."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("source")
    summary = train(tiny_config(corpus, root / "small", train_iters=4, save_interval=4, eval_interval=4,
                                lr_decay_iters=12))
    checkpoint = root / "small" / "step_00000004"
    grow_checkpoint(checkpoint, root / "grown", mode="exact", seed=0, **GROWN)
    return {"summary": summary, "checkpoint": checkpoint, "grown": root / "grown"}


def _tokens(directory):
    return {k: v for k, v in load_file(str(directory / "model.safetensors")).items()}


def test_loss_right_after_exact_growth_equals_the_loss_before(corpus, source, tmp_path):
    summary = train(tiny_config(corpus, train_iters=1, init_from=str(source["grown"])))
    before, after = source["summary"]["val_loss"], summary["val_loss_initial"]
    assert before is not None and after == pytest.approx(before, abs=1e-6)
    # an official growth changes the function, so the same check must see a difference
    grow_checkpoint(source["checkpoint"], tmp_path / "official", mode="official", seed=0, **GROWN)
    official = train(tiny_config(corpus, train_iters=1, init_from=str(tmp_path / "official")))
    assert abs(official["val_loss_initial"] - before) > 1e-3


def test_freeze_old_keeps_old_tokens_bit_identical(corpus, source, tmp_path):
    summary = train(tiny_config(corpus, tmp_path / "run", train_iters=3, init_from=str(source["grown"]),
                                freeze_old=True, weight_decay=0.5))
    grown, trained = _tokens(source["grown"]), _tokens(tmp_path / "run" / "step_00000003")
    old = {"qkv": 32, "proj": 32, "ffn": 128}
    moved = 0
    for name, before in grown.items():
        after = trained[name]
        if not name.endswith("_param_tokens"):
            assert torch.equal(after, before), name  # embedding, final norm: frozen whole
            continue
        group = "ffn" if ".mlp." in name else "proj" if ".proj." in name else "qkv"
        n_old = old[group]
        assert torch.equal(after[:n_old], before[:n_old]), name
        moved += int(not torch.equal(after[n_old:], before[n_old:]))
    assert moved == len([n for n in grown if n.endswith("_param_tokens")])  # every new block trained
    assert summary["train_loss"] is not None


def test_grow_carries_the_optimizer_state_to_the_grown_shapes(source):
    old_state, new_state = read_source_state(source["checkpoint"]), read_source_state(source["grown"])
    assert new_state["step"] == old_state["step"] == 4
    assert new_state["consumed_samples"] == old_state["consumed_samples"]
    names = lambda s: {n: s["optimizer"]["state"][i] for g in s["optimizer"]["param_groups"]  # noqa: E731
                       for i, n in zip(g["params"], g["param_names"])}
    old, new = names(old_state), names(new_state)
    for name, moments in old.items():
        for key in ("exp_avg", "exp_avg_sq"):
            n_old = moments[key].shape[0]
            assert torch.equal(new[name][key][:n_old], moments[key]), name
            assert not new[name][key][n_old:].any(), name
        assert torch.equal(new[name]["step"], moments["step"])
    assert new["layers.0.mlp.key_param_tokens"]["exp_avg"].shape == (160, 64)


def test_init_from_optimizer_loads_the_carried_moments(corpus, source):
    cfg = tiny_config(corpus, init_from=str(source["grown"]), init_from_optimizer=True)
    model = load_checkpoint(source["grown"])
    warm = prepare_model(cfg, model)
    optimizer = build_optimizer(model, cfg)
    warm = start_optimizer(cfg, warm, optimizer)
    assert warm.carried_parameters == len(list(model.parameters()))
    old = read_source_state(source["checkpoint"])["optimizer"]
    old_by_name = {n: old["state"][i] for g in old["param_groups"] for i, n in zip(g["params"], g["param_names"])}
    for group in optimizer.param_groups:
        assert group["lr"] == cfg.lr  # this run's hyperparameters, not the source's
        for param, name in zip(group["params"], group["param_names"]):
            state, saved = optimizer.state[param], old_by_name[name]
            n_old = saved["exp_avg"].shape[0]
            assert torch.equal(state["exp_avg"][:n_old], saved["exp_avg"])
            assert torch.equal(state["exp_avg_sq"][:n_old], saved["exp_avg_sq"])
            assert not state["exp_avg"][n_old:].any() and not state["exp_avg_sq"][n_old:].any()
            assert float(state["step"]) == 4


def test_carried_optimizer_and_continued_schedule_equal_an_uninterrupted_run(corpus, tmp_path):
    # Without growth, init_from a checkpoint + carried optimizer + continued schedule is a resume:
    # the losses of steps 4-6 must be those of a run that never stopped.
    straight = train(tiny_config(corpus, train_iters=6))
    train(tiny_config(corpus, tmp_path / "first", train_iters=3, lr_decay_iters=6))
    second = train(tiny_config(corpus, tmp_path / "second", train_iters=6, init_from_optimizer=True,
                               init_from_schedule="continue", init_from=str(tmp_path / "first" / "step_00000003")))
    assert sorted(second["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6, abs=1e-7)
    # the fresh-optimizer restart does not reproduce it
    restart = train(tiny_config(corpus, train_iters=3, init_from=str(tmp_path / "first" / "step_00000003")))
    assert restart["losses"][1] != pytest.approx(straight["losses"][4], rel=1e-6)


def test_continued_schedule_learning_rates(corpus, source, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train_iters=8, init_from=str(source["grown"]),
                      init_from_schedule="continue", lr_decay_iters=12)
    summary = train(cfg)
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r}
    assert sorted(logged) == [5, 6, 7, 8]
    # the source's schedule (lr 3e-3, warmup 2, cosine to 6e-5 over 12 steps) goes on at step 5
    for step, lr in logged.items():
        progress = (step - 2) / (12 - 2)
        assert lr == pytest.approx(6e-5 + (3e-3 - 6e-5) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr == pytest.approx(lr_at(step, cfg.schedule))
    assert summary["step"] == 8
    # restart: warmup again from step 1
    restart = tiny_config(corpus, tmp_path / "restart", train_iters=2, init_from=str(source["grown"]))
    train(restart)
    first = [r for r in read_metrics(tmp_path / "restart" / "metrics.jsonl") if "lr" in r][0]
    assert first["step"] == 1 and first["lr"] == pytest.approx(3e-3 / 2)


def test_grow_command_reports_the_carried_state(source, tmp_path, capsys):
    assert cli(["grow", "--checkpoint", str(source["checkpoint"]), "--out", str(tmp_path / "g"), "--factor", "2"]) == 0
    assert "optimizer state" in capsys.readouterr().out
    assert read_source_state(tmp_path / "g")["optimizer"] is not None
    # growing a grown directory again maps its state once more; the history records both growths
    assert cli(["grow", "--checkpoint", str(tmp_path / "g"), "--out", str(tmp_path / "g2"), "--factor", "1.5"]) == 0
    state = read_source_state(tmp_path / "g2")
    names = {n: state["optimizer"]["state"][i] for g in state["optimizer"]["param_groups"]
             for i, n in zip(g["params"], g["param_names"])}
    assert names["layers.0.mlp.key_param_tokens"]["exp_avg"].shape == (384, 64)  # 128 x 2 x 1.5
    assert len(json.loads((tmp_path / "g2" / "config.json").read_text())["growth_history"]) == 2
    # a plain model directory (no trainer.pt) grows without one
    load_checkpoint(tmp_path / "g").save_pretrained(tmp_path / "plain")
    assert cli(["grow", "--checkpoint", str(tmp_path / "plain"), "--out", str(tmp_path / "g3"), "--factor", "2"]) == 0
    assert read_source_state(tmp_path / "g3") is None


def test_init_from_option_errors_are_one_sentence(corpus, source, tmp_path):
    plain = tmp_path / "plain"
    load_checkpoint(source["grown"]).save_pretrained(plain)  # no trainer.pt
    cases = [
        (dict(freeze_old=True), "needs init_from"),
        (dict(init_from=str(plain), init_from_optimizer=True), "holds no trainer.pt"),
        (dict(init_from=str(plain), init_from_schedule="continue"), "holds no trainer.pt"),
        (dict(init_from=str(source["checkpoint"]), freeze_old=True), "has no growth"),
        (dict(init_from=str(source["grown"]), init_from_schedule="continue", train_iters=4), "set train_iters > 4"),
        (dict(init_from=str(source["grown"]), init_from_schedule="later"), "use one of restart, continue"),
    ]
    for changes, message in cases:
        with pytest.raises(TokenFormerError, match=message):
            train(tiny_config(corpus, **changes))
    # through the command line: one line on stderr, exit status 2
    code = cli(["train", "--model", "tiny", "--data_path", str(corpus), "--freeze-old", "--progress", "false",
                "--train_iters", "1"])
    assert code == 2


def test_grow_command_prints_the_loss_before_and_after(corpus, source, tmp_path, capsys):
    assert cli(["grow", "--checkpoint", str(source["checkpoint"]), "--out", str(tmp_path / "g"),
                "--ffn-slot-num", "256", "--data", str(corpus)]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("validation loss")][0]
    before, after = (float(part.split()[-1].rstrip(",")) for part in line.split(" (difference")[0].split(", after"))
    assert after == pytest.approx(before, abs=1e-5) and math.isfinite(before)
    assert cli(["grow", "--checkpoint", str(source["checkpoint"]), "--out", str(tmp_path / "o"),
                "--ffn-slot-num", "256", "--mode", "official", "--data", str(corpus)]) == 0
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("validation loss")][0]
    assert "difference +0.00e+00" not in line
