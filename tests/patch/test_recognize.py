"""Demos are recognised by their content, whatever their name."""
from __future__ import annotations

import pytest

from glmsetup.patch.recognize import kind_of

from .conftest import FIXTURES

EXPECTED = {
    "cli_demo.py": "cli", "web_demo.py": "gradio", "web_demo2.py": "streamlit", "api.py": "api",
    "openai_api.py": "openai-api", "utils.py": "utils",
    "variants/cli_demo_edited.py": "cli", "variants/web_demo_gradio4.py": "gradio",
    "variants/old_web_demo2.py": "streamlit", "variants/api_patched_by_hand.py": "api",
    "variants/cli_demo_broken.py": "cli", "variants/not_a_demo.py": None,
}


@pytest.mark.parametrize("name,kind", sorted(EXPECTED.items()))
def test_kind_by_content(name, kind):
    assert kind_of((FIXTURES / name).read_text(encoding="utf-8")) == kind


def test_name_does_not_matter(tmp_path):
    text = (FIXTURES / "web_demo2.py").read_text()
    assert kind_of(text) == "streamlit"
    assert kind_of(text.replace("streamlit", "streamlet")) is None  # what decides is the import, not the file name


def test_unrelated_fastapi_app_is_not_a_demo():
    assert kind_of("from fastapi import FastAPI\napp = FastAPI()\n@app.get('/')\ndef root():\n    return 1\n") is None
