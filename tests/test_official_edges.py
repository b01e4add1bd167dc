"""Which released model an official state dict is, told from shapes alone (meta tensors of the
official names: nothing allocated), and the sentences of one that is none; the checks and files of
a model directory (one unexpected tensor, the safetensors metadata transformers reads, the
sentence for a file where a directory belongs)."""

import pytest
import torch
from safetensors import safe_open

import tokenformer as tf
from tokenformer.models.config import Config
from tokenformer.models.official import infer_official_config
from tokenformer.models.pretrained import check_state_dict, read_config_values


def official_shapes(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors infer_official_config reads, on the meta device, for the released `name`."""
    c = Config.from_name(name)
    state = {f"{prefix}sequential.0.word_embeddings.weight": torch.empty(c.padded_vocab_size, c.hidden_size,
                                                                         device="meta")}
    for layer in range(2, 2 + c.num_layers):  # the official numbering: the blocks start at sequential.2
        for part, n in (("attention.query", c.qkv_slot_num), ("attention.proj", c.proj_slot_num),
                        ("mlp", c.ffn_slot_num)):
            state[f"{prefix}sequential.{layer}.{part}.key_param_tokens"] = torch.empty(n, c.hidden_size, device="meta")
    return state


@pytest.mark.parametrize("name", ["150M", "354M", "757M"])
def test_a_released_models_shapes_name_it(name):
    assert infer_official_config(official_shapes(name)) == Config.from_name(name)
    assert infer_official_config(official_shapes(name, prefix="module.")) == Config.from_name(name)


def test_shapes_of_no_released_model_are_one_sentence():
    state = official_shapes("150M")
    state["sequential.2.mlp.key_param_tokens"] = torch.empty(1000, 768, device="meta")
    with pytest.raises(tf.TokenFormerError) as error:
        infer_official_config(state, source="x.bin")
    shape = dict(num_layers=12, hidden_size=768, qkv_slot_num=768, proj_slot_num=768, ffn_slot_num=1000)
    assert str(error.value) == (f"x.bin has the shape {shape}, which is no released model: convert it with its "
                                f"config (tokenformer convert x.bin DIR --config ITS.yml)")
    wider_vocabulary = official_shapes("150M")
    wider_vocabulary["sequential.0.word_embeddings.weight"] = torch.empty(50432, 768, device="meta")
    with pytest.raises(tf.TokenFormerError, match="which is no released model"):
        infer_official_config(wider_vocabulary)
    for broken in ({k: v for k, v in state.items() if "word_embeddings" not in k},
                   {k: v for k, v in state.items() if "word_embeddings" in k}):
        with pytest.raises(tf.TokenFormerError) as error:
            infer_official_config(broken, source="y.bin")
        assert str(error.value) == "y.bin is not an official TokenFormer checkpoint (no word embeddings or layers)"


def test_one_unexpected_tensor_is_named_without_a_count():
    expected = {"a": torch.zeros(2)}
    with pytest.raises(tf.TokenFormerError) as error:
        check_state_dict({"a": torch.zeros(2), "b": torch.zeros(1)}, expected, source="m")
    assert str(error.value) == "m has unexpected tensor 'b': is the config right for this checkpoint?"
    with pytest.raises(tf.TokenFormerError) as error:
        check_state_dict({"a": torch.zeros(2), "b": torch.zeros(1), "c": torch.zeros(1)}, expected, source="m")
    assert str(error.value) == "m has unexpected tensor 'b' (and 1 more): is the config right for this checkpoint?"


def test_saved_weights_carry_the_format_transformers_reads_and_a_file_is_no_directory(tmp_path):
    directory = tf.TokenFormer(Config.from_name("tiny")).save_pretrained(tmp_path / "m")
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(tf.TokenFormerError) as error:
        read_config_values(directory / "config.json")
    assert str(error.value) == (f"checkpoint directory {directory / 'config.json'} is a file, not a directory: give "
                                f"a directory written by save_pretrained")
