"""`--source tsinghua`: the official README's recipe, done for the user.

The Tsinghua cloud share holds each model's weight files and tokenizer.model, nothing else: no config, no
code, no index, no tokenizer config, no checksums. Its 6B weights are also reported to be an older version
that produces garbage with the current code (ChatGLM2-6B issue #640). So this route takes:

- the manifest (every file of the model, with its sha256 or git blob id) and the small files from the
  first hub that answers (fetch/hubs.py: HF_ENDPOINT or huggingface.co, the HF mirror, ModelScope);
- each weight from the share when the share lists it with the hub's size, checked against the hub's
  sha256 (else the one shipped in models.py); a file the share has in another size is an older version
  and is taken from the hub at once; one whose bytes do not match is discarded and taken from the next
  source (the hubs that answered), or the run stops with the "older version" message;
- when no hub answers, only a folder that already holds the small files (a `GIT_LFS_SKIP_SMUDGE=1` clone,
  say) can be completed: its LFS pointers, else the shipped checksums, check the weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from glmsetup.errors import DownloadError, ModelError
from glmsetup.fetch.hubs import ask_hubs
from glmsetup.fetch.listing import skipped_note
from glmsetup.fetch.manifest import FileSpec, Manifest, load
from glmsetup.fetch.models import ModelEntry
from glmsetup.modelfiles import expected_files, read_lfs_pointer


def share_work(share, model: ModelEntry, model_dir: Path, settings) -> tuple:
    """(manifest, {path: [Origin, ...]}, notes) for the Tsinghua route; `share` is a TsinghuaSource."""
    listing = share.manifest()  # first: a hostile share is refused before any hub is asked
    notes: List[str] = skipped_note(listing, "tsinghua")
    on_share = {f.path: f for f in listing.files if model.is_weight(f.path)}
    share_origin = share.origin()
    share_origin.retry_on_mismatch = False  # wrong bytes there are an older version, not a glitch
    hubs, failures = ask_hubs(model, settings)
    for hub in hubs:
        notes += getattr(hub.source, "notes", [])
    if not hubs:
        reference = folder_reference(model, Path(model_dir), on_share, failures)
        notes.append("no hub answered (" + "; ".join(failures) + "): the weights are checked against "
                     + ("the folder's LFS pointers and " if reference.source == "pointers" else "")
                     + "the checksums shipped with glmsetup; the other files are the folder's own")
    else:
        reference = hubs[0].manifest
        notes.append(f"the Tsinghua share holds only the weights: the other files, and the checksums of all, come "
                     f"from {hubs[0].label} ({hubs[0].source.endpoint})")
    origins: Dict[str, list] = {}
    files, stuck = [], []
    for spec in reference.files:
        chosen = []
        shared = on_share.get(spec.path)
        sha = spec.sha256 or (model.official.get(spec.path) or (None, None))[1]
        if shared is not None and model.is_weight(spec.path):
            if not sha:
                notes.append(f"{spec.path}: no sha256 to check the share's copy against; taken from a hub")
            elif shared.size != spec.size:
                notes.append(f"the share's {spec.path} has {shared.size:,} bytes, the published one {spec.size:,}: "
                             "an older version, taken from a hub instead")
            else:
                spec = FileSpec(spec.path, spec.size, sha, spec.git_sha1, True)
                chosen.append(share_origin)
        for hub in hubs:
            theirs = hub.manifest.by_path().get(spec.path)
            if theirs is not None and theirs.size == spec.size and (
                    theirs.sha256 == spec.sha256 or (spec.sha256 is None and theirs.git_sha1 == spec.git_sha1)):
                chosen.append(hub.origin())
        if chosen:
            origins[spec.path] = chosen
            files.append(spec)
        else:
            stuck.append(spec.path)
    if stuck:  # only without a hub: the share's copy is not the published file, and nothing else serves it
        raise DownloadError(f"the Tsinghua cloud share holds an older, incompatible version of {', '.join(stuck[:3])}"
                            f"{', ...' if len(stuck) > 3 else ''} (another size than the published file), and no hub "
                            "answered to give the right one", hint="try --source hf or --source modelscope")
    manifest = Manifest(model.name, "tsinghua", reference.revision, files, reference.commit, list(listing.skipped))
    return manifest, origins, notes


def folder_reference(model: ModelEntry, model_dir: Path, on_share: Dict[str, FileSpec], failures: List[str]) -> Manifest:
    """Without a hub: the weights the folder needs (those its index names, and tokenizer.model), each checked
    by the folder's LFS pointer or the shipped sha256; the small files must already be in the folder."""
    small = [p for p in model.required_files() if not model.is_weight(p)]
    absent = [p for p in small if not (model_dir / p).is_file()]
    if absent:
        raise DownloadError(
            f"the Tsinghua share holds only the weights; {', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''} "
            "and the checksums come from a hub, and none answered (" + "; ".join(failures) + ")",
            hint="make one reachable (HF_ENDPOINT=https://hf-mirror.com, or MODELSCOPE_ENDPOINT), or put the small "
                 f"files in the folder first (GIT_LFS_SKIP_SMUDGE=1 git clone <hub>/{model.hf_repo} <folder>) and "
                 "run this again with --model-dir <folder>")
    files, unchecked, pointers = [], [], False
    needed = {"tokenizer.model"} | (set(expected_files(model_dir)) if model.sharded else set(model.official))
    try:
        saved = load(model_dir)  # an earlier run's manifest: the pointers it replaced already
    except ModelError:
        saved = None
    earlier = saved.by_path() if saved and saved.model == model.name else {}
    for path in sorted(needed):
        pointer = read_lfs_pointer(model_dir / path)
        if pointer:
            sha, size = pointer
            pointers = True
        elif earlier.get(path) is not None and earlier[path].sha256:
            size, sha = earlier[path].size, earlier[path].sha256
            pointers = pointers or saved.source == "pointers"
        else:
            size, sha = model.official.get(path, (None, None))
        if path not in on_share:
            unchecked.append(f"{path} (not on the share)")
        elif not sha:
            unchecked.append(path)
        else:
            files.append(FileSpec(path, size, sha, lfs=True))
    if unchecked:
        raise DownloadError(
            f"{len(unchecked)} file(s) of the Tsinghua share cannot be checked ({', '.join(unchecked[:4])}"
            f"{', ...' if len(unchecked) > 4 else ''}): the share has no checksums and no manifest from Hugging Face "
            "or ModelScope could be read (" + "; ".join(failures) + ")",
            hint="make huggingface.co (or HF_ENDPOINT) or ModelScope reachable for the manifest, "
                 "or use --source hf / --source modelscope")
    return Manifest(model.name, "pointers" if pointers else "official", "main", files)
