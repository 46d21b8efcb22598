"""`glmsetup fetch` end to end: pick the route, build the manifest, plan, guard, download, report."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from glmsetup import paths
from glmsetup.errors import DownloadError, UsageError
from glmsetup.fetch import hf, modelscope, tsinghua
from glmsetup.fetch.downloader import Downloader, Origin
from glmsetup.fetch.guard import FolderLock, check_space, free_space
from glmsetup.fetch.http import Settings, make_client
from glmsetup.fetch.listing import UnsafeListing, skipped_note
from glmsetup.fetch.manifest import FileSpec, Manifest, ensure_state_dir, save
from glmsetup.fetch.models import ModelEntry, get_model
from glmsetup.fetch.verified import VerifiedCache

SOURCE_CLASSES = {"hf": hf.HFSource, "modelscope": modelscope.ModelScopeSource, "tsinghua": tsinghua.TsinghuaSource}


@dataclass
class FetchRequest:
    model: str = "chatglm2-6b"
    source: str = "hf"
    revision: Optional[str] = None
    endpoint: Optional[str] = None
    weights_from: str = "hf"
    model_dir: Optional[Path] = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    dry_run: bool = False
    connections: Optional[int] = None
    progress: bool = False
    settings: Optional[Settings] = None
    stop: Optional[threading.Event] = field(default=None, repr=False)


def tsinghua_endpoint(flag: Optional[str]) -> Optional[str]:
    return flag or os.environ.get("GLMSETUP_TSINGHUA_ENDPOINT")


def make_source(name: str, model: ModelEntry, revision, endpoint, settings, client):
    if name == "tsinghua":
        endpoint = tsinghua_endpoint(endpoint)
    return SOURCE_CLASSES[name](model, revision, endpoint, settings, client)


def reference_manifest(model: ModelEntry, settings, client, exclude: str = "") -> Manifest:
    """A manifest with checksums for routes that have none: HF, else ModelScope, else the shipped table."""
    for name in ("hf", "modelscope"):
        if name == exclude:
            continue
        try:
            return make_source(name, model, None, None, settings, client).manifest()
        except UnsafeListing:  # a hostile reference is reported, never skipped for the next one
            raise
        except DownloadError:
            continue
    return Manifest(model=model.name, source="official", revision="main",
                    files=[FileSpec(p, s, sha, lfs=True) for p, (s, sha) in model.official.items()])


def checked_against(listing: Manifest, reference: Manifest) -> tuple:
    """Give a checksum-less listing the reference's checksums; (manifest, files that cannot be checked)."""
    ref = reference.by_path()
    files, unchecked = [], []
    for f in listing.files:
        r = ref.get(f.path)
        if r is not None and r.checkable:
            files.append(FileSpec(f.path, r.size, r.sha256, r.git_sha1, r.lfs))
        else:
            unchecked.append(f.path)
    return Manifest(listing.model, listing.source, reference.revision, files, reference.commit,
                    list(listing.skipped)), unchecked


def build_work(req: FetchRequest, model: ModelEntry, model_dir: Path, settings: Settings, client) -> tuple:
    """(manifest, {path: [Origin, ...]}, notes) for the requested route."""
    notes: List[str] = []
    if req.source in ("hf", "modelscope"):
        src = make_source(req.source, model, req.revision, req.endpoint, settings, client)
        manifest = src.manifest()
        notes += skipped_note(manifest, req.source)
        return manifest, {f.path: [src.origin()] for f in manifest.files}, notes
    if req.source == "tsinghua":
        src = make_source("tsinghua", model, None, req.endpoint, settings, client)
        listing = src.manifest()
        notes += skipped_note(listing, "tsinghua")
        reference = reference_manifest(model, settings, client)
        manifest, unchecked = checked_against(listing, reference)
        if unchecked:
            raise DownloadError(
                f"{len(unchecked)} file(s) of the Tsinghua share cannot be checked ({', '.join(unchecked[:4])}"
                f"{', ...' if len(unchecked) > 4 else ''}): the share has no checksums and no manifest from "
                "Hugging Face or ModelScope could be read",
                hint="make huggingface.co (or HF_ENDPOINT) or ModelScope reachable for the manifest, "
                     "or use --source hf / --source modelscope")
        origin = src.origin()
        origin.retry_on_mismatch = False
        return manifest, {f.path: [origin] for f in manifest.files}, notes
    if req.source == "git":
        from glmsetup.fetch import gitlfs

        endpoint = req.endpoint or os.environ.get("GLMSETUP_GIT_ENDPOINT") or hf.endpoint(None)
        manifest = gitlfs.clone_manifest(model, endpoint, model.hf_repo, model_dir, req.revision,
                                         dry_run=req.dry_run)
        notes += skipped_note(manifest, "git")
        if req.weights_from == "hf":
            src = hf.HFSource(model, req.revision, None, settings, client)
            src.commit = manifest.commit
        else:
            src = make_source(req.weights_from, model, None, None, settings, client)
        origin = src.origin()
        if req.weights_from == "tsinghua":
            origin.retry_on_mismatch = False
        return manifest, {f.path: [origin] for f in manifest.files}, notes
    if req.source == "auto":
        from glmsetup.fetch.auto import auto_work

        return auto_work(req, model, settings, client)
    raise UsageError(f"unknown source '{req.source}'", hint="use hf, modelscope, tsinghua, git or auto")


def fetch_model(req: FetchRequest) -> dict:
    model = get_model(req.model)
    model_dir = Path(req.model_dir).expanduser() if req.model_dir else paths.default_model_dir(model.name)
    settings = req.settings or Settings.from_env(connections=req.connections)
    if req.dry_run:
        return _run(req, model, model_dir, settings)
    with FolderLock(ensure_state_dir(model_dir)):
        return _run(req, model, model_dir, settings)


def _run(req: FetchRequest, model: ModelEntry, model_dir: Path, settings: Settings) -> dict:
    client = make_client(settings)
    try:
        manifest, origins, notes = build_work(req, model, model_dir, settings, client)
    finally:
        client.close()
    manifest = manifest.filtered(req.include, req.exclude)
    if not manifest.files:
        raise UsageError("no file matches --include/--exclude", hint="check the patterns (e.g. --exclude '*.bin')")
    cache = VerifiedCache(model_dir)
    plan, todo = [], []
    for spec in manifest.files:
        if req.dry_run and req.source == "git" and not spec.lfs:
            present = True  # comes with the clone itself
        else:
            present = cache.check(spec)
        partial = _partial_bytes(model_dir, spec)
        names = [o.name for o in origins.get(spec.path, [])]
        plan.append({"path": spec.path, "size": spec.size, "sha256": spec.sha256, "present": present,
                     "partial_bytes": 0 if present else partial, "sources": names})
        if not present:
            todo.append(spec)
    remaining = sum((p["size"] or 0) - p["partial_bytes"] for p in plan if not p["present"])
    free = free_space(model_dir)
    result = {
        "model": model.name, "source": req.source, "revision": manifest.revision, "commit": manifest.commit,
        "model_dir": str(model_dir), "files": plan, "total_bytes": manifest.total_bytes,
        "bytes_to_fetch": remaining, "disk_free_bytes": free, "dry_run": req.dry_run, "notes": notes,
        "next": f"glmsetup verify {model_dir}  |  glmsetup run cli --model {model_dir}",
    }
    if req.dry_run:
        result["disk_needed_bytes"] = remaining
        return result
    check_space(model_dir, remaining, free)
    manifest.options = {"source": req.source, "endpoint": req.endpoint, "revision": req.revision,
                        "weights_from": req.weights_from if req.source == "git" else None,
                        "include": list(req.include), "exclude": list(req.exclude)}
    save(manifest, model_dir)
    from glmsetup.fetch.progress import make_progress

    started = time.monotonic()
    work = [(spec, origins[spec.path]) for spec in todo]
    downloader = Downloader(model_dir, settings, stop=req.stop)
    with make_progress(req.progress) as progress:
        downloader.progress = progress
        tasks = downloader.run(work) if work else []
    elapsed = time.monotonic() - started
    failed = []
    for task in tasks:
        if task.status == "done":
            cache.remember(task.spec, task.sha256)
        else:
            failed.append({"path": task.spec.path, "error": _explain(task), "source": task.origin.name})
    cache.save()
    result.update({"seconds": round(elapsed, 3), "bytes_received": downloader.bytes_received,
                   "mb_per_s": round(downloader.bytes_received / 1e6 / elapsed, 1) if elapsed > 0 else None,
                   "failed": failed})
    for entry in plan:
        entry["present"] = entry["present"] or any(t.spec.path == entry["path"] and t.status == "done" for t in tasks)
    if failed:
        first = failed[0]
        raise DownloadError(f"{len(failed)} file(s) could not be downloaded; first: {first['error']}",
                            hint="run the same command again to resume (verified and partial bytes are kept), "
                                 "or try another --source / --endpoint", details=result)
    return result


def _explain(task) -> str:
    reason = task.error or (task.errors[-1] if task.errors else "failed")
    if task.origin.name == "tsinghua" and "checksum" in reason:
        got = reason.split("checksum ", 1)[1].split(" ", 1)[0] if "checksum " in reason else "?"
        return tsinghua.OLDER_VERSION.format(path=task.spec.path, got=got, want=task.spec.sha256 or task.spec.git_sha1)
    return reason


def _partial_bytes(model_dir: Path, spec: FileSpec) -> int:
    from glmsetup.fetch.partial import PartialFile

    p = PartialFile(model_dir, spec, 1 << 62)
    segments = p._load_record()
    return sum(s.done for s in segments) if segments else 0
