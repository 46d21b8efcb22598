"""Conventions every verb follows: help with examples, --json envelopes, exit codes, docs in sync."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from glmsetup import errors
from glmsetup.cli import COMMANDS, main

from ..conftest import ROOT, run_glmsetup


def all_commands():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_cli_docs

    return [(path, cmd) for path, cmd in gen_cli_docs.walk(main, ["glmsetup"]) if len(path) > 1]


def test_every_command_has_examples_and_json():
    cmds = all_commands()
    assert len(cmds) >= 3
    for path, cmd in cmds:
        help_text = cmd.help or ""
        assert "Examples:" in help_text, f"{' '.join(path)} has no examples in its help"
        if not getattr(cmd, "invoke_without_command", True) is False:
            names = {p.name for p in cmd.params}
            assert "json_mode" in names, f"{' '.join(path)} has no --json"


def test_help_names_the_state_folder_one_way():
    for path, cmd in all_commands():
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            assert not re.search(r"(?<![$\w])GLMSETUP_HOME", text), f"{' '.join(path)}: write $GLMSETUP_HOME in {text!r}"


def test_cli_reference_is_generated_from_help():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + "\nrun: python scripts/gen_cli_docs.py"


def test_exit_codes_documented():
    doc = (ROOT / "docs" / "reference" / "exit-codes.md").read_text()
    for code in errors.EXIT_CODES:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"exit code {code} missing from exit-codes.md"


def test_json_envelope_contract(cli):
    """The envelope's keys and types are a public contract (docs/reference/json.md)."""
    ok = cli.json("profiles", "show", "cpu")
    assert set(ok) == {"schema", "command", "version", "ok", "data", "error"}
    assert ok["schema"] == "glmsetup/1" and ok["command"] == "profiles show" and ok["ok"] is True
    assert ok["error"] is None and isinstance(ok["data"], dict)
    bad = cli("estimate", "--profile", "nope", "--json")
    assert bad.exit_code == 2
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["data"] is None and doc["command"] == "estimate"
    assert set(doc["error"]) == {"code", "message", "hint", "exit_code", "details"}
    assert doc["error"]["exit_code"] == 2 and doc["error"]["code"] == "profile"


@pytest.mark.parametrize("args, command", [
    (["estimate", "--json", "--context", "0"], "estimate"),
    (["profiles", "show", "--json"], "profiles show"),
    (["run", "chat", "--json"], "run"),
])
def test_bad_options_under_json_still_give_one_envelope(cli, args, command):
    result = cli(*args)
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["command"] == command and doc["error"]["code"] == "usage"
    assert doc["error"]["hint"] == f"glmsetup {command} --help lists the options"


def test_an_error_is_two_whole_lines_at_80_columns(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / ("a-long-folder-name-" * 4) / "chatglm2-6b"
    result = cli("verify", str(folder))
    assert result.exit_code == 4
    assert result.stderr.splitlines() == [f"error: no model folder at {folder}",
                                          f"hint: glmsetup fetch --model-dir {folder}"]


def test_version_and_module_entry_point():
    result = run_glmsetup("--version")
    assert result.returncode == 0 and "0.1.0" in result.stdout


def test_cli_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom glmsetup.cli import main\n"
            "r = CliRunner().invoke(main, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "for v in ['profiles', 'estimate']:\n    CliRunner().invoke(main, [v, '--help'])\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_no_traceback_on_error_and_debug_shows_it():
    result = run_glmsetup("profiles", "show", "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "hint:" in result.stderr
    debug = run_glmsetup("profiles", "show", "nope", env={"GLMSETUP_DEBUG": "1"})
    assert "Traceback" in debug.stderr
