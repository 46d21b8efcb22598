"""The doctor's report: every check over the facts, the verdict, and the exit code."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from glmsetup.doctor import checks as c
from glmsetup.doctor import checks_network as n
from glmsetup.doctor.checks import Finding
from glmsetup.doctor.facts import Facts
from glmsetup.doctor.verdict import Verdict, evaluate, model_complete

# (probe whose facts the check reads, check) in the order they print
CHECKS: tuple = (
    ("system", c.check_python), ("system", c.check_os), ("git", c.check_git), ("git", c.check_git_lfs),
    ("nvidia", c.check_nvidia), ("nvidia", c.check_gpus), ("torch", c.check_torch),
    ("torch", c.check_torch_cuda), ("torch", c.check_kernels), ("system", c.check_mps),
    ("memory", c.check_ram), ("disk", c.check_disk_space), ("disk", c.check_disk_kind),
    ("packages", c.check_transformers), ("packages", c.check_sentencepiece), ("packages", c.check_accelerate),
    ("packages", c.check_cpm_kernels), ("packages", c.check_gradio), ("packages", c.check_pydantic),
    ("packages", c.check_streamlit), ("packages", c.check_api),
    ("network", n.check_hf_endpoint), ("network", n.check_proxy),
    ("model", n.check_model),
)
NEEDS = {c.check_torch_cuda: ("nvidia",)}


def _ids(fn: Callable) -> tuple:
    name = fn.__name__.removeprefix("check_")
    return name.replace("_", "-"), name


def run_checks(facts: Facts, verdict: Verdict) -> list:
    """Every finding; a check whose facts are missing, or that raises, says "could not check"."""
    findings: list = []
    wants_cuda = any(p.device == "cuda" and p.fit == "fits" for p in verdict.profiles)
    for probe, fn in CHECKS:
        cid = _ids(fn)[0]
        group = _group_of(fn)
        missing = [p for p in (probe,) + NEEDS.get(fn, ()) if getattr(facts, p, None) is None]
        if missing:
            findings.append(c.could_not_check(facts, missing[0], cid, group, cid))
            continue
        try:
            if fn is c.check_torch_cuda or fn is c.check_torch:
                findings.append(fn(facts, wants_cuda))
            elif fn is c.check_disk_space:
                findings.append(fn(facts, model_complete(facts)))
            else:
                findings.append(fn(facts))
        except Exception as exc:  # noqa: BLE001 - odd facts must not take the doctor down
            findings.append(Finding(cid, group, cid, "skipped", f"could not check ({type(exc).__name__}: {exc})"))
    if facts.network is not None:
        findings.extend(n.check_sources(facts))
    elif "online" in facts.errors:
        findings.append(c.could_not_check(facts, "online", "sources", "network", "Download sources"))
    findings.append(check_verdict(verdict))
    return findings


GROUP_OF = {
    "python": "system", "os": "system", "git": "system", "git_lfs": "system",
    "nvidia": "gpu", "gpus": "gpu", "torch": "gpu", "torch_cuda": "gpu", "kernels": "gpu", "mps": "gpu",
    "ram": "memory", "disk_space": "memory", "disk_kind": "memory",
    "hf_endpoint": "network", "proxy": "network", "model": "model",
}


def _group_of(fn: Callable) -> str:
    return GROUP_OF.get(_ids(fn)[1], "packages")


def check_verdict(v: Verdict) -> Finding:
    ev = [f"{p.name}: {p.fit}, {p.reason}" + (f"; blocked: {'; '.join(p.blockers)}" if p.blockers else "")
          for p in v.profiles]
    if v.recommended is None:
        return Finding("profile-fit", "verdict", "Profiles", "fail", "no profile fits this machine", ev,
                       "a GPU with 6 GB or more, or 8 GB of free RAM, runs the int4 profiles")
    rec = next(p for p in v.profiles if p.name == v.recommended)
    if v.best is None:
        return Finding("profile-fit", "verdict", "Profiles", "fail",
                       f"{v.recommended} fits this hardware but cannot run yet: {'; '.join(rec.blockers)}", ev,
                       " && ".join(v.fixes) or None)
    if v.best != v.recommended:
        return Finding("profile-fit", "verdict", "Profiles", "warn",
                       f"{v.best} runs now; {v.recommended} fits this hardware once fixed: {'; '.join(rec.blockers)}", ev,
                       " && ".join(v.fixes) or None)
    status = "ok" if rec.fit == "fits" else "warn"
    return Finding("profile-fit", "verdict", "Profiles", status, f"{v.recommended} fits ({rec.reason})", ev,
                   None if status == "ok" else "keep the context short or free memory")


def diagnose(model_dir: Path, *, default_model_dir: bool = True, context: int = 2048, deep: bool = False,
             online: bool = False, endpoints: Optional[dict] = None, online_timeout: float = 3.0,
             probes: Optional[dict] = None, facts: Optional[Facts] = None) -> dict:
    """Probe (unless `facts` is given), check, decide. Returns the data `glmsetup doctor` prints."""
    from glmsetup import profiles
    from glmsetup.doctor import probes as p

    if facts is None:
        facts = p.gather(model_dir, default_model_dir=default_model_dir, deep=deep, online=online,
                         endpoints=endpoints, online_timeout=online_timeout, probes=probes)
    verdict = evaluate(facts, profiles.load_all(), context, model_dir)
    from glmsetup.doctor.verdict import finetune_verdict

    finetune = finetune_verdict(facts, profiles.load_all())
    findings = run_checks(facts, verdict)
    blocking = [f.id for f in findings if f.status == "fail"]
    from glmsetup.output import to_jsonable

    return {
        "ok": not blocking and verdict.best is not None,
        "blocking": blocking,
        "counts": {s: sum(f.status == s for f in findings) for s in ("ok", "warn", "fail", "skipped")},
        "checks": [to_jsonable(f) for f in findings],
        "verdict": verdict.to_dict(),
        "finetune": finetune,
        "facts": to_jsonable(facts),
        "model_dir": str(model_dir),
    }
