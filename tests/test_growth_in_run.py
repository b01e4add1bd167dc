"""Warmup-stable-decay and growth inside one training run (`grow_at`): the schedule against hand
numbers, exact resume across growth steps, the carried AdamW moments, exact growth keeping the
loss, a 2-rank run growing like one process, and the refusals."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from tests.test_distributed import assert_same_losses, losses_of, run_fields, torchrun
from tests.test_train import tiny_config
from tokenformer import Config, TokenFormer, TokenFormerError
from tokenformer.checkpoint import load_model
from tokenformer.scaling.grow import grow
from tokenformer.training import growth_schedule, metrics
from tokenformer.training.config import TrainConfig
from tokenformer.training.distributed import FAIL_AT_STEP_ENV, DistEnv, InjectedFailure
from tokenformer.training.loop import start_run, train, train_step
from tokenformer.training.metrics import read_metrics
from tokenformer.training.optim import Schedule, lr_at
from tokenformer.training.tasks.language import LanguageModelTask
from tokenformer.training.tasks.vision import VisionTask

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- warmup-stable-decay -----------------------------------------------------------------------------

def wsd(shape: str, **changes) -> Schedule:
    return TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, train_iters=100, lr_decay_style="wsd",
                       wsd_decay_fraction=0.2, wsd_decay_shape=shape, **changes).schedule


@pytest.mark.parametrize("shape, at_85, at_90", [
    # decay over steps 81..100; step 85 is 5/20 = 0.25 of the way, step 90 half way
    ("linear", 0.775, 0.55),            # 1 - 0.9 p
    ("cosine", 0.8681981, 0.55),        # 0.1 + 0.45 (1 + cos(pi p)): cos(pi/4) = 0.7071068
    ("1-sqrt", 0.55, 0.3636039),        # 0.1 + 0.9 (1 - sqrt(p)): sqrt(0.5) = 0.7071068
])
def test_wsd_schedule_matches_hand_numbers(shape, at_85, at_90):
    schedule = wsd(shape)
    assert schedule.stable_until == 80
    hand = {1: 0.1, 5: 0.5, 10: 1.0, 11: 1.0, 50: 1.0, 80: 1.0, 85: at_85, 90: at_90, 100: 0.1, 130: 0.1}
    for step, lr in hand.items():
        assert lr_at(step, schedule) == pytest.approx(lr, abs=1e-7), (shape, step)


def test_a_rewarm_after_growth_ramps_the_lr_back_over_its_steps():
    schedule = wsd("linear", grow_at=[50], grow_rewarm=4)
    assert schedule.rewarm_at == (50,) and schedule.rewarm_iters == 4
    assert [lr_at(s, schedule) for s in (50, 51, 52, 53, 54, 55)] == pytest.approx([1.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    # no re-warm: the schedule goes on
    assert lr_at(51, wsd("linear", grow_at=[50])) == 1.0


@pytest.mark.parametrize("changes, words", [
    (dict(lr_decay_style="wsd", wsd_decay_shape="sqrt"), "unknown wsd_decay_shape 'sqrt'"),
    (dict(lr_decay_style="wsd", wsd_decay_fraction=0.0), "wsd_decay_fraction must be a finite number in (0, 1], got"),
    (dict(wsd_decay_fraction=1.5), "wsd_decay_fraction must be a finite number in (0, 1], got"),
    (dict(grow_at=[0.0]), "grow_at 0.0 is neither"),
    (dict(grow_at=[2.5]), "grow_at 2.5 is neither"),
    (dict(grow_at=[6]), "outside steps 1 .. 5"),
    (dict(grow_at=[0.99]), "outside steps 1 .. 5"),
    (dict(grow_at=[4, 2]), "increasing, distinct steps"),
    (dict(grow_at=[0.5, 3]), "increasing, distinct steps"),  # both are step 3
    (dict(grow_at=[2], grow_to=[{"ffn_slot_num": 64}, {"ffn_slot_num": 128}]), "list of 1 slot-count mappings"),
    (dict(grow_to=[{"ffn_slot_num": 64}]), "grow_to needs grow_at"),
    (dict(grow_at=[2], grow_factor=1.0), "grow_factor must be a finite number above 1, got 1.0"),
    (dict(grow_at=[2], grow_mode="wide"), "unknown grow_mode 'wide'"),
    (dict(grow_at=[2], grow_optimizer="keep"), "unknown grow_optimizer 'keep'"),
    (dict(grow_at=[2], compile=True), "grow_at cannot be combined with compile"),
    (dict(grow_at=[2], init_from="x", tune_tokens=2), "grow_at cannot be combined with tune_tokens"),
])
def test_schedule_and_growth_options_are_checked_by_name(changes, words):
    with pytest.raises(TokenFormerError) as error:
        TrainConfig(train_iters=6, **changes)
    assert words in str(error.value)


# ---- growth inside a run -------------------------------------------------------------------------------

def grown_config(corpus, save=None, **changes):
    """6 steps of WSD (steps 1-4 stable, decay over 5-6), growing after steps 2 and 4: S -> M -> L."""
    values = dict(lr_decay_style="wsd", wsd_decay_fraction=0.34, wsd_decay_shape="linear", grow_at=[2, 4],
                  save_interval=1, keep_last_n=10, eval_interval=100)
    values.update(changes)
    return tiny_config(corpus, save, **values)


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("straight")
    return save, train(grown_config(corpus, save))


def test_growth_in_a_run_grows_the_model_and_marks_the_metrics(straight):
    save, summary = straight
    assert [g["grown_after"] for g in summary["growths"]] == [2, 4]
    assert summary["growths"][0]["slots_from"] == {"qkv_slot_num": 32, "proj_slot_num": 32, "ffn_slot_num": 128}
    assert summary["growths"][1]["slots_to"] == {"qkv_slot_num": 128, "proj_slot_num": 128, "ffn_slot_num": 512}
    # checkpoint step_2 holds the model before the first growth, step_3 after it, step_6 after both
    assert load_model(save / "step_00000002").config.ffn_slot_num == 128
    assert load_model(save / "step_00000003").config.ffn_slot_num == 256
    assert load_model(save / "step_00000006").config.ffn_slot_num == 512
    records = read_metrics(save / "metrics.jsonl")
    marks = [r for r in records if r.get("event") == "grow"]
    assert [(m["step"], m["grown_after"], m["optimizer"]) for m in marks] == [(3, 2, "carry"), (5, 4, "carry")]
    assert marks[0]["parameters"] > marks[0]["parameters_before"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # the loss plot draws a vertical line between the two steps of each growth
    ax = mock.MagicMock()
    with mock.patch.object(metrics, "_save_plot", lambda png, draw, *rest: draw(ax)):
        metrics.plot_loss_curve(save / "metrics.jsonl", save / "unused.png")
    assert [c.args[0] for c in ax.axvline.call_args_list] == [2.5, 4.5]


def test_a_run_resumed_across_growth_steps_gives_the_same_losses_exactly(straight, corpus, tmp_path, monkeypatch):
    _, expected = straight
    save = tmp_path / "resumed"
    # crash after step 3: the latest checkpoint is step 2, before the first growth (which the resumed
    # run makes at the same step); then after step 5: step 4 holds the once-grown model (the run grows
    # its fresh model once to load it, then grows again at step 4)
    for fail_at, resume in (("3", False), ("5", True)):
        monkeypatch.setenv(FAIL_AT_STEP_ENV, fail_at)
        with pytest.raises(InjectedFailure):
            train(grown_config(corpus, save, resume=resume))
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    resumed = train(grown_config(corpus, save, resume=True))
    assert resumed["resumed_from"].endswith("step_00000004")
    assert list(resumed["losses"]) == [5, 6]
    assert losses_of(save) == expected["losses"]  # bit for bit, every step
    assert resumed["val_loss"] == expected["val_loss"]
    marks = [r["grown_after"] for r in read_metrics(save / "metrics.jsonl") if r.get("event") == "grow"]
    assert marks == [2, 4]  # each growth marked once


def started_run(corpus, **changes):
    cfg = grown_config(corpus, grow_at=[2], **changes)
    task = LanguageModelTask(cfg)
    return start_run(cfg, None, DistEnv(), task, cfg), task


def moments_by_name(optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p, name in zip(group["params"], group["param_names"])}


def test_growth_carries_old_moments_starts_new_rows_at_zero_and_keeps_the_loss(corpus):
    run, task = started_run(corpus)
    for step in (1, 2):
        train_step(run, step)
    old = moments_by_name(run.optimizer)
    batch = task.train_batch(run.consumed_samples, 2)
    with torch.no_grad():
        before = task.loss(run.model, batch)[0].item()
    growth_schedule.grow_run(run, 0)
    with torch.no_grad():
        after = task.loss(run.model, batch)[0].item()
    assert after == pytest.approx(before, abs=1e-6, rel=0)  # exact growth: the same function
    new = moments_by_name(run.optimizer)
    assert set(new) == set(old)
    grew = 0
    for name, state in new.items():
        assert torch.equal(state["step"], old[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            n_old = old[name][key].shape[0]
            assert torch.equal(state[key][:n_old], old[name][key]), name
            assert not state[key][n_old:].any(), name
            grew += state[key].shape[0] > n_old
    assert grew == 5 * 2 * 2 * 2  # keys and values of 5 Pattentions x 2 layers, both moments
    # the optimizer holds the grown model's parameters and steps it
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == {id(p) for p in run.model.parameters()}
    keys = run.model.layers[0].mlp.key_param_tokens
    train_step(run, 3)
    assert keys[128:].abs().sum() > 0  # the new keys left zero


def test_a_fresh_optimizer_at_growth_holds_no_moments(corpus):
    run, _ = started_run(corpus, grow_optimizer="fresh")
    train_step(run, 1)
    train_step(run, 2)
    growth_schedule.grow_run(run, 0)
    assert not run.optimizer.state


def test_official_growth_to_given_slots(corpus):
    run, _ = started_run(corpus, grow_mode="official", grow_to=[{"ffn_slot_num": 160}])
    train_step(run, 1)
    record = growth_schedule.grow_run(run, 0)
    assert record["slots_to"] == {"qkv_slot_num": 32, "proj_slot_num": 32, "ffn_slot_num": 160}
    assert run.model.config.ffn_scale_num is None  # official: the normalisation follows the new count
    assert run.model.layers[0].mlp.key_param_tokens.shape[0] == 160


def test_growth_is_refused_where_the_run_cannot_grow():
    cfg = TrainConfig(train_iters=6, grow_at=[2])
    task = SimpleNamespace(growth_refusal=lambda: None)
    model = SimpleNamespace(config=SimpleNamespace())
    with pytest.raises(TokenFormerError, match="not supported under FSDP2"):
        growth_schedule.check_run(cfg, model, task, sharded=True, start_step=0)
    with pytest.raises(TokenFormerError, match="has no qkv_slot_num field"):
        growth_schedule.check_run(cfg, model, task, sharded=False, start_step=0)
    with pytest.raises(TokenFormerError, match="a Linear has no config"):
        growth_schedule.check_run(cfg, nn.Linear(2, 2), task, sharded=False, start_step=0)
    with pytest.raises(TokenFormerError, match="grow_at step 2 comes before step 3"):
        growth_schedule.check_run(cfg, load_free_tiny(), task, sharded=False, start_step=3)
    refusal = VisionTask.growth_refusal(SimpleNamespace(cfg=SimpleNamespace(ema=0.999)))
    with pytest.raises(TokenFormerError, match="this task cannot use grow_at: ema keeps an average"):
        growth_schedule.check_run(cfg, load_free_tiny(), SimpleNamespace(growth_refusal=lambda: refusal), False, 0)
    assert VisionTask.growth_refusal(SimpleNamespace(cfg=SimpleNamespace(ema=0.0))) is None


def load_free_tiny():
    from tokenformer import Config, TokenFormer

    return TokenFormer(Config.from_name("tiny"))


# ---- under torchrun ---------------------------------------------------------------------------------------

def test_two_ddp_ranks_grow_like_one_process(corpus, tmp_path):
    fields = dict(grow_at=[2], lr_decay_style="wsd", train_iters=4)
    single = train(TrainConfig(**run_fields(corpus, tmp_path / "one", train_micro_batch_size_per_gpu=4, **fields)))
    result = torchrun(run_fields(corpus, tmp_path / "two", parallelism="ddp", **fields))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(losses_of(tmp_path / "two"), single["losses"])
    assert load_model(tmp_path / "two" / "step_00000004").config.ffn_slot_num == 256
    marks = [r["grown_after"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r.get("event") == "grow"]
    assert marks == [2]


# ---- epoch tasks -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tests.test_vision import write_toy_mnist

    root = tmp_path_factory.mktemp("images")
    write_toy_mnist(root, n_train=16, n_test=8)
    return root


@pytest.mark.parametrize("command", ["train-vision", "train-clip"])
def test_epoch_tasks_grow_inside_the_run(command, images, tmp_path):
    from tokenformer.training import config as C

    config = {"train-vision": C.VisionTrainConfig, "train-clip": C.ClipTrainConfig}[command]
    own = {"train-vision": dict(augment="none"), "train-clip": dict(tokenizer="byte", max_val_samples=8)}[command]
    # 16 images in batches of 8: 2 steps an epoch, 4 in all; growth after step 2 (half the run)
    summary = train(config(model="tiny-28", data=str(images), epochs=2, batch_size=8, lr=3e-3, progress=False,
                           plot=False, device="cpu", num_threads=1, log_interval=1, save=str(tmp_path),
                           grow_at=[0.5], **own))
    assert [g["grown_after"] for g in summary["growths"]] == [2] and sorted(summary["losses"]) == [1, 2, 3, 4]
    before, after = (load_model(tmp_path / name) for name in ("step_00000002", "model"))
    old_ffn = [m.key_param_tokens.shape[0] for n, m in before.named_modules() if n.endswith("mlp")]
    new_ffn = [m.key_param_tokens.shape[0] for n, m in after.named_modules() if n.endswith("mlp")]
    assert old_ffn and new_ffn == [2 * n for n in old_ffn]


def test_noise_perturbs_the_old_tokens_by_its_share_of_their_std(corpus):
    run, _ = started_run(corpus, grow_mode="official", grow_noise=0.1, grow_to=[{"ffn_slot_num": 256}])
    train_step(run, 1)
    old = {name: p.detach().clone() for name, p in run.model.named_parameters()}
    growth_schedule.grow_run(run, 0)
    grown = dict(run.model.named_parameters())
    for name in ("layers.0.mlp.key_param_tokens", "layers.1.mlp.value_param_tokens"):
        before, after = old[name], grown[name].detach()[:old[name].shape[0]]
        drift = (after - before).std().item() / before.std().item()
        assert drift == pytest.approx(0.1, rel=0.1), name  # 128 x 32 draws: a 10% band is about 8 sigma
    # only the tokens move: the groups that did not grow keep every weight, and so does the embedding
    assert torch.equal(grown["layers.0.attention.query.key_param_tokens"], old["layers.0.attention.query.key_param_tokens"])
    assert torch.equal(grown["word_embeddings.weight"], old["word_embeddings.weight"])
    quiet, _ = started_run(corpus, grow_mode="official", grow_to=[{"ffn_slot_num": 256}])
    train_step(quiet, 1)
    before = quiet.model.layers[0].mlp.key_param_tokens.detach().clone()
    growth_schedule.grow_run(quiet, 0)
    assert torch.equal(quiet.model.layers[0].mlp.key_param_tokens[:128], before)  # no noise: the old rows stay


def test_noise_must_not_be_negative():
    with pytest.raises(TokenFormerError, match="noise must be 0 or more"):
        grow(TokenFormer(Config(num_layers=1, hidden_size=32, num_attention_heads=2, qkv_slot_num=8,
                                proj_slot_num=8, ffn_slot_num=8)), factor=2, noise=-0.1)
