"""Fixtures of the patch tests: look-alike copies of the official demos, and a planner."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
VARIANTS = FIXTURES / "variants"
GOLDEN = HERE / "golden"
DEMOS = ("cli_demo.py", "web_demo.py", "web_demo2.py", "api.py", "openai_api.py")
MODEL = "/models/chatglm2-6b"


@pytest.fixture
def demo_dir(tmp_path) -> Path:
    """A fresh copy of the six official-looking files (five demos + utils.py)."""
    dest = tmp_path / "ChatGLM2-6B"
    dest.mkdir()
    for f in FIXTURES.glob("*.py"):
        shutil.copy(f, dest / f.name)
    return dest


def context(profile: str = "cpu", loader: str = "glmsetup", listen: bool = False, model: str = MODEL):
    from glmsetup import profiles
    from glmsetup.patch.engine import Context

    return Context(model_path=model, profile_arg=profile, profile=profiles.resolve(profile), loader=loader,
                   listen=listen)


def plan(source: bytes | str, *, name: str = "demo.py", only=None, **ctx_kw):
    """Run the rule set of the file's kind over `source` (nothing is written)."""
    from glmsetup.patch import engine, recognize
    from glmsetup.patch.rulesets import RULE_SETS

    data = source.encode() if isinstance(source, str) else source
    kind = recognize.kind_of(data.decode("utf-8", errors="replace"))
    assert kind is not None, f"{name} not recognised"
    return engine.plan_file(Path(name), data, kind, RULE_SETS[kind], context(**ctx_kw),
                            set(only) if only else None)


def statuses(p) -> dict:
    return {r.rule: r.status for r in p.results}
