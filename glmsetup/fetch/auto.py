"""`--source auto`: ask every source, measure each, use the fastest, fall back per file to the others.

Each source is listed and a first slice (probe_bytes) of its largest file is fetched with Range to measure
speed. The manifest comes from a source with checksums (HF, else ModelScope; the Tsinghua share only joins
as an origin for files whose checksums are known). Every file gets its origins ordered fastest first.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Dict, List

from glmsetup.errors import DownloadError
from glmsetup.fetch.http import Settings, make_client, open_following
from glmsetup.fetch.listing import UnsafeListing, skipped_note


def probe_speed(client, origin, spec, nbytes: int) -> float:
    """Bytes per second for the first `nbytes` of a file from one origin."""
    headers = dict(origin.headers)
    headers.update({"Range": f"bytes=0-{max(0, min(nbytes, spec.size or nbytes) - 1)}", "Accept-Encoding": "identity"})
    started = time.monotonic()
    response, _url, _ = open_following(client, origin.url_for(spec.path), headers, auth_host=origin.auth_host)
    try:
        if response.status_code not in (200, 206) or "text/html" in response.headers.get("content-type", ""):
            raise DownloadError(f"probe answered HTTP {response.status_code}")
        got = 0
        for chunk in response.iter_raw():
            got += len(chunk)
            if got >= nbytes:
                break
    finally:
        response.close()
    return got / max(time.monotonic() - started, 1e-6)


def auto_work(req, model, settings: Settings, client) -> tuple:
    from glmsetup.fetch.runner import checked_against, make_source

    names = ["hf", "modelscope"] + (["tsinghua"] if model.tsinghua_folder else [])

    def look(name):
        own = make_client(settings)
        try:
            src = make_source(name, model, req.revision if name != "tsinghua" else None, None, settings, own)
            listing = src.manifest()
            origin = src.origin()
            biggest = max(listing.files, key=lambda f: f.size or 0)
            speed = probe_speed(own, origin, biggest, settings.probe_bytes)
            return name, listing, origin, speed, None
        except UnsafeListing:  # a hostile source is reported and stops the run; it is not just "unavailable"
            raise
        except Exception as exc:  # a source that does not answer is simply left out
            return name, None, None, 0.0, f"{exc.__class__.__name__}: {exc}"
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        found = list(pool.map(look, names))
    alive = [(n, l, o, s) for n, l, o, s, err in found if l is not None]
    notes = [f"{n}: {'%.1f MB/s' % (s / 1e6) if l is not None else 'unavailable (' + str(err)[:120] + ')'}"
             for n, l, o, s, err in found]
    reference = next((l for n, l, o, s in alive if n in ("hf", "modelscope")), None)
    if reference is None:
        raise DownloadError("no source with checksums answered: " + "; ".join(notes),
                            hint="check the network, HF_ENDPOINT / MODELSCOPE_DOMAIN, or name a --source")
    origins: Dict[str, List] = {f.path: [] for f in reference.files}
    for name, listing, origin, speed in sorted(alive, key=lambda a: -a[3]):
        if name == "tsinghua":
            origin.retry_on_mismatch = False
            listing, _unchecked = checked_against(listing, reference)
        have = {f.path: f for f in listing.files}
        for spec in reference.files:
            other = have.get(spec.path)
            if other is not None and other.size == spec.size:
                origins[spec.path].append(origin)
    notes += skipped_note(reference, next(n for n, l, o, s in alive if l is reference))
    missing = [p for p, o in origins.items() if not o]
    reference.files = [f for f in reference.files if origins[f.path]]
    if missing:
        notes.append(f"no source serves {', '.join(missing)} with the manifest's size")
    reference.source = "auto"
    return reference, origins, notes
