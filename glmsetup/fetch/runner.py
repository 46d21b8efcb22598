"""`glmsetup fetch` end to end: pick the route, build the manifest, plan, guard, download, report.

A run marks the folder (`.glmsetup/partial/run.json`, with the command that resumes it) when it starts and
unmarks it when every file is in place, so that run, convert, verify and doctor can say "not downloaded
yet (an earlier fetch stopped)" instead of "not a model folder" (glmsetup.modelfiles reads the mark).
A dry run, or `--offline`, writes nothing; when the server cannot be reached (or with `--offline`) its plan
comes from the table shipped with glmsetup and says it is not confirmed with the server.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from glmsetup import paths
from glmsetup.errors import DownloadError, UsageError
from glmsetup.fetch import hf, modelscope, status, tsinghua
from glmsetup.fetch.downloader import Downloader
from glmsetup.fetch.guard import MARGIN, FolderLock, check_space, free_space
from glmsetup.fetch.http import Settings, make_client
from glmsetup.fetch.listing import UnsafeListing, clip, skipped_note
from glmsetup.fetch.manifest import (FileSpec, Manifest, ensure_state_dir, save, selected, state_dir,
                                     write_json_atomic)
from glmsetup.fetch.models import SMALL_FILES, ModelEntry, get_model
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
    force: bool = False  # replace files of the user's in the way (kept in .glmsetup/replaced/): fetch/existing.py
    offline: bool = False  # the plan from the shipped table: nothing asked, nothing written
    connections: Optional[int] = None
    timeout: Optional[float] = None  # seconds a host has to answer a listing request
    progress: bool = False
    report: bool = False  # say on stderr what is being waited for (hosts, listings, rate limits)
    settings: Optional[Settings] = None
    stop: Optional[threading.Event] = field(default=None, repr=False)

    def options(self) -> dict:
        """The flags that choose the files, as saved with the manifest (verify's repair repeats them)."""
        return {"source": self.source, "endpoint": self.endpoint, "revision": self.revision,
                "weights_from": self.weights_from if self.source == "git" else None,
                "include": list(self.include), "exclude": list(self.exclude)}


def tsinghua_endpoint(flag: Optional[str]) -> Optional[str]:
    return flag or os.environ.get("GLMSETUP_TSINGHUA_ENDPOINT")


def make_source(name: str, model: ModelEntry, revision, endpoint, settings, client):
    if name == "tsinghua":
        endpoint = tsinghua_endpoint(endpoint)
    return SOURCE_CLASSES[name](model, revision, endpoint, settings, client)


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
        notes += src.notes + skipped_note(manifest, req.source)
        return manifest, {f.path: [src.origin()] for f in manifest.files}, notes
    if req.source == "tsinghua":
        from glmsetup.fetch.share import share_work

        return share_work(make_source("tsinghua", model, None, req.endpoint, settings, client), model, model_dir,
                          settings)
    if req.source == "git":
        from glmsetup.fetch import gitlfs

        endpoint = req.endpoint or os.environ.get("GLMSETUP_GIT_ENDPOINT") or hf.endpoint(None)
        manifest = gitlfs.clone_manifest(model, endpoint, model.hf_repo, model_dir, req.revision,
                                         dry_run=req.dry_run, force=req.force, notes=notes, settings=settings)
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
    settings = req.settings or Settings.from_env(connections=req.connections, metadata_timeout=req.timeout)
    with status.use(status.Reporter() if req.report else status.Silent()):
        if req.offline:
            return table_plan(req, model, model_dir, "--offline: no server was asked")
        if req.dry_run:
            return _run(req, model, model_dir, settings)
        from glmsetup.fetch.existing import left_as_found

        with left_as_found(model_dir), FolderLock(ensure_state_dir(model_dir)):  # a refused run leaves no trace
            mark_started(model_dir, req, model)
            result = _run(req, model, model_dir, settings)
            mark_finished(model_dir)
            return result


RUN_MARK = "run.json"  # in .glmsetup/partial/: a fetch started here and has not finished (modelfiles reads it)


def mark_started(model_dir: Path, req: FetchRequest, model: ModelEntry) -> None:
    from glmsetup.fetch.verify import fetch_command

    folder = ensure_state_dir(model_dir, "partial")
    write_json_atomic(folder / RUN_MARK, {"model": model.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          "command": fetch_command(model.name, model_dir, req.options())})


def mark_finished(model_dir: Path) -> None:
    from glmsetup.fetch.safefs import remove_tree

    remove_tree(state_dir(model_dir) / "partial" / RUN_MARK)


def _run(req: FetchRequest, model: ModelEntry, model_dir: Path, settings: Settings) -> dict:
    client = make_client(settings)
    try:
        manifest, origins, notes = build_work(req, model, model_dir, settings, client)
    except UnsafeListing:  # a hostile source is reported, never papered over by the table
        raise
    except DownloadError as exc:
        if req.dry_run:  # the plan can still be made from the table shipped with glmsetup
            return table_plan(req, model, model_dir, clip(exc.message, 240))
        raise
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
    from glmsetup.fetch import existing  # files of the user's in the way: refused before the first write

    in_way = existing.find(model_dir, todo, cache, force=req.force, dry_run=req.dry_run, notes=notes)
    remaining = sum((p["size"] or 0) - p["partial_bytes"] for p in plan if not p["present"])
    free = free_space(model_dir)
    result = {
        "model": model.name, "source": req.source, "revision": manifest.revision, "commit": manifest.commit,
        "model_dir": str(model_dir), "files": plan, "total_bytes": manifest.total_bytes,
        "bytes_to_fetch": remaining, "disk_free_bytes": free, "dry_run": req.dry_run, "notes": notes,
        "confirmed": True, "basis": "server", "not_confirmed": None,
        "next": f"glmsetup verify {model_dir}  |  glmsetup run cli --model {model_dir}",
    }
    if req.dry_run:
        result.update(disk_needed_bytes=remaining, disk_ok=remaining + MARGIN <= free)
        return result
    check_space(model_dir, remaining, free)
    notes += existing.move_aside(model_dir, in_way)
    manifest.options = req.options()
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
            notes += _fallback_note(task)
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
        login = next((t.login for t in tasks if t.status != "done" and t.login), None)
        raise DownloadError(f"{len(failed)} file(s) could not be downloaded; first: {first['error']}",
                            hint=login if login else
                            "run the same command again to resume (verified and partial bytes are kept), "
                            "or try another --source / --endpoint", details=result)
    return result


def _older_on_share(task) -> bool:
    return any("checksum" in e and "(from tsinghua)" in e for e in task.errors)


def _explain(task) -> str:
    reason = task.error or (task.errors[-1] if task.errors else "failed")
    if _older_on_share(task):
        got = next((e.split("checksum ", 1)[1].split(" ", 1)[0] for e in task.errors
                    if "(from tsinghua)" in e and "checksum " in e), "?")
        message = tsinghua.OLDER_VERSION.format(path=task.spec.path, got=got,
                                                want=task.spec.sha256 or task.spec.git_sha1)
        if task.origin.name != "tsinghua":
            message += f"; {task.origin.name} failed too: {reason}"
        return message
    return reason


def _fallback_note(task) -> List[str]:
    if _older_on_share(task) and task.origin.name != "tsinghua":
        return [f"the share's {task.spec.path} is an older version (its sha256 differs): discarded, taken from "
                f"{task.origin.name} instead"]
    return []


def table_plan(req: FetchRequest, model: ModelEntry, model_dir: Path, why: str) -> dict:
    """The plan from the table shipped with glmsetup: every file the model has, the sizes it knows, the disk
    check. Marked as not confirmed with the server (the files and sizes the server lists may differ)."""
    cache = VerifiedCache(model_dir)
    plan, remaining, small_missing = [], 0, False
    for path in model.required_files():
        size, sha = model.official.get(path, (None, None))
        if not selected(path, req.include, req.exclude):
            continue
        target = model_dir / path
        if sha:
            present = cache.check(FileSpec(path, size, sha, lfs=True))
        else:
            present = target.is_file() and (size is None or target.stat().st_size == size)
        partial = 0 if present or size is None else _partial_bytes(model_dir, FileSpec(path, size, sha))
        plan.append({"path": path, "size": size, "sha256": sha, "present": present, "partial_bytes": partial,
                     "sources": _route_sources(req, model, path), "unverified": model.unverified(path)})
        if not present:
            remaining += (size or 0) - partial
            small_missing = small_missing or size is None
    if small_missing:
        remaining += SMALL_FILES
    free = free_space(model_dir)
    revision = req.revision or (model.modelscope_revision if req.source == "modelscope" else model.hf_revision)
    return {"model": model.name, "source": req.source, "revision": revision, "commit": None,
            "model_dir": str(model_dir), "files": plan,
            "total_bytes": sum(p["size"] or 0 for p in plan) + (SMALL_FILES if any(p["size"] is None for p in plan) else 0),
            "bytes_to_fetch": remaining, "disk_free_bytes": free, "dry_run": True, "notes": [],
            "confirmed": False, "basis": "shipped table", "not_confirmed": why,
            "disk_needed_bytes": remaining, "disk_ok": remaining + MARGIN <= free,
            "next": f"glmsetup fetch --model {model.name}" + (f" --source {req.source}" if req.source != "hf" else "")}


def _route_sources(req: FetchRequest, model: ModelEntry, path: str) -> List[str]:
    hubs = ["hf", "modelscope"]
    weight = model.is_weight(path)
    if req.source == "tsinghua":
        return (["tsinghua"] if weight and model.tsinghua_folder else []) + hubs
    if req.source == "auto":
        return hubs + (["tsinghua"] if weight and model.tsinghua_folder else [])
    if req.source == "git":
        return [req.weights_from] if weight else ["git"]
    return [req.source]


def _partial_bytes(model_dir: Path, spec: FileSpec) -> int:
    from glmsetup.fetch.partial import PartialFile

    p = PartialFile(model_dir, spec, 1 << 62)
    segments = p._load_record()
    return sum(s.done for s in segments) if segments else 0
