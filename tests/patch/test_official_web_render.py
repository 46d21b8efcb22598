"""The patched official web_demo.py, run as users run it, without mdtex2html: Gradio renders the LaTeX."""
from __future__ import annotations

import os
import time

import pytest

from .test_patched_demos_run import Server, patched  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]
gr = pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("GLMSETUP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_patched_web_demo_runs_without_mdtex2html_and_renders_latex(patched, tmp_path, monkeypatch):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}")
    demos, _profile = patched
    absent = tmp_path / "absent"  # what a fresh `pip install "glmsetup[all]"` has: no mdtex2html
    absent.mkdir()
    (absent / "mdtex2html.py").write_text("raise ImportError('No module named mdtex2html')\n")
    monkeypatch.setenv("PYTHONPATH", str(absent))
    monkeypatch.setenv("BROWSER", "true")  # the demo's inbrowser=True opens nothing
    server = Server(demos / "web_demo.py")
    try:
        server.wait("/")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.port}/")
                page.wait_for_selector("textarea", timeout=30000)
                page.fill("textarea", "Euler: $$e^{i\\pi} + 1 = 0$$")
                page.get_by_role("button", name="Submit").click()
                user = page.locator('[data-testid="user"]').first
                user.wait_for(timeout=30000)
                deadline = time.monotonic() + 20
                while user.locator(".katex").count() == 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert user.locator(".katex").count() >= 1, user.inner_html()
                text = page.inner_text("body")
                assert "formula incomplete" not in text and "<math" not in user.inner_text()
            finally:
                browser.close()
    finally:
        out = server.stop()
    assert "Traceback" not in out, out
