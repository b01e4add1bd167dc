"""The CPU threads a command computes with (`tokenformer.threads`): the rule from the model's size and
the cores, the user's `--num-threads` and OMP_NUM_THREADS first, and every model command's option."""

import pytest
import torch

from tokenformer import ByteTokenizer, Config, TokenFormer
from tokenformer.__main__ import build_parser, main
from tokenformer.threads import PARAMETERS_PER_THREAD, default_threads, idle_cores, use_threads


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_rule_one_thread_per_share_of_parameters_at_most_one_per_core(monkeypatch):
    assert PARAMETERS_PER_THREAD == 1_000_000
    assert default_threads(90_000, cores=2) == 1  # the demo's size: one thread
    assert default_threads(999_999, cores=16) == 1
    assert default_threads(3_500_000, cores=16) == 3
    assert default_threads(150_000_000, cores=2) == 2  # never more than the cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's two processes share the cores
    monkeypatch.setattr("tokenformer.threads.usable_cores", lambda: 8)
    assert default_threads(10**12) == 4


def test_busy_cores_are_not_counted(monkeypatch):
    monkeypatch.setattr("tokenformer.threads.usable_cores", lambda: 4)
    for load, idle in [(0.2, 4), (1.5, 3), (3.0, 1), (9.0, 1)]:  # ceil(4 - load), at least one
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        assert idle_cores() == idle
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert use_threads(None, 10**9) == 1  # a big model on a machine whose cores are all busy


def test_the_user_choice_wins_then_omp_then_the_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("tokenformer.threads.usable_cores", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
    assert use_threads(None, 1000) == 1 and torch.get_num_threads() == 1
    assert use_threads(None, 5_000_000) == 2
    assert use_threads(2, 1000) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert use_threads(None, 1000) == 2  # left as the user set it


@pytest.mark.parametrize("command", ["generate", "evaluate", "evaluate-clip", "grow", "shrink"])
def test_every_model_command_takes_num_threads(command):
    parser = build_parser()
    required = {"generate": [], "evaluate": [], "evaluate-clip": ["--data", "d"], "grow": ["--out", "o"],
                "shrink": ["--out", "o", "--data", "d"]}[command]
    args = parser.parse_args([command, "--checkpoint", "c", *required, "--num-threads", "3"])
    assert args.num_threads == 3


def test_generate_computes_with_the_threads_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    TokenFormer(Config.from_name("tiny")).save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    torch.set_num_threads(2)
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "a", "--max-new-tokens", "1"]) == 0
    assert torch.get_num_threads() == 1  # a tiny model: the rule's one thread
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "a", "--max-new-tokens", "1",
                 "--num-threads", "2"]) == 0
    assert torch.get_num_threads() == 2
