"""Distributed training for real: `torchrun --nproc_per_node=2` on CPU (gloo) running the
`tokenformer train`, `train-vision` and `train-captioner` commands, compared against a
single-process run with the same global batch.

Six torchrun launches serve every test (module-scoped fixtures):
  - DDP, rank 1 failing on purpose after step 3 (TOKENFORMER_FAIL_AT_STEP), then `--resume`;
  - DDP, rank 1 SIGKILLed after step 2 (a lost node);
  - FSDP2 to the end, writing sharded checkpoints;
  - train-vision with DDP, then `--resume` of a copy of it that lost its last epoch.
The reference is the same `train()` in this process: micro batch 4 x accumulation 2 x 1 rank
against micro batch 2 x accumulation 2 x 2 ranks, i.e. the same 8 windows per optimizer step; for
train-vision, `train()` on the same global batch of 16 images (8 per rank under torchrun).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import tokenformer.training.distributed as D
from tokenformer import TokenFormer
from tokenformer.outputs import MARKER_FILE
from tokenformer.training.config import TrainConfig, VisionTrainConfig
from tokenformer.training import loop
from tokenformer.training.loop import train
from tokenformer.training.metrics import read_metrics

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

REPO = Path(__file__).resolve().parents[1]
# Per-step losses of 2 ranks vs 1 process differ only by float32 summation order (all-reduce of
# gradients, losses averaged across ranks): measured ~1e-6 on this model; 1e-5 leaves room.
LOSS_ATOL = 1e-5
STEPS, SAVE_INTERVAL, FAIL_AT = 4, 2, 3
LAUNCH_TIMEOUT_S = 240  # a hang (a rank waiting forever on a dead peer) fails the test instead
# The runs that lose a rank set the collective timeout (TOKENFORMER_DIST_TIMEOUT_MINUTES) to 2
# minutes: a rank that waited it out would end the job >= 120 s after the failure, within
# LAUNCH_TIMEOUT_S, and the tests require the job to end within a quarter of it (measured: ~1 s).
FAILURE_TIMEOUT_MINUTES = 2.0
PROMPT_STOP_S = FAILURE_TIMEOUT_MINUTES * 60 / 4


def run_fields(corpus: Path, save: Path, **changes) -> dict:
    """Train config fields shared by every run; 2 ranks use micro batch 2, one process 4."""
    fields = dict(model={"name": "tiny", "seq_length": 32}, data_path=str(corpus), train_iters=STEPS,
                  train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, eval_iters=2,
                  eval_interval=100, save=str(save), save_interval=SAVE_INTERVAL, log_interval=1, lr=3e-3,
                  warmup_iters=1, seed=7, device="cpu", progress=False, plot=False)
    fields.update(changes)
    return fields


def torchrun(fields: dict, fail_at: str | None = None, nproc: int = 2, command: str = "train",
             timeout_minutes: float | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N -m tokenformer COMMAND --field value ...`
    (COMMAND: train or train-vision), one thread per rank; `timeout_minutes`: the collective timeout."""
    args = []
    for key, value in fields.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    env = {k: v for k, v in os.environ.items() if k not in (D.FAIL_AT_STEP_ENV, "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    if fail_at is not None:
        env[D.FAIL_AT_STEP_ENV] = fail_at
    if timeout_minutes is not None:
        env[D.TIMEOUT_ENV] = str(timeout_minutes)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
              "-m", "tokenformer", command, *args]
    process = subprocess.Popen(launch, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: torchrun and the ranks it started
        out, err = process.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s (a hung rank?)\n{out}\n{err}")
    return subprocess.CompletedProcess(launch, process.returncode, out, err)


def seconds_since_last_logged_step(save: Path) -> float:
    """Seconds from rank 0's last line in metrics.jsonl (the step at which a peer failed: it logs a
    step once both ranks have its loss) to now, when the launch has just returned."""
    return time.time() - (save / "metrics.jsonl").stat().st_mtime


def losses_of(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(save / "metrics.jsonl") if "loss" in r}


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= LOSS_ATOL, (step, got[step], expected[step])


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, micro batch 4: the same global batch as 2 ranks x micro batch 2. Records the
    `sync` flag of every micro-step's gradient_sync, to check accumulation skips the all-reduce."""
    save = tmp_path_factory.mktemp("single")
    flags, real = [], D.gradient_sync

    def recording(model, sync):
        flags.append(sync)
        return real(model, sync)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop, "gradient_sync", recording)  # where the loop looks it up
            summary = train(TrainConfig(**run_fields(corpus, save, train_micro_batch_size_per_gpu=4)))
    finally:
        torch.set_num_threads(threads)
    return {"save": save, "losses": summary["losses"], "sync_flags": flags}


@pytest.fixture(scope="module")
def ddp_crash(corpus, tmp_path_factory):
    """2-rank DDP whose rank 1 fails after step 3 (the step-2 checkpoint is the last one)."""
    save = tmp_path_factory.mktemp("ddp")
    result = torchrun(run_fields(corpus, save, parallelism="ddp"), fail_at=str(FAIL_AT),
                      timeout_minutes=FAILURE_TIMEOUT_MINUTES)
    return {"save": save, "result": result, "seconds_after_failure": seconds_since_last_logged_step(save),
            "losses": losses_of(save), "latest": (save / "latest").read_text().strip()}


@pytest.fixture(scope="module")
def ddp_resumed(corpus, ddp_crash):
    result = torchrun(run_fields(corpus, ddp_crash["save"], parallelism="ddp", resume=True))
    assert result.returncode == 0, result.stderr
    return {"save": ddp_crash["save"], "result": result, "losses": losses_of(ddp_crash["save"])}


@pytest.fixture(scope="module")
def ddp_killed(corpus, tmp_path_factory):
    """2-rank DDP whose rank 1 is SIGKILLed after step 2 (no message, no cleanup: a lost node)."""
    save = tmp_path_factory.mktemp("killed")
    result = torchrun(run_fields(corpus, save, parallelism="ddp", train_iters=3, save_interval=1),
                      fail_at="2:1:kill", timeout_minutes=FAILURE_TIMEOUT_MINUTES)
    return {"save": save, "result": result, "seconds_after_failure": seconds_since_last_logged_step(save)}


@pytest.fixture(scope="module")
def fsdp(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("fsdp")
    result = torchrun(run_fields(corpus, save, parallelism="fsdp2"))
    assert result.returncode == 0, result.stderr
    return {"save": save, "result": result, "losses": losses_of(save)}


# ---- the same losses as one process ------------------------------------------------------------

def test_fsdp2_two_ranks_match_single_process_losses(fsdp, reference):
    assert len(reference["losses"]) == STEPS
    assert_same_losses(fsdp["losses"], reference["losses"])
    # the run really was sharded: every checkpoint holds DCP shards from both ranks
    shards = sorted(p.name for p in (fsdp["save"] / "step_00000004" / "sharded").glob("*.distcp"))
    assert len(shards) == 2, shards


def test_ddp_two_ranks_failed_and_resumed_match_single_process_losses(ddp_resumed, ddp_crash, reference):
    """Steps 1-2 come from the run that failed at step 3, steps 3-4 from its `--resume`: together
    they equal the uninterrupted single-process run."""
    # rank 0 logged step 3 before rank 1 failed; the resume drops that line and redoes step 3
    assert sorted(ddp_crash["losses"]) == [1, 2, 3]
    assert "resumed" not in ddp_crash["result"].stdout
    assert_same_losses(ddp_resumed["losses"], reference["losses"])
    # the resume continued from step 2 and trained only steps 3 and 4
    assert (ddp_resumed["save"] / "latest").read_text().strip() == "step_00000004"
    trainer = torch.load(ddp_resumed["save"] / "step_00000004" / "trainer.pt", weights_only=True)
    assert trainer["consumed_samples"] == STEPS * 8 and trainer["world_size"] == 2
    # the optimizer names parameters as the plain model does, not DDP's "module." wrapper
    names = [n for group in trainer["optimizer"]["param_groups"] for n in group["param_names"]]
    assert "word_embeddings.weight" in names and not any(n.startswith("module.") for n in names)


def test_language_validation_under_torchrun_equals_one_process_on_the_same_windows(ddp_resumed, corpus):
    """The validation loss 2 DDP ranks log at the last step (each rank half of the eval_iters x micro
    batch = 4 windows, the (loss sum, count) all-reduced) equals the hand cross-entropy of the final
    weights, in this process, over those 4 windows of the valid split in file order."""
    from tokenformer.data.indexed import IndexedDataset

    save = ddp_resumed["save"]
    logged = [r for r in read_metrics(save / "metrics.jsonl") if "val_loss" in r and r["step"] == STEPS]
    assert len(logged) == 1, logged
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in IndexedDataset(str(corpus / "valid_text_document"))])
    windows = torch.from_numpy(np.stack([tokens[32 * i:32 * i + 33] for i in range(4)]))  # (4, 33)
    model = TokenFormer.from_pretrained(save / f"step_{STEPS:08d}").eval()
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert abs(logged[0]["val_loss"] - float(expected)) <= LOSS_ATOL, (logged, float(expected))


def test_gradient_accumulation_syncs_only_on_the_last_micro_step(reference):
    # one process runs the same loop: every optimizer step asks for no sync, then sync
    assert reference["sync_flags"] == [False, True] * STEPS


# ---- a rank fails ------------------------------------------------------------------------------

def test_a_failing_rank_stops_the_job_with_one_clear_message(ddp_crash):
    result = ddp_crash["result"]
    assert result.returncode != 0
    out = result.stdout + result.stderr
    # the failing rank names itself, the cause, and the checkpoint to resume from, exactly once
    own = [line for line in out.splitlines() if line.startswith("tokenformer train: error: rank 1 of 2: "
                                                                 "failed on purpose after step 3")]
    assert len(own) == 1, out
    assert f"step_{SAVE_INTERVAL:08d}" in own[0] and "--resume" in own[0]
    # torchrun's failure summary shows that sentence as the root cause (through its error file)
    root_cause = out[out.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "rank 1 of 2: failed on purpose" in root_cause, out
    # the surviving rank never prints a backend traceback: either its own sentence or, when
    # torchrun's SIGTERM came first, nothing at all
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out
    for line in out.splitlines():
        if line.startswith("tokenformer train: error: rank 0"):
            assert "stopped because another rank failed" in line
    # the job ended promptly (torchrun stops the others), not after the collective timeout
    assert ddp_crash["seconds_after_failure"] < PROMPT_STOP_S, ddp_crash["seconds_after_failure"]
    # the last checkpoint is intact and loads
    assert ddp_crash["latest"] == f"step_{SAVE_INTERVAL:08d}"
    assert not list(ddp_crash["save"].glob(".tmp-*"))
    model = TokenFormer.from_pretrained(ddp_crash["save"] / ddp_crash["latest"])
    assert model.config.num_layers == 2


def test_a_killed_rank_stops_the_job_without_a_hang(ddp_killed):
    result, save = ddp_killed["result"], ddp_killed["save"]
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Signal 9 (SIGKILL)" in out  # torchrun's summary names the killed rank's fate
    assert "[rank0]: Traceback" not in out, out
    for line in out.splitlines():
        if line.startswith("tokenformer train: error: rank 0"):
            assert "stopped because another rank failed" in line and "step_00000001" in line
    # noticed at once (the dead peer's sockets close), not after the collective timeout
    assert ddp_killed["seconds_after_failure"] < PROMPT_STOP_S, ddp_killed["seconds_after_failure"]
    assert (save / "latest").read_text().strip() == "step_00000001"
    assert TokenFormer.from_pretrained(save / "step_00000001").config.num_layers == 2


# ---- sharded checkpoints in one process --------------------------------------------------------

def test_fsdp2_checkpoint_converts_to_one_directory_with_the_same_logits(fsdp, reference, tmp_path):
    from tokenformer.__main__ import main as cli

    checkpoint = fsdp["save"] / "step_00000004"
    out = tmp_path / "consolidated"
    assert cli(["convert", str(checkpoint), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE}
    consolidated = TokenFormer.from_pretrained(out).eval()
    # independent of the shards: the full state rank 0 gathered at save time
    gathered = TokenFormer.from_pretrained(checkpoint).eval()
    single = TokenFormer.from_pretrained(reference["save"] / "step_00000004").eval()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = consolidated(tokens)
        assert torch.equal(logits, gathered(tokens))
        # the same training in one process: equal up to float32 summation order
        torch.testing.assert_close(logits, single(tokens), rtol=0, atol=1e-4)


def test_fsdp2_checkpoint_of_two_ranks_resumes_on_one_process(fsdp, reference, corpus, tmp_path):
    save = tmp_path / "one"
    shutil.copytree(fsdp["save"] / "step_00000002", save / "step_00000002")
    (save / "latest").write_text("step_00000002\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(TrainConfig(**run_fields(corpus, save, train_micro_batch_size_per_gpu=4, resume=True)))
    finally:
        torch.set_num_threads(threads)
    assert summary["resumed_from"].endswith("step_00000002")
    assert_same_losses(summary["losses"], {s: v for s, v in reference["losses"].items() if s > 2})


def test_sharded_folder_without_config_is_a_clear_error(fsdp, tmp_path):
    lonely = tmp_path / "sharded"
    shutil.copytree(fsdp["save"] / "step_00000002" / "sharded", lonely)
    with pytest.raises(FileNotFoundError, match="config.json"):
        D.export_sharded(lonely, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a sharded"):
        D.consolidate_sharded(tmp_path / "empty")


# ---- train-vision under torchrun ------------------------------------------------------------------

# Final weights of 2 DDP ranks vs 1 process after 8 AdamW steps differ by float32 summation order
# (gradients averaged over two half-batches instead of summed over one): measured ~5e-7.
VISION_ATOL = 1e-5


def vision_fields(data: Path, save: Path, **changes) -> dict:
    """train-vision fields shared by every run: 64 images, a global batch of 16, 2 epochs = 8 steps,
    no augmentation (so that 2 ranks and 1 process see the same pixels), EMA on."""
    fields = dict(model="tiny-28", data=str(data), epochs=2, batch_size=16, lr=3e-3, augment="none", ema=0.9,
                  save=str(save), keep_last_n=3, log_interval=1, seed=3, num_threads=1, device="cpu",
                  progress=False, plot=False)
    fields.update(changes)
    return fields


def vision_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def assert_close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory) -> Path:
    from tests.test_vision import write_toy_mnist

    directory = tmp_path_factory.mktemp("toy_mnist")
    write_toy_mnist(directory)
    return directory


@pytest.fixture(scope="module")
def vision_reference(toy_images, tmp_path_factory):

    save = tmp_path_factory.mktemp("vision_single")
    threads = torch.get_num_threads()
    try:
        summary = train(VisionTrainConfig(**vision_fields(toy_images, save)))
    finally:
        torch.set_num_threads(threads)
    return {"save": save, "summary": summary}


@pytest.fixture(scope="module")
def vision_ddp(toy_images, tmp_path_factory):
    save = tmp_path_factory.mktemp("vision_ddp")
    result = torchrun(vision_fields(toy_images, save), command="train-vision")
    assert result.returncode == 0, result.stderr
    return {"save": save, "result": result}


def test_train_vision_two_ranks_match_one_process_on_the_same_global_batch(vision_ddp, vision_reference):
    """DDP averages the gradients of two half-batch mean losses: the gradient of the full-batch mean."""
    ddp, single = vision_ddp["save"], vision_reference["save"]
    for checkpoint in ("step_00000004", "step_00000008", "model"):  # model/: the EMA weights
        assert_close_weights(vision_weights(ddp / checkpoint), vision_weights(single / checkpoint), VISION_ATOL)
    # rank 0 alone wrote the metrics: one line per step, each the mean over both halves of the batch
    got, expected = read_metrics(ddp / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "train_accuracy", "val_accuracy", "val_loss"):
            if key in theirs:
                assert abs(mine[key] - theirs[key]) <= LOSS_ATOL, (mine, theirs)
    # each rank evaluated half the test images: val_loss above (a mean over the whole test set, which
    # half of it would miss by far more than LOSS_ATOL) came from the sums of both halves
    out = vision_ddp["result"].stdout
    assert out.count("epoch 2: test accuracy") == 1 and out.count("after 2 epochs") == 1  # rank 0 only


def test_train_vision_resumes_under_torchrun(vision_ddp, toy_images, tmp_path):
    """A copy of the 2-rank run that lost its last epoch resumes (both ranks read rank 0's step-4
    checkpoint, EMA included) to the weights of the uninterrupted run."""
    save = tmp_path / "resumed"
    shutil.copytree(vision_ddp["save"], save)
    shutil.rmtree(save / "step_00000008")
    (save / "latest").write_text("step_00000004\n")
    result = torchrun(vision_fields(toy_images, save, resume=True), command="train-vision")
    assert result.returncode == 0, result.stderr
    for checkpoint in ("step_00000008", "model"):
        assert_close_weights(vision_weights(save / checkpoint), vision_weights(vision_ddp["save"] / checkpoint), 0)
    epochs = [r["epoch"] for r in read_metrics(save / "metrics.jsonl") if "val_accuracy" in r]
    assert epochs == [1, 2]


def test_a_failing_vision_rank_stops_the_job_with_one_clear_message(toy_images, tmp_path):
    """Rank 1 fails after step 5 (the first epoch's checkpoint is step 4): one sentence naming it and
    the checkpoint to resume from, and that checkpoint is intact."""
    save = tmp_path / "crash"
    result = torchrun(vision_fields(toy_images, save), fail_at="5", command="train-vision")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    own = [line for line in out.splitlines()
           if line.startswith("tokenformer train-vision: error: rank 1 of 2: failed on purpose after step 5")]
    assert len(own) == 1, out
    assert "step_00000004" in own[0] and "--resume" in own[0]
    assert (save / "latest").read_text().strip() == "step_00000004" and not list(save.glob(".tmp-*"))
    from tokenformer import VisionTokenFormer

    assert VisionTokenFormer.from_pretrained(save / "step_00000004").config.name == "tiny-28"


def test_train_vision_global_batch_must_split_over_the_ranks(toy_images, tmp_path):
    cfg = VisionTrainConfig(**vision_fields(toy_images, tmp_path, batch_size=16))
    with pytest.raises(D.TokenFormerError, match="batch_size 16 .* does not split evenly over 3 ranks"):
        cfg.loop_config(steps_per_epoch=4, world_size=3)
    assert cfg.loop_config(steps_per_epoch=4, world_size=2).train_micro_batch_size_per_gpu == 8


# ---- train-captioner under torchrun ---------------------------------------------------------------

# The ranks' shares of a step hold different numbers of caption tokens, so the loop weights each by
# its count (`loss_terms_vary`); what is left between 2 ranks and 1 process is float32 summation
# order, which AdamW's first steps magnify where a gradient is near zero: measured 1.5e-5 after 2
# and 4 steps (without the weighting: 1e-2, and step 1's loss off by 7e-5).
CAPTIONER_ATOL = 1e-4

def captioner_fields(scenes_dir: Path, save: Path) -> dict:
    """32 scenes, a global batch of 16, 2 epochs = 4 steps; 6 validation scenes captioned greedily,
    3 per rank."""
    return dict(model="tiny", data=str(scenes_dir / "train"), val_data=str(scenes_dir / "val"), epochs=2,
                batch_size=16, eval_batch_size=4, lr=3e-3, caption_samples=6, max_new_tokens=12,
                bpe_vocab_size=280, save=str(save), log_interval=1, seed=1, num_threads=1, device="cpu",
                progress=False, plot=False)


def test_train_captioner_two_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    """DDP over 2 ranks gives one process's per-step losses, weights and validation: the caption
    loss and the greedy captions' scene accuracy are sums over both ranks' shares."""
    from tokenformer.data.scenes import write_scene_dataset
    from tokenformer.training.config import CaptionTrainConfig
    from tokenformer.training.loop import train

    write_scene_dataset(tmp_path / "scenes", train=32, val=6, progress=False)
    result = torchrun(captioner_fields(tmp_path / "scenes", tmp_path / "ddp"), command="train-captioner")
    assert result.returncode == 0, result.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        train(CaptionTrainConfig(**captioner_fields(tmp_path / "scenes", tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for checkpoint in ("step_00000002", "step_00000004", "model"):
        assert_close_weights(vision_weights(ddp / checkpoint), vision_weights(single / checkpoint), CAPTIONER_ATOL)
    assert_same_losses(losses_of(ddp), losses_of(single))
    got = [r for r in read_metrics(ddp / "metrics.jsonl") if "val_loss" in r]
    expected = [r for r in read_metrics(single / "metrics.jsonl") if "val_loss" in r]
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == [0, 1, 2]
    for mine, theirs in zip(got, expected):
        assert abs(mine["val_loss"] - theirs["val_loss"]) <= LOSS_ATOL, (mine, theirs)
        assert mine["captioned"] == theirs["captioned"] == 6
        for key in ("exact_match", "count_accuracy", "colour_accuracy", "shape_accuracy", "position_accuracy"):
            assert mine[key] == pytest.approx(theirs[key]), key


# ---- gradient sync, in this process on a one-rank group ------------------------------------------

@pytest.fixture
def one_rank_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_ddp_no_sync_skips_the_all_reduce_until_the_last_micro_step(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_tiny_model())
    reduced = []

    def counting_hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, counting_hook)
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, x in enumerate(batches):
        with D.gradient_sync(model, sync=i == len(batches) - 1):
            model(x).pow(2).mean().backward()
        assert len(reduced) == (0 if i < len(batches) - 1 else 1)  # one bucket, once
    # the one all-reduce carried the gradients accumulated over all micro-steps
    plain = _tiny_model()
    for x in batches:
        plain(x).pow(2).mean().backward()
    for p, q in zip(model.module.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert reduced == [sum(p.numel() for p in plain.parameters())]


def test_fsdp2_gradient_sync_off_keeps_gradients_unreduced(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_tiny_model())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with D.gradient_sync(model, sync=False):
        model(x).pow(2).mean().backward()
    # no reduce-scatter yet: the sharded parameters have no gradient
    assert all(p.grad is None for p in model.parameters())
    with D.gradient_sync(model, sync=True):
        model(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    plain = _tiny_model()
    for _ in range(2):
        plain(x).pow(2).mean().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad)


def test_fail_at_step_spec_is_checked(monkeypatch):
    env = D.DistEnv(rank=1, world_size=2)
    monkeypatch.setenv(D.FAIL_AT_STEP_ENV, "3")
    D.maybe_fail(2, env)  # another step: nothing
    D.maybe_fail(3, D.DistEnv(rank=0, world_size=2))  # another rank: nothing
    with pytest.raises(D.InjectedFailure, match="after step 3"):
        D.maybe_fail(3, env)
    monkeypatch.setenv(D.FAIL_AT_STEP_ENV, "three")
    with pytest.raises(D.TokenFormerError, match="STEP:RANK:kill"):
        D.maybe_fail(3, env)


def test_resuming_with_another_global_batch_is_flagged():
    state = {"world_size": 2, "train_config": json.dumps({"train_micro_batch_size_per_gpu": 2,
                                                          "gradient_accumulation_steps": 2})}
    assert D.resume_batch_note(state, 4, 2, 1) is None  # 4 x 2 x 1 = 2 x 2 x 2
    note = D.resume_batch_note(state, 2, 2, 1)
    assert "global batch of 4 windows" in note and "trained with 8" in note
    assert "train_micro_batch_size_per_gpu to 4" in note
    assert D.resume_batch_note({}, 2, 2, 1) is None  # an old checkpoint without the fields


def test_one_process_checkpoint_resumes_under_fsdp2(one_rank_group, corpus, reference):
    """A full-state checkpoint (one process or DDP) loads into FSDP2's shards: weights and AdamW state."""
    from tokenformer.training.checkpointing import CheckpointManager
    from tokenformer.training.optim import build_optimizer

    checkpoint = reference["save"] / "step_00000002"
    cfg = TrainConfig(**run_fields(corpus, None))
    from torch.distributed.fsdp import fully_shard

    model = TokenFormer.from_pretrained(checkpoint)
    for block in model.layers:  # as wrap_model does, over the one-rank group
        fully_shard(block)
    fully_shard(model)
    optimizer = build_optimizer(model, cfg)
    state = CheckpointManager(reference["save"]).load(checkpoint, model, optimizer, sharded=True)
    assert state["step"] == 2
    saved = torch.load(checkpoint / "trainer.pt", weights_only=True)["optimizer"]
    names = [n for g in saved["param_groups"] for n in g["param_names"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    params = dict(model.named_parameters())
    for name, index in zip(names, ids):
        loaded = optimizer.state[params[name]]
        torch.testing.assert_close(loaded["exp_avg"].full_tensor(), saved["state"][index]["exp_avg"], rtol=0, atol=0)
    reference_model = TokenFormer.from_pretrained(checkpoint)
    for name, p in reference_model.named_parameters():
        assert torch.equal(params[name].full_tensor(), p), name


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    assert D.collective_timeout_minutes() == 30.0
    monkeypatch.setenv(D.TIMEOUT_ENV, "2.5")
    assert D.collective_timeout_minutes() == 2.5
    for bad in ("0", "soon"):
        monkeypatch.setenv(D.TIMEOUT_ENV, bad)
        with pytest.raises(D.TokenFormerError, match=D.TIMEOUT_ENV):
            D.collective_timeout_minutes()


def test_fsdp2_checkpoint_of_two_ranks_resumes_under_ddp(one_rank_group, fsdp, corpus):
    """DDP (here over a one-rank group) reads the 2-rank shards of weights and AdamW state."""
    from torch.nn.parallel import DistributedDataParallel

    from tokenformer.training.checkpointing import CheckpointManager
    from tokenformer.training.optim import build_optimizer

    checkpoint = fsdp["save"] / "step_00000002"
    model = DistributedDataParallel(TokenFormer.from_pretrained(fsdp["save"] / "step_00000004"))
    optimizer = build_optimizer(model, TrainConfig(**run_fields(corpus, None)))
    state = CheckpointManager(fsdp["save"]).load(checkpoint, model, optimizer)
    assert state["step"] == 2
    gathered = TokenFormer.from_pretrained(checkpoint)  # the full weights rank 0 wrote beside the shards
    for (name, p), q in zip(model.module.named_parameters(), gathered.parameters()):
        assert torch.equal(p, q), name
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {2.0} and len(optimizer.state) == len(list(gathered.parameters()))


def test_rank_failures_are_described_and_bugs_keep_their_traceback():
    env = D.DistEnv(rank=0, world_size=4)
    peer = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:4242")
    text = str(D.describe_rank_failure(peer, env, "runs/x/step_00000100"))
    assert text.startswith("rank 0 of 4 stopped because another rank failed")
    assert "Connection closed by peer [10.0.0.2]:4242" in text and "pair.cc" not in text
    assert "runs/x/step_00000100" in text and "--resume" in text
    own = D.describe_rank_failure(FileNotFoundError("data/x.bin does not exist"), env, None)
    assert str(own) == "rank 0 of 4: data/x.bin does not exist; no checkpoint was written yet"
    # an ordinary bug is not dressed up as a peer failure: the caller re-raises it with its traceback
    assert D.describe_rank_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), env, None) is None
    assert D.describe_rank_failure(ValueError("bad"), env, None) is None
