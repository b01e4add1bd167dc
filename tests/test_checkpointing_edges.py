"""`CheckpointManager` on its own, each rule checked on the files it leaves: names, pruning to
`keep_last_n`, a save over an existing step, leftovers of a killed save, loading weights and
optimizer back, the sentences of a bad trainer state or another model's checkpoint, a failed write
that is a bug (re-raised) or a full disk (by errno, by message, by free space), and the RNG round
trip that makes a resume exact."""

import errno
import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenformer import TokenFormerError
from tokenformer.training import checkpointing
from tokenformer.training.checkpointing import CheckpointManager, CheckpointWriteError, capture_rng, restore_rng

from tests.conftest import tiny_model


def trained(seed=0):
    torch.manual_seed(seed)
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 257, (1, 6))).logsumexp(-1).mean().backward()
    optimizer.step()
    return model, optimizer


def test_saves_are_named_pruned_to_keep_last_n_and_pointed_at(tmp_path):
    model, optimizer = trained()
    manager = CheckpointManager(tmp_path, keep_last_n=2)
    assert CheckpointManager.name_of(7) == "step_00000007" and manager.checkpoints() == []
    for step in (1, 2, 3):
        path = manager.save(step, model, optimizer, {"consumed_samples": step, "rng": capture_rng()})
        assert path == tmp_path / f"step_0000000{step}"
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text() == "step_00000003\n" and manager.latest() == tmp_path / "step_00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    (tmp_path / "step_00000009").mkdir()  # no trainer.pt: not a checkpoint
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000003"]
    # a save over an existing step (a rerun) replaces it and leaves nothing else behind
    (tmp_path / "step_00000003" / "stale.txt").write_text("old")
    manager.save(3, model, optimizer, {"consumed_samples": 30, "rng": capture_rng()})
    assert not (tmp_path / "step_00000003" / "stale.txt").exists()
    assert torch.load(tmp_path / "step_00000003" / "trainer.pt", weights_only=True)["consumed_samples"] == 30
    assert not list(tmp_path.glob(".*"))


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    model, optimizer = trained()
    manager = CheckpointManager(tmp_path, keep_last_n=2)
    manager.save(1, model, optimizer, {"consumed_samples": 1, "rng": capture_rng()})
    manager.save(2, model, optimizer, {"consumed_samples": 2, "rng": capture_rng()})
    (tmp_path / "latest").write_text("step_00000001\n")  # pointed back at the older one
    manager.keep_last_n = 1
    manager.prune()
    assert [p.name for p in manager.checkpoints()] == ["step_00000001", "step_00000002"]


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    manager = CheckpointManager(tmp_path)
    for name in (".tmp-step_00000004", "step_00000002"):
        (tmp_path / name).mkdir()
    (tmp_path / ".latest.x1.tmp").write_text("step_0000")
    (tmp_path / ".keep").write_text("a user's file")
    (tmp_path / ".tmp-step_00000005").write_text("")  # a file where a folder was expected: left, no crash
    manager.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", ".tmp-step_00000005", "step_00000002"]


def test_load_restores_weights_and_optimizer_and_names_what_is_wrong(tmp_path):
    model, optimizer = trained(seed=1)
    manager = CheckpointManager(tmp_path)
    path = manager.save(5, model, optimizer, {"consumed_samples": 10, "rng": capture_rng()})
    other, other_optimizer = trained(seed=2)
    state = manager.load(path, other, other_optimizer)
    assert (state["step"], state["consumed_samples"]) == (5, 10)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), model.parameters()))
    moments = [other_optimizer.state[p]["exp_avg"] for p in other.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["exp_avg"]) for a, p in zip(moments, model.parameters()))
    (path / "trainer.pt").rename(path / "moved.pt")
    with pytest.raises(TokenFormerError, match=rf"^trainer state {path / 'trainer.pt'} does not exist: "):
        manager.load(path, other, other_optimizer)
    torch.save({"step": 5, "consumed_samples": 10}, path / "trainer.pt")
    with pytest.raises(TokenFormerError) as error:
        manager.load(path, other, other_optimizer)
    assert str(error.value) == (f"trainer state {path / 'trainer.pt'} lacks 'rng': it was not written by `tokenformer "
                                f"train`; resume from another checkpoint or start afresh")
    small = CheckpointManager(tmp_path / "small")
    torch.manual_seed(0)
    from tokenformer import Config, TokenFormer
    smaller = TokenFormer(Config.from_name("tiny", ffn_slot_num=64))
    small_path = small.save(1, smaller, torch.optim.AdamW(smaller.parameters()), {"consumed_samples": 0,
                                                                                   "rng": capture_rng()})
    with pytest.raises(TokenFormerError) as error:
        small.load(small_path, model, optimizer)
    assert str(error.value).startswith(f"{small_path} holds a model of another shape than this run's (")
    assert str(error.value).endswith("): resume with the same model config, or use a new `save` directory")


def test_a_failed_write_is_a_bug_or_a_sentence_and_a_full_disk_is_recognised(tmp_path, monkeypatch):
    model, optimizer = trained()
    manager = CheckpointManager(tmp_path / "run")
    manager.save(1, model, optimizer, {"consumed_samples": 1, "rng": capture_rng()})

    def fail_with(error):
        def write(*args, **kwargs):
            raise error
        monkeypatch.setattr(checkpointing.torch, "save", write)

    fail_with(RuntimeError("an unrelated bug"))
    with pytest.raises(RuntimeError, match="an unrelated bug"):  # not a write: the traceback is kept
        manager.save(2, model, optimizer, {"consumed_samples": 2, "rng": capture_rng()})
    fail_with(RuntimeError("file write failed: no room"))
    with pytest.raises(CheckpointWriteError) as error:
        manager.save(2, model, optimizer, {"consumed_samples": 2, "rng": capture_rng()})
    assert str(error.value) == (f"could not write checkpoint 2 to {tmp_path / 'run'} (file write failed: no room): "
                                f"the previous checkpoint step_00000001 is kept; fix the directory and resume "
                                f"(--resume)")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "step_00000001"]
    fail_with(OSError(errno.EIO, "Input/output error"))  # an OSError's reason is its strerror, not "[Errno 5] ..."
    with pytest.raises(CheckpointWriteError) as error:
        manager.save(2, model, optimizer, {"consumed_samples": 2, "rng": capture_rng()})
    assert f"to {tmp_path / 'run'} (Input/output error): the previous" in str(error.value)
    fail_with(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointWriteError) as error:
        manager.save(2, model, optimizer, {"consumed_samples": 2, "rng": capture_rng()})
    assert str(error.value) == (f"disk full while saving checkpoint 2 to {tmp_path / 'run'}: the previous checkpoint "
                                f"step_00000001 is kept; free space and resume (--resume)")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda d: Usage(10**9, 10**9, 10**6))
    for error, full in ((OSError(errno.ENOSPC, "No space left"), True), (OSError(errno.EDQUOT, "Quota"), True),
                        (RuntimeError("write: os error 28"), True), (OSError(errno.EIO, "I/O"), False)):
        assert checkpointing._disk_full(error, tmp_path) is full
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda d: Usage(10**9, 10**9, 64 * 1024 - 1))
    assert checkpointing._disk_full(OSError(errno.EIO, "I/O"), tmp_path)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda d: Usage(10**9, 10**9, 64 * 1024))
    assert not checkpointing._disk_full(OSError(errno.EIO, "I/O"), tmp_path)

    def gone(directory):
        raise FileNotFoundError(directory)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", gone)
    assert not checkpointing._disk_full(OSError(errno.EIO, "I/O"), tmp_path)


def test_restored_random_states_draw_the_same_numbers():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's state
    state = capture_rng()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(state)
    assert (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first
    assert isinstance(state["numpy"][1], torch.Tensor)  # loadable with weights_only=True


def test_sharded_saves_and_loads_go_through_the_sharded_format(tmp_path, monkeypatch):
    """Under FSDP2 a save writes the shards into `sharded/` (torch.distributed.checkpoint) beside the
    gathered full weights, and no optimizer state in trainer.pt; loading one (by FSDP2, or by one
    process, which reshards it) reads `sharded/`; a full-state checkpoint loaded under FSDP2 goes
    through `load_full_into_sharded`. The distributed calls are recorded here."""
    calls = []

    def save_sharded(directory, model, optimizer):
        calls.append(("save", directory.name, directory.parent.name))
        directory.mkdir()
        (directory / "shard-0").write_text("shards")

    monkeypatch.setattr(checkpointing, "save_sharded", save_sharded)
    monkeypatch.setattr(checkpointing, "load_sharded", lambda d, m, o: calls.append(("load", d, m, o)))
    monkeypatch.setattr(checkpointing, "load_full_into_sharded",
                        lambda m, o, w, s, source: calls.append(("full", m, o, sorted(w) == sorted(m.state_dict()),
                                                                 s, source)))
    model, optimizer = trained()
    manager = CheckpointManager(tmp_path)
    path = manager.save(4, model, optimizer, {"consumed_samples": 8, "rng": capture_rng()}, sharded=True)
    assert calls == [("save", "sharded", ".tmp-step_00000004")]
    assert (path / "sharded" / "shard-0").read_text() == "shards"
    assert torch.load(path / "trainer.pt", weights_only=True)["optimizer"] is None
    weights = load_file(path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # the gathered full state
    for sharded in (True, False):  # FSDP2, or one process resuming an FSDP2 checkpoint
        calls.clear()
        manager.load(path, model, optimizer, sharded=sharded)
        assert calls == [("load", path / "sharded", model, optimizer)]
    full = CheckpointManager(tmp_path / "full").save(2, model, optimizer, {"consumed_samples": 4, "rng": capture_rng()})
    calls.clear()
    state = manager.load(full, model, optimizer, sharded=True)
    assert calls == [("full", model, optimizer, True, state["optimizer"], str(full))] and state["optimizer"] is not None
