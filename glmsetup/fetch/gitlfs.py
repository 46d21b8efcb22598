"""The git route: clone with LFS skipped, then treat the LFS pointer files as the manifest.

`GIT_LFS_SKIP_SMUDGE=1` goes into the child's environment (no shell syntax, so the same on Windows).
The clone lands in a scratch folder; small files move into the model folder, and each LFS pointer becomes
a manifest entry (sha256, size). The pointer itself is put in place only until the real weight, fetched
into a temporary file and checked against it, is renamed over it. The clone's names go through the same
checks as any listing (fetch/listing.py); links and submodules are refused (git's own tree says which
entries are links, whatever the filesystem made of them), and links are never even checked out.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from glmsetup.errors import DownloadError, MissingDependency, UsageError
from glmsetup.fetch.listing import Listing, UnsafeListing, show
from glmsetup.fetch.manifest import Manifest, ensure_state_dir, hash_file
from glmsetup.fetch.models import ModelEntry
from glmsetup.fetch.safefs import remove_tree
from glmsetup.modelfiles import read_lfs_pointer


def repo_url(endpoint: str, repo: str) -> str:
    return endpoint.rstrip("/") + "/" + repo


def clone(url: str, dest: Path, revision: Optional[str] = None) -> str:
    """Clone `url` into `dest` with LFS smudging off and symlinks never made; returns the commit checked out."""
    if shutil.which("git") is None:
        raise MissingDependency("git is not installed", hint="install git (apt install git / brew install git)")
    if revision and revision.startswith("-"):
        raise UsageError(f"--revision {revision!r} is not a branch, tag or commit", hint="check --revision")
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    # a link in the repository is checked out as a small text file, never as a link (it is refused below)
    cmd = ["git", "clone", "--quiet", "--config", "core.symlinks=false"]
    if url.startswith(("http://", "https://")) and not revision:
        cmd += ["--depth", "1"]
    result = subprocess.run(cmd + ["--", url, str(dest)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise DownloadError(f"git clone {url} failed: {result.stderr.strip()[-300:]}",
                            hint="check --endpoint and the network, or use --source hf")
    if revision:
        co = subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", revision, "--"], env=env,
                            capture_output=True, text=True)
        if co.returncode != 0:
            raise DownloadError(f"revision {revision} not found in {url}", hint="check --revision")
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


def tree_entries(tree: Path) -> List[Tuple[str, str]]:
    """(mode, path) of every entry of the checked-out commit, from git itself (links included, whatever the
    filesystem made of them)."""
    result = subprocess.run(["git", "-C", str(tree), "ls-tree", "-r", "-z", "--full-tree", "HEAD"],
                            capture_output=True)
    if result.returncode != 0:
        raise DownloadError(f"cannot list the clone: {result.stderr.decode('utf-8', 'replace').strip()[-200:]}")
    out = []
    for item in result.stdout.split(b"\0"):
        if item:
            meta, _, path = item.partition(b"\t")
            out.append((meta.split(b" ", 1)[0].decode("ascii", "replace"), path.decode("utf-8", "surrogateescape")))
    return out


def read_clone(tree: Path, listing: Listing, url: str) -> List[Tuple[str, Path, Optional[tuple]]]:
    """(relative path, file, (sha256, size) if it is an LFS pointer) for every file of the model in the clone.

    Every name goes through the listing's checks; a symbolic link, a submodule or anything that is not a
    regular file is refused, and files the model does not have are skipped (left in the scratch folder)."""
    entries = tree_entries(tree)
    for mode, rel in entries:
        if mode not in ("100644", "100755"):
            kind = {"120000": "a symbolic link", "160000": "a submodule"}.get(mode, f"an entry of mode {mode}")
            raise UnsafeListing(f"the git clone of {url} holds {show(rel)} as {kind}: glmsetup refuses links and "
                                "submodules from a clone; nothing was moved into the model folder",
                                hint="use --source hf or --source modelscope")
    out = []
    for _mode, rel in entries:
        name = listing.accept(rel)
        if name is None:
            continue
        file = tree / name
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            raise DownloadError(f"the git clone of {url} lists {name} but did not check it out",
                                hint="use --source hf or --source modelscope") from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeListing(f"the git clone of {url} checked out {show(name)} as something other than a "
                                "regular file: refusing it", hint="use --source hf or --source modelscope")
        pointer = read_lfs_pointer(file)
        if pointer:
            sha, size = pointer
            listing.put(name, size, sha256=sha, lfs=True)
        else:
            sha, sha1 = hash_file(file, st.st_size)
            listing.put(name, st.st_size, sha256=sha, git_sha1=sha1)
        out.append((name, file, pointer))
    return out


def clone_manifest(model: ModelEntry, endpoint: str, repo: str, model_dir: Path, revision: Optional[str],
                   dry_run: bool = False) -> Manifest:
    """Clone, build the manifest from the clone, and (unless dry_run) move the files into the model folder.

    Every file is checked before the first one is moved."""
    scratch_root = Path(tempfile.mkdtemp(prefix="glmsetup-clone-")) if dry_run else ensure_state_dir(model_dir)
    scratch = scratch_root / "clone"
    remove_tree(scratch)
    url = repo_url(endpoint, repo)
    try:
        commit = clone(url, scratch, revision)
        listing = Listing(model, f"the git clone of {url}")
        found = read_clone(scratch, listing, url)
        manifest = listing.manifest("git", revision or "HEAD", commit)
        if not dry_run:
            for rel, file, pointer in found:
                target = Path(model_dir) / rel
                if pointer and os.path.lexists(target):
                    continue  # a placeholder only where nothing is yet
                try:
                    os.replace(file, target)  # a pointer is a placeholder until the weight is renamed over it
                except OSError as exc:
                    raise DownloadError(f"cannot put {rel} into {model_dir}: {exc}",
                                        hint="check the folder's permissions, or remove what is in the way") from exc
        return manifest
    finally:
        remove_tree(scratch if not dry_run else scratch_root)
