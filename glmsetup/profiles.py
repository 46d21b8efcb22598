"""Profiles: how the model is loaded and served, as TOML data.

Built-in profiles live in profiles/ at the project root (shipped inside the package as
glmsetup/profiles); a user's own go in $GLMSETUP_HOME/profiles and may inherit from built-ins or
override them. Every file is validated: an unknown key, a wrong type, a value out of its range
(RANGES), an over-long text or an impossible combination is a ProfileError naming the file, the key and
what is allowed. Files are untrusted: they are size-capped, inheritance is at most MAX_DEPTH files deep,
and one broken file of a user's never stops the others from being listed (load_all skips it with a
warning; only the profile asked for by name raises).
"""
from __future__ import annotations

import dataclasses
import math
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from glmsetup import paths
from glmsetup.errors import ProfileError

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"

DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
BITS = (0, 4, 8)
BACKENDS = ("native", "official")


@dataclass(frozen=True)
class Generation:
    max_length: int = 8192
    top_p: float = 0.8
    temperature: float = 0.8
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Server:
    host: str = "127.0.0.1"
    api_port: int = 8000
    web_port: int = 7860
    streamlit_port: int = 8501


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    quantization_bits: int = 0
    backend: str = "native"
    num_gpus: int = 1
    generation: Generation = field(default_factory=Generation)
    server: Server = field(default_factory=Server)
    inherits: Optional[str] = None
    source: str = ""

    @property
    def precision(self) -> str:
        """A short label: fp32, bf16, fp16, int8, int4."""
        if self.quantization_bits:
            return f"int{self.quantization_bits}"
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]

    @property
    def summary(self) -> str:
        where = f"{self.num_gpus}x cuda" if self.num_gpus > 1 else self.device
        return f"{where} {self.precision} ({self.backend})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# key -> (type, allowed values or None); sections are nested tables.
TOP_KEYS: dict[str, tuple] = {
    "description": (str, None),
    "inherits": (str, None),
    "device": (str, DEVICES),
    "dtype": (str, DTYPES),
    "quantization_bits": (int, BITS),
    "backend": (str, BACKENDS),
    "num_gpus": (int, None),
}
SECTIONS: dict[str, dict[str, type]] = {
    "generation": {f.name: f.type for f in dataclasses.fields(Generation)},
    "server": {f.name: f.type for f in dataclasses.fields(Server)},
}
_TYPES = {"int": int, "float": float, "str": str}

# Numbers: key -> (lowest, highest, lowest excluded, hint). NaN and infinity are refused everywhere.
# The generation bounds are the ones the chat front ends allow (the web sliders, the API, the terminal).
RANGES: dict[str, tuple] = {
    "num_gpus": (1, 16, False, "num_gpus = 1 for one card, 2 or more to split layers"),
    "generation.max_length": (1, 32768, False, "8192 is the official default"),
    "generation.top_p": (0, 1, True, "top_p = 0.8 is the official default"),
    "generation.temperature": (0, 2, False, "0 means greedy; 0.8 is the official default"),
    "generation.repetition_penalty": (0.5, 2, False, "1.0 means off; 1.1-1.3 discourages repetition "
                                                     "(values below 0.5 cause runaway repetition)"),
    "server.api_port": (1, 65535, False, "e.g. 8000"),
    "server.web_port": (1, 65535, False, "e.g. 7860"),
    "server.streamlit_port": (1, 65535, False, "e.g. 8501"),
}
# Texts: key -> most characters. Control characters (newlines included) are refused in all of them.
TEXT_LIMITS = {"description": 300, "inherits": 64, "server.host": 253}
MAX_NAME = 64  # a profile's name: its file name without .toml
MAX_FILE_BYTES = 64 * 1024  # the built-in files are a few hundred bytes
MAX_DEPTH = 8  # files in one inheritance chain (the built-ins use at most 4)


def _show(value: Any, limit: int = 40) -> str:
    """repr(value), shortened: a hostile file's value never floods the one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _show_key(key: str) -> str:
    return key if len(key) <= 40 and key.isprintable() else _show(key)


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a profile name, or None: at most 64 printable characters, no spaces or slashes."""
    if not name or len(name) > MAX_NAME:
        return f"a profile name has 1 to {MAX_NAME} characters"
    if not name.isprintable() or any(c.isspace() or c in "/\\" for c in name):
        return "a profile name has no spaces, slashes or control characters"
    return None


def _type_ok(value: Any, expected) -> bool:
    expected = _TYPES.get(expected, expected) if isinstance(expected, str) else expected
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected) -> str:
    return expected if isinstance(expected, str) else expected.__name__


def _check_value(key: str, value: Any, source: str) -> None:
    """Range of a number, length and characters of a text (the type is already checked)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"{source}: '{key}' must be a finite number, not {value!r}",
                           hint=RANGES[key][3] if key in RANGES else None)
    if key in RANGES:
        low, high, open_low, hint = RANGES[key]
        if value < low or value > high or (open_low and value == low):
            span = f"({low}, {high}]" if open_low else f"{low}..{high}"
            raise ProfileError(f"{source}: '{key}' must be within {span}, not {_show(value)}", hint=hint)
    if key in TEXT_LIMITS:
        limit = TEXT_LIMITS[key]
        if len(value) > limit:
            raise ProfileError(f"{source}: '{key}' is {len(value)} characters long; at most {limit} are allowed",
                               hint="shorten it")
        if not value.isprintable():
            raise ProfileError(f"{source}: '{key}' holds control characters (newlines, tabs, escapes): {_show(value)}",
                               hint="write it as one line of plain text")
    if key == "inherits" and name_problem(value):
        raise ProfileError(f"{source}: 'inherits' = {_show(value)} is not a profile name", hint=name_problem(value))
    if key == "server.host" and (not value or any(c.isspace() for c in value)):
        raise ProfileError(f"{source}: 'server.host' = {_show(value)} is not a host name or address",
                           hint='e.g. host = "127.0.0.1" (this machine only) or "0.0.0.0" (every interface)')


def validate_raw(raw: dict, source: str) -> None:
    """Check keys, types and ranges of one file's table (before inheritance)."""
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ProfileError(f"{source}: [{key}] must be a table", hint=f"allowed keys in [{key}]: {', '.join(SECTIONS[key])}")
            for sub, subval in value.items():
                if sub not in SECTIONS[key]:
                    raise ProfileError(
                        f"{source}: unknown key '{key}.{_show_key(sub)}'",
                        hint=f"allowed keys in [{key}]: {', '.join(SECTIONS[key])}",
                    )
                if not _type_ok(subval, SECTIONS[key][sub]):
                    raise ProfileError(
                        f"{source}: '{key}.{sub}' must be {_type_name(SECTIONS[key][sub])}, not {_show(subval)}",
                        hint=f"e.g. {sub} = {getattr(Generation() if key == 'generation' else Server(), sub)!r}",
                    )
                _check_value(f"{key}.{sub}", subval, source)
            continue
        if key not in TOP_KEYS:
            raise ProfileError(
                f"{source}: unknown key '{_show_key(key)}'",
                hint=f"allowed keys: {', '.join(list(TOP_KEYS) + list(SECTIONS))}",
            )
        typ, allowed = TOP_KEYS[key]
        if not _type_ok(value, typ):
            raise ProfileError(f"{source}: '{key}' must be {typ.__name__}, not {_show(value)}",
                               hint=f"allowed: {', '.join(map(str, allowed))}" if allowed else None)
        if allowed is not None and value not in allowed:
            raise ProfileError(f"{source}: '{key}' = {_show(value)} is not allowed",
                               hint=f"allowed: {', '.join(map(repr, allowed))}")
        _check_value(key, value, source)


def check_combination(p: Profile) -> None:
    """Refuse combinations that cannot run (the errors users hit with the official demos)."""
    src = p.source or p.name

    def bad(key, msg, hint):
        raise ProfileError(f"{src}: '{key}': {msg}", hint=hint)

    if p.device == "mps" and p.quantization_bits:
        bad("quantization_bits", f"int{p.quantization_bits} is not supported on mps",
            "use quantization_bits = 0 on mps (float16 needs about 13 GB of unified memory), or device = \"cpu\"")
    if p.device == "cpu" and p.dtype == "float16":
        bad("dtype", "float16 on cpu fails (\"addmm_impl_cpu_ not implemented for 'Half'\")",
            "use dtype = \"float32\" (the official .float() path) or \"bfloat16\" on cpu")
    if p.backend == "official" and p.device != "cuda" and p.quantization_bits:
        bad("quantization_bits", "the official .quantize() kernels need CUDA",
            "use backend = \"native\" for int8/int4 on cpu, or device = \"cuda\"")
    if p.backend == "official" and p.dtype == "bfloat16":
        bad("dtype", "the official path knows float32 (.float()) and float16 (.half()) only",
            "use backend = \"native\" for bfloat16")
    if p.num_gpus > 1 and p.device != "cuda":
        bad("num_gpus", f"several GPUs need device = \"cuda\", not {p.device!r}", "set device = \"cuda\"")
    if p.num_gpus > 1 and p.quantization_bits:
        bad("num_gpus", "splitting a quantized model across GPUs is not supported",
            "int4/int8 fit on one card: use num_gpus = 1")


def _read(path: Path) -> dict:
    """One file's table, checked; a ProfileError names the file (never a traceback, never a hang)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a fifo would block, a device never ends
            raise ProfileError(f"{path}: not a regular file", hint="a profile is a small .toml file")
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot be read ({exc.strerror})", hint="check the file's permissions")
    if len(data) > MAX_FILE_BYTES:
        raise ProfileError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB, not a profile",
                           hint="a profile is a few lines of TOML; see docs/reference/profiles.md")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not valid TOML (not UTF-8 text)", hint="save the file as UTF-8")
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})", hint="see docs/reference/profiles.md for the format")
    except RecursionError:
        raise ProfileError(f"{path}: not valid TOML (nested too deeply)", hint="see docs/reference/profiles.md for the format")
    validate_raw(raw, str(path))
    return raw


_warned: set = set()


def warn(message: str) -> None:
    """One line on stderr (once per message): a skipped file never hides the others."""
    if message in _warned:
        return
    _warned.add(message)
    from glmsetup import output

    output.stderr().print(f"[yellow]warning:[/] {output.escape(message)}", soft_wrap=True)


def profile_files() -> dict[str, Path]:
    """name -> file; a user's profile of the same name overrides a built-in one."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, paths.user_profiles_dir()):
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
                problem = name_problem(f.stem)
                if problem:
                    warn(f"skipped {_show(str(f), 200)}: its name is not a profile name ({problem})")
                    continue
                found[f.stem] = f
    return dict(sorted(found.items()))


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if key in SECTIONS and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _builtin(name: str) -> Optional[Path]:
    path = BUILTIN_DIR / f"{name}.toml"
    return path if path.is_file() else None


def _resolve_file(name: str, path: Path, files: dict[str, Path], chain: tuple = ()) -> dict:
    """The table of `path` (the profile `name`) with its inheritance applied; errors raise."""
    chain = chain + ((name, path),)
    raw = _read(path)
    parent = raw.get("inherits")
    if not parent:
        return raw
    if parent == name and files.get(name) == path and path.parent != BUILTIN_DIR and _builtin(name):
        parent_path = _builtin(name)  # a user profile that refines the built-in one of the same name
    else:
        parent_path = files.get(parent)
    names = " -> ".join([n for n, _ in chain] + [parent])
    if parent_path is None:
        raise ProfileError(f"{path}: inherits unknown profile '{parent}'",
                           hint=f"known profiles: {', '.join(sorted(files)) or 'none'} (glmsetup profiles)")
    if any(p == parent_path for _, p in chain):
        raise ProfileError(f"profile inheritance loops: {names} ({path})", hint="remove one 'inherits' so the chain ends")
    if len(chain) >= MAX_DEPTH:
        raise ProfileError(f"{path}: inheritance is more than {MAX_DEPTH} profiles deep: {names}",
                           hint=f"inherit from a built-in directly; at most {MAX_DEPTH} files may form a chain")
    return _merge(_resolve_parent(parent, parent_path, files, chain), raw)


def _resolve_parent(name: str, path: Path, files: dict[str, Path], chain: tuple) -> dict:
    """A parent's table. A user's file that overrides a built-in must be a valid profile on its own;
    when it is not, it is skipped with a warning and the built-in is used in its place."""
    builtin = _builtin(name)
    if builtin is None or path == builtin:
        return _resolve_file(name, path, files, chain)
    try:
        raw = _resolve_file(name, path, files, chain)
        build(name, raw, str(path))
        return raw
    except ProfileError as exc:
        warn(f"skipped {exc.message} (using the built-in '{name}')")
    return _resolve_file(name, builtin, files, chain)


def on_cpu_instead(prof: "Profile") -> list[str]:
    """The built-in CPU profiles to suggest for a CUDA profile on a machine without a GPU, closest first."""
    same = {4: ["cpu-int4", "cpu-int8"], 8: ["cpu-int8", "cpu-int4"]}.get(prof.quantization_bits or 0, [])
    first = ["official-cpu"] if prof.backend == "official" else []
    return list(dict.fromkeys(first + same + ["cpu-int4", "cpu-int8", "cpu-bf16", "cpu"]))


def no_gpu_hint(prof: "Profile") -> str:
    """The hint when `prof` needs CUDA and torch sees no GPU: doctor, and the CPU profiles of on_cpu_instead."""
    names = on_cpu_instead(prof)
    return f"`glmsetup doctor` explains why; on CPU use --profile {', '.join(names[:-1])} or {names[-1]}"


def _unknown(name: str, files: dict[str, Path]) -> ProfileError:
    import difflib

    norm = str(name).strip().lower().replace("_", "-")
    close = [norm] if norm in files else difflib.get_close_matches(norm, sorted(files), n=2)
    maybe = f"did you mean {' or '.join(close)}? " if close else ""
    return ProfileError(f"unknown profile '{_show_key(name)}'",
                        hint=f"{maybe}known profiles: {', '.join(sorted(files)) or 'none'} (glmsetup profiles)")


def load(name: str) -> Profile:
    """Resolve a profile by name (inheritance applied, validated)."""
    files = profile_files()
    path = files.get(name)
    if path is None:
        raise _unknown(name, files)
    return build(name, _resolve_file(name, path, files), str(path))


def build(name: str, raw: dict, source: str = "") -> Profile:
    validate_raw(raw, source or name)
    fields = {k: v for k, v in raw.items() if k not in SECTIONS}
    profile = Profile(
        name=name,
        source=source,
        generation=Generation(**{k: (float(v) if k != "max_length" else v) for k, v in raw.get("generation", {}).items()}),
        server=Server(**raw.get("server", {})),
        **fields,
    )
    check_combination(profile)
    return profile


def load_all() -> list[Profile]:
    """Every profile; a broken one is skipped with a warning naming its file (a user's file that
    overrides a built-in falls back to the built-in), so one bad file never hides the others."""
    files = profile_files()
    out = []
    for name, path in files.items():
        try:
            out.append(build(name, _resolve_file(name, path, files), str(path)))
            continue
        except ProfileError as exc:
            builtin = _builtin(name)
            if builtin is None or builtin == path:
                warn(f"skipped profile '{name}': {exc.message}")
                continue
            warn(f"skipped {exc.message} (using the built-in '{name}')")
        try:
            out.append(build(name, _resolve_file(name, builtin, files), str(builtin)))
        except ProfileError as exc:
            warn(f"skipped profile '{name}': {exc.message}")
    return out


def resolve(profile) -> Profile:
    """A Profile, a name, or a path to a .toml file -> Profile. ("auto" is decided by the doctor.)"""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, (str, Path)) and str(profile).endswith(".toml"):
        path = Path(profile)
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist", hint="give a profile name or an existing .toml file")
        files = profile_files()
        return build(path.stem, _resolve_file(path.stem, path, files), str(path))
    return load(str(profile))
