"""`--source auto`: ask every source, measure each, use the fastest, fall back per file to the others.

Each source is listed and a first slice (probe_bytes) of its largest file is fetched with Range to measure
speed. The sources are those of fetch/hubs.py (HF_ENDPOINT or huggingface.co, the HF mirror, ModelScope)
plus the Tsinghua share. The manifest comes from a hub (the first that answered, in that order); the share
only joins as an origin for weights whose sha256 is known and whose size it lists the same (another size
is an older version, said in a note). Every file gets its origins ordered fastest first; a file whose bytes
do not match is discarded and fetched from the next.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Dict, List

from glmsetup.errors import DownloadError
from glmsetup.fetch.http import Settings, make_client, open_following
from glmsetup.fetch.listing import UnsafeListing, clip, skipped_note


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
    from glmsetup.fetch.hubs import candidates
    from glmsetup.fetch.runner import checked_against, make_source

    named = candidates(model, settings, req.revision)  # hf (HF_ENDPOINT), the mirror, modelscope
    if model.tsinghua_folder:
        named.append(("tsinghua", make_source("tsinghua", model, None, None, settings, None)))

    def look(item):
        name, src = item
        own = make_client(settings)
        src.client = own
        try:
            listing = src.manifest()
            origin = src.origin()
            origin.name = name
            biggest = max(listing.files, key=lambda f: f.size or 0)
            speed = probe_speed(own, origin, biggest, settings.probe_bytes)
            return name, src, listing, origin, speed, None
        except UnsafeListing:  # a hostile source is reported and stops the run; it is not just "unavailable"
            raise
        except Exception as exc:  # a source that does not answer is simply left out
            message = exc.message if isinstance(exc, DownloadError) else f"{exc.__class__.__name__}: {exc}"
            return name, src, None, None, 0.0, message
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(len(named)) as pool:
        found = list(pool.map(look, named))
    alive = [(n, l, o, s) for n, _src, l, o, s, err in found if l is not None]
    notes = [f"{n}: {'%.1f MB/s' % (s / 1e6) if l is not None else 'unavailable (' + clip(err, 160) + ')'}"
             for n, _src, l, o, s, err in found]
    for _n, src, listing, *_rest in found:
        if listing is not None:
            notes += getattr(src, "notes", [])
    reference = next((l for n, l, o, s in alive if n != "tsinghua"), None)
    if reference is None:
        raise DownloadError("no source with checksums answered: " + "; ".join(notes),
                            hint="check the network and proxy (HTTPS_PROXY), raise --timeout, or set HF_ENDPOINT / "
                                 "MODELSCOPE_ENDPOINT")
    origins: Dict[str, List] = {f.path: [] for f in reference.files}
    ref_files = reference.by_path()
    for name, listing, origin, speed in sorted(alive, key=lambda a: -a[3]):
        if name == "tsinghua":
            origin.retry_on_mismatch = False
            for f in listing.files:
                r = ref_files.get(f.path)
                if r is not None and model.is_weight(f.path) and f.size != r.size:
                    notes.append(f"the share's {f.path} has {f.size:,} bytes, the published one {r.size:,}: "
                                 "an older version, not taken from the share")
            listing, _unchecked = checked_against(listing, reference)
        have = {f.path: f for f in listing.files}
        for spec in reference.files:
            other = have.get(spec.path)
            if other is None or other.size != spec.size:
                continue
            if name != "tsinghua" and spec.sha256 and other.sha256 and other.sha256 != spec.sha256:
                continue  # another revision on that hub: not the same file
            if name == "tsinghua" and not (spec.sha256 and model.is_weight(spec.path)):
                continue  # the share serves weights only, each checked by sha256
            origins[spec.path].append(origin)
    notes += skipped_note(reference, next(n for n, l, o, s in alive if l is reference))
    missing = [p for p, o in origins.items() if not o]
    reference.files = [f for f in reference.files if origins[f.path]]
    if missing:
        notes.append(f"no source serves {', '.join(missing)} with the manifest's size")
    reference.source = "auto"
    return reference, origins, notes
