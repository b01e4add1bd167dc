"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent) and tiny models."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the project in CI only)")
    return path


@pytest.fixture
def neox_tokenizer_path() -> Path:
    return shared_file("gpt-neox-20b/tokenizer.json")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Train on one thread: on a busy 2-core machine a second thread mostly waits (tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
