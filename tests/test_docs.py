"""The documents a user reads: the README's Python example runs, every relative link in the README
and the docs resolves, and the generated reference matches the code."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.md")),
             ROOT / "bench" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def relative_links(text: str) -> list[str]:
    links = [target for target in LINK.findall(text)
             if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]
    return [target.split("#")[0] for target in links]


def test_link_finder_sees_relative_links_and_skips_urls_and_anchors():
    text = "[a](docs/x.md) [b](https://example.com) [c](#top) ![p](plot.png \"t\") [d](y.md#part)"
    assert relative_links(text) == ["docs/x.md", "plot.png", "y.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    assert document.is_file()
    missing = [target for target in relative_links(document.read_text())
               if not (document.parent / target).exists()]
    assert missing == []


def test_the_readme_stays_short_and_names_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "make test" in text and "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_python_example_runs(tmp_path):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README holds one Python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout and "\ufffd" not in result.stdout  # prints no replacement characters


def test_the_reference_is_generated_from_the_code():
    from tokenformer.cli.reference import reference

    assert (ROOT / "docs" / "reference.md").read_text() == reference(), \
        "regenerate it: python -m tokenformer.cli.reference > docs/reference.md"
    assert "`train_iters`" in reference() and "`tokenformer grow`" in reference()


def test_packaging_states_an_spdx_license_and_ci_installs_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # PEP 639: the table form stops building in 2027
    requirement = project["build-system"]["requires"][0]
    assert re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requirement) and int(requirement.split(">=")[1].split(".")[0]) >= 77
    assert "make test-wheel" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^test-wheel:", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    import tokenformer

    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tokenformer.__version__"}
    assert tokenformer.__version__


# ---- every command of the docs runs ---------------------------------------------------------------
# Each ```bash block of README.md and docs/*.md runs its `tokenformer ...` lines, in order, in a copy of
# a small workspace (`docs_workspace`) laid out as the docs assume: runs/demo/data (a prepared
# dataset), runs/demo/checkpoints (a 5-step run of the demo config shrunk to a tiny model), ckpt/150M
# and ckpt/small (tiny stand-ins), configs/demo.yaml (tiny and fast), corpus files. Step counts are
# divided by 100 (--train_iters 1000 runs 10 steps), prepare reads 20 documents, make-scenes draws
# 16 + 8 images. Other lines (make, pip, python, torchrun) are not run. A block that cannot run
# here says why in a comment right above it: <!-- docs-test: skip (reason) -->.
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\b[^>]*-->\s*\n$")
STEP_OPTIONS = ("--train_iters", "--train-iters", "--lr_decay_iters", "--lr-decay-iters")


def command_blocks(text: str) -> list[tuple[int, list[str], bool]]:
    """(line number, `tokenformer` commands, skipped) of every ```bash block that holds one."""
    blocks = []
    for match in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        joined = match.group(1).replace("\\\n", " ")
        commands = [line.strip() for line in joined.splitlines() if re.match(r"\s*tokenformer ", line)]
        if commands:
            skipped = bool(SKIP_MARK.search(text[:match.start()][-200:]))
            blocks.append((text[:match.start()].count("\n") + 1, commands, skipped))
    return blocks


def test_command_blocks_are_found_and_skip_marks_read():
    text = ("```bash\ntokenformer a --x 1 \\\n  --y 2   # note\nmake test\n```\n"
            "<!-- docs-test: skip (network) -->\n```bash\ntokenformer b\n```\n```python\ntokenformer c\n```\n")
    assert command_blocks(text) == [(1, ["tokenformer a --x 1    --y 2   # note"], False), (7, ["tokenformer b"], True)]


def fast_argv(command: str) -> list[str]:
    """The command's arguments (comments dropped) with its step counts and data sizes made small."""
    import shlex

    argv = shlex.split(command, comments=True)[1:]
    for i, token in enumerate(argv[:-1]):
        if token in STEP_OPTIONS:
            argv[i + 1] = str(max(1, int(argv[i + 1]) // 100))
    if argv[0] == "prepare" and "--hf-dataset" not in argv:
        argv += ["--max-documents", "20", "--quiet"]
    if argv[0] == "make-scenes":
        argv += ["--train", "16", "--val", "8"]
    if argv[0].startswith("train"):
        argv += ["--progress", "false"]
    if argv[0] in ("train-clip", "train-captioner"):
        argv += ["--epochs", "1", "--batch_size", "8"]
    return argv


DEMO_CONFIG = """model: {name: tiny, seq_length: 64}
data_path: runs/demo/data
save: runs/demo/checkpoints
train_iters: 5
train_micro_batch_size_per_gpu: 2
lr: 5.0e-3
warmup_iters: 1
eval_interval: 5
eval_iters: 1
save_interval: 5
log_interval: 1
plot: false
"""


@pytest.fixture(scope="session")
def docs_workspace(tmp_path_factory):
    import json
    import os

    import tokenformer as tf
    from tokenformer.__main__ import main

    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "configs" / "demo.yaml").write_text(DEMO_CONFIG)
    (root / "corpus").mkdir()
    code = "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    for i in range(12):
        (root / "corpus" / f"part{i}.txt").write_text(code * (i + 1))
    (root / "notes.txt").write_text(code)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": code * (i + 1)}) + "\n" for i in range(8)))
    old = os.getcwd()
    os.chdir(root)
    try:
        assert main(["prepare", "corpus", "--out", "runs/demo/data", "--quiet"]) == 0
        assert main(["train", "configs/demo.yaml", "--progress", "false"]) == 0
    finally:
        os.chdir(old)
    for name, overrides in (("150M", {"seq_length": 2048}), ("small", {})):
        model = tf.TokenFormer(tf.Config.from_name("tiny", **overrides))
        model.save_pretrained(root / "ckpt" / name, tokenizer=tf.ByteTokenizer())
    # training.md trains from it on its 2048-token BPE data
    tf.TokenFormer(tf.Config.from_name("tiny", vocab_size=2048)).save_pretrained(root / "ckpt" / "grown")
    from PIL import Image

    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):  # images to caption
        Image.new("RGB", (32, 32), colour).save(root / name)
    # the official files: a tiny model in the GPT-NeoX layout, its .yml, a tokenizer.json
    official = tf.Config.from_name("tiny", vocab_size=50277)
    torch.save(tf.export_official(tf.TokenFormer(official)), root / "pytorch_model.bin")
    fields = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "qkv_slot_num", "proj_slot_num",
              "ffn_slot_num")
    (root / "150M_eval.yml").write_text(json.dumps({k.replace("_", "-"): getattr(official, k) for k in fields}))
    tf.ByteTokenizer().save(root / "tokenizer.json")
    import zstandard
    from datasets import Dataset

    for name in ("00", "01"):
        (root / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            (root / "corpus.jsonl").read_bytes()))
    Dataset.from_dict({"text": [code] * 8}).save_to_disk(str(root / "saved_dataset_dir"))
    return root


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def clear_premade_output(argv: list[str]) -> None:
    """A page's command runs on a fresh output: the workspace made some by hand for later commands,
    and pages show alternatives that write the same output (the write door refuses to replace an
    output without --overwrite, which the pages do not need to show)."""
    from tokenformer.__main__ import OUTPUTS, build_parser

    if not argv or argv[0] not in OUTPUTS:
        return
    try:
        target = getattr(build_parser().parse_args(argv), OUTPUTS[argv[0]].option, None)
    except SystemExit:
        return
    if target is not None and Path(target).is_dir():
        shutil.rmtree(target)
    elif target is not None and Path(target).is_file():
        Path(target).unlink()


@pytest.mark.parametrize("document", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_of_the_docs_runs(document, docs_workspace, tmp_path, monkeypatch, capsys):
    from tokenformer.__main__ import main

    blocks = [b for b in command_blocks(document.read_text()) if not b[2]]
    if not blocks:
        pytest.skip(f"{document.name} has no command block to run")
    workspace = tmp_path / "w"
    shutil.copytree(docs_workspace, workspace)
    if fast_argv(blocks[0][1][0])[:3] == ["prepare", "--out", "runs/demo/data"]:
        shutil.rmtree(workspace / "runs" / "demo" / "checkpoints")  # a page that starts the demo from scratch
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for line, commands, _ in blocks:
        for command in commands:
            clear_premade_output(fast_argv(command))
            code = main(fast_argv(command))
            err = capsys.readouterr().err
            assert code == 0, f"{document.name} line {line}: `{command}` failed: {err.strip()[-500:]}"


def test_the_readme_shows_what_make_demo_runs_and_prints():
    import yaml

    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    steps = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["train_iters"]
    assert f"`configs/demo.yaml` ({steps} steps" in readme
    prompt = re.search(r"^DEMO_PROMPT := (.*)$", makefile, flags=re.MULTILINE).group(1).replace("\\n", "\n")
    sample = readme.split("What it printed:\n\n```\n", 1)[1].split("```", 1)[0]
    assert sample.startswith(prompt) and len(sample.splitlines()) > 3  # the sample as printed, prompt first
    assert "--max-new-tokens 100" in makefile and "samples 100 tokens" in readme
