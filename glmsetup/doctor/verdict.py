"""The verdict: which profiles fit this machine, ranked, and what to run next (pure: facts -> verdict).

Memory fit comes from the one estimator (glmsetup.requirements.estimate); software fit from the
facts (torch build, transformers version, ...). A profile "fits" with a safety margin, is "tight"
when it fits only the whole card or all of the RAM (close other programs, keep the context short),
and is runnable when nothing in the software blocks it.

Ranking: on a GPU quality first (fp16, bf16, fp16 split over GPUs, int8, int4); on Apple silicon
MPS; on a CPU decoding speed is bound by memory bandwidth, so fewer bytes per weight wins while the
quality holds: int8 (per-row scales, about 0.2% error), then bf16, fp32, and int4 last.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from packaging.version import InvalidVersion, Version

from glmsetup import paths, requirements
from glmsetup.doctor import torch_wheels
from glmsetup.doctor.checks import gb
from glmsetup.doctor.facts import Facts
from glmsetup.profiles import Profile

GPU_MARGIN = 0.95  # of free VRAM
RAM_MARGIN = 0.90  # of available RAM
MPS_BUDGET = 2 / 3  # Metal's recommended working set is about 2/3 of unified memory
MPS_TIGHT = 0.85

PRECISION_RANK = {
    "cuda": {"fp16": 0, "bf16": 1, "fp32": 2, "int8": 4, "int4": 5},
    "mps": {"fp16": 0, "bf16": 1, "fp32": 2},
    "cpu": {"int8": 0, "bf16": 1, "fp32": 2, "int4": 3, "fp16": 4},
}
DEVICE_RANK = {"cuda": 0, "mps": 1, "cpu": 2}


@dataclass
class ProfileFit:
    name: str
    summary: str
    device: str
    backend: str
    need: float  # bytes (the largest card's share for several GPUs)
    budget: Optional[float]  # bytes that count as "fits"
    fit: str  # fits, tight, no
    where: str  # "GPU 0 (NVIDIA GeForce RTX 4090)", "RAM", "unified memory"
    reason: str
    blockers: list = field(default_factory=list)
    fixes: list = field(default_factory=list)  # commands that remove the blockers

    @property
    def runnable(self) -> bool:
        return self.fit in ("fits", "tight") and not self.blockers


@dataclass
class Verdict:
    context: int
    profiles: list  # [ProfileFit], ranked
    best: Optional[str]  # the best profile that runs now
    recommended: Optional[str]  # the best profile for this hardware (may need the fixes first)
    fixes: list  # commands to run before `recommended` works
    estimate: Optional[dict]  # the estimator's breakdown for `recommended`
    next_commands: list

    def to_dict(self) -> dict:
        from glmsetup.output import to_jsonable

        d = {k: to_jsonable(getattr(self, k)) for k in ("context", "best", "recommended", "fixes", "estimate",
                                                          "next_commands")}
        d["profiles"] = [{**to_jsonable(p), "runnable": p.runnable} for p in self.profiles]
        return d


def _v(text: Optional[str]) -> Optional[Version]:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def rank_key(p: Profile) -> tuple:
    precision = PRECISION_RANK.get(p.device, {}).get(p.precision, 9)
    if p.num_gpus > 1:
        precision += 2.5  # after one card at full precision, before int8
    return (DEVICE_RANK.get(p.device, 9), precision, 0 if p.backend == "native" else 1, p.name)


def hardware_fit(p: Profile, est: requirements.Estimate, facts: Facts) -> tuple:
    """(fit, need, budget, where, reason)."""
    need = est.total
    if p.device == "cuda":
        gpus = sorted(facts.gpus, key=lambda g: g.free, reverse=True)
        if not gpus:
            return "no", need, None, "GPU", "no NVIDIA GPU"
        if p.dtype == "bfloat16":
            old = [g for g in gpus if g.compute_capability and tuple(g.compute_capability) < (8, 0)]
            gpus = [g for g in gpus if g not in old]
            if not gpus:
                cc = ".".join(map(str, old[0].compute_capability))
                return "no", need, None, "GPU", f"bfloat16 needs compute capability 8.0 or newer ({old[0].name}: {cc})"
        if p.num_gpus > 1:
            if len(gpus) < p.num_gpus:
                return "no", need, None, "GPUs", f"needs {p.num_gpus} GPUs, found {len(gpus)}"
            shares = sorted(est.per_device, reverse=True)
            used = gpus[: p.num_gpus]
            where = f"{p.num_gpus} GPUs"
            pairs = ", ".join(f"{gb(s)} of {gb(g.free)} free on GPU {g.index}" for s, g in zip(shares, used))
            if all(s <= GPU_MARGIN * g.free for s, g in zip(shares, used)):
                return "fits", shares[0], GPU_MARGIN * used[0].free, where, pairs
            if all(s <= g.total for s, g in zip(shares, used)):
                return "tight", shares[0], used[0].total, where, pairs + " (fits the whole cards only)"
            return "no", shares[0], used[0].total, where, pairs
        g = gpus[0]
        where = f"GPU {g.index} ({g.name})"
        if need <= GPU_MARGIN * g.free:
            return "fits", need, GPU_MARGIN * g.free, where, f"{gb(need)} of {gb(g.free)} free VRAM"
        if need <= g.total:
            return "tight", need, g.total, where, (f"{gb(need)} > {gb(GPU_MARGIN * g.free)} usable of {gb(g.free)} "
                                                    f"free, <= {gb(g.total)} on the card: close other GPU programs")
        return "no", need, g.total, where, f"{gb(need)} > {gb(g.total)} VRAM"
    mem = facts.memory
    if p.device == "mps":
        if facts.system and facts.system.rosetta:
            return "no", need, None, "unified memory", "this Python runs under Rosetta (x86_64): no MPS"
        if not facts.is_mac_arm:
            return "no", need, None, "unified memory", "MPS needs a Mac with Apple silicon"
        if mem is None:
            return "no", need, None, "unified memory", "memory unknown"
        budget = MPS_BUDGET * mem.total
        if need <= budget and need <= mem.available:
            return "fits", need, budget, "unified memory", f"{gb(need)} of {gb(budget)} that Metal lets the GPU use"
        if need <= MPS_TIGHT * mem.total:
            return "tight", need, MPS_TIGHT * mem.total, "unified memory", (
                f"{gb(need)} > {gb(budget)} (2/3 of {gb(mem.total)}): macOS will swap, slowly")
        return "no", need, mem.total, "unified memory", f"{gb(need)} > {gb(mem.total)}"
    if mem is None:
        return "no", need, None, "RAM", "memory unknown"
    avail, total = mem.effective_available, mem.effective_total
    capped = " (container limit)" if mem.cgroup_limit and mem.cgroup_limit < mem.total else ""
    if need <= RAM_MARGIN * avail:
        return "fits", need, RAM_MARGIN * avail, "RAM", f"{gb(need)} of {gb(avail)} available RAM{capped}"
    if need <= RAM_MARGIN * total:
        return "tight", need, RAM_MARGIN * total, "RAM", (f"{gb(need)} > {gb(RAM_MARGIN * avail)} usable of "
                                                          f"{gb(avail)} available, <= {gb(total)} total{capped}: "
                                                          "close other programs")
    return "no", need, RAM_MARGIN * total, "RAM", f"{gb(need)} > {gb(RAM_MARGIN * total)} usable of {gb(total)} RAM{capped}"


def software_blockers(p: Profile, facts: Facts) -> tuple:
    """(blockers, fixes) that stop this profile from running with what is installed."""
    blockers, fixes = [], []
    os_name = facts.system.os if facts.system else "Linux"
    nv = facts.nvidia
    torch_cmd, _why = torch_wheels.install_command(os_name, nv.cuda if nv else None, bool(facts.gpus))
    t = facts.torch  # None: could not be probed, so it blocks nothing
    if t is not None and t.version is None:
        blockers.append("torch is not installed")
        if torch_cmd:
            fixes.append(torch_cmd)
    elif t is None:
        pass
    elif p.device == "cuda":
        if t.cuda is None:
            blockers.append(f"torch {t.version} is a CPU build")
            if torch_cmd:
                fixes.append(f"pip uninstall -y torch && {torch_cmd}")
        elif nv and torch_wheels.torch_fits_driver(t.cuda, nv.cuda)[0] == "fail":
            blockers.append(torch_wheels.torch_fits_driver(t.cuda, nv.cuda)[1])
            if torch_cmd:
                fixes.append(f"pip uninstall -y torch && {torch_cmd}")
        elif torch_wheels.torch_lacks_kernels(t.cuda, [g.compute_capability for g in facts.gpus]):
            blockers.append(torch_wheels.torch_lacks_kernels(t.cuda, [g.compute_capability for g in facts.gpus]))
            if torch_cmd:
                fixes.append(f"pip uninstall -y torch && {torch_cmd}")
        elif t.deep and t.deep.get("cuda_available") is False:
            blockers.append("torch.cuda.is_available() is False" + (f" ({t.deep['error']})" if t.deep.get("error") else ""))
    elif p.device == "mps" and t.deep and t.deep.get("mps_available") is False:
        blockers.append("torch.backends.mps.is_available() is False")
    if facts.packages is None:
        return blockers, fixes
    tf = _v(facts.version("transformers"))
    if p.backend == "native":
        if tf is None or tf < Version(requirements.NATIVE_TRANSFORMERS):
            blockers.append(f"the native runtime needs transformers >= {requirements.NATIVE_TRANSFORMERS}"
                            + (f" (found {tf})" if tf else " (not installed)"))
            fixes.append(f'pip install -U "transformers>={requirements.NATIVE_TRANSFORMERS}"')
    else:
        if tf is None or tf > Version(requirements.OFFICIAL_TRANSFORMERS_MAX + ".99"):
            blockers.append(f"the official remote code needs transformers <= {requirements.OFFICIAL_TRANSFORMERS_MAX}"
                            + (f" (found {tf})" if tf else " (not installed)"))
            fixes.append('python -m venv official-env && official-env/bin/pip install "transformers==4.41.2"')
        if p.device == "cuda" and p.quantization_bits and not facts.version("cpm-kernels"):
            blockers.append("the official .quantize() needs cpm_kernels")
            fixes.append("pip install cpm_kernels")
    if not facts.version("sentencepiece"):
        blockers.append("sentencepiece is not installed (the tokenizer)")
        fixes.append("pip install sentencepiece")
    if p.num_gpus > 1 and not facts.version("accelerate"):
        blockers.append("splitting layers over GPUs needs accelerate")
        fixes.append("pip install accelerate")
    return blockers, fixes


def evaluate(facts: Facts, profiles: list, context: int = 2048, model_dir: Optional[Path] = None) -> Verdict:
    fits = []
    for p in sorted(profiles, key=rank_key):
        est = requirements.estimate(p, context)
        fit, need, budget, where, reason = hardware_fit(p, est, facts)
        blockers, fixes = software_blockers(p, facts)
        fits.append(ProfileFit(p.name, p.summary, p.device, p.backend, need, budget, fit, where, reason,
                               blockers, list(dict.fromkeys(fixes))))
    by_name = {p.name: p for p in profiles}
    runnable = [f for f in fits if f.runnable]
    best = next((f for f in runnable if f.fit == "fits"), None) or next(iter(runnable), None)
    hw = next((f for f in fits if f.fit == "fits"), None) or next((f for f in fits if f.fit == "tight"), None)
    recommended = best
    if hw is not None and (best is None or fits.index(hw) < fits.index(best)) and hw.fit == "fits":
        recommended = hw
    if recommended is None:
        recommended = hw
    fixes = list(recommended.fixes) if recommended else []
    est = requirements.estimate(by_name[recommended.name], context).to_dict() if recommended else None
    commands = next_commands(recommended.name, fixes, facts, model_dir) if recommended else []
    return Verdict(context, fits, best.name if best else None, recommended.name if recommended else None,
                   fixes, est, commands)


def model_complete(facts: Facts) -> bool:
    m = facts.model
    return bool(m and m.exists and isinstance(m.report, dict) and m.report.get("ok"))


def next_commands(profile: str, fixes: list, facts: Facts, model_dir: Optional[Path]) -> list:
    custom = model_dir is not None and not facts.default_model_dir
    where = f" --model-dir {model_dir}" if custom else ""
    commands = list(fixes)
    if not model_complete(facts):
        source = fastest_source(facts)
        commands.append(f"glmsetup fetch{where}" + (f" {source}" if source else ""))
    if facts.packages and not facts.version("gradio"):  # probed, and `run web` would stop with exit 3
        from glmsetup.errors import EXTRAS_HINT

        commands.append(EXTRAS_HINT["web"])
    commands.append(f"glmsetup run web --profile {profile}" + (f" --model {model_dir}" if custom else ""))
    return commands


def fastest_source(facts: Facts) -> str:
    """The fetch options of the fastest source that answered (with --online), else ""."""
    rows = (facts.network.online if facts.network else None) or []
    good = [r for r in rows if r.get("status") is not None and r["status"] < 400]
    if not good:
        return ""
    best = min(good, key=lambda r: r["ms"])
    return "" if best["source"] == "hf" and best["fetch_flag"] == "--source hf" else best["fetch_flag"]


def finetune_verdict(facts: Facts, profiles: list, settings: Optional[dict] = None) -> dict:
    """Which profile fits fine-tuning with each method (the table's second column), ranked like `evaluate`.

    One device per run (no multi-GPU split), native backend only; LoRA needs float weights and peft.
    """
    from glmsetup.output import to_jsonable

    base = requirements.FinetuneSettings(**(settings or {}))
    methods = []
    for method in requirements.FINETUNE_METHODS:
        s = requirements.FinetuneSettings(**{**to_jsonable(base), "method": method,
                                             "lora_targets": base.lora_targets})
        rows, best, best_est = [], None, None
        for p in sorted(profiles, key=rank_key):
            if p.backend != "native" or p.num_gpus > 1:
                continue
            est = requirements.finetune_estimate(p, s)
            fit, need, _budget, where, reason = hardware_fit(p, est, facts)
            blockers, fixes = software_blockers(p, facts)
            if method == "lora" and p.quantization_bits:
                blockers.append("LoRA trains float weights (use ptuning over int8/int4)")
            if method == "lora" and facts.packages is not None and not facts.version("peft"):
                blockers.append("LoRA needs peft")
                fixes.append('pip install "glmsetup[finetune]"')
            runnable = fit in ("fits", "tight") and not blockers
            rows.append({"name": p.name, "fit": fit, "need": round(need), "where": where, "reason": reason,
                         "blockers": blockers, "fixes": list(dict.fromkeys(fixes)), "runnable": runnable,
                         "usable": not (method == "lora" and p.quantization_bits)})
            if best is None and runnable and fit == "fits":
                best, best_est = p.name, est
        methods.append({"method": method, "best": best, "profiles": rows,
                        "estimate": best_est.to_dict() if best_est else None})
    return {"settings": {**to_jsonable(base), "lora_targets": list(base.lora_targets)}, "methods": methods}
