"""The memory figures the docs quote are the estimator's (`glmsetup estimate`), to the digits they show."""
from __future__ import annotations

import re

import pytest

from glmsetup import profiles, requirements

from ..conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GB = re.compile(r"(\d+(?:\.\d+)?) GB")


def estimate_lines():
    """(page, line) of every `glmsetup estimate --profile P ...  # ... N GB ...` example."""
    for page in PAGES:
        for line in page.read_text(encoding="utf-8").splitlines():
            if "glmsetup estimate" in line and "--profile" in line and "#" in line and GB.search(line):
                yield page.name, line


def matches(figure: str, value_bytes: float) -> bool:
    """`figure` ("6.00", "7.5", "8") is value_bytes in GB, rounded to the digits the figure shows."""
    digits = len(figure.split(".")[1]) if "." in figure else 0
    return f"{value_bytes / 1e9:.{digits}f}" == figure


@pytest.mark.parametrize("page, line", list(estimate_lines()))
def test_estimate_examples_quote_the_tool(page, line):
    command, comment = line.split("#", 1)
    profile = re.search(r"--profile (\S+)", command).group(1)
    found = re.search(r"--context (\d+)", command)
    context = int(found.group(1)) if found else 2048
    names = sorted((p.name for p in profiles.load_all()), key=len, reverse=True)
    est = requirements.estimate(profiles.load(profile), context)
    figures = GB.findall(comment)
    if est.per_device:  # "per card: 7.5 GB on the first, 6.4 GB on the second"
        assert len(figures) == len(est.per_device), line
        for figure, value in zip(figures, est.per_device):
            assert matches(figure, value), (page, line, [round(v / 1e9, 2) for v in est.per_device])
        return
    for part in re.split(r";", comment):  # "6.00 GB; cuda-int8 needs 8.85 GB": a named profile owns its part
        named = next((n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", part)), profile)
        value = requirements.estimate(profiles.load(named), context).total
        for figure in GB.findall(part):
            assert matches(figure, value), (page, line, named, round(value / 1e9, 2))


def test_readme_profile_table_quotes_the_tool():
    names = {p.name for p in profiles.load_all()}
    rows = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and " GB" in line and line.split("|")[1].strip() in names]
    assert {row.split("|")[1].strip() for row in rows} == names  # every profile, the official ones too
    for row in rows:
        name, _runs_on, memory = [cell.strip() for cell in row.strip("|").split("|")]
        est = requirements.estimate(profiles.load(name), 2048)
        figures = re.findall(r"(\d+(?:\.\d+)?)", memory)  # "26.1 GB RAM", "7.5 + 6.4 GB VRAM"
        values = est.per_device or [est.total]
        assert len(figures) == len(values) and all(matches(f, v) for f, v in zip(figures, values)), (row, values)


def test_the_old_howto_figures_would_fail():
    """5.3 GB for cuda-int4 at 8192 tokens was what docs/howto.md said; the tool says 6.00 GB."""
    value = requirements.estimate(profiles.load("cuda-int4"), 8192).total
    assert not matches("5.3", value) and matches("6.00", value)
