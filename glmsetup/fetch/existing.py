"""Files already in a model folder that glmsetup did not put there.

`glmsetup fetch --model-dir DIR` may be pointed at a folder that holds other things: a project, a git clone,
a download made with another tool. A file at a path the manifest names is replaced only when

- glmsetup put it there (the folder's saved manifest or verified cache names it: re-runs and resumes), or
- it holds nothing to lose: a git-lfs pointer (the placeholder a clone without git-lfs leaves) or 0 bytes.

A file that is already the source's (same size and sha256) is adopted, not fetched again (the verified
cache decides that before this module is asked). Anything else in the way stops the run before its first
write (exit 2), naming the files; `--force` moves them to `<model dir>/.glmsetup/replaced/` first and says so.
A refused run leaves the folder as it found it (`left_as_found`): no `.glmsetup/`, no run mark.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, List, Optional, Set, Tuple

from glmsetup.errors import GlmsetupError, ModelError, UsageError
from glmsetup.fetch.manifest import FileSpec, ensure_state_dir, state_dir
from glmsetup.modelfiles import read_lfs_pointer

REPLACED = "replaced"  # <model dir>/.glmsetup/replaced/: what --force moved out of the way


class FilesInTheWay(UsageError):
    """Files glmsetup did not put in the model folder differ from the source's: nothing was written."""


def owned(model_dir: Path, cache=None) -> Set[str]:
    """Paths glmsetup put in this folder: those its saved manifest and its verified cache name."""
    from glmsetup.fetch import manifest as manifest_mod
    from glmsetup.fetch.verified import VerifiedCache

    names: Set[str] = set()
    try:
        saved = manifest_mod.load(model_dir)
    except GlmsetupError:  # a manifest that names unsafe paths vouches for nothing
        saved = None
    if saved:
        names.update(f.path for f in saved.files)
    if cache is None:
        try:
            cache = VerifiedCache(model_dir)
        except (GlmsetupError, OSError):
            cache = None
    if cache is not None:
        names.update(p for p in cache.entries if isinstance(p, str))
    return names


def _size(n: int) -> str:
    return f"{n:,} bytes"


def in_the_way(model_dir: Path, spec: FileSpec, mine: Set[str]) -> Optional[str]:
    """Why the entry at spec's path must not be replaced without --force, or None when it may be.

    The caller knows the entry is not the source's file (the verified cache said so)."""
    if spec.path in mine:
        return None
    target = Path(model_dir) / spec.path
    try:
        link = stat.S_ISLNK(os.lstat(target).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.stat(target)
    except OSError:
        return "a link to nothing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file" + (" (a link to one)" if link else "")
    if st.st_size == 0:
        return None  # nothing to lose
    if st.st_size <= 1024 and read_lfs_pointer(target):
        return None  # a clone's placeholder: replacing it with the weight is the point
    if spec.size is not None and st.st_size != spec.size:
        return f"{_size(st.st_size)}, the source's {_size(spec.size)}"
    return "same size, other content"


def find(model_dir: Path, specs: Iterable[FileSpec], cache=None, *, force: bool = False, dry_run: bool = False,
         notes: Optional[list] = None, compare: bool = False) -> List[Tuple[str, str]]:
    """[(path, why)] of the files in the way of `specs`. Raises FilesInTheWay when there are some, unless
    `force` (the caller moves them with `move_aside` before writing) or `dry_run` (a note says what a real
    run would do).

    `compare`: the specs have not been checked against the folder yet: a file that is already the source's
    is adopted (the verified cache hashes it once and remembers it), not counted as in the way."""
    from glmsetup.fetch.verified import VerifiedCache

    specs = list(specs)
    if not specs or not Path(model_dir).is_dir():
        return []
    if cache is None:
        cache = VerifiedCache(model_dir)
    mine = owned(model_dir, cache)
    found = []
    for spec in specs:
        if compare and cache.check(spec):
            continue
        why = in_the_way(model_dir, spec, mine)
        if why:
            found.append((spec.path, why))
    if compare and not dry_run and (force or not found):
        cache.save()  # what was adopted is not hashed again by the plan
    if not found:
        return []
    listed = ", ".join(f"{p} ({why})" for p, why in found[:6]) + (", ..." if len(found) > 6 else "")
    kept = state_dir(model_dir) / REPLACED
    if dry_run:
        if notes is not None:
            notes.append(f"{len(found)} file(s) in {model_dir} were not put there by glmsetup and differ from the "
                         f"source's: {listed}; fetch refuses to replace them unless --force (which keeps them in "
                         f"{kept})")
        return found
    if not force:
        raise FilesInTheWay(
            f"{model_dir} already holds {len(found)} file(s) that glmsetup did not put there and that differ from "
            f"the source's: {listed}; refusing to replace them (nothing was written)",
            hint=f"choose an empty folder with --model-dir, move them away, or add --force to replace them "
                 f"(your copies are kept in {kept})",
            details={"model_dir": str(model_dir), "files": [{"path": p, "why": w} for p, w in found]})
    return found


def move_aside(model_dir: Path, found: List[Tuple[str, str]]) -> List[str]:
    """Move each file in the way to `.glmsetup/replaced/<path>` (a free name `<path>.1`, ... if taken);
    the note that says so."""
    from glmsetup.fetch.listing import check_name
    from glmsetup.fetch.safefs import ensure_dir

    if not found:
        return []
    model_dir = Path(model_dir)
    base = ensure_state_dir(model_dir, REPLACED)
    for path, _why in found:
        dest = base / check_name(path, "the manifest")
        ensure_dir(model_dir, dest.parent)
        n = 0
        while os.path.lexists(dest):
            n += 1
            dest = dest.with_name(f"{Path(path).name}.{n}")
        try:
            os.replace(model_dir / path, dest)  # a link is moved itself, never followed
        except OSError as exc:
            raise ModelError(f"cannot move {model_dir / path} to {dest}: {exc.strerror or exc}",
                             hint="move it away yourself and run the same command again") from exc
    names = ", ".join(p for p, _ in found[:6]) + (", ..." if len(found) > 6 else "")
    return [f"--force: moved {len(found)} file(s) that were not glmsetup's and differed from the source's to "
            f"{base}: {names}"]


@contextmanager
def left_as_found(model_dir: Path):
    """Around a fetch run: when it stops with FilesInTheWay, take back the bookkeeping it began with (the
    run mark, and `.glmsetup/` itself when the run made it), so a refused run leaves no trace."""
    from glmsetup.fetch.safefs import read_bytes, write_atomic

    state = state_dir(model_dir)
    mark = state / "partial" / "run.json"
    fresh = not os.path.lexists(state)
    try:
        before = None if fresh else read_bytes(mark)
    except (OSError, GlmsetupError):
        before = None
    try:
        yield
    except FilesInTheWay:
        try:
            if before is not None:
                write_atomic(mark, before)
            elif os.path.lexists(mark):
                os.unlink(mark)
            if fresh:
                for lock in (state / "lock",):
                    if os.path.isfile(lock) and not os.path.islink(lock) and os.path.getsize(lock) == 0:
                        os.unlink(lock)
                for folder in (state / "partial", state):
                    os.rmdir(folder)  # only when empty: never anything else
        except OSError:
            pass
        raise
