"""The training loop's pieces against numbers and sentences written out here: which samples a rank
takes, the seeding, the note on a changed schedule at resume, the model the loop starts from, the
activation-checkpointing switch, a loss that is not finite, and the summary of a short run."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tokenformer import TokenFormerError
from tokenformer.training.loop import initial_model, micro_batch_start, resume_schedule_note, seed_everything
from tokenformer.training.loop import set_up_blocks, train
from tokenformer.training.distributed import DistEnv

from tests.conftest import tiny_model
from tests.test_train import tiny_config


def test_a_rank_takes_every_world_size_th_micro_batch_of_the_global_order():
    # 100 samples consumed; micro-step 2 of rank 1 of 4, micro batches of 3: the 9th micro batch after them
    assert micro_batch_start(100, 2, 1, 4, 3) == 100 + (2 * 4 + 1) * 3
    starts = sorted(micro_batch_start(0, m, r, 2, 2) for m in range(3) for r in range(2))
    assert starts == [0, 2, 4, 6, 8, 10]  # 2 ranks x 3 micro-steps cover the 12 samples once


def test_seeding_seeds_python_numpy_and_torch():
    seed_everything(2**32 + 5)  # numpy takes the seed modulo 2^32
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2**32 + 5), np.random.seed(5), torch.manual_seed(2**32 + 5)
    assert drawn == (random.random(), np.random.rand(), torch.rand(1).item())


def test_the_note_on_a_changed_schedule_names_both_rates_and_the_fix():
    cfg = tiny_config("unused", train_iters=100, lr=1e-3, warmup_iters=0, lr_decay_style="constant")
    saved = {"scheduler": {"lr": 5e-4}, "train_config": json.dumps({"train_iters": 40})}
    assert resume_schedule_note(saved, 50, cfg) == (
        "the learning-rate schedule changed: at step 50 the run's lr was 0.0005 and the new settings give 0.001 "
        "(it moves back up); to go on at min_lr instead, pass --lr_decay_iters 40")
    lower = {"scheduler": {"lr": 2e-3}, "train_config": json.dumps({"lr_decay_iters": 30, "train_iters": 40})}
    assert resume_schedule_note(lower, 50, cfg) == (
        "the learning-rate schedule changed: at step 50 the run's lr was 0.002 and the new settings give 0.001; "
        "to go on at min_lr instead, pass --lr_decay_iters 30")
    assert resume_schedule_note({"scheduler": {"lr": 5e-4}}, 50, cfg).endswith("0.001 (it moves back up)")
    assert resume_schedule_note({"scheduler": {"lr": 1e-3 * (1 + 1e-7)}}, 50, cfg) is None  # the same, rounding aside
    assert resume_schedule_note({"scheduler": {}}, 50, cfg) is None
    assert resume_schedule_note({}, 0, cfg) is None


def test_the_starting_model_is_the_given_one_the_checkpoint_or_the_tasks(tmp_path):
    task = SimpleNamespace(build_model=lambda: "built")
    given = nn.Linear(1, 1)
    assert initial_model(SimpleNamespace(init_from=str(tmp_path)), given, task, None) is given
    assert initial_model(SimpleNamespace(init_from=None), None, task, None) == "built"
    path = tiny_model().save_pretrained(tmp_path / "lm")
    loaded = initial_model(SimpleNamespace(init_from=str(path)), None, task, None)
    assert loaded.training and type(loaded).__name__ == "TokenFormer"
    with pytest.raises(TokenFormerError) as error:
        initial_model(SimpleNamespace(init_from=str(path)), None, task, nn.Linear)
    assert str(error.value) == (f"init_from {path} holds a TokenFormer, and this command trains a Linear: give a "
                                f"checkpoint of one")


def test_activation_checkpointing_is_switched_on_the_model_or_refused():
    env = DistEnv()
    model = tiny_model()
    set_up_blocks(SimpleNamespace(checkpoint_activations=True, compile=False), model, env)
    assert model.gradient_checkpointing is True
    set_up_blocks(SimpleNamespace(checkpoint_activations=False, compile=False), model, env)
    assert model.gradient_checkpointing is False
    with pytest.raises(TokenFormerError) as error:
        set_up_blocks(SimpleNamespace(checkpoint_activations=True, compile=False), nn.Linear(1, 1), env)
    assert str(error.value) == ("checkpoint_activations: a Linear cannot recompute its blocks (it has no "
                                "gradient_checkpointing switch); drop the option")


def test_a_loss_that_is_not_finite_stops_the_run_in_one_sentence(corpus, tmp_path):
    model = tiny_model().train()
    with torch.no_grad():
        model.layers[0].mlp.value_param_tokens.fill_(float("nan"))
    with pytest.raises(TokenFormerError) as error:
        train(tiny_config(corpus), model=model)
    assert str(error.value) == ("the training loss became nan at step 1; no checkpoint was written yet: lower lr, "
                                "raise warmup or use fp32/bf16")


def test_a_run_without_save_warns_and_its_summary_holds_the_last_validation(corpus, capsys):
    summary = train(tiny_config(corpus, eval_interval=4))
    assert capsys.readouterr().err.splitlines()[0] == (
        "warning: no `save` directory: the trained model is not kept (pass --save DIR to keep it)")
    record = summary["validation"]
    assert record["step"] == 6 and record["val_loss"] == summary["val_loss"]  # the end's, not step 4's
    assert summary["growths"] == [] and summary["checkpoint"] is None and summary["step"] == 6


def test_a_run_that_grows_inside_lists_each_growth_in_its_summary(corpus):
    cfg = tiny_config(corpus, lr_decay_style="wsd", wsd_decay_fraction=0.34, wsd_decay_shape="linear",
                      grow_at=[2, 4], eval_interval=100)
    summary = train(cfg)
    assert [g["grown_after"] for g in summary["growths"]] == [2, 4]
    assert summary["step"] == 6 and sorted(summary["losses"]) == [1, 2, 3, 4, 5, 6]


def test_a_ranks_error_names_the_rank_and_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """What rank 1 of 2 says when its body fails (the process group faked: `init_distributed` gives
    a 2-rank DistEnv and `shutdown` is recorded): the rank, the error and the latest checkpoint of
    the run's `save`; a bug keeps its traceback; a rank that finishes leaves the group."""
    from tokenformer.training import loop
    from tokenformer.training.checkpointing import CheckpointManager, capture_rng

    save = tmp_path / "run"
    model = tiny_model()
    CheckpointManager(save).save(4, model, torch.optim.AdamW(model.parameters()), {"consumed_samples": 8,
                                                                                    "rng": capture_rng()})
    left = []
    monkeypatch.setattr(loop, "init_distributed", lambda device, **sizes: DistEnv(rank=1, world_size=2))
    monkeypatch.setattr(loop, "shutdown", lambda **kwargs: left.append(True))

    def failing(env):
        raise TokenFormerError("the data ran out")

    with pytest.raises(TokenFormerError) as error:
        loop.run_distributed("cpu", str(save), failing)
    assert str(error.value) == (f"rank 1 of 2: the data ran out; the last complete checkpoint is "
                                f"{save / 'step_00000004'}: rerun with --resume to continue from it")
    assert left == []  # a failing rank leaves its group to the process's exit (its error is reported first)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        loop.run_distributed("cpu", None, lambda env: 1 / 0)
    assert loop.run_distributed("cpu", str(save), lambda env: env.rank) == 1 and left == [True]  # done: left
