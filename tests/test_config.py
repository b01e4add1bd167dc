"""Config presets, derived fields, JSON round trip and the official GPT-NeoX .yml reader."""

import pytest
import torch

from tokenformer import PRESETS, Config, TokenFormer, TokenFormerError

OFFICIAL_COUNTS = {"150M": 151_881_216, "450M": 454_166_528, "900M": 903_252_480, "1.5B": 1_587_219_456}

# The model part of the official 150M config, in the released files' JSON-like YAML with comments.
OFFICIAL_150M_YML = """\
{
  "pipe_parallel_size": 1,
  "model_parallel_size": 1,

  "num_layers": 12,
  "hidden_size": 768,
  "num_attention_heads": 12,
  "qkv_slot_num": 768,
  "proj_slot_num": 768,
  "ffn_slot_num": 3072,
  "seq_length": 2048,
  "max_position_embeddings": 2048,
  "pos_emb": "rotary",
  "rotary_pct": 0.25,
  "no_weight_tying": false,
  "norm": "layernorm_nonparam",
  "final_norm": "layernorm",
  "gpt_j_residual": false,
  "attention_config": [[["tokenformer"], 12]],
  "norm_activation_type": "l2_norm_gelu", # "l2_norm_gelu", "gelu_l2_norm", "softmax"
  "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "train_micro_batch_size_per_gpu": 32, # 8 GPUs
  "checkpoint_validation_with_forward_pass": False,
  "tokenizer-type": "HFTokenizer",
  "vocab-file": "./tokenizer.json", # from GPT-NeoX 20B
}
"""


@pytest.mark.parametrize("name,count", OFFICIAL_COUNTS.items())
def test_preset_parameter_counts_equal_official(name, count):
    config = Config.from_name(name)
    with torch.device("meta"):
        model = TokenFormer(config)
    assert model.num_parameters() == count
    assert config.num_parameters == count


def test_incremental_scaling_presets():
    small, big = Config.from_name("354M"), Config.from_name("757M")
    assert (small.qkv_slot_num, small.proj_slot_num, small.ffn_slot_num) == (768, 768, 3072)
    assert (big.qkv_slot_num, big.proj_slot_num, big.ffn_slot_num) == (1792, 1792, 7168)
    assert small.seq_length == big.seq_length == 1024
    # The paper's names round differently (353.5M and 756.2M by our exact count).
    assert abs(small.num_parameters / 1e6 - 354) < 1 and abs(big.num_parameters / 1e6 - 757) < 1


def test_padded_vocab():
    assert Config.from_name("150M").padded_vocab_size == 50304
    assert Config.from_name("tiny").padded_vocab_size == 384


def test_official_yml_parses_to_150m_preset(tmp_path):
    path = tmp_path / "150M_eval.yml"
    path.write_text(OFFICIAL_150M_YML)
    config = Config.from_neox_yaml(path)
    preset = Config.from_name("150M")
    config.name = preset.name
    assert config == preset


def test_yml_with_hyphenated_keys(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text('{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 128}\n')
    config = Config.from_neox_yaml(path)
    assert (config.num_layers, config.hidden_size, config.seq_length) == (2, 64, 128)
    assert config.ffn_slot_num == 256


def test_yml_with_unsupported_architecture(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text('{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "gpt_j_residual": true}')
    with pytest.raises(TokenFormerError, match="gpt_j_residual"):
        Config.from_neox_yaml(path)


def test_json_round_trip(tmp_path):
    config = Config.from_name("small", qkv_scale_num=64, growth_history=[{"mode": "exact"}])
    config.to_json(tmp_path / "c.json")
    assert Config.from_json(tmp_path / "c.json") == config
    assert Config.from_json(config.to_json()) == config


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(TokenFormerError) as e:
        Config.from_name("42M")
    assert "42M" in str(e.value) and all(name in str(e.value) for name in PRESETS)


def test_heads_must_divide_hidden():
    with pytest.raises(TokenFormerError, match="not divisible by num_attention_heads 5"):
        Config(hidden_size=64, num_attention_heads=5)


def test_unknown_field_and_bad_values():
    with pytest.raises(TokenFormerError, match="unknown config field.*hidden_sise"):
        Config.from_dict({"hidden_sise": 3})
    with pytest.raises(TokenFormerError, match="norm_activation_type"):
        Config(norm_activation_type="relu")
    with pytest.raises(TokenFormerError, match="num_layers must be at least 1"):
        Config(num_layers=0)


def test_missing_files():
    with pytest.raises(FileNotFoundError, match="nowhere.yml"):
        Config.from_neox_yaml("nowhere.yml")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        Config.from_json("nowhere.json")


def test_resolve_reads_a_run_configs_model_field_the_same_way_for_every_model():
    from tokenformer.models.captioner import CAPTIONER_PRESETS, CaptionerConfig
    from tokenformer.models.clip import CLIP_PRESETS, CLIPConfig
    from tokenformer.models.vision import VisionConfig

    # a preset name, the config itself, and a mapping that starts from the preset named in it
    assert Config.resolve("tiny") == Config.from_name("tiny")
    assert Config.resolve(Config.from_name("tiny")).name == "tiny"
    vision = VisionConfig.resolve({"name": "tiny-28", "num_layers": 3})
    assert vision.num_layers == 3 and vision.hidden_size == VisionConfig.from_name("tiny-28").hidden_size
    # without a preset's name the mapping is the fields themselves
    assert Config.resolve({"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2}).name == "custom"
    # a mapping over a part (vision, text) changes single fields of the preset's part, not the part
    for cls, presets in ((CLIPConfig, CLIP_PRESETS), (CaptionerConfig, CAPTIONER_PRESETS)):
        config = cls.resolve({"name": "tiny", "text": {"num_layers": 3}})
        assert config.text.num_layers == 3
        assert config.text.hidden_size == presets["tiny"]["text"]["hidden_size"]
        assert config.vision == cls.from_name("tiny").vision
    with pytest.raises(TokenFormerError, match=r"CLIP preset name \(B/16, tiny, .*\) or a mapping of CLIP config fields"):
        CLIPConfig.resolve(42)
    with pytest.raises(TokenFormerError, match="unknown vision preset 'huge'"):
        VisionConfig.resolve("huge")
