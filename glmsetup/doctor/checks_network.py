"""Checks of the download settings, the sources (--online) and the model folder (pure, like checks.py)."""
from __future__ import annotations

from glmsetup.doctor.checks import Finding, gb
from glmsetup.doctor.facts import Facts
from glmsetup.modelfiles import holds_model_files

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_hf_endpoint(facts: Facts) -> Finding:
    env = facts.network.env
    ev = [f"{k}={v}" for k, v in env.items() if k.startswith(("HF_", "TRANSFORMERS_", "MODELSCOPE_"))]
    endpoint = env.get("HF_ENDPOINT")
    if env.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or env.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return Finding("hf-endpoint", "network", "Hugging Face settings", "warn", "offline mode is on: nothing downloads",
                       ev, "unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE to download")
    if env.get("HF_HUB_ENABLE_HF_TRANSFER", "0") not in ("", "0") and not facts.network.hf_transfer:
        return Finding("hf-endpoint", "network", "Hugging Face settings", "warn",
                       "HF_HUB_ENABLE_HF_TRANSFER is set but hf_transfer is not installed", ev,
                       "pip install hf_transfer   (or unset HF_HUB_ENABLE_HF_TRANSFER)")
    if endpoint is None:
        return Finding("hf-endpoint", "network", "Hugging Face settings", "ok", "https://huggingface.co (HF_ENDPOINT not set)",
                       ev + ["in mainland China: export HF_ENDPOINT=https://hf-mirror.com, or glmsetup fetch --source modelscope"])
    if not endpoint.startswith(("http://", "https://")):
        return Finding("hf-endpoint", "network", "Hugging Face settings", "fail", f"HF_ENDPOINT={endpoint} has no http(s)://",
                       ev, f"export HF_ENDPOINT=https://{endpoint.strip('/')}")
    return Finding("hf-endpoint", "network", "Hugging Face settings", "ok", f"HF_ENDPOINT={endpoint}", ev)


def check_proxy(facts: Facts) -> Finding:
    env = facts.network.env
    set_ = {k: v for k, v in env.items() if k in PROXY_VARS}
    ev = [f"{k}={v}" for k, v in env.items() if k.lower().endswith("proxy")]
    if not set_:
        return Finding("proxy", "network", "Proxy", "ok", "no proxy set", ev)
    bad = [k for k, v in set_.items() if "://" not in v]
    if bad:
        return Finding("proxy", "network", "Proxy", "warn", f"{bad[0]} has no scheme: {set_[bad[0]]}", ev,
                       f"export {bad[0]}=http://{set_[bad[0]]}")
    socks = [k for k, v in set_.items() if v.lower().startswith("socks")]
    if socks and facts.network.socks_support is False:
        return Finding("proxy", "network", "Proxy", "warn", f"{socks[0]} is a SOCKS proxy and socksio is missing", ev,
                       'pip install "httpx[socks]"')
    shown = next(iter(set_.values()))
    return Finding("proxy", "network", "Proxy", "ok", f"through {shown}", ev)


def check_sources(facts: Facts) -> list:
    rows = facts.network.online if facts.network else None
    if rows is None:
        return []
    out = []
    for r in rows:
        cid, title = f"source-{r['source']}", f"source {r['source']}"
        ev = [f"HEAD {r['url']}", f"fetch with: glmsetup fetch {r['fetch_flag']}"]
        if r.get("status") is not None and r["status"] < 400:
            out.append(Finding(cid, "network", title, "ok", f"answered {r['status']} in {r['ms']:.0f} ms", ev))
        elif r.get("status") is not None:
            out.append(Finding(cid, "network", title, "warn", f"answered {r['status']} in {r['ms']:.0f} ms", ev,
                               "try another source (glmsetup fetch --source ...)"))
        else:
            out.append(Finding(cid, "network", title, "warn", f"no answer: {r['error']} ({r['ms']:.0f} ms)", ev,
                               "check the proxy settings, or try another source"))
    if rows and all(f.status != "ok" for f in out):
        out.append(Finding("sources", "network", "Download sources", "warn", "no download source answered", [],
                           "check the network and the proxy (HTTPS_PROXY)"))
    return out


PROBLEMS = {
    "missing": "missing",
    "pointer": "an LFS pointer file in place of the weights (cloned without git-lfs)",
    "html": "an HTML page saved in place of a file (a mirror's error page)",
    "empty": "empty",
    "truncated": "truncated",
    "mismatch": "does not match its checksum",
}


def check_model(facts: Facts) -> Finding:
    m = facts.model
    title = "Model folder"
    if not m.exists:
        return Finding("model", "model", title, "skipped", f"not downloaded yet: {m.path}", [], "glmsetup fetch"
                       + ("" if facts.default_model_dir else f" --model-dir {m.path}"))
    if m.unavailable:
        return Finding("model", "model", title, "skipped", f"could not check ({m.unavailable})", [m.path])
    r = m.report or {}
    files = r.get("files") or []
    if r.get("stopped") and isinstance(r.get("unfinished"), str):  # an earlier fetch stopped: resume it
        missing = sum(1 for i in r.get("issues") or [] if i.get("problem") == "missing")
        return Finding("model", "model", title, "skipped",
                       f"not downloaded yet (an earlier fetch stopped): {missing} file(s) not there yet in {m.path}",
                       [], r["unfinished"])
    if not files and r.get("kind", "unknown") == "unknown":
        return Finding("model", "model", title, "skipped", f"empty folder, not downloaded yet: {m.path}", [],
                       "glmsetup fetch" + ("" if facts.default_model_dir else f" --model-dir {m.path}"))
    ev = [f"{m.path}: kind {r.get('kind', '?')}, {len(files)} files"]
    issues = r.get("issues") or []
    for issue in issues[:12]:
        problem = issue.get("problem", "?")
        ev.append(f"{issue.get('path')}: {PROBLEMS.get(problem, problem)}" + (f" ({issue['detail']})" if issue.get("detail") else ""))
    repair = "glmsetup fetch" + ("" if facts.default_model_dir else f" --model-dir {m.path}")
    if r.get("ok"):
        size = f", {gb(facts.disk.existing_bytes)}" if facts.disk else ""
        ev.append(f"every file is there and none is an LFS pointer or an error page; `glmsetup verify {m.path}` "
                  "checks sizes and sha256")
        return Finding("model", "model", title, "ok", f"complete ({r.get('kind')}{size})", ev)
    if r.get("kind") == "unknown" and (not issues or not holds_model_files(files)):
        return Finding("model", "model", title, "fail", "not a ChatGLM2 checkpoint", ev, f"point --model-dir at a ChatGLM2 folder, or {repair}")
    kinds = sorted({i.get("problem") for i in issues})
    summary = f"{len(issues)} problem file(s): " + ", ".join(k for k in kinds if k)
    if "pointer" in kinds:
        summary += " (LFS pointers where weights belong)"
    return Finding("model", "model", title, "fail", summary, ev, f"{repair}   (fetches what is missing or damaged)")
