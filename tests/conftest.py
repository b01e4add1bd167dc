"""Shared fixtures: paths to ../shared/data (skipped with a reason when absent), tiny models and
checkpoints, a prepared training corpus.

In CI (CI=true, `.ci/run`) the development extras are installed by `make test`: there a missing one is a
broken install, so `pytest.importorskip` imports strictly (a failure, not a silent skip of the module).
"""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenformer import ByteTokenizer, Config, TokenFormer
from tokenformer.data.indexed import IndexedDatasetWriter

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


# ---- tiny models and checkpoints ------------------------------------------------------------------

def tiny_model() -> TokenFormer:
    """The `tiny` preset, untrained, in eval mode (its weights follow the seed of `_seed`)."""
    return TokenFormer(Config.from_name("tiny")).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A `tiny` model saved with the byte tokenizer (tmp_path/tiny)."""
    return TokenFormer(Config.from_name("tiny")).save_pretrained(tmp_path / "tiny", tokenizer=ByteTokenizer())


# ---- a prepared corpus ---------------------------------------------------------------------------

def write_indexed(prefix, documents, dtype=np.uint16) -> str:
    """An indexed dataset (PREFIX.bin + PREFIX.idx) of `documents`, lists of token ids; returns PREFIX."""
    writer = IndexedDatasetWriter(prefix, dtype=dtype)
    for document in documents:
        writer.add_item(document)
    writer.close()
    return str(prefix)


def write_corpus(directory: Path, train_docs, valid_docs=None) -> Path:
    """A `tokenformer prepare`-shaped directory: indexed files, tokenizer.json, prepare.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train_docs), ("valid", valid_docs)):
        if docs is not None:
            write_indexed(directory / f"{name}_text_document", docs)
    tokenizer = ByteTokenizer()
    tokenizer.save(directory / "tokenizer.json")
    (directory / "prepare.json").write_text(json.dumps({"vocab_size": tokenizer.vocab_size,
                                                        "eod_id": tokenizer.eos_id}))
    return directory


def text_docs(texts):
    tok = ByteTokenizer()
    return [tok.encode(t) + [tok.eos_id] for t in texts]


TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 short code-like documents for training, every 7th of them for validation (byte tokens)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), text_docs(TEXTS), text_docs(TEXTS[::7]))
