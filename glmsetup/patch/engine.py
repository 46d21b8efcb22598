"""Apply one rule set to one file: parse, run the rules in order, check the result compiles.

Nothing here writes: `plan_file` returns the new bytes and a report; glmsetup.patch.apply decides
what is written. The module is parsed from bytes, so the encoding (coding cookie, BOM) and the line
endings of the original are kept; untouched code is reproduced byte for byte.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import libcst as cst

from glmsetup.errors import PatchError

APPLIED = "applied"
ALREADY = "already_applied"
NOT_APPLICABLE = "not_applicable"

# The rule names, in the order they run.
RULES = ("model-path", "loader", "repetition-penalty", "compatibility", "binding")
LOADERS = ("glmsetup", "official")


@dataclass
class Context:
    """What the rules need to know: where the model is, which profile, which loader."""

    model_path: str
    profile_arg: str  # what goes into profile="..." (a name or a .toml path)
    profile: object  # the resolved glmsetup.profiles.Profile
    loader: str = "glmsetup"
    listen: bool = False
    has_utils: bool = True  # a utils.py with load_model_on_gpus sits beside the demo

    @property
    def host(self) -> str:
        return "0.0.0.0" if self.listen else self.profile.server.host


@dataclass
class RuleResult:
    rule: str
    status: str
    reason: str = ""
    changes: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "status": self.status, "reason": self.reason,
                "changes": list(self.changes), "notes": list(self.notes)}


class Outcome:
    """Collects the sub-edits of one rule: what changed, what was already there, what was missing."""

    def __init__(self, rule: str):
        self.rule = rule
        self.changes: list[str] = []
        self.done: list[str] = []
        self.notes: list[str] = []

    def changed(self, what: str) -> None:
        self.changes.append(what)

    def already(self, what: str) -> None:
        self.done.append(what)

    def note(self, what: str) -> None:
        self.notes.append(what)

    def result(self, reason_if_nothing: str = "nothing in this file matches the rule") -> RuleResult:
        if self.changes:
            return RuleResult(self.rule, APPLIED, "", self.changes, self.notes)
        if self.done:
            return RuleResult(self.rule, ALREADY, "; ".join(self.done), [], self.notes)
        reason = "; ".join(self.notes) if self.notes else reason_if_nothing
        return RuleResult(self.rule, NOT_APPLICABLE, reason, [], [])


RuleFn = Callable[[cst.Module, Context, Outcome], cst.Module]


def not_applicable(rule: str, reason: str) -> RuleResult:
    return RuleResult(rule, NOT_APPLICABLE, reason)


@dataclass
class FilePlan:
    path: Path
    kind: str
    original: bytes
    new: bytes
    results: list
    encoding: str = "utf-8"

    @property
    def changed(self) -> bool:
        return self.new != self.original


def parse(source: bytes, path: Path) -> cst.Module:
    try:
        return cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise PatchError(f"{path}: not valid Python (line {exc.raw_line}: {exc.message})",
                         hint="fix the syntax error (or restore the original file) and run glmsetup patch again",
                         details={"path": str(path)}) from None
    except (UnicodeDecodeError, LookupError, SyntaxError) as exc:  # SyntaxError: a bad coding line
        raise PatchError(f"{path}: cannot be decoded ({exc})",
                         hint="save the file as UTF-8 or declare its encoding in a '# coding: ...' line",
                         details={"path": str(path)}) from None


def check_compiles(new: bytes, path: Path) -> None:
    """The gate every result passes before it may be written."""
    try:
        with warnings.catch_warnings():  # the demos' own warnings (invalid escapes ...) are not ours to print
            warnings.simplefilter("ignore")
            compile(new, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        raise PatchError(f"{path}: the patched file would not compile (line {line}: {getattr(exc, 'msg', exc)}); "
                         "nothing was written",
                         hint="the file may have been edited in a way the rules do not expect: patch with --only "
                              "to skip a rule, or restore the original",
                         details={"path": str(path), "line": line}) from None


def plan_file(path: Path, source: bytes, kind: str, rules: dict, ctx: Context,
              only: Optional[set] = None) -> FilePlan:
    """Run the rule set of `kind` over `source`; the result has been compiled (or PatchError)."""
    module = parse(source, path)
    results = []
    for name in RULES:
        if only is not None and name not in only:
            continue
        fn = rules.get(name)
        if fn is None:
            results.append(not_applicable(name, rules.get(f"{name}:reason", f"the {kind} demo has nothing for this rule")))
            continue
        outcome = Outcome(name)
        try:
            module = fn(module, ctx, outcome)
        except PatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected shape of code must not leave a half-written file
            raise PatchError(f"{path}: the {name} rule cannot handle this file ({exc.__class__.__name__}: {exc}); "
                             "nothing was written",
                             hint=f"skip that rule with --only (all rules but {name}), or edit the file by hand",
                             details={"path": str(path), "rule": name}) from exc
        results.append(outcome.result())
    new = module.bytes
    if new != source:
        check_compiles(new, path)
    return FilePlan(path=path, kind=kind, original=source, new=new, results=results, encoding=module.encoding)
