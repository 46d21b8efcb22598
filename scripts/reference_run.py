#!/usr/bin/env python
"""Run a new user's first hour for real and write it to docs/tutorial-reference-run.md.

The journey of tests/journey/journey.py (the wheel into a fresh venv, then doctor, selftest, fetch from
a loopback hub, verify, estimate, run api with the openai client, run web in headless Chromium), in
a temporary folder; the transcript and a screenshot of the web page go to docs/. Takes a few minutes.

    .venv/bin/python scripts/reference_run.py            # writes docs/tutorial-reference-run.md
    .venv/bin/python scripts/reference_run.py --check    # runs it, writes nothing, exit 1 if a step failed
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.journey.journey import FirstHour, transcript  # noqa: E402

DOC = ROOT / "docs" / "tutorial-reference-run.md"
SCREENSHOT = ROOT / "docs" / "tutorial-reference-run.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run the journey, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="first-hour-") as tmp:
        shot = None if args.check else Path(tmp) / "page.png"
        hour = FirstHour(Path(tmp) / "run", log=lambda line: print(line, flush=True), screenshot=shot)
        steps = hour.go()
        failed = [s.title for s in steps if s.rc != 0]
        if not args.check:
            text = transcript(steps, python=platform.python_version())
            if shot is not None and shot.is_file():
                SCREENSHOT.write_bytes(shot.read_bytes())
                text += f"\nThe page after that answer:\n\n![the web page]({SCREENSHOT.name})\n"
            DOC.write_text(text, encoding="utf-8")
            print(f"wrote {DOC.relative_to(ROOT)} ({len(steps)} steps)")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
