"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent) and tiny models.

In CI (CI=true, `.ci/run`) the development extras are installed by `make test`: there a missing one is a
broken install, so `pytest.importorskip` imports strictly (a failure, not a silent skip of the module).
"""

import importlib
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _strict_importorskip(modname: str, minversion: str | None = None, reason: str | None = None, **kwargs):
    """`pytest.importorskip` for CI: the module must import (and be at least `minversion`)."""
    module = importlib.import_module(modname)
    if minversion is not None:
        return _importorskip(modname, minversion=minversion, reason=reason, **kwargs)  # checks the version
    return module


_importorskip = pytest.importorskip
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.importorskip = _strict_importorskip


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


def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Train on one thread: on a busy 2-core machine a second thread mostly waits (tiny models)."""
    yield from _one_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module, its module-scoped fixtures included: a test module that
    wants it writes `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    yield from _one_thread()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Hugging Face libraries must never reach the network in a test (local files only) and cache
    what `datasets` builds in a private folder, for this test only. `datasets` and
    `huggingface_hub` read these variables once, when first imported: their copies are set too.
    Returns the cache folder."""
    datasets = pytest.importorskip("datasets", reason="datasets is in the dev extra")
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub comes with datasets")

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / datasets.config.DOWNLOADED_DATASETS_DIR)
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / datasets.config.EXTRACTED_DATASETS_DIR)
    return cache
