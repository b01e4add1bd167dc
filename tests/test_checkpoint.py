"""What a user calls "a checkpoint" (`tokenformer.checkpoint.resolve_checkpoint`): a model directory,
a training run's folder (its final model/ or the checkpoint its `latest` names), an official .bin;
and a model directory's own config.json read as a model config (`convert --config`, `train --model`)."""

import json

import pytest
import torch

from tokenformer import ByteTokenizer, Config, TokenFormer, TokenFormerError
from tokenformer.__main__ import main
from tokenformer.checkpoint import load_model, resolve_checkpoint
from tokenformer.models import official
from tokenformer.models.clip import CLIPConfig, CLIPTokenFormer
from tokenformer.models.config import resolve_model_config
from tokenformer.models.official import export_official, infer_official_config
from tests.test_model import official_random_state


def tiny_model(seed: int) -> TokenFormer:
    torch.manual_seed(seed)
    return TokenFormer(Config.from_name("tiny")).eval()


def fake_run(tmp_path):
    """A training run's folder: two step checkpoints (weights of seeds 1 and 2, a trainer.pt each)."""
    run = tmp_path / "run"
    for step in (1, 2):
        directory = run / f"step_{step:08d}"
        tiny_model(step).save_pretrained(directory, tokenizer=ByteTokenizer())
        torch.save({"step": step}, directory / "trainer.pt")
    return run


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_folder_is_its_latest_checkpoint_and_a_model_folder_itself(tmp_path):
    run = fake_run(tmp_path)
    (run / "latest").write_text("step_00000001\n")
    assert resolve_checkpoint(run) == run / "step_00000001"  # what `latest` names, not the newest name
    assert same_weights(load_model(run), tiny_model(1))
    (run / "latest").unlink()  # a pointer lost to a crash: the newest complete checkpoint
    assert resolve_checkpoint(run) == run / "step_00000002"
    assert resolve_checkpoint(run / "step_00000001") == run / "step_00000001"
    tiny_model(3).save_pretrained(run / "model")  # a vision/CLIP/captioner run's final model
    assert resolve_checkpoint(run) == run / "model"
    (run / "train_config.json").write_text(json.dumps({"train_iters": 2}))  # finished at step 2: model/ stands
    assert resolve_checkpoint(run) == run / "model"
    (run / "train_config.json").write_text(json.dumps({"train_iters": 4}))  # resumed for more: step 2 is newer
    assert resolve_checkpoint(run) == run / "step_00000002"
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenFormerError, match="holds no config.json and no training checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nothing")


def test_every_command_takes_a_run_folder(tmp_path, capsys, one_thread):
    run = fake_run(tmp_path)
    (run / "latest").write_text("step_00000002\n")
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(text), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == str(run / "step_00000002")
    assert main(["grow", "--checkpoint", str(run), "--out", str(tmp_path / "grown"), "--factor", "2"]) == 0
    assert main(["shrink", "--checkpoint", str(run), "--out", str(tmp_path / "small"), "--factor", "0.5",
                 "--data", str(text), "--calibration-windows", "1", "--validation-windows", "1",
                 "--seq-length", "16"]) == 0
    assert main(["convert", str(run), str(tmp_path / "back.bin")]) == 0
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert all(torch.equal(back[k], v.half()) for k, v in export_official(tiny_model(2)).items())
    assert "error" not in capsys.readouterr().err


def test_an_official_bin_is_read_as_the_released_shape_it_matches(tmp_path, monkeypatch, capsys):
    with torch.device("meta"):  # shapes only: the 150M model's tensors, never allocated
        state = official_random_state(Config.from_name("150M"))
    assert infer_official_config(state).name == "150M"
    assert infer_official_config({"module": state}).name == "150M"  # DeepSpeed's wrapper
    with torch.device("meta"):
        odd = official_random_state(Config.from_name("150M", ffn_slot_num=1000))
    with pytest.raises(TokenFormerError, match="no released model: convert it with its config"):
        infer_official_config(odd, "odd.bin")
    monkeypatch.setattr(official, "RELEASED_PRESETS", ("tiny",))  # a released shape small enough to write
    torch.save(export_official(tiny_model(4)), tmp_path / "pytorch_model.bin")
    assert same_weights(load_model(tmp_path / "pytorch_model.bin"), tiny_model(4))
    assert main(["generate", "--checkpoint", str(tmp_path / "pytorch_model.bin"), "--prompt", "x"]) == 2
    assert "holds no tokenizer: give its tokenizer (--tokenizer" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "pytorch_model.bin"), "--tokenizer", "byte",
                 "--prompt", "x", "--max-new-tokens", "2"]) == 0


def test_a_model_directory_config_json_is_a_model_config(tmp_path, capsys):
    model = tiny_model(5)
    model.save_pretrained(tmp_path / "step", tokenizer=ByteTokenizer())
    values = json.loads((tmp_path / "step" / "config.json").read_text())
    assert values["model_type"] == "tokenformer"
    assert resolve_model_config(tmp_path / "step" / "config.json") == model.config
    assert resolve_model_config(str(tmp_path / "step")) == model.config  # the directory names its config
    torch.save(export_official(model), tmp_path / "demo.bin")
    assert main(["convert", str(tmp_path / "demo.bin"), str(tmp_path / "out"),
                 "--config", str(tmp_path / "step" / "config.json")]) == 0
    assert same_weights(TokenFormer.from_pretrained(tmp_path / "out"), model)
    CLIPTokenFormer(CLIPConfig.from_name("tiny")).save_pretrained(tmp_path / "clip")
    with pytest.raises(TokenFormerError, match="config of a 'clip_tokenformer' model, not of a TokenFormer language model"):
        resolve_model_config(tmp_path / "clip" / "config.json")
