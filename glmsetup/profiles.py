"""Profiles: how the model is loaded and served, as TOML data.

Built-in profiles live in profiles/ at the project root (shipped inside the package as
glmsetup/profiles); a user's own go in $GLMSETUP_HOME/profiles and may inherit from built-ins or
override them. Every file is validated: an unknown key, a wrong type or an impossible combination is
a ProfileError naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
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


def _type_ok(value: Any, expected) -> bool:
    expected = _TYPES.get(expected, expected) if isinstance(expected, str) else expected
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected) -> str:
    return expected if isinstance(expected, str) else expected.__name__


def validate_raw(raw: dict, source: str) -> None:
    """Check keys and types of one file's table (before inheritance)."""
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ProfileError(f"{source}: [{key}] must be a table", hint=f"allowed keys in [{key}]: {', '.join(SECTIONS[key])}")
            for sub, subval in value.items():
                if sub not in SECTIONS[key]:
                    raise ProfileError(
                        f"{source}: unknown key '{key}.{sub}'",
                        hint=f"allowed keys in [{key}]: {', '.join(SECTIONS[key])}",
                    )
                if not _type_ok(subval, SECTIONS[key][sub]):
                    raise ProfileError(
                        f"{source}: '{key}.{sub}' must be {_type_name(SECTIONS[key][sub])}, not {subval!r}",
                        hint=f"e.g. {sub} = {getattr(Generation() if key == 'generation' else Server(), sub)!r}",
                    )
            continue
        if key not in TOP_KEYS:
            raise ProfileError(
                f"{source}: unknown key '{key}'",
                hint=f"allowed keys: {', '.join(list(TOP_KEYS) + list(SECTIONS))}",
            )
        typ, allowed = TOP_KEYS[key]
        if not _type_ok(value, typ):
            raise ProfileError(f"{source}: '{key}' must be {typ.__name__}, not {value!r}",
                               hint=f"allowed: {', '.join(map(str, allowed))}" if allowed else None)
        if allowed is not None and value not in allowed:
            raise ProfileError(f"{source}: '{key}' = {value!r} is not allowed",
                               hint=f"allowed: {', '.join(map(repr, allowed))}")


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
    if p.num_gpus < 1:
        bad("num_gpus", f"must be at least 1, not {p.num_gpus}", "num_gpus = 1 for one card, 2 or more to split layers")
    if p.num_gpus > 1 and p.device != "cuda":
        bad("num_gpus", f"several GPUs need device = \"cuda\", not {p.device!r}", "set device = \"cuda\"")
    if p.num_gpus > 1 and p.quantization_bits:
        bad("num_gpus", "splitting a quantized model across GPUs is not supported",
            "int4/int8 fit on one card: use num_gpus = 1")
    g = p.generation
    if not 0 < g.top_p <= 1:
        bad("generation.top_p", f"must be in (0, 1], not {g.top_p}", "top_p = 0.8 is the official default")
    if g.temperature < 0:
        bad("generation.temperature", f"must be >= 0, not {g.temperature}", "0 means greedy; 0.8 is the official default")
    if g.repetition_penalty < 0.5:
        bad("generation.repetition_penalty", f"values below 0.5 cause runaway repetition ({g.repetition_penalty})",
            "1.0 means off; 1.1-1.3 discourages repetition")
    if not 1 <= g.max_length <= 32768:
        bad("generation.max_length", f"must be within 1..32768, not {g.max_length}", "8192 is the official default")
    for key in ("api_port", "web_port", "streamlit_port"):
        port = getattr(p.server, key)
        if not 0 < port < 65536:
            bad(f"server.{key}", f"must be within 1..65535, not {port}", "e.g. 8000")


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})", hint="see docs/reference/profiles.md for the format")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot be read ({exc.strerror})", hint="check the file's permissions")
    validate_raw(raw, str(path))
    return raw


def profile_files() -> dict[str, Path]:
    """name -> file; a user's profile of the same name overrides a built-in one."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, paths.user_profiles_dir()):
        if folder.is_dir():
            for f in sorted(folder.glob("*.toml")):
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


def _resolve_raw(name: str, files: dict[str, Path], seen: tuple = ()) -> tuple[dict, Path]:
    if name in seen:
        raise ProfileError(f"profile inheritance loops: {' -> '.join(seen + (name,))}",
                           hint="remove one 'inherits' so the chain ends")
    path = files.get(name)
    if path is None:
        raise ProfileError(f"unknown profile '{name}'",
                           hint=f"known profiles: {', '.join(sorted(files)) or 'none'} (glmsetup profiles)")
    raw = _read(path)
    parent = raw.get("inherits")
    if parent:
        if parent == name and path.parent != BUILTIN_DIR and (BUILTIN_DIR / f"{name}.toml").exists():
            # A user profile that refines the built-in one of the same name.
            base = _read(BUILTIN_DIR / f"{name}.toml")
        else:
            base, _ = _resolve_raw(parent, files, seen + (name,))
        raw = _merge(base, raw)
    return raw, path


def load(name: str) -> Profile:
    """Resolve a profile by name (inheritance applied, validated)."""
    files = profile_files()
    raw, path = _resolve_raw(name, files)
    return build(name, raw, str(path))


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
    return [load(name) for name in profile_files()]


def resolve(profile) -> Profile:
    """A Profile, a name, or a path to a .toml file -> Profile. ("auto" is decided by the doctor.)"""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, (str, Path)) and str(profile).endswith(".toml"):
        path = Path(profile)
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist", hint="give a profile name or an existing .toml file")
        raw = _read(path)
        if raw.get("inherits"):
            base, _ = _resolve_raw(raw["inherits"], profile_files())
            raw = _merge(base, raw)
        return build(path.stem, raw, str(path))
    return load(str(profile))
