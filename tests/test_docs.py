"""The documents a user reads: the README's Python example runs, every relative link in the README
and the docs resolves, and the generated reference matches the code."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
