"""Freezing the old tokens of a model whose slot group holds Pattentions of different sizes."""

import torch

import tokenformer as tf
from tokenformer.models.pattention import Pattention


class Uneven(torch.nn.Module):
    """One ffn group of two bare Pattentions, 4 and 6 tokens (a custom model's pattention_groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Pattention(2, 3, 4), Pattention(2, 3, 6)

    def pattention_groups(self):
        return {"qkv_slot_num": {}, "proj_slot_num": {}, "ffn_slot_num": {"a": self.a, "b": self.b}}

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_layer_without_new_rows_does_not_stop_the_rest_of_its_group():
    # old count 4: `a` has no new rows (frozen whole), `b` has 2 (its first 4 rows frozen)
    model = Uneven()
    frozen = tf.freeze_old_tokens(model, {"qkv_slot_num": 0, "proj_slot_num": 0, "ffn_slot_num": 4})
    assert not model.a.key_param_tokens.requires_grad and not model.a.value_param_tokens.requires_grad
    assert model.b.key_param_tokens.requires_grad and model.b.value_param_tokens.requires_grad
    model(torch.randn(5, 2, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    for grad in (model.b.key_param_tokens.grad, model.b.value_param_tokens.grad):
        assert torch.count_nonzero(grad[:4]) == 0 and torch.count_nonzero(grad[4:]) > 0
    before = model.b.value_param_tokens.detach().clone()
    with torch.no_grad():
        model.b.value_param_tokens.add_(1.0)
    frozen.restore()  # the old rows back, the new ones as moved
    assert torch.equal(model.b.value_param_tokens.detach()[:4], before[:4])
    assert torch.equal(model.b.value_param_tokens.detach()[4:], before[4:] + 1.0)
    frozen.remove()
    assert all(p.requires_grad for p in model.parameters())
