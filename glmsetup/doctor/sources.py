"""`doctor --online`: how fast each download source answers (called from probes.py only).

One HEAD request per source, all at once, short timeouts, redirects not followed, nothing
downloaded. Endpoints can be overridden (`--endpoint hf=http://127.0.0.1:PORT`), which is how the
tests point the doctor at a loopback server. HF_ENDPOINT and MODELSCOPE_ENDPOINT (or the older
MODELSCOPE_DOMAIN) are honoured.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from glmsetup.fetch.models import (HF_ENDPOINT, MODELS, MODELSCOPE_ENDPOINT, TSINGHUA_ENDPOINT,
                                   TSINGHUA_SHARE)

_MODEL = MODELS["chatglm2-6b"]
# name -> (default base URL, path of a small file to ask about, the `glmsetup fetch` options that pick it)
SOURCES: dict[str, tuple] = {
    "hf": (HF_ENDPOINT, f"/{_MODEL.hf_repo}/resolve/{_MODEL.hf_revision}/config.json", "--source hf"),
    "hf-mirror": ("https://hf-mirror.com", f"/{_MODEL.hf_repo}/resolve/{_MODEL.hf_revision}/config.json",
                  "--source hf --endpoint https://hf-mirror.com"),
    "modelscope": (MODELSCOPE_ENDPOINT, f"/api/v1/models/{_MODEL.modelscope_id}/repo?Revision="
                   f"{_MODEL.modelscope_revision}&FilePath=config.json", "--source modelscope"),
    "tsinghua": (TSINGHUA_ENDPOINT, f"/d/{TSINGHUA_SHARE}/", "--source tsinghua"),
}


def endpoints_from_env(env=None) -> dict:
    env = os.environ if env is None else env
    out = {}
    if env.get("HF_ENDPOINT"):
        out["hf"] = env["HF_ENDPOINT"]
    domain = env.get("MODELSCOPE_ENDPOINT") or env.get("MODELSCOPE_DOMAIN")  # the SDK's current name, then its older
    if domain:
        out["modelscope"] = domain if "://" in domain else f"https://{domain}"
    return out


def fetch_flag(source: str, base: str) -> str:
    """The `glmsetup fetch` options that pick this source."""
    default_base, _path, flag = SOURCES[source]
    if base.rstrip("/") == default_base:
        return flag
    name = "hf" if source == "hf-mirror" else source
    return f"--source {name} --endpoint {base.rstrip('/')}"


def probe_one(client, source: str, base: str) -> dict:
    import httpx

    url = base.rstrip("/") + SOURCES[source][1]
    start = time.perf_counter()
    row: dict = {"source": source, "url": url, "status": None, "ms": None, "error": None,
                 "fetch_flag": fetch_flag(source, base)}
    try:
        response = client.head(url)
        row["status"] = response.status_code
    except httpx.TimeoutException:
        row["error"] = "no answer in time"
    except httpx.HTTPError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    row["ms"] = round((time.perf_counter() - start) * 1000, 1)
    return row


def probe_sources(endpoints: Optional[dict] = None, timeout: float = 3.0, env=None) -> list:
    """One HEAD per source; `endpoints` maps a source name to a base URL (overrides the env)."""
    import httpx

    bases = {name: spec[0] for name, spec in SOURCES.items()}
    bases.update(endpoints_from_env(env))
    for name, url in (endpoints or {}).items():
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
        bases[name] = url
    if bases["hf"].rstrip("/") == bases["hf-mirror"].rstrip("/"):
        del bases["hf-mirror"]  # HF_ENDPOINT already is the mirror
    with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False,
                      headers={"User-Agent": "glmsetup-doctor"}) as client:
        with ThreadPoolExecutor(max_workers=len(bases)) as pool:
            rows = list(pool.map(lambda item: probe_one(client, *item), bases.items()))
    return rows
