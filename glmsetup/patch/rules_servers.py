"""What the two API servers share: binding (uvicorn host/port, CORS)."""
from __future__ import annotations

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome

LOCAL_ORIGINS = r'r"https?://(localhost|127\.0\.0\.1)(:[0-9]+)?"'


def uvicorn_binding(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    runs = t.calls(module, lambda c: t.call_name(c).endswith("uvicorn.run") or t.call_name(c) == "run"
                   and t.imports_from(module, "uvicorn", "run"))
    if not runs:
        out.note("no uvicorn.run(...) call found")
        return module
    want = (("host", ctx.host), ("port", ctx.profile.server.api_port))
    for call in runs:
        new = call
        for key, value in want:
            a = t.arg(new, keyword=key)
            current = None if a is None else (t.string_value(a.value) if isinstance(value, str) else t.code_of(a.value))
            if current == (value if isinstance(value, str) else str(value)):
                out.already(f"uvicorn.run({key}={value!r})")
                continue
            like = a.value if a is not None and isinstance(a.value, cst.SimpleString) else None
            literal = t.string_literal(value, like) if isinstance(value, str) else cst.Integer(str(value))
            if a is not None:
                new = new.deep_replace(a.value, literal)
            else:
                new = t.add_keyword(new, key, literal, after=None)
            out.changed(f"uvicorn.run({key}={value!r})")
        module = module.deep_replace(call, new)
    if ctx.listen:
        out.note("listening on all interfaces with no API key: anyone who can reach this machine can use the model")
    return module


def cors_binding(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """Open CORS ("*") lets any web page the user visits call the local API; keep it to local pages."""
    for call in t.calls(module, lambda c: t.last_attr(c) == "add_middleware"):
        kind = t.arg(call, position=0)
        if kind is None or not t.dotted(kind.value).endswith("CORSMiddleware"):
            continue
        origins = t.arg(call, keyword="allow_origins")
        regex = t.arg(call, keyword="allow_origin_regex")
        if ctx.listen:
            out.note("--listen: CORS left as the file sets it")
            continue
        if origins is not None and t.code_of(origins.value).replace(" ", "") in ('["*"]', "['*']"):
            new_arg = origins.with_changes(keyword=cst.Name("allow_origin_regex"),
                                           value=cst.parse_expression(LOCAL_ORIGINS))
            module = module.deep_replace(origins, new_arg)
            out.changed('CORS: allow_origins=["*"] -> pages served from localhost/127.0.0.1 only')
        elif regex is not None:
            out.already("CORS limited to local pages")
    return module
