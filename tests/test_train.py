"""The trainer: recipe pieces against hand formulas, exact resume, crash-safe checkpoints, config
handling, bad input, outputs. Tiny models and a few steps each, on a corpus built here."""

import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenformer import ByteTokenizer, Config, TokenFormer, TokenFormerError
from tokenformer.__main__ import build_parser, main as cli
from tokenformer.data.windows import WindowDataset
from tokenformer.evaluation import scoring
from tokenformer.models.config import resolve_model_config
from tokenformer.training.checkpointing import CheckpointManager
from tokenformer.training.config import TrainConfig
from tokenformer.training.loop import micro_batch_start, train
from tokenformer.training.metrics import read_metrics
from tokenformer.training.optim import build_optimizer, lr_at
from tokenformer.training.tasks.language import LanguageModelTask

from tests.conftest import TEXTS, text_docs, write_corpus


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(corpus, save=None, **changes) -> TrainConfig:
    values = dict(model={"name": "tiny", "seq_length": 32}, data_path=str(corpus), train_iters=6,
                  train_micro_batch_size_per_gpu=2, eval_interval=3, eval_iters=2, save_interval=3,
                  log_interval=1, lr=3e-3, warmup_iters=2, progress=False, plot=False, device="cpu",
                  save=str(save) if save else None, seed=7)
    values.update(changes)
    return TrainConfig(**values)


# ---- the pieces ---------------------------------------------------------------------------------

def test_lr_schedule_matches_hand_formula():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, train_iters=110).schedule
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    # halfway through the decay the cosine is at the midpoint
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    # warmup as a fraction of the decay steps, the official 1%
    assert TrainConfig(train_iters=143000).schedule.warmup_iters == 1430
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_iters=0, train_iters=100, lr_decay_style="linear").schedule
    assert lr_at(25, linear) == pytest.approx(0.75)


def test_weight_decay_groups_cover_tokens_and_embedding_not_final_norm():
    model = TokenFormer(Config.from_name("tiny"))
    optimizer = build_optimizer(model, TrainConfig())
    by_decay = {g["weight_decay"]: set(g["param_names"]) for g in optimizer.param_groups}
    assert by_decay[0.0] == {"final_norm.weight", "final_norm.bias"}
    decayed = by_decay[0.1]
    assert "word_embeddings.weight" in decayed
    assert {n for n in decayed if n.endswith("_param_tokens")} == \
        {n for n, _ in model.named_parameters() if n.endswith("_param_tokens")}
    assert len(decayed) + 2 == len(list(model.parameters()))
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8


def test_windows_overlap_by_one_token_and_cover_the_stream(tmp_path):
    docs = [list(range(1, 11)), list(range(11, 31)), list(range(31, 36))]
    data = write_corpus(tmp_path / "d", docs)
    ordered = WindowDataset([str(data / "train_text_document")], seq_length=4, shuffle=False)
    stream = np.concatenate(docs)
    assert ordered.windows_per_epoch == (len(stream) - 1) // 4
    for i in range(ordered.windows_per_epoch):
        assert ordered.window(i).tolist() == stream[4 * i: 4 * i + 5].tolist()
    shuffled = WindowDataset([str(data / "train_text_document")], seq_length=4, seed=3)
    again = WindowDataset([str(data / "train_text_document")], seq_length=4, seed=3)
    n = shuffled.windows_per_epoch
    assert [again.window(i).tolist() for i in range(2 * n)] == [shuffled.window(i).tolist() for i in range(2 * n)]
    # each window is a run of consecutive tokens from some document order
    for i in range(2 * n):
        assert len(shuffled.window(i)) == 5


def test_ranks_share_the_global_batch():
    # 2 ranks x 1 micro-step take the same samples as 1 rank x 2 micro-steps
    two_ranks = sorted(micro_batch_start(8, 0, r, 2, 2) for r in range(2))
    one_rank = sorted(micro_batch_start(8, m, 0, 1, 2) for m in range(2))
    assert two_ranks == one_rank == [8, 10]


# ---- training -----------------------------------------------------------------------------------

def test_tiny_model_overfits_one_batch(tmp_path):
    data = write_corpus(tmp_path / "d", text_docs(["the quick brown fox jumps over the lazy dog. " * 2]))
    cfg = tiny_config(data, train_iters=60, lr=1e-2, warmup_iters=0, lr_decay_style="constant",
                      eval_interval=1000, model={"name": "tiny", "seq_length": 16},
                      train_micro_batch_size_per_gpu=5)
    summary = train(cfg)
    assert summary["losses"][1] > 4.0
    assert summary["train_loss"] < 0.5, summary["losses"]


def test_resume_gives_the_same_losses_exactly(corpus, tmp_path):
    # the interrupted run stops at step 3 of the same 6-step schedule
    straight = train(tiny_config(corpus, tmp_path / "a", lr_decay_iters=6))
    first = train(tiny_config(corpus, tmp_path / "b", lr_decay_iters=6, train_iters=3))
    resumed = train(tiny_config(corpus, tmp_path / "b", lr_decay_iters=6, resume=True))
    assert resumed["resumed_from"].endswith("step_00000003")
    assert list(resumed["losses"]) == [4, 5, 6]
    both = {**first["losses"], **resumed["losses"]}
    assert both == straight["losses"]  # bit-for-bit
    assert resumed["val_loss"] == straight["val_loss"]
    # the metrics file reads as one run
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_equals_the_larger_batch(corpus):
    one = TokenFormer(Config.from_name("tiny", seq_length=32))
    two = TokenFormer(Config.from_name("tiny", seq_length=32))
    two.load_state_dict(one.state_dict())
    big = train(tiny_config(corpus, train_iters=3, train_micro_batch_size_per_gpu=4, eval_iters=0), model=one)
    acc = train(tiny_config(corpus, train_iters=3, train_micro_batch_size_per_gpu=2,
                            gradient_accumulation_steps=2, eval_iters=0), model=two)
    for step in (1, 2, 3):
        assert acc["losses"][step] == pytest.approx(big["losses"][step], abs=1e-5)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# ---- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_is_a_model_directory_and_generates(corpus, tmp_path, capsys):
    summary = train(tiny_config(corpus, tmp_path / "run", train_iters=3))
    path = Path(summary["checkpoint"])
    assert path.name == "step_00000003"
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_00000003"
    model = TokenFormer.from_pretrained(path)
    assert model.config.seq_length == 32 and (path / "tokenizer.json").is_file()
    capsys.readouterr()
    assert cli(["generate", "--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_crash_mid_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    save = tmp_path / "run"
    train(tiny_config(corpus, save, train_iters=3))
    before = TokenFormer.from_pretrained(save / "step_00000003").state_dict()

    def crash(self, directory, state):
        (directory / "trainer.pt").write_bytes(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(CheckpointManager, "_write_trainer_state", crash)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_config(corpus, save, resume=True))
    monkeypatch.undo()
    manager = CheckpointManager(save)
    assert manager.latest() == save / "step_00000003"
    assert (save / "latest").read_text().strip() == "step_00000003"
    assert not (save / "step_00000006").exists()
    after = TokenFormer.from_pretrained(manager.latest()).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the next run cleans the leftover and resumes from the good checkpoint
    summary = train(tiny_config(corpus, save, resume=True))
    assert summary["resumed_from"] == str(save / "step_00000003") and summary["step"] == 6
    assert not list(save.glob(".tmp-*"))


def test_keep_last_n(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "run", train_iters=5, save_interval=1, keep_last_n=2, eval_iters=0))
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_00000004", "step_00000005"]


def test_metrics_jsonl_and_loss_curve_png(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    summary = train(tiny_config(corpus, tmp_path / "run", plot=True))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train_records] == [summary["losses"][s] for s in range(1, 7)]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in records if "val_loss" in r)
    assert summary["tokens_seen"] == 6 * 2 * 32
    png = Path(summary["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.parent == tmp_path / "run"


def test_init_from_starts_from_the_weights_with_a_fresh_schedule(corpus, tmp_path):
    source = TokenFormer(Config.from_name("tiny", seq_length=32))
    source.save_pretrained(tmp_path / "start", tokenizer=ByteTokenizer())
    cfg = tiny_config(corpus, tmp_path / "run", init_from=str(tmp_path / "start"), train_iters=1, lr=0.0,
                      min_lr=0.0, weight_decay=0.0)
    summary = train(cfg)
    trained = TokenFormer.from_pretrained(summary["checkpoint"])
    # lr 0: the weights are exactly the starting ones
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), trained.state_dict().values()))


# ---- configuration ------------------------------------------------------------------------------

def test_yaml_config_with_cli_overrides(corpus, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {{name: tiny, seq_length: 32}}\ndata_path: {corpus}\nlr: 6e-4\n"
                         f"train_iters: 50\nprogress: false\nplot: false\nsave: {tmp_path / 'run'}\n"
                         f"train-micro-batch-size-per-gpu: 2\neval_iters: 1\n")
    cfg = TrainConfig.from_yaml(yaml_file)
    assert cfg.lr == 6e-4 and isinstance(cfg.lr, float) and cfg.train_micro_batch_size_per_gpu == 2
    args = build_parser().parse_args(
        ["train", str(yaml_file), "--train-iters", "2", "--lr=1e-3", "--checkpoint_activations"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.train_iters, cfg.lr, cfg.checkpoint_activations, cfg.eval_iters) == (2, 1e-3, True, 1)
    assert cli(["train", str(yaml_file), "--train_iters", "2", "--save_interval", "1"]) == 0
    assert (tmp_path / "run" / "step_00000002").is_dir()


def test_unknown_field_names_the_nearest(tmp_path, capsys):
    with pytest.raises(TokenFormerError, match=r"unknown train config field 'lrr' \(did you mean lr\?\)"):
        TrainConfig.from_dict({"lrr": 1})
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("train_iter: 10\n")
    assert cli(["train", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "train_iter" in err and "did you mean train_iters" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(TokenFormerError, match="expects int"):
        TrainConfig.from_dict({"train_iters": "ten"})


# ---- bad input ----------------------------------------------------------------------------------

def test_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenformer prepare"):
        train(tiny_config(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nothing_text_document.bin"):
        train(tiny_config(None, data_path=None, train_data_paths=[str(tmp_path / "nothing_text_document")]))
    with pytest.raises(TokenFormerError, match="no training data"):
        train(tiny_config(None, data_path=None))


def test_tokenizer_larger_than_the_model(corpus):
    with pytest.raises(TokenFormerError, match="tokenizer has 257 tokens but the model's vocabulary holds 128"):
        train(tiny_config(corpus, model={"name": "tiny", "vocab_size": 100}))


def test_empty_and_too_short_corpora(tmp_path):
    empty = write_corpus(tmp_path / "empty", [])
    with pytest.raises(TokenFormerError, match="corpus is empty"):
        train(tiny_config(empty))
    short = write_corpus(tmp_path / "short", [[1, 2, 3, 256]])
    with pytest.raises(TokenFormerError, match="fewer than one window"):
        train(tiny_config(short))


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    save = tmp_path / "run"
    train(tiny_config(corpus, save, train_iters=3))
    real_loss = scoring.next_token_loss

    def poisoned(logits, targets):  # training losses only: validation runs without grad
        loss = real_loss(logits, targets)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(scoring, "next_token_loss", poisoned)
    with pytest.raises(TokenFormerError, match=r"loss became nan at step 4; the last good checkpoint .*step_00000003"):
        train(tiny_config(corpus, save, resume=True))
    assert CheckpointManager(save).latest() == save / "step_00000003"


def test_fp16_on_cpu_is_refused(corpus):
    with pytest.raises(TokenFormerError, match="fp16 needs a CUDA GPU"):
        train(tiny_config(corpus, precision="fp16"))


# bf16 autocast rounds activations to 8 significant bits (~0.4% each): over 2 steps of the tiny
# model its losses differ from fp32 by ~3e-4 (measured); 5e-3 leaves room, a wrong loss is off by more.
BF16_LOSS_ATOL = 5e-3


def test_bf16_and_activation_checkpointing_train_like_fp32(corpus, monkeypatch):
    """The same 2 steps (same seed, data and initial weights) four ways: activation checkpointing
    recomputes the very same forward, so its losses equal those without it; bf16 is close to fp32."""
    recomputed, real_checkpoint = [], torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        recomputed.append(type(function).__name__)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    runs = {}
    for precision in ("fp32", "bf16"):
        for checkpointing in (False, True):
            recomputed.clear()
            summary = train(tiny_config(corpus, precision=precision, checkpoint_activations=checkpointing,
                                        train_iters=2, eval_iters=1))
            # checkpointing really ran: each of the 2 blocks once per training forward (2 steps x 1 micro-batch)
            assert recomputed == (["Block"] * 4 if checkpointing else []), (precision, recomputed)
            runs[precision, checkpointing] = summary
    fp32 = runs["fp32", False]
    assert sorted(fp32["losses"]) == [1, 2] and math.isfinite(fp32["val_loss"])
    for precision in ("fp32", "bf16"):
        plain, checkpointed = runs[precision, False], runs[precision, True]
        for step, loss in plain["losses"].items():
            assert checkpointed["losses"][step] == pytest.approx(loss, abs=1e-6), (precision, step)
        assert checkpointed["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6)
    bf16 = runs["bf16", False]
    assert sorted(bf16["losses"]) == [1, 2]
    for step, loss in fp32["losses"].items():
        assert bf16["losses"][step] == pytest.approx(loss, abs=BF16_LOSS_ATOL), step
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=BF16_LOSS_ATOL)
    assert bf16["losses"] != fp32["losses"]  # it really ran in bf16


# ---- shipped configs ----------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def hand_parameter_count(padded_vocab: int, hidden: int, layers: int, qkv: int, proj: int, ffn: int) -> int:
    """The spec's count: the tied embedding, per layer key and value tokens (h each) of the three
    q/k/v Pattentions, the output projection and the FFN, and the final norm's weight and bias."""
    return padded_vocab * hidden + layers * 2 * hidden * (3 * qkv + proj + ffn) + 2 * hidden


# config -> (layers, hidden, heads, qkv/proj/ffn tokens, padded vocabulary, window, parameters), from
# the configs' comments and the spec (150M: the released size); the model each one trains.
SHIPPED_MODELS = {
    "demo": (2, 64, 4, (32, 32, 128), 2048, 64, 196_736),
    "150M_pile": (12, 768, 12, (768, 768, 3072), 50304, 2048, 151_881_216),
    "354M_owt2": (24, 1024, 16, (768, 768, 3072), 50304, 1024, 353_503_232),
    "757M_owt2_grown": (24, 1024, 16, (1792, 1792, 7168), 50304, 1024, 756_156_416),
}


def grow_command_of(config_path: Path) -> list[str]:
    """The `tokenformer grow ...` command a config's comments tell the user to run first."""
    comments = "\n".join(line.lstrip("#") for line in config_path.read_text().splitlines() if line.startswith("#"))
    command = re.search(r"tokenformer grow (.*)", comments.replace("\\\n", " "))  # one line, continuations joined
    assert command, f"{config_path.name} does not say how to grow its init_from"
    return ["grow", *shlex.split(command.group(1))]


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_shipped_configs_train_the_model_they_describe(name):
    layers, hidden, heads, (qkv, proj, ffn), padded_vocab, window, parameters = SHIPPED_MODELS[name]
    assert hand_parameter_count(padded_vocab, hidden, layers, qkv, proj, ffn) == parameters
    cfg = TrainConfig.from_yaml(CONFIGS / f"{name}.yaml")
    if name == "757M_owt2_grown":
        # init_from replaces `model`: the 354M OpenWebText2 run's last checkpoint, grown by the
        # command in the config's comments to the 757M shape (only the parameter tokens change)
        base = TrainConfig.from_yaml(CONFIGS / "354M_owt2.yaml")
        grow = build_parser().parse_args(grow_command_of(CONFIGS / f"{name}.yaml"))
        assert grow.checkpoint == Path(base.save) / f"step_{base.train_iters:08d}"
        assert cfg.init_from == str(grow.out) == "runs/354M_owt2/grown-757M"
        assert grow.mode == "official" and grow.factor is None
        model = dataclasses.replace(resolve_model_config(base.model), qkv_slot_num=grow.qkv_slot_num,
                                    proj_slot_num=grow.proj_slot_num, ffn_slot_num=grow.ffn_slot_num)
        assert (cfg.seq_length, cfg.tokenizer) == (base.seq_length, base.tokenizer)
    else:
        assert cfg.init_from is None
        model = resolve_model_config(cfg.model)
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (layers, hidden, heads)
    assert (model.qkv_slot_num, model.proj_slot_num, model.ffn_slot_num) == (qkv, proj, ffn)
    assert model.padded_vocab_size == padded_vocab and (cfg.seq_length or model.seq_length) == window
    assert model.num_parameters == parameters
    with torch.device("meta"):  # the real modules' shapes, without allocating their weights
        assert sum(p.numel() for p in TokenFormer(model).parameters()) == parameters


def test_150M_config_is_the_official_recipe():
    cfg = TrainConfig.from_yaml(CONFIGS / "150M_pile.yaml")
    model = resolve_model_config(cfg.model)
    assert model.num_parameters == 151_881_216 and cfg.seq_length == 2048
    assert cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * 8 == 1024
    assert (cfg.train_iters, cfg.lr, cfg.min_lr, cfg.schedule.warmup_iters) == (143_000, 6e-4, 6e-5, 1430)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay, cfg.clip_grad) == \
        (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.precision == "fp16" and cfg.checkpoint_activations


@pytest.mark.parametrize("field, module, extra", [("tensorboard_dir", "torch.utils.tensorboard", "tensorboard"),
                                                   ("wandb_project", "wandb", "wandb")])
def test_missing_logging_extra_is_named(corpus, tmp_path, monkeypatch, field, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError, installed or not
    with pytest.raises(TokenFormerError, match=rf"tokenformer\[{extra}\]"):
        train(tiny_config(corpus, tmp_path / "run", **{field: str(tmp_path / "logs")}))


def test_resume_with_another_model_shape_is_refused(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "run", train_iters=2))
    with pytest.raises(TokenFormerError, match="another shape"):
        train(tiny_config(corpus, tmp_path / "run", resume=True,
                          model={"name": "tiny", "seq_length": 32, "ffn_slot_num": 64}))
    with pytest.raises(TokenFormerError, match="seq_length"):
        train(tiny_config(corpus, tmp_path / "run", resume=True, seq_length=16))


def test_several_prefixes_are_one_stream(tmp_path):
    first = write_corpus(tmp_path / "a", [[1, 2, 3, 4, 5]])
    second = write_corpus(tmp_path / "b", [[6, 7, 8, 9, 10]])
    data = WindowDataset([str(first / "train_text_document"), str(second / "train_text_document")],
                         seq_length=3, shuffle=False)
    assert [data.window(i).tolist() for i in range(data.windows_per_epoch)] == [[1, 2, 3, 4], [4, 5, 6, 7],
                                                                                [7, 8, 9, 10]]
    cfg = tiny_config(None, data_path=None, train_data_paths=[str(first / "train_text_document.bin")],
                      model={"name": "tiny", "seq_length": 4}, train_iters=1, eval_iters=0)
    assert train(cfg)["tokens_seen"] == 2 * 4


def test_evaluate_loss_is_the_token_weighted_mean_cross_entropy():
    model = TokenFormer(Config.from_name("tiny"))
    batches = [torch.randint(0, 257, (2, 9)), torch.randint(0, 257, (1, 9))]
    by_hand = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch[:, :-1])  # (B, 8, V)
            log_probs = torch.log_softmax(logits.double(), dim=-1)
            by_hand += (-log_probs.gather(-1, batch[:, 1:, None])).flatten().tolist()
    assert scoring.mean_loss(model, batches) == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    assert model.training  # restored


def test_a_custom_task_reuses_the_loop(corpus, tmp_path):
    """Another trainer brings its own data and loss (here: predict only the last token of a window)."""

    class LastTokenTask(LanguageModelTask):
        def loss(self, model, batch, ctx=None):
            logits = model(batch[:, :-1])[:, -1]  # (B, V)
            return torch.nn.functional.cross_entropy(logits.float(), batch[:, -1]), batch.shape[0]

    cfg = tiny_config(corpus, tmp_path / "run", train_iters=2)
    summary = train(cfg, task=LastTokenTask(cfg))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [set(r) for r in records if "val_loss" in r] == [{"step", "val_loss", "val_ppl", "elapsed_s"}] * 2
    assert summary["val_loss"] != train(tiny_config(corpus, train_iters=2))["val_loss"]


def test_the_command_refuses_to_start_afresh_over_an_earlier_run(corpus, tmp_path, capsys):
    train(tiny_config(corpus, tmp_path / "run", train_iters=1, eval_iters=0))
    assert cli(["train", "--data_path", str(corpus), "--model", "tiny", "--save", str(tmp_path / "run"),
                "--train_iters", "2", "--progress", "false"]) == 2
    assert "holds an earlier output of `tokenformer train`: pass --resume" in capsys.readouterr().err
    assert CheckpointManager(tmp_path / "run").latest().name == "step_00000001"


def test_compiled_blocks_train_like_eager_and_save_plain_names(corpus, tmp_path, monkeypatch):
    # aot_eager traces like inductor but skips code generation (seconds instead of half a minute);
    # tests/test_model.py compares the compiled model with the eager one.
    compile_module, compiled_blocks = torch.nn.Module.compile, []

    def compile_with_aot_eager(module, **kwargs):
        compiled_blocks.append(type(module).__name__)
        compile_module(module, backend="aot_eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    eager = train(tiny_config(corpus, train_iters=2, eval_iters=1))
    compiled = train(tiny_config(corpus, train_iters=2, eval_iters=1, compile=True,
                                 save=str(tmp_path / "run")))
    for step, loss in eager["losses"].items():
        assert compiled["losses"][step] == pytest.approx(loss, abs=1e-4)
    assert compiled_blocks == ["Block", "Block"]  # the tiny preset's two blocks
    names = TokenFormer.from_pretrained(tmp_path / "run" / (tmp_path / "run" / "latest").read_text().strip())
    assert all("_orig_mod" not in name for name in names.state_dict())


# ---- what a run tells its user ------------------------------------------------------------------

def test_a_run_without_save_says_that_it_keeps_nothing(corpus, capsys):
    train(tiny_config(corpus, None, train_iters=1, eval_iters=0))
    assert "warning: no `save` directory: the trained model is not kept" in capsys.readouterr().err


def test_resume_names_its_step_and_explains_a_stretched_schedule(corpus, tmp_path, capsys):
    save = tmp_path / "run"
    train(tiny_config(corpus, save, eval_iters=0))  # 6 steps: warmup 2, cosine down to min_lr at step 6
    capsys.readouterr()
    train(tiny_config(corpus, save, eval_iters=0, train_iters=12, resume=True))
    out, err = capsys.readouterr()
    assert f"resuming from {save / 'step_00000006'} at step 6 of 12" in out
    # by hand: at step 6 the 6-step run had reached min_lr; over 12 steps the cosine is 4/10 of the way
    stretched = 6e-5 + (3e-3 - 6e-5) * 0.5 * (1 + math.cos(math.pi * 4 / 10))
    assert (f"warning: the learning-rate schedule changed: at step 6 the run's lr was {6e-5:.3g} and the new "
            f"settings give {stretched:.3g} (it moves back up); to go on at min_lr instead, pass "
            f"--lr_decay_iters 6") in err
    train(tiny_config(corpus, save, eval_iters=0, train_iters=18, lr_decay_iters=6, resume=True))
    out, err = capsys.readouterr()
    assert "at step 12 of 18" in out and "schedule changed" not in err  # the advice taken: nothing to explain


def test_the_default_model_takes_the_prepared_datas_vocabulary(tmp_path):
    tokenizer_docs = text_docs(TEXTS[:10])
    corpus = write_corpus(tmp_path / "data", tokenizer_docs, tokenizer_docs[:2])
    metadata = json.loads((corpus / "prepare.json").read_text())
    (corpus / "prepare.json").write_text(json.dumps({**metadata, "vocab_size": 300}))  # as a 300-token BPE
    cfg = tiny_config(corpus, train_iters=1, eval_iters=0)
    assert LanguageModelTask(dataclasses.replace(cfg, model="tiny")).build_model().config.vocab_size == 300
    assert LanguageModelTask(dataclasses.replace(cfg, model={"name": "tiny", "seq_length": 16})) \
        .build_model().config.vocab_size == 300
    stated = dataclasses.replace(cfg, model={"name": "tiny", "vocab_size": 512})  # what the user wrote wins
    assert LanguageModelTask(stated).build_model().config.vocab_size == 512
