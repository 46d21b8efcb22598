"""The real upstream files as independent references: the official tokenizer, openai_api.py, modeling code.

They live in ../shared/fixtures/upstream/ (relative to the repository root); tests that need them
skip with a clear reason where that folder is absent. The official files are loaded as modules
straight from there (never copied into the project):

- tokenizer-2023-10/tokenization_chatglm.py constructs on current transformers; its tokenize,
  convert_tokens_to_ids and build_inputs_with_special_tokens work (only its `_pad` override breaks
  on transformers >= 4.45, and padding does not change ids), so the official ids of a text are
  `build_inputs_with_special_tokens(convert_tokens_to_ids(tokenize(text)))`, the path the official
  chat() takes through `tokenizer([prompt])`.
- ChatGLM2-6B-repo/openai_api.py: its request handler turns messages into (query, history) and calls
  model.chat(tokenizer, query, history=history); a recording model captures those two arguments.
- chatglm2-6b*/modeling_chatglm.py: the top-level class no longer constructs on transformers 5.x,
  but the official ChatGLMModel (embedding, GLM blocks, RoPE, output layer) does and runs a forward pass.
  For the int4 variant, the chatglm2-6b modeling file (the int4 fixture's copy comes from a LoRA fork
  that imports a module it does not ship) with the int4 repo's quantization.py, whose CPU kernels it
  compiles with gcc on import: the official int4 forward on CPU.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT.parent / "shared" / "fixtures" / "upstream"
REAL_TOKENIZER = UPSTREAM / "chatglm2-6b" / "tokenizer.model"
VARIANT_CONFIGS = {name: UPSTREAM / name / "config.json" for name in ("chatglm2-6b", "chatglm2-6b-32k", "chatglm2-6b-int4")}

needs_upstream = pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"the upstream fixtures are absent ({UPSTREAM})")


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def official_tokenizer(vocab_file: str = str(REAL_TOKENIZER)):
    module = _load_module("official_tokenization_chatglm", UPSTREAM / "tokenizer-2023-10" / "tokenization_chatglm.py")
    return module.ChatGLMTokenizer(vocab_file=vocab_file)


def official_ids(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = tok.convert_tokens_to_ids(tok.tokenize(text))
    return tok.build_inputs_with_special_tokens(ids) if add_special_tokens else ids


class _RecordingModel:
    """Stands where openai_api.py expects the model: records what the server passes to chat()."""

    def __init__(self):
        self.calls: list = []

    def chat(self, tokenizer, query, history=None, **kwargs):
        self.calls.append((query, [tuple(h) for h in history or []]))
        return "", []


@lru_cache(maxsize=None)
def _openai_api():
    return _load_module("official_openai_api", UPSTREAM / "ChatGLM2-6B-repo" / "openai_api.py")


def official_query_history(messages: list[dict]):
    """(query, history) the official openai_api.py passes to model.chat for these messages.

    Raises ValueError where the official server refuses the request (a 400, or a role it does not accept).
    """
    api = _openai_api()
    recorder = _RecordingModel()
    api.model, api.tokenizer = recorder, None
    try:
        request = api.ChatCompletionRequest(model="chatglm2-6b", messages=messages)
    except Exception as exc:  # pydantic: a role the server does not know
        raise ValueError(f"refused: {exc.__class__.__name__}") from exc
    try:
        asyncio.run(api.create_chat_completion(request))
    except api.HTTPException as exc:
        raise ValueError(f"refused: {exc.status_code} {exc.detail}") from exc
    (call,) = recorder.calls
    return call


def official_chat_ids(tok, messages: list[dict]) -> list[int]:
    query, history = official_query_history(messages)
    return official_ids(tok, tok.build_prompt(query, history))


@lru_cache(maxsize=None)
def official_modeling(variant: str, workdir: str):
    """The official configuration, modeling (and for int4 quantization) modules of a variant, as a package."""
    pkg = Path(workdir) / f"official_{variant.replace('-', '_')}"
    pkg.mkdir(parents=True, exist_ok=True)
    code = "chatglm2-6b" if variant == "chatglm2-6b-int4" else variant
    for name in ("configuration_chatglm.py", "modeling_chatglm.py"):
        shutil.copyfile(UPSTREAM / code / name, pkg / name)
    if variant == "chatglm2-6b-int4":
        shutil.copyfile(UPSTREAM / variant / "quantization.py", pkg / "quantization.py")
    (pkg / "__init__.py").write_text("")
    if workdir not in sys.path:
        sys.path.insert(0, workdir)
    modules = [importlib.import_module(f"{pkg.name}.configuration_chatglm"),
               importlib.import_module(f"{pkg.name}.modeling_chatglm")]
    if variant == "chatglm2-6b-int4":
        modules.append(importlib.import_module(f"{pkg.name}.quantization"))
    return tuple(modules)


def official_logits(variant: str, workdir: Path, folder: Path, input_ids, position_ids=None):
    """fp32 logits [batch, seq, vocab] of the official ChatGLMModel of `variant` over the tiny checkpoint in `folder`."""
    import json

    import torch

    configuration, modeling, *quantization = official_modeling(variant, str(workdir))
    raw = json.loads((folder / "config.json").read_text())
    cfg = configuration.ChatGLMConfig(**raw)
    cfg.torch_dtype = torch.float32
    model = modeling.ChatGLMModel(cfg, empty_init=False).eval()
    if raw.get("quantization_bit"):  # as the official ChatGLMForConditionalGeneration does for the int4 repo
        if not quantization or not quantization[0].cpu_kernels.load:
            pytest.skip("the official int4 CPU kernels did not compile (they need gcc)")
        quantization[0].quantize(model.encoder, raw["quantization_bit"], empty_init=True, device="cpu")
    state = {}
    for f in sorted(folder.glob("pytorch_model*.bin")):
        state.update({k.removeprefix("transformer."): v if v.dtype == torch.int8 else v.float()
                      for k, v in torch.load(f, weights_only=True).items()})
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, return_dict=True).last_hidden_state
        return model.output_layer(hidden).transpose(0, 1).float()
