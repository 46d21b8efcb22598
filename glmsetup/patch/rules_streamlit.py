"""Rules for the Streamlit demo (web_demo2.py and its copies)."""
from __future__ import annotations

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome

NEW_PARAM = "repetition_penalty"


def _sidebar_sliders(module: cst.Module) -> list:
    return [s for s in t.find_all(module, lambda n: t.assign_parts(n) is not None)
            if isinstance(t.assign_parts(s)[1], cst.Call) and t.call_name(t.assign_parts(s)[1]).endswith("slider")]


def repetition_penalty(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    default = ctx.profile.generation.repetition_penalty
    sliders = _sidebar_sliders(module)
    if any(t.assign_parts(s)[0] == NEW_PARAM for s in sliders):
        out.already("repetition_penalty sidebar slider")
    elif sliders:
        anchor = next((s for s in sliders if t.assign_parts(s)[0] == "temperature"), sliders[-1])
        st = t.call_name(t.assign_parts(anchor)[1]).rsplit(".slider", 1)[0] or "st.sidebar"
        new = t.statement(f"{NEW_PARAM} = {st}.slider('repetition_penalty', 0.5, 2.0, {default}, step=0.01)\n")
        module = t.insert_after(module, anchor, [new])
        out.changed(f"repetition_penalty sidebar slider (0.5..2.0, default {default})")
    else:
        out.note("no sidebar slider found to put the repetition_penalty slider beside")
        return module
    for call in t.calls(module, lambda c: t.last_attr(c) == "stream_chat"):
        if NEW_PARAM in t.keywords(call):
            out.already(f"stream_chat gets {NEW_PARAM}")
            continue
        after = next((k for k in ("temperature", "top_p", "max_length") if k in t.keywords(call)), None)
        module = module.deep_replace(call, t.add_keyword(call, NEW_PARAM, NEW_PARAM, after=after))
        out.changed(f"stream_chat(..., {NEW_PARAM}={NEW_PARAM})")
    return module


def compatibility(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """@st.cache(allow_output_mutation=True) (removed from Streamlit) becomes @st.cache_resource."""
    pairs = []
    for deco in t.find_all(module, lambda n: isinstance(n, cst.Decorator)):
        expr = deco.decorator
        name = t.call_name(expr) if isinstance(expr, cst.Call) else t.dotted(expr)
        if name.endswith(".cache") and name.count(".") == 1:
            pairs.append((deco, deco.with_changes(decorator=cst.parse_expression(f"{name}_resource"))))
        elif name.endswith(".cache_resource"):
            out.already("the model is cached with st.cache_resource")
    if pairs:
        module = t.replace_many(module, pairs)
        out.changed("@st.cache(...) -> @st.cache_resource")
    if not out.changes and not out.done:
        out.note("runs unchanged on Streamlit >= 1.24")
    return module


RULES = {
    "repetition-penalty": repetition_penalty,
    "compatibility": compatibility,
    "binding:reason": "Streamlit takes its address from its command line (glmsetup run streamlit passes "
                      "--server.address 127.0.0.1 and the profile's port)",
}
