"""The first hour of a new user, end to end: wheel, fresh venv, then every step of the tutorial.

Each assertion names a stumble a new user met: a child process importing the clone instead of the
installed package, a doctor that goes green before the extras are there, Enter that does not send,
defaults that differ between the banner and the page, usage that counts more than max_tokens, a
traceback or Gradio's share=True advice in the terminal. scripts/reference_run.py writes the same
journey to docs/tutorial-reference-run.md.
"""
from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

pytest.importorskip("openai")
pytest.importorskip("playwright.sync_api")
pytest.importorskip("torch")

from tests.journey.journey import CHROMIUM, FirstHour, dump  # noqa: E402


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt install chromium; .ci/run installs it)")
    hour = FirstHour(tmp_path_factory.mktemp("first-hour"))
    try:
        steps = hour.go()
    except Exception as exc:  # say where it stopped, with everything printed so far
        raise AssertionError(f"the journey stopped: {exc!r}\n{dump(hour.steps)[-6000:]}") from exc
    yield hour, {s.title: s for s in steps}
    hour.cleanup()


def test_every_step_succeeds_without_a_traceback(journey):
    _hour, steps = journey
    for step in steps.values():
        assert step.rc == 0, (step.title, step.shown, step.text[-3000:])
        for bad in ("Traceback", "set `share=True`", "cannot import name", "Error: "):
            assert bad not in step.text, (step.title, bad, step.text[-3000:])


def test_first_commands_read_right(journey):
    hour, steps = journey
    assert steps["No arguments: the help"].out.startswith("Usage: glmsetup")
    doctor = steps["Check the machine"].out
    assert "Next:" in doctor and f"glmsetup run web --profile {hour.profile}" in doctor
    assert 'pip install "glmsetup[web]"' not in doctor  # [all] brought it
    assert " 1 warnings" not in doctor
    selftest = steps["Prove the install with a tiny model"].text
    for front in ("cli (pipe)", "api (HTTP, both protocols)", "web (Gradio predict)", "streamlit (AppTest)"):
        assert front in selftest, selftest
    assert "skipped" not in selftest and "fail" not in selftest.lower().replace("failed: 0", ""), selftest
    assert steps["Check them file by file"].rc == 0
    estimate = steps["What the recommended profile needs"].out
    assert estimate.startswith(hour.profile), estimate  # the profile doctor recommends, not cuda-fp16


def test_the_api_answers_the_openai_client_within_max_tokens(journey):
    _hour, steps = journey
    api = steps["Serve the OpenAI-compatible API"]
    usage = api.extra["plain"]["usage"]
    assert 1 <= usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 0
    assert 1 <= api.extra["stream_usage"]["completion_tokens"] <= 8 and api.extra["chunks"] >= 3
    assert "Uvicorn running" in api.err or "127.0.0.1" in api.err


def test_the_web_page_sends_on_enter_with_the_profile_defaults(journey):
    from glmsetup import profiles

    hour, steps = journey
    web = steps["Chat in the browser"]
    gen = profiles.load(hour.profile).generation
    page = web.extra
    assert page["user"].strip() == "你好" and page["box_after"] == ""
    assert "tokens/s" in page["stats"]
    tokens = int(page["stats"].split()[0])
    assert 1 <= tokens <= 64
    assert float(page["sliders"]["temperature"]) == gen.temperature and page["temperature_max"] == "2"
    assert float(page["sliders"]["top-p"]) == gen.top_p
    assert f"temperature {gen.temperature}" in web.err  # the banner says what the page shows
    assert "web page ready: http://127.0.0.1:" in web.err and "Closing server" not in web.text
