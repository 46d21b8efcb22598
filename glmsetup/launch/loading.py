"""The banner printed before anything loads, and the model load with its progress display.

Both go to stderr: stdout belongs to the chat of `run cli` and to the JSON envelope. The spinner with
elapsed time shows only for a person at a terminal (output.progress_enabled); otherwise two plain
lines, "loading ..." and "loaded in N s", so logs still say what happened.
"""
from __future__ import annotations

import time
from typing import Optional

from glmsetup import output
from glmsetup.errors import GlmsetupError, MissingDependency, RuntimeFailure
from glmsetup.launch.plan import RunPlan


def _needs(est: dict) -> str:
    if est["per_device_bytes"]:
        return " + ".join(output.human_bytes(x) for x in est["per_device_bytes"]) + " " + est["memory"]
    return f"{output.human_bytes(est['total_bytes'])} {est['memory']}"


def banner_lines(plan: RunPlan) -> list:
    """Plain-text lines (rich markup) describing the run: profile, memory, model, address, warnings."""
    prof = plan.profile
    gen = prof.generation
    lines = [
        f"[bold]profile[/]  {prof.name}: {prof.summary}  [dim]{prof.source}[/]",
        f"[bold]memory[/]   about {_needs(plan.estimate)} at {plan.estimate['context']} tokens, "
        f"{_needs(plan.estimate_max)} at max_length {plan.estimate_max['context']}",
        f"[bold]model[/]    {plan.model_dir} ({plan.model_kind})",
        f"[bold]sampling[/] max_length {gen.max_length}, top_p {gen.top_p}, temperature {gen.temperature}, "
        f"repetition_penalty {gen.repetition_penalty}",
    ]
    if plan.ptuning_checkpoint:
        lines.append(f"[bold]tuned[/]    P-tuning checkpoint {output.escape(str(plan.ptuning_checkpoint))}")
    if plan.adapter:
        lines.append(f"[bold]tuned[/]    LoRA adapter {output.escape(str(plan.adapter))} (merged while loading)")
    if plan.binding.host is not None:
        auth = "API key required" if plan.binding.api_key else "no auth"
        cors = f", CORS {', '.join(plan.binding.cors)}" if plan.binding.cors else ""
        lines.append(f"[bold]serving[/]  {plan.front} on {plan.binding.host}:{plan.binding.port} "
                     f"-> {plan.binding.url} ({auth}{cors})")
    if plan.official:
        lines.append(f"[bold]official[/] {plan.official['script']} (working copy {plan.official['work_dir']})")
    if plan.command:
        import shlex

        lines.append(f"[bold]command[/]  {output.escape(shlex.join(plan.shown_command))}")
    for note in plan.binding.notes + plan.notes:
        lines.append(f"[dim]{output.escape(note)}[/]")
    return lines


def print_banner(plan: RunPlan) -> None:
    console = output.stderr()
    for line in banner_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
    for warning in plan.warnings:
        console.print(f"[bold red]warning:[/] [bold]{output.escape(warning)}[/]", soft_wrap=True)


def load_model(plan: RunPlan, *, json_mode: bool = False, quiet: bool = False):
    """glmsetup.load_chat_model with a progress display; runtime failures become GlmsetupErrors."""
    import glmsetup

    check_backend(plan)
    console = output.stderr()
    what = f"loading {plan.model_dir.name} with profile {plan.profile.name}"
    start = time.perf_counter()
    show_spinner = output.progress_enabled(json_mode)
    try:
        if show_spinner:
            with console.status(f"{what} ...", spinner="dots") as status:
                result = _load(glmsetup, plan, status, start, what)
        else:
            if not (json_mode or quiet):
                console.print(f"{what} ...", highlight=False)
            result = _load(glmsetup, plan, None, start, what)
    except GlmsetupError:
        raise
    except ImportError as exc:
        extra = "official" if plan.profile.backend == "official" else "runtime"
        raise MissingDependency(f"the model runtime does not import ({exc})",
                                hint=f'pip install "glmsetup[{extra}]"') from exc
    except MemoryError as exc:
        from glmsetup.errors import ResourceError

        raise ResourceError(f"out of memory while loading with profile {plan.profile.name}",
                            hint="pick a smaller profile: glmsetup doctor, or --profile cpu-int4 / cuda-int4") from exc
    except Exception as exc:  # a failure inside torch/transformers: report it, don't dump a traceback
        raise RuntimeFailure(f"loading the model failed: {exc.__class__.__name__}: {exc}",
                             hint=f"glmsetup verify {plan.model_dir}; GLMSETUP_DEBUG=1 shows the traceback") from exc
    seconds = time.perf_counter() - start
    model = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    info = getattr(model, "load_info", None) or {}
    if not (json_mode or quiet):
        console.print(f"[green]loaded[/] in {seconds:.1f} s{output.escape(cache_note(info))}", highlight=False,
                      soft_wrap=True)
        if info.get("kernels"):
            from glmsetup.runtime.kernels import summary_line

            console.print(f"[dim]kernels  {output.escape(summary_line(info['kernels']))}[/]", highlight=False)
    if not json_mode:
        for note in kernel_warnings(info):
            console.print(f"[bold red]warning:[/] [bold]{output.escape(note)}[/]", soft_wrap=True)
    return result


def cache_note(info: dict) -> str:
    """Where the quantized weights came from, for the "loaded in N s" line ("" when not quantized)."""
    state = info.get("quant_cache")
    if state == "hit":
        return " (quantized weights mapped from the cache)"
    if state == "written":
        return f" (quantized weights cached in {info.get('quant_cache_file')}: the next start maps them)"
    if state == "rebuilt":
        return " (the quantized-weight cache was damaged or stale: rebuilt)"
    if state and state.startswith("not written"):
        return f" (quantized weights {state})"
    return ""


def kernel_warnings(info: dict) -> list:
    """One line per int8/int4 kernel that is not used on a device, with the reason and the cost."""
    return [note for group in info.get("kernels") or [] for note in group.get("notes", [])]


def check_backend(plan: RunPlan) -> None:
    """Refuse, before anything loads, a backend that the installed transformers cannot run.

    The official remote code runs on transformers 4.30-4.41, the native runtime needs 4.46 or
    newer: one environment holds one of them (docs/runtime.md, "The official backend").
    """
    if plan.profile.backend == "official":
        from glmsetup.runtime.official import check_transformers

        check_transformers()
    else:
        from glmsetup.runtime.load import check_native_transformers

        check_native_transformers()
    check_cuda(plan.profile)


def check_cuda(prof) -> None:
    """A CUDA profile where torch sees no GPU: refused before loading, naming the CPU profiles to use instead."""
    if prof.device != "cuda":
        return
    try:
        import torch
    except ImportError:  # loading reports the missing runtime with its pip line
        return
    if not torch.cuda.is_available():
        from glmsetup import profiles
        from glmsetup.errors import ResourceError

        raise ResourceError(f"profile '{prof.name}' needs CUDA, and torch sees no NVIDIA GPU (torch {torch.__version__})",
                            hint=profiles.no_gpu_hint(prof))


def _load(glmsetup, plan: RunPlan, status, start: float, what: str):
    """Run the load on a worker thread so the spinner can show elapsed seconds meanwhile."""
    import threading

    box: dict = {}

    def work():
        try:
            box["value"] = glmsetup.load_chat_model(str(plan.model_dir), profile=plan.profile,
                                                    ptuning_checkpoint=plan.ptuning_checkpoint, adapter=plan.adapter)
        except BaseException as exc:  # handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name="glmsetup-load", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
        if status is not None:
            status.update(f"{what} ... {time.perf_counter() - start:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def first_line(text: Optional[str]) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""
