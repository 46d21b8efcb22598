"""Table-driven: facts modelled on real machines -> the verdict, the statuses and the hints."""
from __future__ import annotations

import dataclasses

import pytest

from glmsetup.doctor import auto_profile
from glmsetup.doctor.report import diagnose
from glmsetup.doctor.facts import Git, ModelFolder, Torch

from . import machines as m


def run(facts, context=2048, model_dir="/home/me/.glmsetup/models/chatglm2-6b"):
    from pathlib import Path

    data = diagnose(Path(model_dir), facts=facts, context=context)
    return data, {c["id"]: c for c in data["checks"]}, {p["name"]: p for p in data["verdict"]["profiles"]}


# machine, best profile, {profile: fit}, {check id: status}, exit ok?
MACHINES = [
    (m.rtx2060_laptop, "cuda-int4", {"cuda-int4": "fits", "cuda-int8": "no", "cuda-fp16": "no", "cuda-bf16": "no"},
     {"nvidia": "ok", "gpus": "ok", "torch-cuda": "ok", "mps": "skipped"}, True),
    (m.rtx3070, "cuda-int4", {"cuda-int4": "fits", "cuda-int8": "tight", "cuda-fp16": "no"},
     {"gpus": "ok", "torch-cuda": "ok", "os": "ok"}, True),
    (m.rtx4090, "cuda-fp16", {"cuda-fp16": "fits", "cuda-bf16": "fits", "cuda-int4": "fits", "multi-gpu": "no"},
     {"torch-cuda": "ok"}, True),
    (m.two_12gb_cards, "multi-gpu", {"multi-gpu": "fits", "cuda-fp16": "no", "cuda-int8": "fits"},
     {"gpus": "ok", "accelerate": "ok"}, True),
    (m.m2_mac, "cpu-int8", {"mps": "tight", "cpu-int8": "fits", "cuda-int4": "no", "cpu": "no"},
     {"mps": "ok", "nvidia": "skipped", "torch-cuda": "skipped", "cpm-kernels": "skipped"}, True),
    (m.cpu_pc_16gb, "cpu-int8", {"cpu-int8": "fits", "cpu-bf16": "tight", "cpu": "no", "cuda-int4": "no"},
     {"ram": "ok", "nvidia": "skipped"}, True),
    (m.container_8gb, "cpu-int4", {"cpu-int4": "fits", "cpu-int8": "no", "cpu-bf16": "no"}, {"ram": "ok"}, True),
    (m.windows_no_lfs, "cuda-int8", {"cuda-int8": "fits", "cuda-fp16": "no", "cuda-int4": "fits"},
     {"git": "ok", "git-lfs": "warn"}, True),
]


@pytest.mark.parametrize("machine, best, fits, statuses, ok", MACHINES, ids=[x[0].__name__ for x in MACHINES])
def test_machine_verdict(machine, best, fits, statuses, ok):
    data, checks, profiles = run(machine())
    v = data["verdict"]
    assert v["best"] == best and v["recommended"] == best
    for name, fit in fits.items():
        assert profiles[name]["fit"] == fit, (name, profiles[name])
    for cid, status in statuses.items():
        assert checks[cid]["status"] == status, checks[cid]
    assert data["ok"] is ok and data["blocking"] == []
    assert v["next_commands"] == ["glmsetup fetch", f"glmsetup run web --profile {best}"]
    assert v["estimate"]["profile"] == best and v["estimate"]["bytes"]["total"] > 0
    assert auto_profile(facts=machine()).name == best


def test_ranking_prefers_full_precision_on_gpu_and_int8_on_cpu():
    _, _, profiles = run(m.rtx4090())
    order = [n for n, p in profiles.items() if p["fit"] == "fits"]
    assert order[:4] == ["cuda-fp16", "cuda-bf16", "cuda-int8", "cuda-int4"]
    _, _, profiles = run(m.cpu_pc_16gb())
    assert [n for n, p in profiles.items() if p["device"] == "cpu"][:2] == ["cpu-int8", "cpu-bf16"]


def test_bf16_needs_ampere():
    _, _, profiles = run(m.rtx2060_laptop())
    assert "compute capability 8.0" in profiles["cuda-bf16"]["reason"]


def test_rtx3070_int8_is_tight_with_advice():
    _, _, profiles = run(m.rtx3070())
    assert "close other GPU programs" in profiles["cuda-int8"]["reason"]


def test_two_cards_split_shares():
    data, _, profiles = run(m.two_12gb_cards())
    assert "GPU 1" in profiles["multi-gpu"]["reason"] and "GPU 0" in profiles["multi-gpu"]["reason"]
    assert len(data["verdict"]["estimate"]["per_device_total"]) == 2


def test_container_limit_is_honoured_and_shown():
    facts = m.container_8gb()
    assert facts.memory.effective_total == 8 * m.GiB
    _, checks, profiles = run(facts)
    assert "container limit" in checks["ram"]["summary"]
    assert "container limit" in profiles["cpu-int8"]["reason"]


def test_windows_without_git_lfs_hint():
    _, checks, _ = run(m.windows_no_lfs())
    assert "winget install GitHub.GitLFS" in checks["git-lfs"]["hint"]
    assert "pointer" in checks["git-lfs"]["evidence"][0]


def test_lfs_installed_but_not_initialised():
    facts = m.rtx4090()
    facts.git = Git(git="2.34.1", lfs="3.0.2", lfs_filter=False)
    _, checks, _ = run(facts)
    assert checks["git-lfs"]["status"] == "warn" and checks["git-lfs"]["hint"] == "git lfs install"


def test_long_context_changes_the_verdict():
    data, _, _ = run(m.rtx2060_laptop(), context=32768)
    assert data["verdict"]["best"] is None or data["verdict"]["best"].startswith("cpu")


# --- Software that blocks -------------------------------------------------------------------------------
def test_no_torch_blocks_and_names_the_wheel_for_the_driver():
    facts = m.rtx2060_laptop()
    facts.torch = Torch()
    facts.packages["torch"] = None
    data, checks, _ = run(facts)
    assert checks["torch"]["status"] == "fail"
    assert checks["torch"]["hint"] == "pip install torch --index-url https://download.pytorch.org/whl/cu121"
    assert data["ok"] is False and "torch" in data["blocking"]
    v = data["verdict"]
    assert v["best"] is None and v["recommended"] == "cuda-int4"
    assert v["next_commands"][0] == "pip install torch --index-url https://download.pytorch.org/whl/cu121"
    assert v["next_commands"][-1] == "glmsetup run web --profile cuda-int4"


def test_cpu_torch_on_a_gpu_machine():
    facts = m.rtx4090()
    facts.torch = Torch(version="2.4.1+cpu", cuda=None)
    data, checks, _ = run(facts)
    assert checks["torch-cuda"]["status"] == "fail"
    assert "cu124" in checks["torch-cuda"]["hint"] and checks["torch-cuda"]["hint"].startswith("pip uninstall -y torch")
    assert data["verdict"]["best"] == "cpu-int8" and data["verdict"]["recommended"] == "cuda-fp16"
    assert data["ok"] is False


def test_torch_newer_than_the_driver():
    facts = m.rtx2060_laptop()
    facts.nvidia.driver, facts.nvidia.cuda = "470.223.02", "11.4"
    facts.torch = Torch(version="2.1.2+cu121", cuda="12.1")
    _, checks, profiles = run(facts)
    assert checks["torch-cuda"]["status"] == "fail"
    assert "cu118" in checks["torch-cuda"]["hint"]
    assert "CUDA 12.1" in profiles["cuda-int4"]["blockers"][0]


def test_minor_version_compatibility_is_a_warning():
    facts = m.rtx2060_laptop()
    facts.torch = Torch(version="2.4.1+cu124", cuda="12.4")
    _, checks, _ = run(facts)
    assert checks["torch-cuda"]["status"] == "warn"


def test_old_transformers_runs_only_official_profiles():
    facts = m.rtx2060_laptop()
    facts.packages["transformers"] = "4.30.2"
    facts.packages["cpm-kernels"] = "1.0.11"
    data, checks, profiles = run(facts)
    assert checks["transformers"]["status"] == "warn"
    assert profiles["official-cuda-int4"]["runnable"] and not profiles["cuda-int4"]["runnable"]
    assert data["verdict"]["best"] == "official-cuda-int4"


def test_transformers_between_the_two_is_a_blocker():
    facts = m.cpu_pc_16gb()
    facts.packages["transformers"] = "4.43.4"
    data, checks, _ = run(facts)
    assert checks["transformers"]["status"] == "fail" and data["ok"] is False
    assert checks["transformers"]["hint"] == 'pip install -U "transformers>=4.46"'


@pytest.mark.parametrize("pkg, version, cid, status, words", [
    ("gradio", "3.50.2", "gradio", "warn", "also needs mdtex2html"),  # the machines have no mdtex2html
    ("gradio", None, "gradio", "warn", "glmsetup[web]"),
    ("pydantic", "1.10.13", "pydantic", "warn", "pydantic 2"),
    ("streamlit", "1.22.0", "streamlit", "warn", ">= 1.24"),
    ("streamlit", None, "streamlit", "skipped", "not installed"),
    ("sentencepiece", None, "sentencepiece", "fail", "tokenizer"),
])
def test_package_rules(pkg, version, cid, status, words):
    facts = m.cpu_pc_16gb()
    facts.packages[pkg] = version
    _, checks, _ = run(facts)
    assert checks[cid]["status"] == status
    assert words in checks[cid]["summary"] + str(checks[cid]["hint"])


def test_cpm_kernels_on_cuda():
    _, checks, _ = run(m.rtx4090())
    assert checks["cpm-kernels"]["status"] == "warn" and checks["cpm-kernels"]["hint"] == "pip install cpm_kernels"


# --- Disk, model folder, network ------------------------------------------------------------------------
def test_disk_too_small_blocks():
    facts = m.rtx4090()
    facts.disk = m.ssd(free=9e9)
    data, checks, _ = run(facts)
    assert checks["disk-space"]["status"] == "fail" and "disk-space" in data["blocking"]
    assert "--model-dir" in checks["disk-space"]["hint"]


def test_disk_enough_for_download_only_warns():
    facts = m.rtx4090()
    facts.disk = m.ssd(free=20e9)
    _, checks, _ = run(facts)
    assert checks["disk-space"]["status"] == "warn"


def test_hdd_warns():
    facts = m.cpu_pc_16gb()
    facts.disk = dataclasses.replace(facts.disk, kind="hdd", device="sda", evidence="/sys/block/sda/queue/rotational = 1")
    _, checks, _ = run(facts)
    assert checks["disk-kind"]["status"] == "warn" and "SSD" in checks["disk-kind"]["hint"]


def test_model_folder_with_pointers_blocks_and_complete_one_skips_fetch():
    facts = m.rtx4090()
    report = {"path": "/m", "exists": True, "kind": "chatglm2", "files": ["config.json", "pytorch_model-00001-of-00007.bin"],
              "issues": [{"path": "pytorch_model-00001-of-00007.bin", "problem": "pointer",
                          "detail": "a git-lfs pointer (1,827,780,615 bytes expected)"}], "ok": False}
    facts.model = ModelFolder(path="/m", exists=True, report=report)
    facts.default_model_dir = False
    data, checks, _ = run(facts, model_dir="/m")
    assert checks["model"]["status"] == "fail" and "pointer" in checks["model"]["summary"]
    assert checks["model"]["hint"].startswith("glmsetup fetch --model-dir /m")
    assert data["ok"] is False
    facts.model.report = dict(report, issues=[], ok=True)
    data, checks, _ = run(facts, model_dir="/m")
    assert checks["model"]["status"] == "ok" and data["ok"] is True
    assert data["verdict"]["next_commands"] == ["glmsetup run web --profile cuda-fp16 --model /m"]


@pytest.mark.parametrize("env, status, words", [
    ({"HF_ENDPOINT": "hf-mirror.com"}, "fail", "https://hf-mirror.com"),
    ({"HF_ENDPOINT": "https://hf-mirror.com"}, "ok", "hf-mirror"),
    ({"HF_HUB_OFFLINE": "1"}, "warn", "offline"),
    ({"HF_HUB_ENABLE_HF_TRANSFER": "1"}, "warn", "hf_transfer"),
])
def test_hf_settings(env, status, words):
    facts = m.cpu_pc_16gb()
    facts.network.env = env
    _, checks, _ = run(facts)
    c = checks["hf-endpoint"]
    assert c["status"] == status and words in c["summary"] + str(c["hint"])


def test_socks_proxy_without_socksio():
    facts = m.cpu_pc_16gb()
    facts.network.env = {"HTTPS_PROXY": "socks5://***@10.0.0.1:1080"}
    _, checks, _ = run(facts)
    assert checks["proxy"]["status"] == "warn" and "httpx[socks]" in checks["proxy"]["hint"]


def test_missing_facts_become_could_not_check():
    facts = m.rtx4090()
    facts.nvidia = None
    facts.memory = None
    facts.errors = {"nvidia": "NVMLError_Unknown: Unknown Error", "memory": "PermissionError: /proc/meminfo"}
    data, checks, _ = run(facts)
    for cid in ("nvidia", "gpus", "torch-cuda", "ram"):
        assert checks[cid]["status"] == "skipped" and checks[cid]["summary"].startswith("could not check"), cid
    assert "NVMLError_Unknown" in checks["nvidia"]["summary"]


def test_auto_profile_never_picks_the_official_backend():
    facts = m.rtx2060_laptop()
    facts.packages["transformers"] = "4.30.2"
    facts.packages["cpm-kernels"] = "1.0.11"
    assert auto_profile(facts=facts).name == "cuda-int4"  # the native one; the runtime says what to install


def test_auto_profile_raises_when_nothing_fits():
    from glmsetup.errors import ResourceError

    facts = m.cpu_pc_16gb()
    facts.memory = dataclasses.replace(facts.memory, total=4 * m.GiB, available=3 * m.GiB)
    with pytest.raises(ResourceError):
        auto_profile(facts=facts)


def test_blackwell_needs_a_cuda_12_8_build():
    data, checks, profiles = run(m.rtx5090_old_torch())
    assert checks["torch-cuda"]["status"] == "fail" and "12.0" in checks["torch-cuda"]["summary"]
    assert checks["torch-cuda"]["hint"].endswith("/whl/cu128")
    assert profiles["cuda-fp16"]["fit"] == "fits" and not profiles["cuda-fp16"]["runnable"]
    assert data["verdict"]["recommended"] == "cuda-fp16" and data["ok"] is False
    assert data["verdict"]["next_commands"][0].endswith("/whl/cu128")


def test_model_dir_that_cannot_be_written_blocks():
    facts = m.rtx4090()
    facts.disk = dataclasses.replace(m.ssd(), probed="/opt", writable=False)
    data, checks, _ = run(facts)
    assert checks["disk-space"]["status"] == "fail" and "not writable" in checks["disk-space"]["summary"]
    assert data["ok"] is False


def test_mac_python_under_rosetta():
    facts = m.m2_mac()
    facts.system = dataclasses.replace(facts.system, machine="x86_64", rosetta=True)
    _, checks, profiles = run(facts)
    assert checks["mps"]["status"] == "warn" and "arm64 Python" in checks["mps"]["hint"]
    assert profiles["mps"]["fit"] == "no" and "Rosetta" in profiles["mps"]["reason"]


def test_32gb_mac_runs_mps():
    facts = m.m2_mac()
    facts.memory = dataclasses.replace(facts.memory, total=32 * m.GiB, available=24 * m.GiB)
    data, _, profiles = run(facts)
    assert profiles["mps"]["fit"] == "fits" and data["verdict"]["best"] == "mps"
