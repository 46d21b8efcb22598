"""`run api --engine vllm`: vLLM's OpenAI server on the converted model folder.

vLLM knows transformers' GlmForCausalLM, which is what `glmsetup convert` writes (config.json with
model_type glm, safetensors, the tokenizer files and a chat template reproducing the official
prompt). The official checkpoint itself needs remote code, so an unconverted folder is converted
first (the runtime's conversion cache under GLMSETUP_HOME/converted, reused when it is there) or,
with --dry-run, the plan says it would be.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
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


def conversion_dtype(plan: RunPlan) -> Optional[str]:
    """The dtype to convert to: the CUDA profile's, else the checkpoint's own (float16)."""
    return plan.profile.dtype if plan.profile.device == "cuda" and plan.profile.dtype != "float32" else None


def find_conversion(src: Path, dtype: Optional[str]) -> tuple[Optional[Path], Path]:
    """(a finished conversion of `src` in the runtime's cache or None, where a new one would go)."""
    from glmsetup.errors import require

    require("torch", "runtime")
    from glmsetup.runtime import convert as conv
    from glmsetup.runtime.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    chosen = dtype or conv._default_dtype(ckpt)
    return conv.cached_conversion(ckpt, chosen), conv.cache_dir_for(ckpt, chosen)


def chat_template(folder: Path, dry_run: bool) -> tuple[Optional[Path], str]:
    """(a template file to pass with --chat-template, where the template comes from).

    A template kept only inside tokenizer_config.json is written out to a file under
    GLMSETUP_HOME/work/vllm, so the command names it explicitly whatever vLLM version reads it.
    """
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            return folder / name, str(folder / name)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template")
    if not isinstance(template, str) or not template:
        return None, ""
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    out = paths.work_dir() / "vllm" / f"chatglm2-chat-template-{digest}.jinja"
    if not dry_run and not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(template, encoding="utf-8")
        os.replace(tmp, out)
    return out, f"{folder / 'tokenizer_config.json'} (as {out})"


def vllm_command(folder: Path, plan: RunPlan, tensor_parallel_size: int, template: Optional[Path]) -> list:
    exe = shutil.which("vllm")
    from glmsetup.launch.serve import python_module_command

    head = [exe, "serve", str(folder)] if exe else [*python_module_command("vllm.entrypoints.openai.api_server"),
                                                    "--model", str(folder)]
    b = plan.binding
    cmd = head + ["--host", b.host, "--port", str(b.port), "--served-model-name", SERVED_NAME,
                  "--tensor-parallel-size", str(tensor_parallel_size),
                  "--max-model-len", str(plan.profile.generation.max_length)]
    if plan.profile.device == "cuda":
        cmd += ["--dtype", VLLM_DTYPES[plan.profile.dtype]]
    if template is not None:
        cmd += ["--chat-template", str(template)]
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
        dtype = conversion_dtype(plan)
        found, target = find_conversion(plan.model_dir, dtype)
        if found is not None:
            folder = found
            plan.notes.append(f"using the converted folder {found}")
        elif dry_run:
            folder = target
            plan.notes.append(f"would first convert {plan.model_dir} to {target} (glmsetup convert "
                              f"{shlex.quote(str(plan.model_dir))}{' --dtype ' + dtype if dtype else ''})")
        else:
            folder = convert(plan.model_dir, dtype)
    template, source = chat_template(folder, dry_run)
    if source:
        plan.notes.append(f"chat template: {source}")
    elif folder.is_dir():
        raise ModelError(f"{folder} has no chat template, so vLLM would not build the ChatGLM2 prompt",
                         hint=f"convert again: glmsetup convert {shlex.quote(str(plan.model_dir))} --no-cache")
    if plan.profile.device != "cuda":
        plan.notes.append(f"profile {plan.profile.name} is not a CUDA profile: vLLM picks its own dtype")
    if tensor_parallel_size > 1 and plan.profile.num_gpus not in (1, tensor_parallel_size):
        plan.notes.append(f"--tensor-parallel-size {tensor_parallel_size} differs from the profile's "
                          f"num_gpus {plan.profile.num_gpus}; the flag wins")
    plan.command = vllm_command(folder, plan, tensor_parallel_size, template)
    if plan.binding.api_key:  # vLLM reads it from there: the key stays out of the process list
        plan.env["VLLM_API_KEY"] = plan.binding.api_key
    plan.official = None
    return plan


def convert(src: Path, dtype: Optional[str]) -> Path:
    """The runtime's conversion of an official folder into a GlmForCausalLM folder (cached)."""
    from glmsetup import output
    from glmsetup.errors import require

    conv = require("glmsetup.runtime.convert", "runtime")
    console = output.stderr()
    console.print(f"converting {src} for vLLM (once; the result is cached) ...", highlight=False)
    result = conv.convert_checkpoint(src, dtype=dtype, progress=lambda line: console.print(f"[dim]{line}[/]"))
    return Path(result["destination"])
