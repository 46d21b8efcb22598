"""Profiles are untrusted files: every number is bounded, texts are capped, files are size-capped,
inheritance is bounded, and one broken file of a user's never stops the others from working."""
from __future__ import annotations

import json
import os

import pytest

from glmsetup import profiles
from glmsetup.errors import ProfileError


def write(home, name, text):
    folder = home / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused(name="bad"):
    with pytest.raises(ProfileError) as info:
        profiles.load(name)
    err = info.value
    assert err.exit_code == 2 and "\n" not in err.message
    return err


@pytest.mark.parametrize("text, key, needle", [
    ('device = "cuda"\ndtype = "float16"\nnum_gpus = 1000000000000\n', "num_gpus", "1..16"),
    ('device = "cuda"\ndtype = "float16"\nnum_gpus = 17\n', "num_gpus", "1..16"),
    ("[generation]\ntemperature = nan\n", "generation.temperature", "finite"),
    ("[generation]\ntemperature = inf\n", "generation.temperature", "finite"),
    ("[generation]\ntemperature = 3.0\n", "generation.temperature", "0..2"),
    ("[generation]\ntemperature = " + "9" * 400 + "\n", "generation.temperature", "0..2"),
    ("[generation]\nrepetition_penalty = inf\n", "generation.repetition_penalty", "finite"),
    ("[generation]\nrepetition_penalty = 1e308\n", "generation.repetition_penalty", "0.5..2"),
    ("[generation]\ntop_p = -inf\n", "generation.top_p", "finite"),
    ("[generation]\nmax_length = " + "9" * 400 + "\n", "generation.max_length", "1..32768"),
    ("[server]\napi_port = " + "9" * 30 + "\n", "server.api_port", "1..65535"),
    ('description = "' + "x" * 5000 + '"\n', "description", "at most 300"),
    ('description = "\\u001b[2J\\u001b[31mred"\n', "description", "control characters"),
    ('description = """two\nlines"""\n', "description", "control characters"),
    ('[server]\nhost = "' + "h" * 300 + '"\n', "server.host", "at most 253"),
    ('[server]\nhost = "127.0.0.1 --reload"\n', "server.host", "not a host name"),
    ('inherits = "../../etc/passwd"\n', "inherits", "not a profile name"),
])
def test_out_of_range_values_are_refused(glmsetup_home, text, key, needle):
    path = write(glmsetup_home, "bad", text)
    err = refused()
    assert str(path) in err.message and f"'{key}'" in err.message
    assert needle in err.message
    assert len(err.message) < 400  # the value is shown shortened, never a flood


def test_values_at_the_bounds_are_accepted(glmsetup_home):
    write(glmsetup_home, "edge", 'inherits = "cuda-fp16"\nnum_gpus = 16\n[generation]\ntemperature = 2.0\n'
                                 "top_p = 1.0\nrepetition_penalty = 0.5\nmax_length = 32768\n"
                                 '[server]\napi_port = 65535\nweb_port = 1\nhost = "::1"\n')
    p = profiles.load("edge")
    assert (p.num_gpus, p.generation.temperature, p.generation.max_length, p.server.api_port) == (16, 2.0, 32768, 65535)


def test_huge_num_gpus_is_refused_before_any_estimate(glmsetup_home, cli):
    write(glmsetup_home, "many", 'inherits = "cuda-fp16"\nnum_gpus = 1000000000000\n')
    result = cli("estimate", "--profile", "many")
    assert result.exit_code == 2
    assert "'num_gpus' must be within 1..16" in result.stderr and "hint:" in result.stderr


@pytest.mark.parametrize("data, needle", [
    (b"# padding\n" * 10000, "larger than 64 KiB"),
    (b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply"),
    (b'description = "\xff\xfe"\n', "not UTF-8"),
])
def test_unreadable_files_are_refused(glmsetup_home, data, needle):
    write(glmsetup_home, "bad", data)
    assert needle in refused().message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_not_waited_on(glmsetup_home):
    folder = glmsetup_home / "profiles"
    folder.mkdir()
    os.mkfifo(folder / "bad.toml")
    assert "not a regular file" in refused().message


def test_inheritance_depth_is_capped(glmsetup_home):
    for i in range(11):
        write(glmsetup_home, f"p{i}", f'inherits = "p{i + 1}"\n')
    write(glmsetup_home, "p11", 'inherits = "cpu"\n')
    err = refused("p0")
    assert f"more than {profiles.MAX_DEPTH} profiles deep" in err.message and "p0 -> p1" in err.message
    # A chain of MAX_DEPTH files resolves (p4 .. p11 + cpu = 9 files is one too many; p5 .. cpu is 8).
    assert profiles.load("p5").device == "cpu"
    refused("p4")


def test_a_long_chain_never_recurses_out(glmsetup_home):
    for i in range(1100):
        write(glmsetup_home, f"q{i}", f'inherits = "q{i + 1}"\n')
    write(glmsetup_home, "q1100", 'inherits = "cpu"\n')
    assert "deep" in refused("q0").message


def test_cycles_are_refused(glmsetup_home):
    write(glmsetup_home, "a", 'inherits = "b"\n')
    write(glmsetup_home, "b", 'inherits = "c"\n')
    write(glmsetup_home, "c", 'inherits = "a"\n')
    write(glmsetup_home, "self", 'inherits = "self"\n')
    assert "loops: a -> b -> c -> a" in refused("a").message
    assert "loops" in refused("self").message


def test_refining_a_builtin_keeps_the_builtins_own_chain(glmsetup_home):
    # The user's cpu-int4 refines the built-in cpu-int4, which inherits cpu-bf16 -> cpu.
    write(glmsetup_home, "cpu-int4", 'inherits = "cpu-int4"\n[server]\napi_port = 9100\n')
    p = profiles.load("cpu-int4")
    assert (p.device, p.dtype, p.quantization_bits, p.server.api_port) == ("cpu", "bfloat16", 4, 9100)


# -- one broken file never breaks the others -----------------------------------------------------------

BROKEN = "device = \n"


def test_load_all_skips_a_broken_user_profile_with_a_warning(glmsetup_home, capsys):
    path = write(glmsetup_home, "bad", BROKEN)
    names = [p.name for p in profiles.load_all()]
    assert "bad" not in names and "cpu" in names and "cuda-int4" in names
    err = capsys.readouterr().err
    assert "warning:" in err and str(path) in err and "not valid TOML" in err


def test_a_broken_override_of_a_builtin_falls_back_to_the_builtin(glmsetup_home, capsys):
    path = write(glmsetup_home, "cpu", BROKEN)
    by_name = {p.name: p for p in profiles.load_all()}
    assert by_name["cpu"].source.endswith("glmsetup/profiles/cpu.toml")
    assert by_name["cuda-fp16"].device == "cuda"  # inherits cpu: the built-in one is used
    assert str(path) in capsys.readouterr().err
    refused("cpu")  # asked for by name: the clear error


def test_cli_profiles_lists_the_others(cli, glmsetup_home):
    path = write(glmsetup_home, "bad", BROKEN)
    result = cli("profiles", "--json")
    assert result.exit_code == 0, result.stderr
    names = [row["name"] for row in json.loads(result.stdout)["data"]]
    assert "cpu" in names and "bad" not in names
    assert f"warning: skipped profile 'bad': {path}" in result.stderr
    shown = cli("profiles", "show", "bad")
    assert shown.exit_code == 2 and str(path) in shown.stderr and "not valid TOML" in shown.stderr


def test_cli_estimate_with_a_broken_override_of_its_parent(cli, glmsetup_home):
    path = write(glmsetup_home, "cpu", BROKEN)  # cuda-fp16 inherits cpu
    result = cli("estimate", "--profile", "cuda-fp16", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["data"]["profile"] == "cuda-fp16"
    assert str(path) in result.stderr and "warning:" in result.stderr
    asked = cli("estimate", "--profile", "cpu")
    assert asked.exit_code == 2 and str(path) in asked.stderr and "Traceback" not in asked.stderr


def test_cli_doctor_with_a_broken_user_profile(cli, glmsetup_home):
    path = write(glmsetup_home, "bad", BROKEN)
    result = cli("doctor", "--json")
    assert result.exit_code in (0, 1), result.stdout
    doc = json.loads(result.stdout)
    assert doc["error"] is None and doc["data"]["verdict"]
    assert str(path) in result.stderr


def test_cli_run_auto_with_a_broken_user_profile(cli, glmsetup_home, tiny_model_dir):
    path = write(glmsetup_home, "bad", BROKEN)
    result = cli("run", "api", "--model", str(tiny_model_dir), "--dry-run", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["data"]["profile"]["name"] != "bad"
    assert str(path) in result.stderr
    asked = cli("run", "api", "--model", str(tiny_model_dir), "--profile", "bad", "--dry-run")
    assert asked.exit_code == 2 and str(path) in asked.stderr


def test_a_file_name_that_is_no_profile_name_is_skipped(glmsetup_home, capsys):
    write(glmsetup_home, "my laptop", 'inherits = "cpu"\n')
    assert "my laptop" not in profiles.profile_files()
    assert "not a profile name" in capsys.readouterr().err


def test_an_override_that_is_no_valid_profile_is_not_inherited(glmsetup_home, capsys):
    # Each line alone is fine, together they are impossible: the user's cpu is skipped everywhere.
    path = write(glmsetup_home, "cpu", "num_gpus = 3\n")
    by_name = {p.name: p for p in profiles.load_all()}
    assert by_name["cpu"].num_gpus == 1 and by_name["cuda-int8"].num_gpus == 1 and by_name["mps"].device == "mps"
    err = capsys.readouterr().err
    assert f"skipped {path}: 'num_gpus'" in err and "using the built-in 'cpu'" in err
    assert "cuda-int8" not in err  # the children are not blamed for their parent
    assert profiles.load("cuda-fp16").num_gpus == 1
