"""The run plan: everything decided before a model is loaded.

`build_plan` resolves the profile ("auto" asks the doctor), checks the model folder with
glmsetup.modelfiles (a missing or damaged folder is a ModelError naming `glmsetup fetch` or
`glmsetup verify`), checks that the front end's extra is installed, applies the binding rules and
estimates memory with glmsetup.requirements. `glmsetup run --dry-run` prints exactly this plan.
"""
from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from glmsetup import paths, profiles, requirements
from glmsetup.errors import EXTRAS_HINT, MissingDependency, ModelError, UsageError
from glmsetup.launch.binding import Binding, resolve_binding

# front end -> (modules it needs, the extra that installs them)
FRONT_EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "cli": ((), "runtime"),
    "web": (("gradio",), "web"),
    "streamlit": (("streamlit",), "streamlit"),
    "api": (("fastapi", "uvicorn", "sse_starlette"), "api"),
}
RUNTIME_MODULES = ("torch", "transformers", "sentencepiece")
NATIVE_KINDS = ("chatglm2", "chatglm2-int4", "glm-converted")
ESTIMATE_CONTEXT = 2048
API_MAX_BATCH = 16  # requests `run api` generates at once by default: runtime.batching.MAX_BATCH (torch-free here)
API_MAX_BATCH_LIMIT = 64  # the most `--max-batch` allows


@dataclass
class RunPlan:
    front: str
    profile: profiles.Profile
    profile_ref: str  # what to hand a child process: a name, or the .toml path the user gave
    model_dir: Path
    model_kind: str
    binding: Binding
    estimate: dict
    estimate_max: dict
    engine: str = "native"
    command: Optional[list] = None  # set when the front end runs as another process
    env: dict = field(default_factory=dict)  # extra environment for that process
    cwd: Optional[Path] = None
    notes: list = field(default_factory=list)
    memory_warnings: list = field(default_factory=list)
    official: Optional[dict] = None
    ptuning_checkpoint: Optional[Path] = None  # a P-tuning v2 checkpoint to serve with (run --ptuning-checkpoint)
    adapter: Optional[Path] = None  # a peft LoRA adapter merged while loading (run --adapter)
    max_batch: Optional[int] = None  # requests the API server generates at once (run api --max-batch)

    @property
    def shown_command(self) -> Optional[list]:
        """The command with the API key hidden (for printing and JSON)."""
        if not self.command:
            return None
        key = self.binding.api_key
        return ["***" if key and part == key else part for part in self.command]

    @property
    def shown_env(self) -> dict:
        key = self.binding.api_key
        return {k: ("***" if key and v == key else v) for k, v in self.env.items()}

    @property
    def warnings(self) -> list:
        return self.binding.warnings + self.memory_warnings

    def to_dict(self) -> dict:
        return {
            "front": self.front, "engine": self.engine,
            "profile": {"name": self.profile.name, "summary": self.profile.summary, "source": self.profile.source,
                        "generation": vars(self.profile.generation)},
            "model_dir": str(self.model_dir), "model_kind": self.model_kind,
            "estimate": self.estimate, "estimate_max_length": self.estimate_max,
            "binding": self.binding.to_dict(),
            "command": self.shown_command,
            "command_line": shlex.join(self.shown_command) if self.command else None,
            "env": self.shown_env, "cwd": str(self.cwd) if self.cwd else None,
            "official": self.official, "notes": list(self.notes), "warnings": list(self.warnings),
            "ptuning_checkpoint": str(self.ptuning_checkpoint) if self.ptuning_checkpoint else None,
            "adapter": str(self.adapter) if self.adapter else None,
            "max_batch": self.max_batch,
        }


def resolve_profile(spec: str) -> tuple[profiles.Profile, str]:
    """A name, a .toml path or "auto" -> (Profile, the reference to hand a child process)."""
    if spec == "auto":
        try:
            from glmsetup.doctor import auto_profile
        except ImportError as exc:  # no doctor in this install (a partial checkout): not torch's absence
            if not (exc.name or "").startswith("glmsetup"):
                raise
            prof = profiles.load("cpu")  # this install has no doctor: the profile that runs anywhere
        else:
            prof = auto_profile(context=ESTIMATE_CONTEXT)
        return prof, prof.name
    prof = profiles.resolve(spec)
    ref = str(Path(spec).resolve()) if spec.endswith(".toml") else prof.name
    return prof, ref


def check_model_dir(model_dir: Optional[str], *, kinds: tuple = NATIVE_KINDS) -> tuple[Path, str]:
    """The model folder, checked; (path, kind) or a ModelError whose hint is the repairing command."""
    from glmsetup.modelfiles import holds_model_files, inspect_model_dir, stopped_fetch_error

    default = model_dir is None
    folder = paths.default_model_dir() if default else Path(model_dir).expanduser()
    fetch = "glmsetup fetch" if default else f"glmsetup fetch --model-dir {shlex.quote(str(folder))}"
    report = inspect_model_dir(folder)
    if not report.exists:
        others = other_models(folder) if default else []
        if others:
            raise ModelError(f"no model folder at {folder}",
                             hint=f"found {', '.join(map(str, others))}: pass it with --model, or download the "
                                  f"default with `{fetch}`")
        raise ModelError(f"no model folder at {folder}",
                         hint=f"download it with `{fetch}` (or pass --model DIR), or try `glmsetup selftest` first")
    stopped = stopped_fetch_error(report)
    if stopped:  # an earlier fetch stopped: not "empty", "damaged" or "not a model folder"
        raise ModelError(*stopped, details=report.to_dict())
    if not report.files:
        raise ModelError(f"the model folder {folder} is empty: nothing downloaded yet",
                         hint=f"download it with `{fetch}` (or pass --model DIR), or try `glmsetup selftest` first")
    if not holds_model_files(report.files):
        raise ModelError(f"{folder} is not a model folder (no config.json, no weight files)",
                         hint=f"point --model at a ChatGLM2-6B folder, or download one with `{fetch}`",
                         details=report.to_dict())
    if report.issues:
        shown = "; ".join(f"{i.path}: {i.problem}" + (f" ({i.detail})" if i.detail else "") for i in report.issues[:4])
        more = f" and {len(report.issues) - 4} more" if len(report.issues) > 4 else ""
        raise ModelError(f"the model folder {folder} is damaged: {shown}{more}",
                         hint=f"`glmsetup verify {shlex.quote(str(folder))}` lists every problem; `{fetch}` repairs it",
                         details=report.to_dict())
    if report.kind not in kinds:
        raise ModelError(f"{folder} does not hold a ChatGLM2-6B checkpoint (kind: {report.kind})",
                         hint=f"point --model at a ChatGLM2-6B folder, or download one with `{fetch}`",
                         details=report.to_dict())
    return folder, report.kind


def other_models(missing: Path) -> list:
    """Model folders beside the missing default one (e.g. chatglm2-6b-int4 fetched instead)."""
    parent = missing.parent
    if not parent.is_dir():
        return []
    return [p for p in sorted(parent.iterdir()) if p.is_dir() and (p / "config.json").is_file()][:3]


def missing_modules(modules) -> list:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def not_installed(names: list) -> str:
    """"a, which is not installed" / "a and b, which are not installed"."""
    if len(names) == 1:
        return f"{names[0]}, which is not installed"
    return f"{', '.join(names[:-1])} and {names[-1]}, which are not installed"


def require_extra(front: str) -> None:
    """MissingDependency (exit 3) naming the pip line when the front end's extra is not installed."""
    modules, extra = FRONT_EXTRAS[front]
    gone = missing_modules(modules)
    if gone:
        raise MissingDependency(f"`run {front}` needs {not_installed(gone)}",
                                hint=EXTRAS_HINT.get(extra, f'pip install "glmsetup[{extra}]"'))
    gone = missing_modules(RUNTIME_MODULES)
    if gone:
        raise MissingDependency(f"the model runtime needs {not_installed(gone)}",
                                hint=EXTRAS_HINT["runtime"])


def memory_estimate(profile: profiles.Profile, context: int) -> dict:
    est = requirements.estimate(profile, context)
    return {"context": context, "total_bytes": round(est.total), "per_device_bytes": [round(b) for b in est.per_device],
            "memory": "VRAM" if profile.device in ("cuda", "mps") else "RAM", "weights_bytes": round(est.weights),
            "kv_cache_bytes": round(est.kv_cache)}


def model_dims(folder: Path) -> Optional[tuple]:
    """(layers, hidden size) from a folder's config.json (official or converted names), or None."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    layers = config.get("num_layers", config.get("num_hidden_layers"))
    return (layers, config.get("hidden_size")) if layers and config.get("hidden_size") else None


def available_memory() -> Optional[int]:
    """Bytes of RAM this process can still use (cgroup limits counted), or None when unknown."""
    try:
        from glmsetup.doctor.probes import probe_memory

        return probe_memory().effective_available
    except Exception:  # the doctor's probes are a nicety here: fall back to psutil
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except Exception:
            return None


def memory_notes(plan: "RunPlan") -> None:
    """Say when the estimate does not apply (a smaller test model) or does not fit in RAM."""
    from glmsetup import output

    dims = model_dims(plan.model_dir)
    full = (requirements.NUM_LAYERS, requirements.HIDDEN)
    if dims is not None and tuple(dims) != full:
        plan.notes.append(f"this folder holds a smaller model ({dims[0]} layers, hidden size {dims[1]}): "
                          "the memory estimate is for ChatGLM2-6B")
        return
    if plan.profile.device not in ("cpu", "mps"):
        return  # VRAM is the doctor's to probe (NVML); the estimate above says what is needed
    free = available_memory()
    need = plan.estimate["total_bytes"]
    if free is not None and need > free:
        plan.memory_warnings.append(
            f"profile {plan.profile.name} needs about {output.human_bytes(need)} of RAM and "
            f"{output.human_bytes(free)} are available: the load may fail or swap heavily "
            "(`glmsetup doctor` suggests a profile that fits; try --profile auto)")


def build_plan(front: str, *, profile: str = "auto", model: Optional[str] = None, host: Optional[str] = None,
               port: Optional[int] = None, listen: bool = False, api_key: Optional[str] = None,
               insecure: bool = False, cors: tuple = (), engine: str = "native",
               check_extras: bool = True, model_kinds: tuple = NATIVE_KINDS) -> RunPlan:
    """Decide everything a run needs, in the order a user wants the errors: flags, profile, folder, extras."""
    if engine not in ("native", "vllm"):
        raise UsageError(f"unknown engine '{engine}'", hint="--engine native (default) or --engine vllm")
    prof, ref = resolve_profile(profile)
    binding = resolve_binding(front, prof, host=host, port=port, listen=listen, api_key=api_key,
                              insecure=insecure, cors=cors)
    folder, kind = check_model_dir(model, kinds=model_kinds)
    if check_extras:
        require_extra(front)
    plan = RunPlan(front=front, profile=prof, profile_ref=ref, model_dir=folder, model_kind=kind, binding=binding,
                   estimate=memory_estimate(prof, ESTIMATE_CONTEXT),
                   estimate_max=memory_estimate(prof, prof.generation.max_length), engine=engine)
    memory_notes(plan)
    if check_extras and front == "streamlit" and engine == "native":
        # Streamlit's own process loads the model on the first page view: a backend this environment's
        # transformers cannot run (or a GPU that is not there) is refused now, before it starts.
        from glmsetup.launch.loading import check_backend  # loading imports this module

        check_backend(plan)
    if profile == "auto":
        plan.notes.append(f"--profile auto chose {prof.name} for this machine (`glmsetup doctor` shows why)")
    return plan


def apply_max_batch(plan: RunPlan, max_batch: Optional[int]) -> RunPlan:
    """`run api --max-batch N`: how many requests glmsetup's API server generates at once (None: the default).

    Only `run api` on the native engine batches, and only a native profile (the official remote code answers
    one request at a time: the plan says 1). Other fronts and engines leave max_batch None."""
    if max_batch is not None:
        if plan.front != "api":
            raise UsageError(f"--max-batch applies to `run api` only, not `run {plan.front}`",
                             hint="glmsetup run api --max-batch N")
        if plan.engine != "native":
            raise UsageError("--max-batch applies to the native engine; vLLM batches requests on its own",
                             hint="drop --max-batch, or drop --engine vllm")
        if plan.official:
            raise UsageError("--max-batch applies to glmsetup's API server, not to the official api.py",
                             hint="drop --official to serve with glmsetup's server, or drop --max-batch")
        if plan.profile.backend != "native" and max_batch > 1:
            raise UsageError(f"profile '{plan.profile.name}' runs the official remote code, which answers one request "
                             f"at a time: --max-batch {max_batch} cannot apply",
                             hint="use a native profile (cpu, cuda-fp16, ...) to batch, or drop --max-batch")
    if plan.front == "api" and plan.engine == "native" and not plan.official:
        plan.max_batch = max_batch or (API_MAX_BATCH if plan.profile.backend == "native" else 1)
    return plan
