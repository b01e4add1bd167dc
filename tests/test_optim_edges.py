"""The optimizer side of training against numbers written out here: the learning rate of every
schedule style and shape at each step (warmup, decay, the floor, a re-warm), the weight-decay
groups and their names, AdamW's hyperparameters, and gradient clipping's norm by hand."""

import math

import pytest
import torch
from torch import nn

from tokenformer.training.config import TrainConfig
from tokenformer.training.optim import Schedule, build_optimizer, clip_gradients, decayed, lr_at, parameter_groups


def test_every_decay_style_step_by_step():
    # warmup 4 steps to lr 1.0, decay over steps 5..14 (10 steps) to 0.1, then the floor
    for style, at in (("linear", lambda p: 1.0 - 0.9 * p), ("cosine", lambda p: 0.1 + 0.45 * (1 + math.cos(math.pi * p)))):
        s = Schedule(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14, decay_style=style)
        assert [lr_at(i, s) for i in range(1, 5)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
        assert [lr_at(i, s) for i in range(5, 15)] == pytest.approx([at((i - 4) / 10) for i in range(5, 15)])
        assert lr_at(14, s) == pytest.approx(0.1) and lr_at(15, s) == 0.1 and lr_at(99, s) == 0.1
    constant = Schedule(lr=2.0, min_lr=0.1, warmup_iters=2, decay_iters=5, decay_style="constant")
    assert [lr_at(i, constant) for i in (1, 2, 3, 5, 50)] == [1.0, 2.0, 2.0, 2.0, 2.0]
    no_warmup = Schedule(lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=10, decay_style="linear")
    assert lr_at(1, no_warmup) == pytest.approx(0.9) and lr_at(0, no_warmup) == pytest.approx(1.0)


@pytest.mark.parametrize("shape, curve", [("linear", lambda p: 1.0 - 0.8 * p),
                                          ("cosine", lambda p: 0.2 + 0.4 * (1 + math.cos(math.pi * p))),
                                          ("1-sqrt", lambda p: 0.2 + 0.8 * (1 - math.sqrt(p)))])
def test_wsd_holds_the_peak_then_decays_over_its_fraction(shape, curve):
    # 20 steps, the last 25% (5 steps) decay: stable up to step 15, then steps 16..20
    s = Schedule(lr=1.0, min_lr=0.2, warmup_iters=2, decay_iters=20, decay_style="wsd", decay_fraction=0.25,
                 decay_shape=shape)
    assert s.stable_until == 15
    assert [lr_at(i, s) for i in (1, 2, 3, 15)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert [lr_at(i, s) for i in range(16, 21)] == pytest.approx([curve((i - 15) / 5) for i in range(16, 21)])
    assert lr_at(21, s) == 0.2
    assert decayed(1.0, 0.2, 0.0, shape) == pytest.approx(1.0) and decayed(1.0, 0.2, 1.0, shape) == pytest.approx(0.2)
    # a decay fraction that reaches into the warmup starts decaying where the warmup ends
    long = Schedule(lr=1.0, min_lr=0.0, warmup_iters=6, decay_iters=10, decay_style="wsd", decay_fraction=0.9,
                    decay_shape=shape)
    assert long.stable_until == 1 and lr_at(6, long) == pytest.approx(1.0)
    halfway = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]  # lr 1 to 0, progress 2 / 4
    assert lr_at(8, long) == pytest.approx(halfway)


def test_rewarms_scale_the_steps_after_each_growth():
    s = Schedule(lr=1.0, min_lr=1.0, warmup_iters=0, decay_iters=100, decay_style="constant", rewarm_at=(10, 30),
                 rewarm_iters=4)
    assert [lr_at(i, s) for i in range(9, 16)] == pytest.approx([1.0, 1.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert [lr_at(i, s) for i in range(30, 35)] == pytest.approx([1.0, 0.25, 0.5, 0.75, 1.0])


class TwoKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(3, 2))
        self.vector = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(2, 2), requires_grad=False)


def test_decay_groups_hold_matrices_and_vectors_apart_with_plain_names():
    model = TwoKinds()
    groups = parameter_groups(model, 0.3)
    assert [(g["param_names"], g["weight_decay"]) for g in groups] == [(["matrix"], 0.3), (["vector"], 0.0)]
    assert groups[0]["params"][0] is model.matrix and groups[1]["params"][0] is model.vector
    wrapped = nn.Module()
    wrapped.module = model  # a DDP-like wrapper: the names lose its prefix
    assert [g["param_names"] for g in parameter_groups(wrapped, 0.3)] == [["matrix"], ["vector"]]
    only_matrices = nn.Linear(2, 2, bias=False)
    assert [g["weight_decay"] for g in parameter_groups(only_matrices, 0.3)] == [0.3]  # no empty group
    optimizer = build_optimizer(model, TrainConfig(lr=0.01, weight_decay=0.3, adam_beta1=0.8, adam_beta2=0.9,
                                                   adam_eps=1e-6))
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in optimizer.param_groups] == \
        [(0.01, (0.8, 0.9), 1e-6, 0.3), (0.01, (0.8, 0.9), 1e-6, 0.0)]


def test_clipping_returns_the_norm_before_and_scales_to_the_limit():
    model = TwoKinds()
    model.matrix.grad = torch.full((3, 2), 2.0)  # norm sqrt(6 * 4) = sqrt(24)
    model.vector.grad = torch.tensor([1.0, 2.0, 3.0])  # norm sqrt(14); total sqrt(38); `frozen` has none
    assert clip_gradients(model, 0.0) == pytest.approx(math.sqrt(38), rel=1e-6)
    assert torch.equal(model.vector.grad, torch.tensor([1.0, 2.0, 3.0]))  # 0: measured, not clipped
    assert clip_gradients(model, 1.0) == pytest.approx(math.sqrt(38), rel=1e-6)
    scale = 1.0 / math.sqrt(38)
    assert torch.allclose(model.vector.grad, torch.tensor([1.0, 2.0, 3.0]) * scale, rtol=1e-5)
    assert math.sqrt(model.matrix.grad.square().sum() + model.vector.grad.square().sum()) == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(model, 5.0) == pytest.approx(1.0, rel=1e-5)  # under the limit: unchanged
    assert torch.allclose(model.vector.grad, torch.tensor([1.0, 2.0, 3.0]) * scale, rtol=1e-5)


def test_a_sharded_norm_is_gathered_before_it_is_read(monkeypatch):
    """Under FSDP2 the clipping returns a DTensor: its `full_tensor()` is the norm to report."""

    class ShardedNorm:  # what FSDP2's clip_grad_norm_ returns, reduced to what clip_gradients may use
        def full_tensor(self):
            return torch.tensor(2.5)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda parameters, max_norm: ShardedNorm())
    model = TwoKinds()
    model.matrix.grad = torch.ones(3, 2)
    assert clip_gradients(model, 1.0) == 2.5
