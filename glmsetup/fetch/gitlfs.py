"""The git route: clone with nothing checked out, check the tree, take out only the model's files; the LFS
pointer files are the manifest.

`git clone --no-checkout` writes git's own objects and nothing else; where the server supports it,
`--filter=blob:limit=...` keeps any blob over MAX_BLOB from being downloaded at all (a server that refuses
filters is asked again without). The commit's tree is then read with `git ls-tree`, entry by entry, and
git is stopped at the listing's entry cap, so a tree bomb (a few kB of nested trees that name 10^10 files)
costs nothing. Every entry goes through the checks of any listing (fetch/listing.py); links and
submodules are refused (git's tree says which entries are links); a file the model has that is not in
git-lfs may be at most MAX_BLOB (a config or code file is a few kB, a pointer under 1 kB). Only then are
the model's files taken out of git with `git cat-file`, as the exact bytes of their blobs (no checkout: no
attributes, filters, hooks or links), into the scratch folder; nothing else ever leaves git.
`GIT_LFS_SKIP_SMUDGE=1` stays in every child's environment (no shell syntax, so the same on Windows).

The small files then move into the model folder, after fetch/existing.py has checked that nothing of the
user's is in the way, and each LFS pointer becomes a manifest entry (sha256, size). The pointer itself is put
in place only until the real weight, fetched into a temporary file and checked against it, is renamed
over it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from glmsetup.errors import DownloadError, MissingDependency, UsageError
from glmsetup.fetch.http import Settings
from glmsetup.fetch.listing import Listing, UnsafeListing, show
from glmsetup.fetch.manifest import Manifest, ensure_state_dir, hash_file
from glmsetup.fetch.models import ModelEntry
from glmsetup.fetch.safefs import ensure_dir, open_file, remove_tree
from glmsetup.modelfiles import read_lfs_pointer

MAX_BLOB = 16 << 20  # a file outside git-lfs: config, code, index, README (a few kB); a pointer is < 1 kB
MAX_ENTRY_BYTES = 64 << 10  # one `ls-tree` entry (a name is at most 1024 characters)
NOTHING_OUT = "nothing was checked out or moved into the model folder"
OTHER_SOURCE = "use --source hf or --source modelscope"
# what git (through curl) says when http.lowSpeedLimit/lowSpeedTime gave up on a transfer
STALLED = re.compile(r"operation too slow", re.IGNORECASE)


def _env() -> dict:
    return {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}


def _git(tree: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(tree), *args], env=_env(), capture_output=True, **kw)


def _run_clone(cmd: list, url: str, deadline: float, settings: Settings) -> subprocess.CompletedProcess:
    """Run one `git clone`; past `deadline` git and its helpers (git-remote-https) are killed together."""
    proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=hasattr(os, "killpg"))
    try:
        out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise DownloadError(f"git clone {url} was still running after {settings.clone_seconds:.0f} s: stopped",
                            hint="the server is too slow or stalling: try again later, or another --endpoint, or "
                                 "--source hf (GLMSETUP_FETCH_CLONE_SECONDS allows longer)") from None
    except BaseException:  # Ctrl-C: no git left behind writing into the scratch folder
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:  # already gone
        pass
    proc.communicate()


def repo_url(endpoint: str, repo: str) -> str:
    return endpoint.rstrip("/") + "/" + repo


def clone(url: str, dest: Path, revision: Optional[str] = None, settings: Optional[Settings] = None) -> str:
    """Clone `url` into `dest` without checking anything out; returns the commit of `revision` (else HEAD).

    Over HTTP(S) git itself gives up on a transfer slower than settings.min_speed over settings.stall_window
    (the downloader's stall rule); any clone is stopped after settings.clone_seconds in all."""
    if shutil.which("git") is None:
        raise MissingDependency("git is not installed", hint="install git (apt install git / brew install git)")
    if revision and revision.startswith("-"):
        raise UsageError(f"--revision {revision!r} is not a branch, tag or commit", hint="check --revision")
    settings = settings or Settings.from_env()
    stall = (max(1, int(settings.min_speed)), max(1, round(settings.stall_window)))
    cmd = ["git", "-c", f"http.lowSpeedLimit={stall[0]}", "-c", f"http.lowSpeedTime={stall[1]}",
           "clone", "--quiet", "--no-checkout", "--config", "core.symlinks=false"]
    if url.startswith(("http://", "https://")) and not revision:
        cmd += ["--depth", "1"]
    filtered = cmd + [f"--filter=blob:limit={MAX_BLOB + 1}"]  # local paths ignore it (with a warning)
    deadline = time.monotonic() + settings.clone_seconds
    result = _run_clone(filtered + ["--", url, str(dest)], url, deadline, settings)
    refused = "filter" in result.stderr.lower() and not STALLED.search(result.stderr)
    if result.returncode != 0 and refused:  # a server that refuses filters (not one that warned, then stalled)
        remove_tree(dest)
        result = _run_clone(cmd + ["--", url, str(dest)], url, deadline, settings)
    if result.returncode != 0:
        if STALLED.search(result.stderr):
            raise DownloadError(f"git clone {url} stalled: less than {stall[0]} bytes/s for {stall[1]} s, stopped",
                                hint="the server is stalling: try again later, or another --endpoint, or "
                                     "--source hf")
        last = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        raise DownloadError(f"git clone {url} failed: {last[-300:]}",
                            hint="check --endpoint and the network, or use --source hf")
    for name in ([revision, f"origin/{revision}"] if revision else ["HEAD"]):
        found = _git(dest, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", text=True)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    if revision:
        raise DownloadError(f"revision {revision} not found in {url}", hint="check --revision")
    raise DownloadError(f"the git clone of {url} has no commit", hint="check --endpoint, or " + OTHER_SOURCE)


def tree_entries(tree: Path, commit: str = "HEAD") -> Iterator[Tuple[str, str, str]]:
    """(mode, object id, path) of every file entry of `commit`, links and submodules included, from git's own
    tree, read as git writes them: the caller stops reading (close the iterator) and git is stopped."""
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(["git", "-C", str(tree), "ls-tree", "-r", "-z", "--full-tree", commit],
                            stdout=subprocess.PIPE, stderr=errors, env=_env())
    pending = b""
    try:
        while True:
            block = proc.stdout.read1(1 << 16)
            if not block:
                break
            *items, pending = (pending + block).split(b"\0")
            for item in items:
                meta, _, path = item.partition(b"\t")
                mode, _kind, oid = (meta.decode("ascii", "replace").split(" ") + ["", ""])[:3]
                yield mode, oid, path.decode("utf-8", "surrogateescape")
            if len(pending) > MAX_ENTRY_BYTES:
                raise UnsafeListing(f"the git clone's tree holds a name of more than {MAX_ENTRY_BYTES:,} bytes",
                                    hint=OTHER_SOURCE)
        if proc.wait() != 0:
            errors.seek(0)
            text = errors.read().decode("utf-8", "replace").strip()[-200:]
            raise DownloadError(f"cannot list the clone: {text}", hint=OTHER_SOURCE)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        errors.close()


def missing_blobs(tree: Path, commit: str) -> set:
    """Objects of `commit` the clone's filter left on the server (blobs over MAX_BLOB); never fetches them."""
    proc = subprocess.Popen(["git", "-C", str(tree), "rev-list", "--objects", "--missing=print", commit],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    missing = set()
    with proc:
        for line in proc.stdout:
            if line.startswith(b"?"):
                missing.add(line[1:].strip().decode("ascii", "replace"))
    return missing


def blob_sizes(tree: Path, oids: List[str]) -> dict:
    """object id -> size, for objects the clone holds (never asked of the server)."""
    if not oids:
        return {}
    result = _git(tree, "cat-file", "--batch-check", input="".join(o + "\n" for o in oids).encode())
    sizes = {}
    for line in result.stdout.decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "blob" and parts[2].isdigit():
            sizes[parts[0]] = int(parts[2])
    return sizes


def write_blobs(tree: Path, wanted: List[Tuple[str, str]], url: str) -> None:
    """Write each (name, object id) into `tree` as the exact bytes of the blob; every file is new."""
    proc = subprocess.Popen(["git", "-C", str(tree), "cat-file", "--batch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    try:
        for name, oid in wanted:
            proc.stdin.write(oid.encode() + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline().split()
            if len(header) != 3 or header[1] != b"blob" or not header[2].isdigit() or int(header[2]) > MAX_BLOB:
                raise DownloadError(f"cannot read {name} from the git clone of {url}", hint=OTHER_SOURCE)
            left = int(header[2])
            ensure_dir(tree, (tree / name).parent)
            try:
                fd = open_file(tree / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                raise UnsafeListing(f"the git clone of {url} lists {show(name)} twice (or in two spellings that "
                                    f"are one name here): refusing it; {NOTHING_OUT}", hint=OTHER_SOURCE) from None
            with os.fdopen(fd, "wb") as out:
                while left:
                    block = proc.stdout.read(min(left, 1 << 20))
                    if not block:
                        raise DownloadError(f"cannot read {name} from the git clone of {url}", hint=OTHER_SOURCE)
                    out.write(block)
                    left -= len(block)
            proc.stdout.read(1)  # the newline after each object
    finally:
        proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def read_clone(tree: Path, listing: Listing, url: str, commit: str = "HEAD") -> List[Tuple[str, Path, Optional[tuple]]]:
    """(relative path, file, (sha256, size) if it is an LFS pointer) for every file of the model in the clone.

    Every entry of the tree is checked (links, submodules, names, the entry cap) before anything leaves git;
    files the model does not have are skipped and never leave git."""
    wanted: List[Tuple[str, str]] = []
    with closing(tree_entries(tree, commit)) as entries:
        for mode, oid, rel in entries:
            if mode not in ("100644", "100755"):
                kind = {"120000": "a symbolic link", "160000": "a submodule"}.get(mode, f"an entry of mode {mode}")
                raise UnsafeListing(f"the git clone of {url} holds {show(rel)} as {kind}: glmsetup refuses links and "
                                    f"submodules from a clone; {NOTHING_OUT}", hint=OTHER_SOURCE)
            name = listing.accept(rel)
            if name is not None:
                wanted.append((name, oid))
    missing = missing_blobs(tree, commit)
    sizes = blob_sizes(tree, [oid for _name, oid in wanted if oid not in missing])
    for name, oid in wanted:
        size = sizes.get(oid)
        if size is None or size > MAX_BLOB:
            what = f"{size:,} bytes" if size is not None else f"more than {MAX_BLOB >> 20} MB"
            raise UnsafeListing(f"the git clone of {url} holds {show(name)} as a file of {what} outside git-lfs "
                                f"({listing.model.name}'s files outside git-lfs are a few kB): refusing it; "
                                f"{NOTHING_OUT}", hint=OTHER_SOURCE)
    write_blobs(tree, wanted, url)
    out = []
    for name, _oid in wanted:
        file = tree / name
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode):  # written just above as a new file: never anything else
            raise UnsafeListing(f"the git clone of {url} gave {show(name)} as something other than a regular file",
                                hint=OTHER_SOURCE)
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
                   dry_run: bool = False, force: bool = False, notes: Optional[list] = None,
                   settings: Optional[Settings] = None) -> Manifest:
    """Clone, build the manifest from the clone, and (unless dry_run) move the files into the model folder.

    Every file is checked, and the folder is checked for files of the user's in the way (refused unless
    `force`, which moves them to .glmsetup/replaced/), before the first one is moved; `notes` gets what
    was moved aside (or, in a dry run, what a real run would refuse)."""
    from glmsetup.fetch import existing

    scratch_root = Path(tempfile.mkdtemp(prefix="glmsetup-clone-")) if dry_run else ensure_state_dir(model_dir)
    scratch = scratch_root / "clone"
    remove_tree(scratch)
    url = repo_url(endpoint, repo)
    try:
        commit = clone(url, scratch, revision, settings)
        listing = Listing(model, f"the git clone of {url}")
        found = read_clone(scratch, listing, url, commit)
        manifest = listing.manifest("git", revision or "HEAD", commit)
        specs = manifest.by_path()  # a dry run's plan checks the weights itself
        check = [specs[rel] for rel, _file, pointer in found if not (dry_run and pointer)]
        in_way = existing.find(model_dir, check, force=force, dry_run=dry_run, notes=notes, compare=True)
        if not dry_run:
            moved = existing.move_aside(model_dir, in_way)
            if notes is not None:
                notes += moved
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
