"""`run FRONT --official DIR`: the official demo, patched in a working copy and launched.

The user's folder is never touched: it is copied to GLMSETUP_HOME/work/official/<name>-<hash>
(weights, .git and caches left out), the copy is patched there with glmsetup.patch.patch_folder
(model path, glmsetup loader and profile, Gradio 4+, pydantic v2, binding), and the script that
matches the front end is started with the right launcher: python for cli_demo.py, web_demo.py,
api.py and openai_api.py, `streamlit run` for web_demo2.py. Give a file instead of a folder to pick
one script (e.g. DIR/openai_api.py for the OpenAI protocol).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from glmsetup import paths
from glmsetup.errors import GlmsetupError, MissingDependency, PatchError, ResourceError, UsageError
from glmsetup.launch.plan import RunPlan
from glmsetup.launch.serve import streamlit_command

# front end -> the official file names, first preferred
SCRIPTS = {
    "cli": ("cli_demo.py",),
    "web": ("web_demo.py",),
    "streamlit": ("web_demo2.py",),
    "api": ("api.py", "openai_api.py"),
}
# What identifies a demo when it was renamed: (front, words that must all appear in the file)
SIGNATURES = (
    ("api", ("/v1/chat/completions",)),
    ("streamlit", ("import streamlit",)),
    ("web", ("import gradio",)),
    ("api", ("FastAPI",)),
    ("cli", ("stream_chat", "input(")),
)
SKIP = shutil.ignore_patterns(".git", "__pycache__", "node_modules", "*.bin", "*.safetensors", "*.pt", "*.pth",
                              "*.gguf", "*.ckpt")
BIG_FILE = 20 * 1024 * 1024
# A clone of THUDM/ChatGLM2-6B without weights is a few MB in about 100 files: a folder far beyond
# these is not a demo folder (a home folder, a disk), and copying it would fill the disk.
MAX_COPY_BYTES = 256 * 1024 * 1024
MAX_COPY_FILES = 5000
PROFILE_FILE = "glmsetup-run.toml"


def kind_of(script: Path) -> str:
    """The front end a script is, by its content (renamed copies of the demos are common)."""
    try:
        if not script.is_file():  # a FIFO named *.py must not hang the run
            return ""
        with open(script, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", errors="replace")  # demos are under 10 KB
    except OSError:
        return ""
    for front, words in SIGNATURES:
        if all(w in text for w in words):
            return front
    return ""


def find_script(source: Path, front: str) -> Path:
    if source.is_file():
        return source
    for name in SCRIPTS[front]:
        if (source / name).is_file():
            return source / name
    for candidate in sorted(source.glob("*.py")):
        if kind_of(candidate) == front:
            return candidate
    raise UsageError(f"{source} has no official {front} demo ({' or '.join(SCRIPTS[front])})",
                     hint="point --official at a clone of THUDM/ChatGLM2-6B, or at the demo file itself")


def work_copy_dir(source: Path) -> Path:
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return paths.work_dir() / "official" / f"{source.resolve().name}-{digest}"


def plan_official(plan: RunPlan, official: str) -> RunPlan:
    given = Path(official).expanduser()
    if not given.exists():
        raise UsageError(f"--official {given}: no such file or folder",
                         hint="git clone https://github.com/THUDM/ChatGLM2-6B and pass that folder")
    if plan.binding.api_key:
        raise UsageError("the official demo scripts have no API-key check, so --api-key cannot protect them",
                         hint="use the built-in server (`glmsetup run api --api-key K`), or --insecure on a trusted network")
    script = find_script(given, plan.front)
    actual = kind_of(script) or plan.front
    if actual != plan.front and not (plan.front == "web" and actual == "streamlit"):
        raise UsageError(f"{script.name} is a {actual} demo, not a {plan.front} one",
                         hint=f"glmsetup run {actual} --official {official}")
    source = script.parent
    work = work_copy_dir(source)
    # the script runs inside its working copy: a relative --model would be looked for there
    plan.model_dir = plan.model_dir.resolve()
    target = work / script.name
    if actual == "streamlit":
        command = streamlit_command(target, plan.binding.host, plan.binding.port)
    else:
        command = [sys.executable, str(target)]
    plan.command = command
    plan.cwd = work
    plan.env = {"GLMSETUP_MODEL_DIR": str(plan.model_dir), "GLMSETUP_PROFILE": plan.profile_ref}
    if plan.binding.host is not None:
        plan.env.update({"GLMSETUP_HOST": plan.binding.host, "GLMSETUP_PORT": str(plan.binding.port),
                         "GRADIO_SERVER_NAME": plan.binding.host, "GRADIO_SERVER_PORT": str(plan.binding.port)})
    plan.official = {"source": str(source), "script": script.name, "kind": actual, "work_dir": str(work),
                     "launcher": "streamlit run" if actual == "streamlit" else "python"}
    plan.notes.append(f"copies {source} to {work} and patches the copy; {source} is not changed")
    return plan


def profile_toml(plan: RunPlan) -> str:
    """The resolved profile as a self-contained TOML file, its [server] set to where this run binds.

    The patch rules write the profile's host and ports into the scripts, so --host/--port/--listen
    reach the official script through this file.
    """
    prof = plan.profile

    def value(v) -> str:
        return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v)  # a TOML basic string

    server = dict(vars(prof.server))
    if plan.binding.host is not None:
        server["host"] = plan.binding.host
        server[{"api": "api_port", "web": "web_port", "streamlit": "streamlit_port"}[plan.front]] = plan.binding.port
        if plan.official and plan.official.get("kind") == "streamlit":
            server["streamlit_port"] = plan.binding.port
    lines = [f"# written by glmsetup run --official from profile {prof.name} ({prof.source})",
             f"description = {value(prof.description or prof.name)}"]
    for key in ("device", "dtype", "quantization_bits", "backend", "num_gpus"):
        lines.append(f"{key} = {value(getattr(prof, key))}")
    for section, table in (("generation", vars(prof.generation)), ("server", server)):
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class _Budget:
    """What the working copy may hold; too much is a clean error naming the folder."""

    def __init__(self, source: Path):
        self.source = source
        self.files = 0
        self.bytes = 0

    def take(self, size: int = 0) -> None:
        self.files += 1
        self.bytes += size
        if self.files > MAX_COPY_FILES or self.bytes > MAX_COPY_BYTES:
            what = (f"more than {MAX_COPY_FILES} files and folders" if self.files > MAX_COPY_FILES
                    else f"more than {MAX_COPY_BYTES / 2 ** 20:g} MB")
            raise UsageError(f"--official {self.source} holds {what} (weights and files over "
                             f"{BIG_FILE // (1024 * 1024)} MB left out): not a demo folder, not copied",
                             hint="point --official at a clone of THUDM/ChatGLM2-6B (a few MB without weights), "
                                  "or move the demo scripts into a folder of their own")


def _copy_file(src: Path, dst: Path, budget: _Budget) -> None:
    """One regular file, opened without following a link or blocking (a FIFO swapped in is not read)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(src, flags)
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > BIG_FILE:
            return
        budget.take(st.st_size)
        with open(dst, "xb") as fout:
            left = st.st_size
            while left > 0:  # never more than was counted, even if the file grows meanwhile
                chunk = fin.read(min(left, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                left -= len(chunk)
        os.chmod(dst, stat.S_IMODE(st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)


def _copy_folder(source: Path, dest: Path) -> list:
    """Copy regular files and folders of `source` into the new folder `dest`, never following a link.

    Links (a link to / or a `ln -s . loop` included), FIFOs, sockets and devices are left out, as are
    SKIP's names, virtual environments and files over BIG_FILE. Returns the links left out, relative.
    """
    budget = _Budget(source)
    links: list = []
    dest.mkdir()
    stack = [(source, dest, "")]
    while stack:
        src_dir, dst_dir, rel = stack.pop()
        with os.scandir(src_dir) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        ignored = SKIP(str(src_dir), [e.name for e in entries])
        for entry in entries:
            name = f"{rel}{entry.name}"
            if entry.name in ignored:
                continue
            if entry.is_symlink():
                links.append(name)
            elif entry.is_dir(follow_symlinks=False):
                if os.path.lexists(os.path.join(entry.path, "pyvenv.cfg")):
                    continue  # a virtual environment made inside the clone: thousands of files, no demo
                budget.take()
                (dst_dir / entry.name).mkdir()
                stack.append((Path(entry.path), dst_dir / entry.name, name + "/"))
            elif entry.is_file(follow_symlinks=False):
                _copy_file(Path(entry.path), dst_dir / entry.name, budget)
    return links


def copy_tree(source: Path, work: Path) -> list:
    """A fresh working copy: copied beside the old one, then swapped in. Returns the links left out.

    An unreadable file, a full disk or a folder that changes under the copy is a one-line error; the
    old working copy stays as it was and nothing half-copied is left behind.
    """
    work.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{work.name}-", dir=work.parent))
    try:
        try:
            links = _copy_folder(source, tmp / "copy")
        except GlmsetupError:
            raise
        except (OSError, shutil.Error) as exc:
            where = getattr(exc, "filename", None) or source
            reason = getattr(exc, "strerror", None) or str(exc)
            if getattr(exc, "errno", None) == errno.ENOSPC:
                raise ResourceError(f"no space left to copy --official {source} to {work.parent}",
                                    hint="free some disk space, or set GLMSETUP_HOME to a disk with room") from None
            raise UsageError(f"cannot copy --official {source} into the working copy: {reason} ({where})",
                             hint="make the demo folder readable, or point --official at a clone of "
                                  "THUDM/ChatGLM2-6B") from None
        if work.exists():
            old = work.with_name(f".{work.name}-old-{os.getpid()}")
            os.replace(work, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp / "copy", work)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return links


def prepare(plan: RunPlan) -> dict:
    """Copy and patch; returns the patch report. Runs only when really starting (not --dry-run)."""
    try:
        from glmsetup.patch import patch_folder
    except ImportError as exc:
        if not (exc.name or "glmsetup").startswith("glmsetup"):
            raise MissingDependency(f"patching needs {exc.name}, which is not installed",
                                    hint='pip install "glmsetup[patch]"') from exc
        raise MissingDependency("this install has no glmsetup.patch, so the official demos cannot be patched",
                                hint="run the built-in front end instead: glmsetup run " + plan.front) from exc
    source = Path(plan.official["source"])
    work = Path(plan.official["work_dir"])
    script = source / plan.official["script"]
    if script.is_symlink():  # links are not copied, and patch does not write through them anyway
        raise PatchError(f"{script} is a symbolic link to {os.path.realpath(script)}; the working copy holds "
                         f"no links", hint=f"give the file it points to: --official {os.path.realpath(script)}")
    links = copy_tree(source, work)
    if links:
        from glmsetup import output

        shown = ", ".join(links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        output.stderr().print(f"note: {len(links)} symbolic link(s) in {source} not copied (links are never "
                              f"followed): {shown}", highlight=False, soft_wrap=True, markup=False)
    profile_file = work / PROFILE_FILE
    tmp = profile_file.with_suffix(".tmp")
    tmp.write_text(profile_toml(plan), encoding="utf-8")
    os.replace(tmp, profile_file)
    report = patch_folder(work, model=str(plan.model_dir), profile=str(profile_file))
    plan.official["patched"] = True
    plan.official["links_not_copied"] = links
    return report
