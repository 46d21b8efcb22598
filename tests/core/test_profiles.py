"""Profiles: built-ins resolve, user profiles override and inherit, bad files are clear errors."""
from __future__ import annotations

import pytest

from glmsetup import profiles
from glmsetup.errors import ProfileError

REQUIRED = ["cpu", "cpu-bf16", "cpu-int8", "cuda-fp16", "cuda-int8", "cuda-int4", "mps", "multi-gpu"]


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_profiles_resolve(name):
    p = profiles.load(name)
    assert p.name == name
    assert p.server.host == "127.0.0.1"
    assert p.generation.max_length == 8192 and p.generation.top_p == 0.8


def test_inheritance_applies_parent_values():
    p = profiles.load("cuda-int4")
    assert (p.device, p.dtype, p.quantization_bits, p.backend) == ("cuda", "float16", 4, "native")
    assert p.inherits == "cuda-fp16"
    assert profiles.load("multi-gpu").num_gpus == 2
    assert profiles.load("cpu").precision == "fp32"


def write_user_profile(home, name, text):
    folder = home / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_user_profile_inherits_builtin(glmsetup_home):
    write_user_profile(glmsetup_home, "laptop", 'inherits = "cuda-int4"\n[generation]\ntemperature = 0.3\n')
    p = profiles.load("laptop")
    assert p.quantization_bits == 4 and p.generation.temperature == 0.3 and p.generation.top_p == 0.8
    assert "laptop" in profiles.profile_files()


def test_user_profile_can_refine_builtin_of_same_name(glmsetup_home):
    write_user_profile(glmsetup_home, "cpu", 'inherits = "cpu"\n[server]\napi_port = 9000\n')
    p = profiles.load("cpu")
    assert p.server.api_port == 9000 and p.dtype == "float32"


@pytest.mark.parametrize("text, key, allowed", [
    ('device = "cpu"\ncolour = "red"\n', "colour", "allowed keys"),
    ('device = "tpu"\n', "device", "'cpu', 'cuda', 'mps'"),
    ('quantization_bits = "4"\n', "quantization_bits", "0, 4, 8"),
    ('[generation]\ntop_k = 3\n', "generation.top_k", "max_length"),
    ('[generation]\ntemperature = "hot"\n', "generation.temperature", "temperature = 0.8"),
    ('device = "mps"\ndtype = "float16"\nquantization_bits = 4\n', "quantization_bits", "mps"),
    ('device = "cpu"\ndtype = "float16"\n', "dtype", "bfloat16"),
    ('device = "cpu"\nbackend = "official"\nquantization_bits = 8\n', "quantization_bits", "native"),
    ('device = "cuda"\ndtype = "float16"\nnum_gpus = 0\n', "num_gpus", "num_gpus = 1"),
    ('[generation]\nrepetition_penalty = 0.2\n', "generation.repetition_penalty", "1.0 means off"),
])
def test_bad_profile_names_file_key_and_allowed(glmsetup_home, text, key, allowed):
    path = write_user_profile(glmsetup_home, "bad", text)
    with pytest.raises(ProfileError) as info:
        profiles.load("bad")
    err = info.value
    assert str(path) in err.message and key in err.message
    assert allowed in (err.hint or "") + err.message


def test_not_toml_and_loops_and_unknown(glmsetup_home):
    write_user_profile(glmsetup_home, "broken", "device = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        profiles.load("broken")
    write_user_profile(glmsetup_home, "a", 'inherits = "b"\n')
    write_user_profile(glmsetup_home, "b", 'inherits = "a"\n')
    with pytest.raises(ProfileError, match="loops"):
        profiles.load("a")
    with pytest.raises(ProfileError) as info:
        profiles.load("nope")
    assert "cuda-int4" in info.value.hint


def test_profile_from_file_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('inherits = "cpu-int8"\n[server]\nweb_port = 7000\n')
    p = profiles.resolve(str(path))
    assert p.name == "mine" and p.quantization_bits == 8 and p.server.web_port == 7000


def test_cli_profiles_list_and_show(cli):
    doc = cli.json("profiles")
    names = [row["name"] for row in doc["data"]]
    assert set(REQUIRED) <= set(names)
    shown = cli.json("profiles", "show", "cuda-int8")
    assert shown["data"]["quantization_bits"] == 8
    result = cli("profiles", "show", "nope")
    assert result.exit_code == 2 and "unknown profile" in result.stderr and "hint:" in result.stderr


def test_cli_profiles_show_prints_section_names(cli):
    result = cli("profiles", "show", "cpu-int4")
    assert result.exit_code == 0
    assert "[generation]" in result.stdout and "[server]" in result.stdout


def test_cli_profiles_json_bytes_are_whole_numbers(cli):
    for row in cli.json("profiles")["data"]:
        assert type(row["needs_bytes"]) is int and all(type(b) is int for b in row["per_device_bytes"])


def test_cli_profiles_names_the_real_folder_for_own_profiles(cli, glmsetup_home):
    assert f"your own go in {glmsetup_home / 'profiles'}/*.toml" in cli("profiles").stdout
