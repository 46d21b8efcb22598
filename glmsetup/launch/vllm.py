"""`run api --engine vllm`: vLLM's OpenAI server on the converted model folder.

vLLM knows transformers' GlmForCausalLM, which is what `glmsetup convert` writes (config.json with
model_type glm, safetensors, the tokenizer files and a chat template reproducing the official
prompt). The official checkpoint itself needs remote code, so an unconverted folder is converted
first (under GLMSETUP_HOME/converted) or, with --dry-run, the plan says it would be.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Optional

from glmsetup import paths
from glmsetup.errors import MissingDependency, ModelError
from glmsetup.launch.plan import RunPlan

SERVED_NAME = "chatglm2-6b"
INSTALL_HINT = ("pip install vllm   (Linux with an NVIDIA GPU; see https://docs.vllm.ai for other builds), "
                "or serve natively: glmsetup run api")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
VLLM_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def converted_target(src: Path) -> Path:
    """Where an official folder's conversion lives (the runtime's cache keeps its own key inside)."""
    return paths.converted_dir() / src.name


def chat_template(folder: Path) -> tuple[Optional[Path], str]:
    """(a template file to pass with --chat-template, where the template comes from)."""
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            return folder / name, name
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if config.get("chat_template"):
        return None, "tokenizer_config.json"
    return None, ""


def vllm_command(folder: Path, plan: RunPlan, tensor_parallel_size: int, template: Optional[Path]) -> list:
    exe = shutil.which("vllm")
    head = [exe, "serve", str(folder)] if exe else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                    "--model", str(folder)]
    b = plan.binding
    cmd = head + ["--host", b.host, "--port", str(b.port), "--served-model-name", SERVED_NAME,
                  "--tensor-parallel-size", str(tensor_parallel_size),
                  "--max-model-len", str(plan.profile.generation.max_length)]
    if plan.profile.device == "cuda":
        cmd += ["--dtype", VLLM_DTYPES[plan.profile.dtype]]
    if template is not None:
        cmd += ["--chat-template", str(template)]
    if b.api_key:
        cmd += ["--api-key", b.api_key]
    if b.cors:
        cmd += ["--allowed-origins", json.dumps(list(b.cors))]
    return cmd


def plan_vllm(plan: RunPlan, *, tensor_parallel_size: int = 1, dry_run: bool = False) -> RunPlan:
    plan.engine = "vllm"
    if not vllm_installed():
        if not dry_run:
            raise MissingDependency("vLLM is not installed in this environment", hint=INSTALL_HINT)
        plan.notes.append(f"vLLM is not installed: {INSTALL_HINT}")
    folder = plan.model_dir
    if plan.model_kind != "glm-converted":
        target = converted_target(plan.model_dir)
        if (target / "config.json").is_file():
            folder = target
            plan.notes.append(f"using the converted folder {target}")
        elif dry_run:
            folder = target
            plan.notes.append(f"would first convert {plan.model_dir} to {target} "
                              f"(glmsetup convert {shlex.quote(str(plan.model_dir))} {shlex.quote(str(target))})")
        else:
            folder = convert(plan.model_dir, target)
    template, source = chat_template(folder)
    if source:
        plan.notes.append(f"chat template: {folder / source if template else source}")
    elif folder.is_dir():
        raise ModelError(f"{folder} has no chat template, so vLLM would not build the ChatGLM2 prompt",
                         hint=f"convert again: glmsetup convert {shlex.quote(str(plan.model_dir))} {folder}")
    if plan.profile.device != "cuda":
        plan.notes.append(f"profile {plan.profile.name} is not a CUDA profile: vLLM picks its own dtype")
    if tensor_parallel_size > 1 and plan.profile.num_gpus not in (1, tensor_parallel_size):
        plan.notes.append(f"--tensor-parallel-size {tensor_parallel_size} differs from the profile's "
                          f"num_gpus {plan.profile.num_gpus}; the flag wins")
    plan.command = vllm_command(folder, plan, tensor_parallel_size, template)
    plan.official = None
    return plan


def convert(src: Path, dst: Path) -> Path:
    """The runtime's conversion of an official folder into a GlmForCausalLM folder."""
    from glmsetup.errors import require

    runtime_convert = require("glmsetup.runtime.convert", "runtime")
    result = runtime_convert.convert(src, dst)
    return Path(result) if result else dst
