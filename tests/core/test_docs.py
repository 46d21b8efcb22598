"""The docs stay true: every command and profile they name exists, and the README keeps its two set-up commands."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from glmsetup import profiles
from glmsetup.cli import main

from ..conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def verbs_in(text: str) -> set[tuple[str, ...]]:
    found = set()
    code = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
    for line in re.findall(r"(?m)^\s*(?:\$ )?glmsetup ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", code):
        found.add(tuple(line.split()))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_named_in_docs_exist(doc):
    runner = CliRunner()
    for words in verbs_in(doc.read_text(encoding="utf-8")):
        result = runner.invoke(main, [words[0], "--help"])
        assert result.exit_code == 0, f"{doc.name} names `glmsetup {words[0]}`, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_profiles_named_in_docs_exist(doc):
    known = set(profiles.profile_files()) | {"auto", "P", "NAME"}
    for name in re.findall(r"--profile[ =]([A-Za-z0-9_.-]+)", doc.read_text(encoding="utf-8")):
        if not name.endswith(".toml"):
            assert name in known, f"{doc.name} names profile {name!r}, which does not exist"


def test_readme_has_exactly_the_two_setup_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert [b.strip() for b in blocks] == [
        "python -m venv .venv && . .venv/bin/activate\n"
        "pip install torch --index-url https://download.pytorch.org/whl/cpu   # the CPU build: about 200 MB\n"
        'pip install ".[all]"\n'
        "glmsetup doctor",
        "scripts/test.sh",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("scripts/test.sh")


def test_one_torch_install_story():
    """README, tutorial, doctor and scripts/test.sh give the same CPU torch line (PyPI's default Linux
    torch is the multi-GB CUDA build, which the README's old `pip install torch==2.13.0` pulled)."""
    from glmsetup.doctor.torch_wheels import install_command
    from glmsetup.errors import EXTRAS_HINT

    cpu_line, _why = install_command("Linux", None, False)
    assert cpu_line == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    for page in ("README.md", "docs/tutorial.md"):
        assert cpu_line in (ROOT / page).read_text(encoding="utf-8"), page
    assert cpu_line in EXTRAS_HINT["runtime"]
    index = cpu_line.split("--index-url ", 1)[1]
    assert f"GLMSETUP_TORCH_INDEX:-{index}" in (ROOT / "scripts" / "test.sh").read_text()


def test_readme_profile_table_matches_the_estimator():
    from glmsetup import requirements

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"(?m)^\| ([a-z0-9-]+) \| [^|]+ \| ([0-9.]+) (?:\+ [0-9.]+ )?GB", text)
    assert len(rows) >= 8
    for name, gb in rows:
        total = requirements.estimate(profiles.load(name), 2048)
        first = total.per_device[0] if total.per_device else total.total
        assert abs(first / 1e9 - float(gb)) < 0.06, (name, gb, first / 1e9)


def test_test_files_named_in_docs_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for path in re.findall(r"tests/[\w/]+\.py", doc.read_text(encoding="utf-8")):
            assert (ROOT / path).is_file(), f"{doc.relative_to(ROOT)} names {path}, which does not exist"
