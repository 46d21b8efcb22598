"""glmsetup doctor: what this machine can run, and what to fix.

probes.py (with its helpers storage.py and sources.py) is the only code that touches the machine;
checks.py, checks_network.py and verdict.py are pure functions over the facts record (facts.py);
report.py puts them together. Nothing here imports torch (`--deep` does, in a child process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["auto_profile", "finetune_profile", "diagnose", "LIGHT_PROBES"]

# What `auto_profile` needs: no subprocesses, no disk walk, no network.
LIGHT_PROBES = ("system", "nvidia", "torch", "memory", "packages")


def diagnose(model_dir: Optional[Path] = None, **kwargs) -> dict:
    from glmsetup import paths
    from glmsetup.doctor.report import diagnose as _diagnose

    default = model_dir is None
    return _diagnose(Path(model_dir) if model_dir else paths.default_model_dir(),
                     default_model_dir=kwargs.pop("default_model_dir", default), **kwargs)


def auto_profile(context: int = 2048, facts=None):
    """The best profile that fits this machine (fast: no torch import, no network).

    Only native-backend profiles are candidates (the official-* ones are chosen by name). Prefers
    a profile that runs with what is installed; else the best one for the hardware (the runtime then
    reports what to install). Raises ResourceError when nothing fits.
    """
    from glmsetup import profiles
    from glmsetup.doctor import probes
    from glmsetup.doctor.verdict import evaluate
    from glmsetup.errors import ResourceError

    if facts is None:
        facts = probes.gather(Path("."), only=LIGHT_PROBES)
    verdict = evaluate(facts, [p for p in profiles.load_all() if p.backend == "native"], context)
    name = verdict.best or verdict.recommended
    if name is None:
        raise ResourceError(f"no profile fits this machine at {context} tokens",
                            hint="glmsetup doctor shows what each profile needs and what this machine has")
    return profiles.load(name)


def finetune_profile(method: str, settings=None, facts=None, *, must_run: bool = True):
    """The profile to fine-tune with `method` here: the one doctor's fine-tuning line names.

    `settings` holds what the memory depends on (lengths, rank, batch ...): a dict or an object with the
    fields of requirements.FinetuneSettings (both commands' settings have them); None: train.sh's.
    The best profile that fits and runs; when none runs, `must_run` (what `glmsetup finetune` trains with)
    raises ResourceError, else (what `estimate --finetune` shows) the nearest one the method can use at
    all (LoRA: float weights only), whether or not torch or peft are installed yet: an estimate is about memory.
    """
    import dataclasses

    from glmsetup import profiles, requirements
    from glmsetup.doctor import probes
    from glmsetup.doctor.verdict import finetune_verdict
    from glmsetup.errors import ResourceError

    if settings is not None and not isinstance(settings, dict):
        names = [f.name for f in dataclasses.fields(requirements.FinetuneSettings) if f.name != "method"]
        settings = {name: getattr(settings, name) for name in names if hasattr(settings, name)}
    if facts is None:
        facts = probes.gather(Path("."), only=LIGHT_PROBES)
    verdict = finetune_verdict(facts, profiles.load_all(), settings)
    rows = next(m for m in verdict["methods"] if m["method"] == method)
    name = rows["best"] or next((p["name"] for p in rows["profiles"] if p["runnable"]), None)
    if name is None and must_run:
        raise ResourceError(f"no profile fits fine-tuning with {method} on this machine",
                            hint=f"glmsetup doctor shows what each profile needs; glmsetup estimate --finetune {method}")
    if name is None:
        usable = [p for p in rows["profiles"] if p.get("usable", True)]
        name = next((p["name"] for p in usable if p["fit"] != "no"), None) or next((p["name"] for p in usable), None)
    return profiles.load(name or "cpu")
