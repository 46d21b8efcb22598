"""Rules for the terminal demo (cli_demo.py and its copies)."""
from __future__ import annotations

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome

NEW = "repetition_penalty"
HELPER = "repetition_penalty_setting"
ENV = "GLMSETUP_REPETITION_PENALTY"
FLAG = "--repetition-penalty"


def _helper_code(default: float) -> str:
    return f'''def {HELPER}():
    """{FLAG} X, else ${ENV}, else {default} (1.0 is off); never below 0.5."""
    value = os.environ.get("{ENV}", "{default}")
    for i, arg in enumerate(sys.argv[1:], 1):
        if arg.startswith("{FLAG}="):
            value = arg.split("=", 1)[1]
        elif arg == "{FLAG}" and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
    return max(0.5, float(value))
'''


def repetition_penalty(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    streams = t.calls(module, lambda c: t.last_attr(c) == "stream_chat")
    if not streams:
        out.note("no stream_chat call found")
        return module
    if t.function(module, HELPER) is not None:
        out.already(f"{HELPER}() reads {FLAG} / ${ENV}")
    else:
        first_def = next((s for s in module.body if isinstance(s, cst.FunctionDef)), None)
        if first_def is None:
            out.note("no top-level function to put the setting before")
            return module
        helper = t.statement(_helper_code(ctx.profile.generation.repetition_penalty))
        spacer = first_def.with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])
        module = t.insert_before(module, first_def, [helper])
        module = module.deep_replace(t.function(module, first_def.name.value), spacer)
        out.changed(f"{HELPER}(): {FLAG} X or ${ENV}")
        for mod in ("os", "sys"):
            if not t.imports_module(module, mod):
                module = t.add_import(module, f"import {mod}\n")
                out.changed(f"import {mod}")
    for call in t.calls(module, lambda c: t.last_attr(c) == "stream_chat"):
        if NEW in t.keywords(call):
            out.already(f"stream_chat gets {NEW}")
            continue
        module = module.deep_replace(call, t.add_keyword(call, NEW, f"{HELPER}()", after="past_key_values"))
        out.changed(f"stream_chat(..., {NEW}={HELPER}())")
    return module


GUARD = '''try:
    import readline  # line editing and history; not available on Windows
except ImportError:
    pass
'''


def _is_readline_import(node) -> bool:
    return isinstance(node, cst.Import) and any(t.dotted(a.name) == "readline" for a in node.names)


def compatibility(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """`import readline` fails on Windows: guard it."""
    guarded = set()
    for tr in t.find_all(module, lambda n: isinstance(n, cst.Try)):
        for node in t.find_all(tr.body, _is_readline_import):
            guarded.add(id(node))
    for stmt in t.find_all(module, lambda n: isinstance(n, cst.SimpleStatementLine)):
        if not any(_is_readline_import(s) for s in stmt.body):
            continue
        node = next(s for s in stmt.body if _is_readline_import(s))
        if id(node) in guarded:
            out.already("import readline is guarded")
            continue
        if len(stmt.body) != 1 or len(node.names) != 1:
            out.note("import readline shares its line with other statements; left as is")
            continue
        guard = t.statement(GUARD).with_changes(leading_lines=stmt.leading_lines)
        module = module.deep_replace(stmt, guard)
        out.changed("import readline guarded with try/except ImportError (Windows)")
    if not out.changes and not out.done and not out.notes:
        out.note("no import readline")
    return module


RULES = {
    "repetition-penalty": repetition_penalty,
    "compatibility": compatibility,
    "binding:reason": "a terminal program: it does not listen on the network",
}
