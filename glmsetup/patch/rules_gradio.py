"""Rules for the Gradio demo (web_demo.py and its copies)."""
from __future__ import annotations

from typing import Optional

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome

SLIDER_LABEL = "Repetition Penalty"
NEW_PARAM = "repetition_penalty"
WRAPPER = "_postprocess_for_gradio"
ORIGINAL = "_gradio_chatbot_postprocess"
SAMPLING = ("temperature", "top_p", "max_length")


def _stream_function(module: cst.Module) -> Optional[cst.FunctionDef]:
    """The function that streams answers (predict in the official file)."""
    for fn in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef)):
        if t.calls(fn.body, lambda c: t.last_attr(c) == "stream_chat"):
            return fn
    return None


def _slider_assigns(module: cst.Module) -> list:
    return [s for s in t.find_all(module, lambda n: t.assign_parts(n) is not None)
            if isinstance(t.assign_parts(s)[1], cst.Call) and t.last_attr(t.assign_parts(s)[1]) == "Slider"]


def _label(call: cst.Call) -> str:
    a = t.arg(call, keyword="label")
    return (t.string_value(a.value) or "") if a is not None else ""


def _after_sampling(names: list[str]) -> Optional[str]:
    for name in SAMPLING:
        if name in names:
            return name
    return None


def repetition_penalty(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    default = ctx.profile.generation.repetition_penalty
    # 1. the slider, next to the other sampling sliders
    sliders = _slider_assigns(module)
    if any(t.assign_parts(s)[0] == NEW_PARAM or _label(t.assign_parts(s)[1]) == SLIDER_LABEL for s in sliders):
        out.already("Repetition Penalty slider")
    elif sliders:
        anchor = next((s for s in sliders if t.assign_parts(s)[0] == "temperature"), sliders[-1])
        new = t.statement(f'{NEW_PARAM} = gr.Slider(0.5, 2.0, value={default}, step=0.01, label="{SLIDER_LABEL}", '
                          'interactive=True)\n')
        module = t.insert_after(module, anchor, [new])
        out.changed(f"Repetition Penalty slider (0.5..2.0, default {default}) after '{t.assign_parts(anchor)[0]}'")
    else:
        out.note("no gr.Slider found to put the Repetition Penalty slider beside")

    # 2. the streaming function takes it and passes it on
    fn = _stream_function(module)
    if fn is None:
        out.note("no function calling stream_chat found")
        return module
    params = t.param_names(fn)
    index = None
    if NEW_PARAM in params:
        out.already(f"{fn.name.value}() takes {NEW_PARAM}")
    else:
        after = _after_sampling(params)
        if after is None:
            out.note(f"{fn.name.value}() has none of {', '.join(SAMPLING)}: cannot tell where {NEW_PARAM} goes")
            return module
        index = params.index(after) + 1
        new_params = t.insert_list_item(fn.params.params, index, cst.Param(name=cst.Name(NEW_PARAM)))
        new_fn = fn.with_changes(params=fn.params.with_changes(params=new_params))
        module = module.deep_replace(fn, new_fn)
        fn = new_fn
        out.changed(f"{fn.name.value}() takes {NEW_PARAM} after {after}")
    stream = t.calls(fn.body, lambda c: t.last_attr(c) == "stream_chat")[0]
    if NEW_PARAM in t.keywords(stream):
        out.already(f"stream_chat gets {NEW_PARAM}")
    else:
        module = module.deep_replace(stream, t.add_keyword(stream, NEW_PARAM, NEW_PARAM,
                                                           after=_after_sampling(t.keywords(stream))))
        out.changed(f"stream_chat(..., {NEW_PARAM}={NEW_PARAM})")

    # 3. every event that calls it lists the slider among its inputs, in the same place
    fn_name = fn.name.value
    position = t.param_names(fn).index(NEW_PARAM)
    for call in t.calls(module, lambda c: t.last_attr(c) in ("click", "submit", "then")):
        target = t.arg(call, keyword="fn", position=0)
        if target is None or not isinstance(target.value, cst.Name) or target.value.value != fn_name:
            continue
        inputs = t.arg(call, keyword="inputs", position=1)
        if inputs is None or not isinstance(inputs.value, cst.List):
            out.note(f"an event calls {fn_name} without a literal inputs list; add {NEW_PARAM} to it by hand")
            continue
        names = [e.value.value if isinstance(e.value, cst.Name) else None for e in inputs.value.elements]
        if NEW_PARAM in names:
            out.already(f"{t.last_attr(call)}({fn_name}, ...) inputs include {NEW_PARAM}")
            continue
        if len(names) != len(t.param_names(fn)) - 1:
            out.note(f"{t.last_attr(call)}({fn_name}, ...) has {len(names)} inputs for {len(t.param_names(fn)) - 1} "
                     "parameters; left as is")
            continue
        elements = t.insert_list_item(inputs.value.elements, position, cst.Element(value=cst.Name(NEW_PARAM)))
        module = module.deep_replace(inputs.value, inputs.value.with_changes(elements=elements))
        out.changed(f"{t.last_attr(call)}({fn_name}, ...) inputs include {NEW_PARAM} at position {position + 1}")
    return module


def _postprocess_wrapper(gr: str, override: str) -> list:
    code = f'''{ORIGINAL} = {gr}.Chatbot.postprocess


def {WRAPPER}(self, y):
    """Gradio >= 4: run {override}() on (query, response) pairs, then Gradio's own postprocess."""
    major = int({gr}.__version__.split(".")[0])
    if major < 4:
        return {override}(self, y)
    if getattr(self, "type", "messages" if major >= 6 else "tuples") == "tuples":
        return {ORIGINAL}(self, {override}(self, [tuple(item) for item in y or []]))
    messages = []
    for item in y or []:
        if isinstance(item, (list, tuple)):
            pair = {override}(self, [tuple(item)])[0]
            messages += [{{"role": r, "content": c}} for r, c in zip(("user", "assistant"), pair) if c is not None]
        else:
            messages.append(item)
    return {ORIGINAL}(self, messages)


{gr}.Chatbot.postprocess = {WRAPPER}
'''
    return list(cst.parse_module(code).body)


MDTEX_SHIM = '''if int({gr}.__version__.split(".")[0]) >= 4:
    # Gradio 4+ renders Markdown and LaTeX itself (mdtex2html's MathML shows as raw text there)
    class mdtex2html:
        convert = staticmethod(lambda text: text)
else:
    import mdtex2html
'''


def _gradio_alias(module: cst.Module) -> Optional[tuple]:
    """(index in module.body, name) of the top-level `import gradio [as gr]`, or None."""
    for index, stmt in enumerate(module.body):
        small = t.simple_statement(stmt)
        if isinstance(small, cst.Import):
            for alias in small.names:
                if t.dotted(alias.name) == "gradio":
                    return index, (alias.asname.name.value if alias.asname else "gradio")
    return None


def _markdown_rendering(module: cst.Module, out: Outcome) -> cst.Module:
    """`import mdtex2html` only on Gradio < 4: newer Gradio renders Markdown and LaTeX in the Chatbot."""
    found = [(i, s) for i, s in enumerate(module.body) if isinstance(t.simple_statement(s), cst.Import)
             and [(t.dotted(a.name), a.asname) for a in t.simple_statement(s).names] == [("mdtex2html", None)]]
    if not found:
        if any(isinstance(s, cst.If) and "class mdtex2html" in t.code_of(s) for s in module.body):
            out.already("mdtex2html only on Gradio < 4")
        return module
    index, stmt = found[0]
    gradio = _gradio_alias(module)
    if gradio is None or gradio[0] > index:
        out.note("import mdtex2html left as is: no `import gradio` before it")
        return module
    new = list(cst.parse_module(MDTEX_SHIM.format(gr=gradio[1])).body)
    new[0] = new[0].with_changes(leading_lines=stmt.leading_lines)
    module = module.deep_replace(stmt, cst.FlattenSentinel(new))
    out.changed("import mdtex2html only on Gradio < 4: Gradio's Chatbot renders Markdown and LaTeX itself "
                "(mdtex2html's MathML showed as raw text, and it is not installed with Gradio)")
    return module


def compatibility(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    # 1. .style(...) was removed in Gradio 4: its arguments go to the constructor
    styles = t.calls(module, lambda c: isinstance(c.func, cst.Attribute) and c.func.attr.value == "style"
                     and isinstance(c.func.value, cst.Call))
    for call in reversed(styles):  # inner ones last, so nested matches never overlap
        ctor = call.func.value
        new = ctor
        for a in call.args:
            if a.keyword is not None and a.keyword.value not in t.keywords(ctor):
                new = t.add_keyword(new, a.keyword.value, a.value)
        module = module.deep_replace(call, new)
        moved = ", ".join(f"{a.keyword.value}=" for a in call.args if a.keyword is not None)
        out.changed(f"{t.call_name(ctor)}(...).style({moved}...) -> {t.call_name(ctor)}(..., {moved}...)")
    if not styles:
        if t.calls(module, lambda c: t.call_name(c).endswith("Textbox") and "container" in t.keywords(c)):
            out.already("container= is a constructor argument")

    # 2. the Chatbot.postprocess override keeps working on Gradio >= 4
    for stmt in t.find_all(module, lambda n: isinstance(t.simple_statement(n), cst.Assign)):
        small = t.simple_statement(stmt)
        target = t.dotted(small.targets[0].target)
        if not target.endswith("Chatbot.postprocess"):
            continue
        if isinstance(small.value, cst.Name) and small.value.value == WRAPPER:
            out.already("Chatbot.postprocess override wrapped for Gradio >= 4")
            break
        if not isinstance(small.value, cst.Name):
            out.note(f"{target} is set to an expression; left as is")
            break
        gr = target[: -len(".Chatbot.postprocess")]
        new = _postprocess_wrapper(gr, small.value.value)
        new[0] = new[0].with_changes(leading_lines=stmt.leading_lines)
        module = module.deep_replace(stmt, cst.FlattenSentinel(new))
        out.changed(f"Chatbot.postprocess override ({small.value.value}) wrapped for Gradio >= 4 (messages format)")
        break

    # 3. show_progress=True became show_progress="full"
    pairs = []
    for call in t.calls(module, lambda c: t.last_attr(c) in ("click", "submit", "then", "change")):
        a = t.arg(call, keyword="show_progress")
        if a is not None and isinstance(a.value, cst.Name) and a.value.value in ("True", "False"):
            pairs.append((a.value, cst.SimpleString('"full"' if a.value.value == "True" else '"hidden"')))
    if pairs:
        module = t.replace_many(module, pairs)
        out.changed(f"show_progress=True/False -> \"full\"/\"hidden\" ({len(pairs)} events)")

    # 4. mdtex2html's MathML shows as raw text on Gradio >= 4, which renders LaTeX itself
    return _markdown_rendering(module, out)


def binding(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    launches = t.calls(module, lambda c: t.last_attr(c) == "launch")
    if not launches:
        out.note("no .launch() call found")
        return module
    want = {"server_name": ctx.host, "server_port": ctx.profile.server.web_port}
    for call in launches:
        new = call
        for key, value in want.items():
            a = t.arg(new, keyword=key)
            literal = t.string_literal(value) if isinstance(value, str) else cst.Integer(str(value))
            if a is not None and t.code_of(a.value) == t.code_of(literal):
                out.already(f"launch({key}={value!r})")
                continue
            if a is not None:
                new = t.remove_keyword(new, key)
            new = t.add_keyword(new, key, literal)
            out.changed(f"launch({key}={value!r})")
        if ctx.listen:
            out.note("listening on all interfaces: anyone who can reach this machine can use the demo")
        share = t.arg(new, keyword="share")
        if share is not None and t.code_of(share.value) == "True":
            out.note("share=True publishes the demo through a public Gradio link")
        module = module.deep_replace(call, new)
    return module


RULES = {
    "repetition-penalty": repetition_penalty,
    "compatibility": compatibility,
    "binding": binding,
}
