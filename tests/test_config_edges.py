"""Model configs: the sentences of a bad field, of an official .yml the package cannot read, and
the ways `resolve_model_config` finds a config (a model directory)."""

import pytest

import tokenformer as tf
from tokenformer.models.config import Config, resolve_model_config
from tokenformer.models.vision import VisionConfig


def error_of(call) -> str:
    with pytest.raises(tf.TokenFormerError) as error:
        call()
    return str(error.value)


def test_a_bad_field_is_named_as_a_config_field():
    assert error_of(lambda: Config.from_name("tiny", vocab_size=0)) == "config field vocab_size must be at least 1, got 0"
    # a list of floats is bounded at +-1e6 (image statistics): just above it is refused
    assert error_of(lambda: VisionConfig.from_name("tiny-28", image_mean=[1000000.5])) == (
        "every value of vision config field image_mean must be a finite number in [-1000000, 1000000], got 1000000.5")
    assert VisionConfig.from_name("tiny-28", image_mean=[1000000.0]).image_mean == [1000000.0]



def test_range_sentences_print_whole_bounds_in_full():
    """`--vocab-size` is at most 2^20: the sentence says 1048576, not 1.04858e+06; fractions stay short."""
    from tokenformer.options import Bounds
    assert Bounds(minimum=257, maximum=1 << 20).describe() == "in [257, 1048576]"
    assert Bounds(above=0.0, below=1e-8).describe() == "in (0, 1e-08)"
    assert Bounds(minimum=2**64 - 1).describe() == "at least 18446744073709551615"

def test_an_official_yml_the_package_cannot_read_is_named(tmp_path):
    learned = tmp_path / "learned.yml"
    learned.write_text('{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "learned"}')
    assert error_of(lambda: Config.from_neox_yaml(learned)) == (
        f"{learned} sets pos_emb='learned'; only 'rotary' (the released TokenFormer) is supported")
    text = tmp_path / "text.yml"
    text.write_text('{"num-layers": 2, "hidden-size": "64", "num-attention-heads": 4}')
    assert error_of(lambda: Config.from_neox_yaml(text)) == (
        f"GPT-NeoX config {text} has hidden_size '64', not an integer")


def test_a_model_directory_resolves_to_its_config(tmp_path):
    config = Config.from_name("tiny", ffn_slot_num=96)
    directory = tf.TokenFormer(config).save_pretrained(tmp_path / "m")
    assert resolve_model_config(directory).ffn_slot_num == 96
    assert resolve_model_config(str(directory / "config.json")).ffn_slot_num == 96


def test_a_yml_without_a_model_shape_is_asked_whether_it_is_a_model_config(tmp_path):
    training = tmp_path / "train.yml"
    training.write_text('{"train-iters": 1000, "lr": 0.0006}')
    assert error_of(lambda: Config.from_neox_yaml(training)) == (
        f"{training} has no num_layers/hidden_size: is it a model config?")
