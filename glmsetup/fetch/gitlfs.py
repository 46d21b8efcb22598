"""The git route: clone with LFS skipped, then treat the LFS pointer files as the manifest.

`GIT_LFS_SKIP_SMUDGE=1` goes into the child's environment (no shell syntax, so the same on Windows).
The clone lands in a scratch folder; small files move into the model folder, and each LFS pointer becomes
a manifest entry (sha256, size). The pointer itself is put in place only until the real weight, fetched
into a temporary file and checked against it, is renamed over it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from glmsetup.errors import DownloadError, MissingDependency
from glmsetup.fetch.manifest import FileSpec, Manifest, hash_file, state_dir
from glmsetup.modelfiles import read_lfs_pointer


def repo_url(endpoint: str, repo: str) -> str:
    return endpoint.rstrip("/") + "/" + repo


def clone(url: str, dest: Path, revision: Optional[str] = None) -> str:
    """Clone `url` into `dest` with LFS smudging off; returns the commit checked out."""
    if shutil.which("git") is None:
        raise MissingDependency("git is not installed", hint="install git (apt install git / brew install git)")
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    cmd = ["git", "clone", "--quiet"]
    if url.startswith(("http://", "https://")) and not revision:
        cmd += ["--depth", "1"]
    result = subprocess.run(cmd + [url, str(dest)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise DownloadError(f"git clone {url} failed: {result.stderr.strip()[-300:]}",
                            hint="check --endpoint and the network, or use --source hf")
    if revision:
        co = subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", revision], env=env,
                            capture_output=True, text=True)
        if co.returncode != 0:
            raise DownloadError(f"revision {revision} not found in {url}", hint="check --revision")
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


def read_clone(tree: Path) -> List[Tuple[str, Path, Optional[tuple]]]:
    """(relative path, file, (sha256, size) if it is an LFS pointer) for every file outside .git."""
    out = []
    for file in sorted(tree.rglob("*")):
        rel = file.relative_to(tree)
        if not file.is_file() or rel.parts[0] == ".git":
            continue
        out.append((rel.as_posix(), file, read_lfs_pointer(file)))
    return out


def clone_manifest(model_name: str, endpoint: str, repo: str, model_dir: Path, revision: Optional[str],
                   dry_run: bool = False) -> Manifest:
    """Clone, build the manifest from the clone, and (unless dry_run) move the files into the model folder."""
    scratch_root = Path(tempfile.mkdtemp(prefix="glmsetup-clone-")) if dry_run else state_dir(model_dir)
    scratch = scratch_root / "clone"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        commit = clone(repo_url(endpoint, repo), scratch, revision)
        files = []
        for rel, file, pointer in read_clone(scratch):
            if pointer:
                sha, size = pointer
                files.append(FileSpec(path=rel, size=size, sha256=sha, lfs=True))
                target = Path(model_dir) / rel
                if not dry_run and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(file, target)  # a placeholder until the weight is renamed over it
            else:
                size = file.stat().st_size
                sha, sha1 = hash_file(file, size)
                files.append(FileSpec(path=rel, size=size, sha256=sha, git_sha1=sha1))
                if not dry_run:
                    target = Path(model_dir) / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(file, target)
        return Manifest(model=model_name, source="git", revision=revision or "HEAD", commit=commit, files=files)
    finally:
        shutil.rmtree(scratch if not dry_run else scratch_root, ignore_errors=True)
