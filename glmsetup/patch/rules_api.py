"""Rules for the two API servers: api.py (POST /) and openai_api.py (/v1/chat/completions)."""
from __future__ import annotations

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome
from glmsetup.patch.rules_servers import cors_binding, uvicorn_binding

NEW = "repetition_penalty"
HELPER = "generation_kwargs"
STREAM_PARAM = "gen_kwargs"


# ---- api.py -----------------------------------------------------------------------------------

def api_repetition_penalty(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """`repetition_penalty` read from the request body like the other settings and passed to chat()."""
    reads = {}
    for stmt in t.find_all(module, lambda n: t.assign_parts(n) is not None):
        name, value = t.assign_parts(stmt)
        if isinstance(value, cst.Call) and t.last_attr(value) == "get" and isinstance(value.func, cst.Attribute):
            key = t.arg(value, position=0)
            if key is not None and t.string_value(key.value) is not None:
                reads[t.string_value(key.value)] = (stmt, name, value)
    if NEW in reads:
        out.already(f"reads {NEW} from the request")
    else:
        anchor = next((reads[k] for k in ("temperature", "top_p", "max_length") if k in reads), None)
        if anchor is None:
            out.note("the request's settings are not read with body.get('...') here; left as is")
            return module
        stmt, _name, value = anchor
        body = t.code_of(value.func.value)
        quote = "'" if t.code_of(t.arg(value, position=0).value).startswith("'") else '"'
        module = t.insert_after(module, stmt, [t.statement(f"{NEW} = {body}.get({quote}{NEW}{quote})\n")])
        out.changed(f"reads {NEW} from the request body")
    default = ctx.profile.generation.repetition_penalty
    for call in t.calls(module, lambda c: t.last_attr(c) == "chat"):
        if NEW in t.keywords(call):
            out.already(f"chat() gets {NEW}")
            continue
        after = next((k for k in ("temperature", "top_p", "max_length") if k in t.keywords(call)), None)
        module = module.deep_replace(call, t.add_keyword(
            call, NEW, f"max(0.5, float({NEW})) if {NEW} else {default}", after=after))
        out.changed(f"chat(..., {NEW}=...) (default {default}, at least 0.5)")
    return module


def api_binding(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    return uvicorn_binding(module, ctx, out)


API_RULES = {
    "repetition-penalty": api_repetition_penalty,
    "compatibility:reason": "runs unchanged on current FastAPI, uvicorn and pydantic",
    "binding": api_binding,
}


# ---- openai_api.py ----------------------------------------------------------------------------

HELPER_CODE = f'''def {HELPER}(request):
    """The sampling settings a request sets (temperature 0 means greedy); unset ones keep the model's defaults."""
    kwargs = {{name: getattr(request, name, None) for name in ("temperature", "top_p", "max_length", "{NEW}")}}
    kwargs = {{name: value for name, value in kwargs.items() if value is not None}}
    if kwargs.get("{NEW}") is not None:
        kwargs["{NEW}"] = max(0.5, kwargs["{NEW}"])
    if kwargs.get("temperature") == 0:
        del kwargs["temperature"]
        kwargs["do_sample"] = False
    return kwargs
'''


def _star_kwargs(call: cst.Call, code: str) -> cst.Call:
    args = list(call.args)
    new = cst.Arg(value=cst.parse_expression(code), star="**")
    return call.with_changes(args=t.insert_list_item(args, len(args), new))


def _has_star(call: cst.Call, code: str) -> bool:
    return any(a.star == "**" and t.code_of(a.value) == code for a in call.args)


def openai_repetition_penalty(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """A repetition_penalty request field; temperature, top_p, max_length and it reach the model."""
    # 1. the request model gets the field
    requests = t.find_all(module, lambda n: isinstance(n, cst.ClassDef) and n.name.value == "ChatCompletionRequest")
    if not requests:
        out.note("no ChatCompletionRequest class found")
        return module
    cls = requests[0]
    fields = [s for s in cls.body.body if isinstance(t.simple_statement(s), cst.AnnAssign)]
    names = [t.simple_statement(s).target.value for s in fields if isinstance(t.simple_statement(s).target, cst.Name)]
    if not fields:
        out.note("ChatCompletionRequest has no annotated fields")
        return module
    if NEW in names:
        out.already(f"ChatCompletionRequest.{NEW}")
    else:
        anchor = next((fields[names.index(k)] for k in ("max_length", "top_p", "temperature") if k in names), fields[-1])
        module = t.insert_after(module, anchor, [t.statement(f"{NEW}: Optional[float] = None\n")])
        out.changed(f"ChatCompletionRequest.{NEW}: Optional[float] = None")
        if not t.imports_from(module, "typing", "Optional"):
            module = t.add_import(module, "from typing import Optional\n")

    # 2. one helper turns the request into generate settings
    if t.function(module, HELPER) is not None:
        out.already(f"{HELPER}(request) helper")
    else:
        endpoint = next((f for f in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef))
                         if t.calls(f.body, lambda c: t.last_attr(c) == "chat")), None)
        if endpoint is None:
            out.note("no function calling model.chat found")
            return module
        helper = t.statement(HELPER_CODE)
        module = t.insert_before(module, endpoint, [helper, ])
        out.changed(f"{HELPER}(request): temperature, top_p, max_length, {NEW} (temperature 0 = greedy)")
        # two blank lines between the helper and the decorated endpoint
        endpoint = next(f for f in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef))
                        if t.calls(f.body, lambda c: t.last_attr(c) == "chat"))
        module = module.deep_replace(endpoint, endpoint.with_changes(
            leading_lines=[cst.EmptyLine(), cst.EmptyLine()]))

    # 3. chat() and the streaming generator use it
    endpoint = next(f for f in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef))
                    if t.calls(f.body, lambda c: t.last_attr(c) == "chat"))
    request_name = t.param_names(endpoint)[0] if t.param_names(endpoint) else "request"
    helper_call = f"{HELPER}({request_name})"
    for call in t.calls(endpoint.body, lambda c: t.last_attr(c) == "chat"):
        if _has_star(call, helper_call):
            out.already(f"chat(..., **{helper_call})")
        else:
            module = module.deep_replace(call, _star_kwargs(call, helper_call))
            out.changed(f"chat(..., **{helper_call})")
    streamer = next((f for f in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef))
                     if t.calls(f.body, lambda c: t.last_attr(c) == "stream_chat")), None)
    if streamer is None:
        out.note("no streaming function found")
        return module
    name = streamer.name.value
    endpoint = next(f for f in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef))
                    if t.calls(f.body, lambda c: t.last_attr(c) == "chat"))
    for call in t.calls(endpoint.body, lambda c: t.call_name(c) == name):
        if t.arg(call, keyword=STREAM_PARAM) is not None or any(t.code_of(a.value) == helper_call for a in call.args):
            out.already(f"{name}(..., {helper_call})")
            continue
        module = module.deep_replace(call, t.add_keyword(call, STREAM_PARAM, helper_call))
        out.changed(f"{name}(..., {STREAM_PARAM}={helper_call})")
    streamer = t.function(module, name)
    if STREAM_PARAM in t.param_names(streamer):
        out.already(f"{name}() takes {STREAM_PARAM}")
    else:
        param = cst.Param(name=cst.Name(STREAM_PARAM), annotation=cst.Annotation(cst.parse_expression("Optional[dict]")),
                          default=cst.Name("None"), equal=cst.AssignEqual())
        params = t.insert_list_item(streamer.params.params, len(streamer.params.params), param)
        new_streamer = streamer.with_changes(params=streamer.params.with_changes(params=params))
        module = module.deep_replace(streamer, new_streamer)
        out.changed(f"{name}() takes {STREAM_PARAM}")
    streamer = t.function(module, name)
    star = f"({STREAM_PARAM} or {{}})"
    for call in t.calls(streamer.body, lambda c: t.last_attr(c) == "stream_chat"):
        if _has_star(call, star):
            out.already(f"stream_chat(..., **{star})")
        else:
            module = module.deep_replace(call, _star_kwargs(call, star))
            out.changed(f"stream_chat(..., **{star})")
    return module


def openai_compatibility(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """pydantic v2: `.json(..., ensure_ascii=False)` raises; model_dump_json keeps non-ASCII as it is."""
    pairs = []
    for call in t.calls(module, lambda c: t.last_attr(c) == "json" and isinstance(c.func, cst.Attribute)
                        and ("ensure_ascii" in t.keywords(c) or "exclude_unset" in t.keywords(c))):
        new = t.remove_keyword(call, "ensure_ascii")
        new = new.with_changes(func=new.func.with_changes(attr=cst.Name("model_dump_json")))
        pairs.append((call, new))
    if pairs:
        module = t.replace_many(module, pairs)
        out.changed(f".json(exclude_unset=True, ensure_ascii=False) -> .model_dump_json(exclude_unset=True) "
                    f"({len(pairs)} calls, pydantic v2)")
    elif t.calls(module, lambda c: t.last_attr(c) == "model_dump_json"):
        out.already("serialises with model_dump_json (pydantic v2)")
    return module


def openai_binding(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    module = uvicorn_binding(module, ctx, out)
    return cors_binding(module, ctx, out)


OPENAI_RULES = {
    "repetition-penalty": openai_repetition_penalty,
    "compatibility": openai_compatibility,
    "binding": openai_binding,
}
