"""Token tuning: the tuned model starts at the base's logits, only the new tokens train, adapters
save, load, stack and merge exactly, a wrong base is refused, and `train --tune-tokens` runs end to
end (and resumes exactly). Tiny models on the CPU."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from tokenformer import Config, TokenFormer, TokenFormerError
from tokenformer.__main__ import main as cli
from tokenformer.checkpoint import load_model
from tokenformer.scaling.freeze import freeze_old_tokens
from tokenformer.scaling.grow import pattention_groups
from tokenformer.scaling.tune import (ADAPTER_FORMAT, add_tuning_tokens, content_hash, load_adapter, load_adapters,
                                      merge_adapters, save_adapter)
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics
from tokenformer.training.optim import build_optimizer
from tokenformer.training.config import TrainConfig

from tests.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
BASE_COUNTS = {"qkv": 32, "proj": 32, "ffn": 128}  # the tiny preset


def group_of(name: str) -> str:
    return "ffn" if ".mlp." in name else "proj" if ".proj." in name else "qkv"


def tiny_base(seed: int = 0) -> TokenFormer:
    torch.manual_seed(seed)
    return TokenFormer(Config.from_name("tiny", seq_length=32)).eval()


def batch(seed: int = 1, size: int = 3) -> torch.Tensor:
    return torch.randint(0, 257, (size, 17), generator=torch.Generator().manual_seed(seed))  # (B, T + 1)


def tune_steps(base: TokenFormer, tokens: int, steps: int = 4, seed: int = 0, lr: float = 1e-2) -> TokenFormer:
    """Token-tune `base` for a few AdamW steps (weight decay on, which would move frozen rows)."""
    tuned = add_tuning_tokens(base, tokens, seed=seed).train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr, weight_decay=0.5)
    freeze_old_tokens(tuned, optimizer=optimizer)
    for step in range(steps):
        ids = batch(seed=100 * seed + step)
        loss = F.cross_entropy(tuned(ids[:, :-1]).reshape(-1, 257 + 127), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned.eval()


def assert_same_function(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float rounding: the new tokens add exact zeros, but the matmuls over a longer token
    axis may be blocked differently by BLAS (0.0 on the tiny preset here, ~7e-7 on `small`)."""
    assert (a - b).abs().max().item() <= 1e-6


def logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model((batch() if ids is None else ids)[:, :-1])


@pytest.fixture(scope="module")
def base():
    return tiny_base()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two adapters trained on the same base: A with 4 tokens per Pattention, B with 6."""
    root = tmp_path_factory.mktemp("adapters")
    tuned_a, tuned_b = tune_steps(base, 4, seed=1), tune_steps(base, 6, seed=2)
    return {"a": save_adapter(tuned_a, root / "a.safetensors"), "b": save_adapter(tuned_b, root / "b.safetensors"),
            "tuned_a": tuned_a, "tuned_b": tuned_b}


# ---- the tuned model ----------------------------------------------------------------------------

def test_a_tuned_model_starts_exactly_at_the_base_logits(base):
    tuned = add_tuning_tokens(base, 8, seed=0)
    assert_same_function(logits(tuned), logits(base))
    for layer in tuned.pattentions().values():
        assert not layer.key_param_tokens[-8:].any()       # zero keys: weight gelu(0) = 0
        assert layer.value_param_tokens[-8:].abs().sum() > 0  # random values: the keys get gradient
    assert tuned.config.qkv_slot_num == 40 and tuned.config.qkv_scale_num == 32
    entry = tuned.config.growth_history[-1]
    assert entry["token_tuning"]["base_sha256"] == content_hash(base)
    assert base.config.qkv_slot_num == 32 and base.config.growth_history == []  # untouched


def test_only_the_new_tokens_train(base):
    tuned = tune_steps(base, 4)
    before, after = base.state_dict(), tuned.state_dict()
    start = add_tuning_tokens(base, 4, seed=0).state_dict()  # where the new rows began
    moved = 0
    for name, old in before.items():
        new = after[name]
        if not name.endswith("_param_tokens"):
            assert torch.equal(new, old), name  # embedding, final norm
            continue
        n = BASE_COUNTS[group_of(name)]
        assert new.shape[0] == n + 4
        assert torch.equal(new[:n], old), name  # bit-identical despite weight decay 0.5
        moved += int(not torch.equal(new[n:], start[name][n:]))
    assert moved == len([n for n in before if n.endswith("_param_tokens")])  # every new block learned
    assert not torch.equal(logits(tuned), logits(base))


def test_the_content_hash_sees_every_tensor_and_only_the_base_inside_a_tuned_model(base):
    other = tiny_base()
    assert content_hash(other) == content_hash(base)  # same seed, same tensors
    with torch.no_grad():
        other.final_norm.bias[3] += 1e-7
    assert content_hash(other) != content_hash(base)
    tuned = add_tuning_tokens(base, 3)
    rows = {f"{name}.{t}": BASE_COUNTS[group_of(name + ".")] for name in tuned.pattentions()
            for t in ("key_param_tokens", "value_param_tokens")}
    assert content_hash(tuned, rows=rows) == content_hash(base) != content_hash(tuned)


def test_tuning_errors_are_one_sentence(base):
    softmax = TokenFormer(Config.from_name("tiny", norm_activation_type="softmax"))
    for call, message in [(lambda: add_tuning_tokens(base, 0), "positive number"),
                          (lambda: add_tuning_tokens(softmax, 4), "cannot have"),
                          (lambda: save_adapter(base, "x.safetensors"), "was not token-tuned")]:
        with pytest.raises(TokenFormerError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# ---- adapter files ------------------------------------------------------------------------------

def test_an_adapter_holds_only_the_new_rows_and_loads_exactly(base, adapters):
    path, tuned = adapters["a"], adapters["tuned_a"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == ADAPTER_FORMAT and metadata["base_sha256"] == content_hash(base)
    assert set(json.loads(metadata["tokens"]).values()) == {4}
    assert json.loads(metadata["scale_num"])["layers.0.mlp"] == 128
    assert json.loads(metadata["base_tokens"])["layers.1.attention.proj"] == 32
    rows = load_file(str(path))
    assert len(rows) == 2 * len(tuned.pattentions())  # keys and values of each Pattention, nothing else
    full = tuned.state_dict()
    for key, value in rows.items():
        n = BASE_COUNTS[group_of(key)]
        assert value.shape == (4, 64) and torch.equal(value, full[key][n:]), key
    loaded = load_adapter(base, path)
    assert all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items())
    assert loaded.config.to_dict()["ffn_scale_num"] == 128 and loaded.config.ffn_slot_num == 132
    assert torch.equal(logits(loaded), logits(tuned))


def test_two_adapters_stack_into_the_concatenated_rows(base, adapters):
    stacked = load_adapters(base, [adapters["a"], adapters["b"]])
    assert stacked.config.qkv_slot_num == 32 + 4 + 6 and stacked.config.qkv_scale_num == 32
    # the definition, computed independently: each Pattention's rows are base ++ A ++ B, n the base's
    a, b = load_file(str(adapters["a"])), load_file(str(adapters["b"]))
    by_hand = {k: torch.cat([v, a[k], b[k]]) if k in a else v for k, v in base.state_dict().items()}
    config = Config.from_dict({**base.config.to_dict(), "qkv_slot_num": 42, "proj_slot_num": 42, "ffn_slot_num": 138,
                               "qkv_scale_num": 32, "proj_scale_num": 32, "ffn_scale_num": 138 - 10})
    reference = TokenFormer(config).eval()
    reference.load_state_dict(by_hand)
    assert torch.equal(logits(stacked), logits(reference))
    # one Pattention against the hand formula gelu(s / ||s|| * sqrt(n_base)) @ V
    layer = stacked.layers[1].mlp
    x = torch.randn(5, 64)
    s = x @ layer.key_param_tokens.T  # (5, 138)
    expected = F.gelu(s / s.norm(dim=-1, keepdim=True) * math.sqrt(128)) @ layer.value_param_tokens
    assert torch.allclose(layer(x), expected, atol=1e-6)
    # the stack changes the function of each adapter alone, and does not depend on the order
    assert not torch.allclose(logits(stacked), logits(adapters["tuned_a"]), atol=1e-4)
    swapped = load_adapters(base, [adapters["b"], adapters["a"]])
    assert torch.allclose(logits(swapped), logits(stacked), atol=1e-5)


def test_an_untrained_adapter_stacks_as_a_no_op_and_a_stack_saves_as_one_adapter(base, adapters, tmp_path):
    fresh = save_adapter(add_tuning_tokens(base, 5, seed=3), tmp_path / "fresh.safetensors")  # zero keys
    with_fresh = load_adapters(base, [adapters["a"], fresh])
    assert_same_function(logits(with_fresh), logits(adapters["tuned_a"]))
    stacked = load_adapters(base, [adapters["a"], adapters["b"]])
    one = save_adapter(stacked, tmp_path / "ab.safetensors")
    again = load_adapter(base, one)
    assert all(torch.equal(v, stacked.state_dict()[k]) for k, v in again.state_dict().items())


def test_merge_writes_a_model_directory_with_the_adapter_logits(base, adapters, tmp_path):
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    out = merge_adapters(tmp_path / "base", [adapters["a"], adapters["b"]], tmp_path / "merged")
    merged = TokenFormer.from_pretrained(out)
    assert torch.equal(logits(merged), logits(load_adapters(base, [adapters["a"], adapters["b"]])))
    assert (out / "tokenizer.json").is_file()
    assert merged.config.growth_history[-1]["token_tuning"]["base_sha256"] == content_hash(base)
    # the merged directory is an ordinary base too: tuning it again starts at its logits
    assert_same_function(logits(add_tuning_tokens(merged, 2)), logits(merged))


def test_a_wrong_base_is_refused_in_one_sentence(base, adapters, tmp_path):
    other = tiny_base(seed=5)
    with pytest.raises(TokenFormerError, match="tuned on another base model") as error:
        load_adapter(other, adapters["a"])
    message = str(error.value)
    assert "\n" not in message and message.count(": ") == 1 and content_hash(other)[:12] in message
    nudged = tiny_base()
    with torch.no_grad():
        nudged.layers[0].attention.query.value_param_tokens[0, 0] += 1e-6
    with pytest.raises(TokenFormerError, match="another base"):
        load_adapter(nudged, adapters["a"])
    # a tuned model whose base rows trained too yields no adapter
    tuned = add_tuning_tokens(base, 2)
    with torch.no_grad():
        tuned.layers[0].mlp.key_param_tokens[0, 0] += 1.0
    with pytest.raises(TokenFormerError, match="no longer those of the base"):
        save_adapter(tuned, tmp_path / "bad.safetensors")
    (tmp_path / "plain.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TokenFormerError, match="not a safetensors file"):
        load_adapter(base, tmp_path / "plain.safetensors")


# ---- `tokenformer train --tune-tokens` ----------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A tiny model trained 4 steps: the base checkpoint."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretrained")
    summary = train(tiny_config(corpus, root / "run", train_iters=4, save_interval=4, eval_interval=4))
    return {"summary": summary, "checkpoint": root / "run" / "step_00000004"}


def test_train_tune_tokens_end_to_end(corpus, pretrained, tmp_path, capsys):
    save = tmp_path / "tuned"
    code = cli(["train", "--model", "tiny", "--data_path", str(corpus), "--init-from", str(pretrained["checkpoint"]),
                "--tune-tokens", "4", "--train_iters", "4", "--save", str(save), "--save_interval", "2",
                "--eval_interval", "2", "--eval_iters", "2", "--seq_length", "32", "--lr", "1e-2",
                "--train_micro_batch_size_per_gpu", "2", "--seed", "7", "--progress", "false", "--plot", "false",
                "--device", "cpu", "--weight_decay", "0.5"])
    assert code == 0
    assert f"adapter {save / 'step_00000004' / 'adapter.safetensors'}" in capsys.readouterr().out
    validations = [r["val_loss"] for r in read_metrics(save / "metrics.jsonl") if "val_loss" in r]
    assert validations[0] == pytest.approx(pretrained["summary"]["val_loss"], abs=1e-6)  # starts at the base
    assert validations[-1] < validations[0]
    base = load_model(pretrained["checkpoint"])
    for step in (2, 4):
        checkpoint = save / f"step_{step:08d}"
        tuned = load_model(checkpoint)
        for name, old in base.state_dict().items():
            new = tuned.state_dict()[name]
            assert torch.equal(new if not name.endswith("_param_tokens") else new[:old.shape[0]], old), name
        loaded = load_adapter(base, checkpoint / "adapter.safetensors")
        assert torch.equal(logits(loaded), logits(tuned))
    assert (save / "step_00000004" / "adapter.safetensors").stat().st_size < \
        (save / "step_00000004" / "model.safetensors").stat().st_size / 4


def test_a_tune_tokens_run_resumes_exactly(corpus, pretrained, tmp_path):
    common = dict(init_from=str(pretrained["checkpoint"]), tune_tokens=3, lr_decay_iters=6)
    straight = train(tiny_config(corpus, tmp_path / "a", **common))
    first = train(tiny_config(corpus, tmp_path / "b", train_iters=3, **common))
    resumed = train(tiny_config(corpus, tmp_path / "b", resume=True, **common))
    assert {**first["losses"], **resumed["losses"]} == straight["losses"]  # bit for bit
    assert resumed["adapter"].endswith("step_00000006/adapter.safetensors")
    a, b = load_file(straight["adapter"]), load_file(resumed["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tune_tokens_option_errors_are_one_sentence(corpus, pretrained):
    cases = [(dict(tune_tokens=2), "needs init_from"),
             (dict(tune_tokens=2, init_from=str(pretrained["checkpoint"]), freeze_old=True), "cannot be combined"),
             (dict(tune_tokens=2, init_from=str(pretrained["checkpoint"]), init_from_optimizer=True),
              "cannot be combined")]
    for changes, message in cases:
        with pytest.raises(TokenFormerError, match=message) as error:
            train(tiny_config(corpus, **changes))
        assert "\n" not in str(error.value)
    with pytest.raises(TokenFormerError, match="tune_tokens must be at least 0"):
        TrainConfig(tune_tokens=-1)


def test_the_optimizer_of_a_tuned_model_holds_only_the_pattention_tokens(base):
    tuned = add_tuning_tokens(base, 2)
    freeze_old_tokens(tuned)
    optimizer = build_optimizer(tuned, TrainConfig())
    names = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert names == {f"{name}.{t}" for groups in pattention_groups(tuned).values() for name in groups
                     for t in ("key_param_tokens", "value_param_tokens")}
