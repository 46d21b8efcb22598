"""glmsetup doctor: what this machine can run, and what to fix.

probes.py (with its helpers storage.py and sources.py) is the only code that touches the machine;
checks.py, checks_network.py and verdict.py are pure functions over the facts record (facts.py);
report.py puts them together. Nothing here imports torch (`--deep` does, in a child process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["auto_profile", "auto_finetune_profile", "finetune_estimate_profile", "diagnose", "LIGHT_PROBES"]

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


def auto_finetune_profile(method: str, settings: Optional[dict] = None, facts=None):
    """The best profile for fine-tuning with `method` here (like auto_profile, for the table's second column)."""
    from glmsetup import profiles
    from glmsetup.doctor import probes
    from glmsetup.doctor.verdict import finetune_verdict
    from glmsetup.errors import ResourceError

    if facts is None:
        facts = probes.gather(Path("."), only=LIGHT_PROBES)
    verdict = finetune_verdict(facts, profiles.load_all(), settings)
    rows = next(m for m in verdict["methods"] if m["method"] == method)
    name = rows["best"] or next((p["name"] for p in rows["profiles"] if p["runnable"]), None)
    if name is None:
        raise ResourceError(f"no profile fits fine-tuning with {method} on this machine",
                            hint=f"glmsetup doctor shows what each profile needs; glmsetup estimate --finetune {method}")
    return profiles.load(name)


def finetune_estimate_profile(method: str, settings: Optional[dict] = None, facts=None):
    """The profile `estimate --finetune METHOD` shows by default: the one doctor's fine-tuning line names.

    The best that fits and runs; else the nearest one the method can use at all (LoRA: float weights
    only), whether or not torch or peft are installed yet: an estimate is about memory.
    """
    from glmsetup import profiles
    from glmsetup.doctor import probes
    from glmsetup.doctor.verdict import finetune_verdict

    if facts is None:
        facts = probes.gather(Path("."), only=LIGHT_PROBES)
    verdict = finetune_verdict(facts, profiles.load_all(), settings)
    rows = next(m for m in verdict["methods"] if m["method"] == method)
    usable = [p for p in rows["profiles"] if p.get("usable", True)]
    name = (rows["best"] or next((p["name"] for p in usable if p["runnable"]), None)
            or next((p["name"] for p in usable if p["fit"] != "no"), None) or next((p["name"] for p in usable), None))
    return profiles.load(name or "cpu")
