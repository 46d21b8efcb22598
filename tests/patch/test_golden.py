"""Golden diffs: each rule on each official-looking demo, alone (GLMSETUP_UPDATE_GOLDEN=1 rewrites them)."""
from __future__ import annotations

import os

import pytest

from glmsetup.patch.diff import unified
from glmsetup.patch.engine import RULES

from .conftest import DEMOS, FIXTURES, GOLDEN, plan

CASES = [(demo, rule) for demo in DEMOS for rule in RULES] + [
    ("web_demo.py", "loader:official"), ("cli_demo.py", "loader:official-multi-gpu"),
    ("openai_api.py", "loader:official-int4"), ("api.py", "binding:listen"),
]


def _options(rule: str) -> dict:
    base, _, variant = rule.partition(":")
    kw = {"only": [base]}
    if variant == "official":
        kw.update(loader="official", profile="cuda-fp16")
    elif variant == "official-multi-gpu":
        kw.update(loader="official", profile="multi-gpu")
    elif variant == "official-int4":
        kw.update(loader="official", profile="cuda-int4")
    elif variant == "listen":
        kw.update(listen=True)
    return kw


@pytest.mark.parametrize("demo,rule", CASES)
def test_golden_diff(demo, rule):
    source = (FIXTURES / demo).read_bytes()
    p = plan(source, name=demo, **_options(rule))
    got = unified(demo, p.original, p.new)
    golden = GOLDEN / f"{demo[:-3]}__{rule.replace(':', '__')}.diff"
    if os.environ.get("GLMSETUP_UPDATE_GOLDEN") == "1":
        golden.write_text(got, encoding="utf-8")
    assert golden.exists(), f"missing {golden.name}: run with GLMSETUP_UPDATE_GOLDEN=1"
    assert got == golden.read_text(encoding="utf-8")
    (result,) = p.results
    if got:
        assert result.status == "applied" and result.changes, result
    else:
        assert result.status in ("already_applied", "not_applicable") and not result.changes, result
