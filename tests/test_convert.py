"""Official checkpoint files: loading, clear errors, safety, and the convert command."""


import pytest
import torch

from tokenformer import Config, TokenFormer, TokenFormerError, export_official, load_official, weight_map
from tokenformer.__main__ import main
from tests.test_model import CFG, official_random_state


def test_weight_map_covers_official_layout():
    mapping = weight_map(12)
    assert len(mapping) == 1 + 12 * 10 + 2
    assert mapping["sequential.2.attention.query.key_param_tokens"] == "layers.0.attention.query.key_param_tokens"
    assert mapping["sequential.13.mlp.value_param_tokens"] == "layers.11.mlp.value_param_tokens"
    assert mapping["sequential.15.norm.bias"] == "final_norm.bias"


def test_missing_key_is_named():
    config = Config(**CFG)
    sd = official_random_state(config)
    del sd["sequential.3.mlp.key_param_tokens"]
    with pytest.raises(TokenFormerError, match=r"missing tensor 'sequential.3.mlp.key_param_tokens'"):
        load_official(sd, config)


def test_unexpected_key_is_named():
    config = Config(**CFG)
    sd = official_random_state(config)
    sd["sequential.2.attention.rotary_emb.inv_freq"] = torch.zeros(4)
    with pytest.raises(TokenFormerError, match="unexpected tensor 'sequential.2.attention.rotary_emb.inv_freq'"):
        load_official(sd, config)


def test_misshaped_key_names_both_shapes():
    config = Config(**CFG)
    sd = official_random_state(config)
    sd["sequential.2.mlp.key_param_tokens"] = torch.zeros(99, 48)
    with pytest.raises(TokenFormerError, match=r"mlp.key_param_tokens' has shape \(99, 48\).*expects \(36, 48\)"):
        load_official(sd, config)


def test_deepspeed_module_prefix_is_accepted():
    config = Config(**CFG)
    sd = official_random_state(config)
    model = load_official({"module": {f"module.{k}": v for k, v in sd.items()}}, config)
    assert torch.equal(export_official(model)["sequential.0.word_embeddings.weight"],
                       sd["sequential.0.word_embeddings.weight"])


class Boom:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_loading_never_executes_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    torch.save({"sequential.0.word_embeddings.weight": torch.zeros(1), "x": Boom()}, path)
    with pytest.raises(TokenFormerError, match="cannot be loaded safely"):
        load_official(path, Config(**CFG))
    assert "pickled code ran" not in capsys.readouterr().out


def test_grown_model_refuses_official_export():
    model = TokenFormer(Config(**CFG, ffn_scale_num=8))
    with pytest.raises(TokenFormerError, match="official code cannot represent"):
        export_official(model)


def test_convert_cli_round_trip(tmp_path):
    config = Config(**{**CFG, "vocab_size": 257})
    sd = official_random_state(config, dtype=torch.float16)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    config.to_json(tmp_path / "config.json")
    assert main(["convert", str(tmp_path / "pytorch_model.bin"), str(tmp_path / "ours"),
                 "--config", str(tmp_path / "config.json"), "--tokenizer", "byte"]) == 0
    model = TokenFormer.from_pretrained(tmp_path / "ours")
    assert model.word_embeddings.weight.dtype == torch.float32
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.bin")]) == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # fp16 -> fp32 -> fp16 is lossless


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.bin"), str(tmp_path / "o"), "--config", "150M"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.bin does not exist" in err
    assert main(["convert", str(tmp_path / "x.bin"), str(tmp_path / "o")]) == 2
    assert "needs --config" in capsys.readouterr().err


def test_from_pretrained_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        TokenFormer.from_pretrained(tmp_path / "nothing")
