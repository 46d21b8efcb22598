"""The loader rule for the official P-tuning web demo (ptuning/web_demo.py and its copies).

That demo loads inside main(): tokenizer and config from --model_name_or_path, pre_seq_len and
prefix_projection into the config, the base model, the prefix encoder's tensors from
--ptuning_checkpoint/pytorch_model.bin, an optional .quantize(), then .cuda() (no CPU path). With
the glmsetup loader all of that becomes one call that reads the same arguments:

    tokenizer, model = glmsetup.load_chat_model(model_args.model_name_or_path, profile="...",
                                                ptuning_checkpoint=model_args.ptuning_checkpoint)

so the checkpoint loads natively under any profile (CPU, int8/int4 included). Every other demo of
the gradio kind goes to the shared loader rule unchanged; so does this one once rewritten (a second
run finds the glmsetup call and only keeps its profile current).
"""
from __future__ import annotations

import re

import libcst as cst

from glmsetup.patch import cst_tools as t
from glmsetup.patch import loading
from glmsetup.patch.engine import Context, Outcome

MARK = "prefix_encoder"


def _loads_prefix(fn: cst.FunctionDef) -> bool:
    return bool(t.calls(fn, lambda c: t.last_attr(c) == "load_state_dict" and MARK in t.call_name(c)))


def _tokenizer_index(body: list) -> int:
    for i, stmt in enumerate(body):
        parts = t.assign_parts(stmt)
        if parts and loading._is_tokenizer_load(parts[1]):
            return i
    return -1


def loader(module: cst.Module, ctx: Context, out: Outcome) -> cst.Module:
    fns = [fn for fn in t.find_all(module, lambda n: isinstance(n, cst.FunctionDef)) if _loads_prefix(fn)]
    if not fns:
        return loading.loader(module, ctx, out)
    if ctx.loader == "official":
        out.note("the P-tuning demo keeps its own loading with --loader official (it needs CUDA and "
                 "transformers <= 4.41)")
        return module
    fn = fns[0]
    body = list(fn.body.body)
    start = _tokenizer_index(body)
    if start < 0:
        out.note(f"{fn.name.value}() loads a prefix encoder but no AutoTokenizer line was found; left as is")
        return module
    uses_model = re.compile(r"\bmodel\b")
    end = max(i for i in range(start, len(body)) if i == start or uses_model.search(t.code_of(body[i])))
    tok_root = t.innermost_call(t.assign_parts(body[start])[1])
    path_arg = loading._path_arg(tok_root)
    path_code = t.code_of(path_arg.value) if path_arg is not None else "None"
    ckpt = t.find_all(fn, lambda n: isinstance(n, cst.Attribute) and n.attr.value == "ptuning_checkpoint")
    ckpt_code = t.code_of(ckpt[0]) if ckpt else "None"
    tok_name = t.assign_parts(body[start])[0]
    new = t.statement(f"{tok_name}, model = glmsetup.load_chat_model({path_code}, profile={loading._profile_kw(ctx)}, "
                      f"ptuning_checkpoint={ckpt_code})\n")
    new = new.with_changes(leading_lines=body[start].leading_lines)
    body[start:end + 1] = [new]
    module = module.deep_replace(fn, fn.with_changes(body=fn.body.with_changes(body=body)))
    out.changed(f"{fn.name.value}(): tokenizer, base model and prefix encoder load with glmsetup.load_chat_model("
                f"..., ptuning_checkpoint={ckpt_code})")
    if not t.imports_module(module, "glmsetup"):
        module = t.add_import(module, "import glmsetup\n")
        out.changed("import glmsetup")
    return module
