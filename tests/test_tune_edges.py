"""Token tuning's edges: a damaged adapter file is refused in one sentence, and save_adapter writes
the rows of the `state` it is given (FSDP2's gathered one), not the model's own."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenformer import Config, TokenFormer, TokenFormerError
from tokenformer.scaling.tune import add_tuning_tokens, load_adapter, save_adapter

SMALL = dict(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=16,
             qkv_slot_num=4, proj_slot_num=4, ffn_slot_num=8, vocab_size=64)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return TokenFormer(Config(**SMALL)).eval()


def test_an_adapter_missing_rows_or_of_another_shape_is_refused(base, tmp_path):
    path = save_adapter(add_tuning_tokens(base, 2, seed=1), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    rows = load_file(str(path))
    name = "layers.0.mlp"
    damaged = {"short": {**rows, f"{name}.value_param_tokens": rows[f"{name}.value_param_tokens"][:1]},
               "missing": {k: v for k, v in rows.items() if k != f"{name}.key_param_tokens"}}
    for kind, tensors in damaged.items():
        save_file(tensors, str(tmp_path / f"{kind}.safetensors"), metadata=metadata)
        with pytest.raises(TokenFormerError, match=f"lacks the 2 rows of {name} or holds them in another shape"):
            load_adapter(base, tmp_path / f"{kind}.safetensors")


def test_save_adapter_writes_the_rows_of_the_given_state(base, tmp_path):
    tuned = add_tuning_tokens(base, 2, seed=1)
    state = {k: v.clone() for k, v in tuned.state_dict().items()}
    state["layers.0.mlp.value_param_tokens"][8:] = 7.0  # the 2 new rows of the ffn (base: 8 tokens)
    state["layers.0.mlp.key_param_tokens"][8:] = -3.0
    path = save_adapter(tuned, tmp_path / "a.safetensors", state=state)
    rows = load_file(str(path))
    assert torch.equal(rows["layers.0.mlp.value_param_tokens"], torch.full((2, 16), 7.0))
    assert torch.equal(rows["layers.0.mlp.key_param_tokens"], torch.full((2, 16), -3.0))
    assert torch.equal(rows["layers.0.attention.query.key_param_tokens"], torch.zeros(2, 16))  # exact growth
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["tokens"])["layers.0.mlp"] == 2
    # a state whose base rows moved is refused although the model's own are intact
    state["layers.0.mlp.key_param_tokens"][0, 0] += 1.0
    with pytest.raises(TokenFormerError, match="no longer those of the base"):
        save_adapter(tuned, tmp_path / "b.safetensors", state=state)
