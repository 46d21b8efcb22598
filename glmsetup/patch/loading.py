"""The rules every demo shares: model-path and loader.

model-path points every `from_pretrained(...)`, `load_model_on_gpus(...)` and
`glmsetup.load_chat_model(...)` at the local model folder. loader either replaces the
tokenizer+model lines with one `glmsetup.load_chat_model(path, profile=...)` call, or keeps the
official calls and writes the chain the tutorial teaches for the profile.
"""
from __future__ import annotations

from typing import Optional

import libcst as cst

from glmsetup.errors import UsageError
from glmsetup.patch import cst_tools as t
from glmsetup.patch.engine import Context, Outcome

GLMSETUP_CALL = "glmsetup.load_chat_model"
PATH_KEYWORDS = ("pretrained_model_name_or_path", "checkpoint_path", "path")


def _is_loading_call(call: cst.Call) -> bool:
    name = t.call_name(call)
    return (t.last_attr(call) == "from_pretrained" or name.endswith("load_model_on_gpus")
            or name in (GLMSETUP_CALL, "load_chat_model"))


def _path_arg(call: cst.Call) -> Optional[cst.Arg]:
    for kw in PATH_KEYWORDS:
        found = t.arg(call, keyword=kw)
        if found is not None:
            return found
    return t.arg(call, position=0)


def model_path(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    """Point every loading call at ctx.model_path (string literals, or the variable they read)."""
    pairs = []
    seen: set = set()
    for call in t.calls(module, _is_loading_call):
        where = t.call_name(call) or t.last_attr(call)
        a = _path_arg(call)
        if a is None:
            out.note(f"{where}(...) has no path argument")
            continue
        targets = []
        if isinstance(a.value, cst.SimpleString):
            targets = [a.value]
        elif isinstance(a.value, cst.Name):
            var = a.value.value
            for stmt in t.find_all(module, lambda n: t.assign_parts(n) is not None and t.assign_parts(n)[0] == var):
                value = t.assign_parts(stmt)[1]
                if isinstance(value, cst.SimpleString):
                    targets.append(value)
            if not targets:
                out.note(f"{where}({var}, ...): '{var}' is not set from a string literal here; left as is")
        else:
            out.note(f"{where}(...): the path is computed ({t.code_of(a.value)}); left as is")
        for lit in targets:
            if id(lit) in seen:
                continue
            seen.add(id(lit))
            old = t.string_value(lit)
            if old == ctx.model_path:
                out.already(f"{where} reads {ctx.model_path}")
            else:
                pairs.append((lit, t.string_literal(ctx.model_path, lit)))
                out.changed(f"{where}: {old!r} -> {ctx.model_path!r}")
    return t.replace_many(module, pairs)


# ---- loader -----------------------------------------------------------------------------------

def _is_tokenizer_load(value: cst.BaseExpression) -> bool:
    root = t.innermost_call(value)
    return root is not None and t.last_attr(root) == "from_pretrained" and "Tokenizer" in t.call_name(root)


def _is_model_load(value: cst.BaseExpression) -> bool:
    root = t.innermost_call(value)
    if root is None:
        return False
    name = t.call_name(root)
    return (t.last_attr(root) == "from_pretrained" and "Model" in name) or name.endswith("load_model_on_gpus")


def _is_glmsetup_load(stmt: cst.CSTNode) -> bool:
    small = t.simple_statement(stmt)
    return isinstance(small, cst.Assign) and isinstance(small.value, cst.Call) and \
        t.call_name(small.value) in (GLMSETUP_CALL, "load_chat_model")


def _loading_sites(module: cst.Module):
    """(block, tokenizer statement or None, model statement) for each place the model is loaded."""
    sites = []
    for block in t.blocks(module):
        body = list(block.body)
        models = [s for s in body if t.assign_parts(s) and _is_model_load(t.assign_parts(s)[1])]
        if not models:
            continue
        toks = [s for s in body if t.assign_parts(s) and _is_tokenizer_load(t.assign_parts(s)[1])]
        sites.append((block, toks[0] if toks else None, models[0]))
    return sites


def official_chain(profile) -> str:
    """The call chain the official tutorial writes for a profile (after from_pretrained(...))."""
    if profile.device == "cuda":
        if profile.quantization_bits:
            return f".quantize({profile.quantization_bits}).cuda()"
        return ".half().cuda()"
    if profile.device == "mps":
        return '.to("mps")'
    return ".float()"


def check_official(profile) -> None:
    """Refuse a profile the official loading cannot express."""
    if profile.quantization_bits and profile.device != "cuda":
        raise UsageError(f"profile '{profile.name}': the official .quantize() kernels need CUDA",
                         hint="use --loader glmsetup for int8/int4 on this device")
    if profile.dtype == "bfloat16":
        raise UsageError(f"profile '{profile.name}' uses bfloat16, which the official loading cannot express",
                         hint="use --loader glmsetup, or a float16/float32 profile (cuda-fp16, cpu)")


def loader(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    if ctx.loader == "official":
        return _official(module, ctx, out)
    return _glmsetup(module, ctx, out)


def _profile_kw(ctx: Context) -> str:
    return t.code_of(t.string_literal(ctx.profile_arg))


def _glmsetup(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    pairs = []
    for stmt in t.find_all(module, _is_glmsetup_load):
        call = t.simple_statement(stmt).value
        prof = t.arg(call, keyword="profile")
        if prof is not None and t.string_value(prof.value) == ctx.profile_arg:
            out.already(f"loads with glmsetup.load_chat_model (profile {ctx.profile_arg})")
            continue
        literal = cst.parse_expression(_profile_kw(ctx))
        if prof is not None:
            new_call = call.deep_replace(prof.value, literal)
        else:
            new_call = t.add_keyword(call, "profile", literal)
        pairs.append((call, new_call))
        out.changed(f"profile -> {ctx.profile_arg}")
    module = t.replace_many(module, pairs)

    sites = _loading_sites(module)
    for _block, tok, model in sites:
        model_name, model_value = t.assign_parts(model)
        if tok is None:
            out.note(f"'{model_name} = ...' loads the model but no tokenizer line sits beside it; left as is")
            continue
        tok_name, _ = t.assign_parts(tok)
        root = t.innermost_call(model_value)
        path_arg = _path_arg(root)
        path_code = t.code_of(path_arg.value) if path_arg is not None else "None"
        new = t.statement(f"{tok_name}, {model_name} = glmsetup.load_chat_model({path_code}, "
                          f"profile={_profile_kw(ctx)})\n")
        new = new.with_changes(leading_lines=tuple(tok.leading_lines) + tuple(model.leading_lines))
        module = t.replace_many(module, [(tok, new), (model, cst.RemoveFromParent())])
        out.changed(f"{tok_name} and {model_name} load with glmsetup.load_chat_model(profile={ctx.profile_arg!r})")
    if (out.changes or out.done) and not t.imports_module(module, "glmsetup"):
        module = t.add_import(module, "import glmsetup\n")
        out.changed("import glmsetup")
    if not out.changes and not out.done and not out.notes:
        out.note("no AutoTokenizer/AutoModel loading lines found")
    return module


def _official(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    if t.find_all(module, _is_glmsetup_load):
        out.note("this file loads with glmsetup.load_chat_model; run glmsetup patch --revert to go back to the "
                 "official loading first")
        return module
    prof = ctx.profile
    for _block, _tok, model in _loading_sites(module):
        name, value = t.assign_parts(model)
        root = t.innermost_call(value)
        path_arg = _path_arg(root)
        path_code = t.code_of(path_arg.value) if path_arg is not None else '"THUDM/chatglm2-6b"'
        if prof.num_gpus > 1:
            target = f"load_model_on_gpus({path_code}, num_gpus={prof.num_gpus})"
            what = f"{name} = load_model_on_gpus(..., num_gpus={prof.num_gpus})"
        elif t.last_attr(root) == "from_pretrained":
            target = t.code_of(root) + official_chain(prof)
            what = f"{name} = {t.call_name(root)}(...){official_chain(prof)}"
        else:
            target = f"AutoModel.from_pretrained({path_code}, trust_remote_code=True){official_chain(prof)}"
            what = f"{name} = AutoModel.from_pretrained(...){official_chain(prof)}"
        if t.code_of(value) == target:
            out.already(what)
            continue
        small = t.simple_statement(model)
        module = module.deep_replace(small.value, cst.parse_expression(target))
        out.changed(what)
        if target.startswith("load_model_on_gpus") and not t.imports_from(module, "utils", "load_model_on_gpus"):
            module = t.add_import(module, "from utils import load_model_on_gpus\n")
            out.changed("from utils import load_model_on_gpus")
            if not ctx.has_utils:
                out.note("utils.py (with load_model_on_gpus) is not beside this file: copy it from the official "
                         "repository")
        if target.startswith("AutoModel.") and not t.imports_from(module, "transformers", "AutoModel"):
            module = t.add_import(module, "from transformers import AutoModel\n")
            out.changed("from transformers import AutoModel")
    if not out.changes and not out.done and not out.notes:
        out.note("no AutoModel loading line found")
    return module
