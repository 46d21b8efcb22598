"""The `official` backend: the remote code of the model folder, run exactly as the tutorial does.

`AutoTokenizer/AutoModel.from_pretrained(folder, trust_remote_code=True)`, then `.float()` on CPU,
`.half().cuda()` on a GPU, `.half().quantize(n).cuda()` for int8/int4 (a chatglm2-6b-int4 folder
is already quantized: `.cuda()` or `.float()`). That code runs on transformers 4.30 to 4.41 only
(chatglm2.md section 2), which is older than the native runtime needs (4.46): it lives in its own
environment (`pip install "glmsetup[official]"`), and a newer transformers is refused before
anything is loaded. Nothing here imports the native runtime (GlmConfig does not exist there).

The loaded model keeps the official chat()/stream_chat(); `adapt` wraps them so that the front ends
can treat both backends alike: `stop_event` (a threading.Event) ends an answer after the current
token, temperature 0 means greedy, and a caller's logits_processor list is not appended to.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from glmsetup.errors import MissingDependency, ModelError, ResourceError, UsageError, require

MIN_TRANSFORMERS = "4.30"
MAX_TRANSFORMERS = "4.41.99"
OLD_TOKENIZER_MAX = "4.33.99"  # the 2023-09 tokenization_chatglm.py breaks on 4.34+
REMOTE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
INSTALL_HINT = ('in a separate environment: pip install "glmsetup[official]" (transformers 4.30 to 4.41); '
                "or use a native profile (--profile cpu, cuda-fp16, ...)")


def check_transformers() -> str:
    """The installed transformers version, or MissingDependency when the remote code cannot run on it."""
    from packaging.version import Version

    version = require("transformers", "official").__version__
    if Version(version) > Version(MAX_TRANSFORMERS):
        raise MissingDependency(
            f"the official remote code cannot run on transformers {version} (it works from 4.30 up to 4.41; "
            "the official requirements pin 4.30.2)", hint=INSTALL_HINT)
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise MissingDependency(f"the official remote code needs transformers 4.30 or newer, this is {version}",
                                hint='pip install "glmsetup[official]"')
    return version


def check_remote_code(folder: Path, raw_config: dict, transformers_version: str) -> None:
    """The folder's own code is there, config.json and tokenizer_config.json point at it, and it runs here."""
    import json

    from packaging.version import Version

    missing = [name for name in REMOTE_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder / missing[0]} is missing: the official backend runs the folder's own code",
                         hint="`glmsetup fetch` downloads the complete folder; or use the native backend")
    try:
        tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tok_config = {}
    model_map = raw_config.get("auto_map") if isinstance(raw_config.get("auto_map"), dict) else {}
    tok_map = tok_config.get("auto_map") if isinstance(tok_config, dict) else None
    tok_source = folder / "tokenizer_config.json"
    if not (isinstance(tok_map, dict) and tok_map.get("AutoTokenizer")) and model_map.get("AutoTokenizer"):
        tok_map, tok_source = model_map, folder / "config.json"  # transformers looks there too
    for source, auto, key in ((folder / "config.json", model_map, "AutoModel"),
                              (tok_source, tok_map, "AutoTokenizer")):
        target = auto.get(key) if isinstance(auto, dict) else None
        if isinstance(target, (list, tuple)):
            target = target[0] if target else None
        if not isinstance(target, str) or not target:
            raise ModelError(f"{source} has no auto_map entry for {key}: transformers would not find the remote code",
                             hint="use the config files of THUDM/chatglm2-6b (`glmsetup fetch`); or the native backend")
        if "--" in target:
            raise ModelError(f"{source}: auto_map {key} = {target!r} names code in another repository",
                             hint="the official backend runs only the folder's own .py files; point auto_map "
                                  "at them (e.g. modeling_chatglm.ChatGLMForConditionalGeneration)")
        module = target.rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise ModelError(f"{source}: auto_map {key} = {target!r}, but {folder / (module + '.py')} is missing",
                             hint="`glmsetup fetch` downloads the complete folder")
    if Version(transformers_version) > Version(OLD_TOKENIZER_MAX) and old_tokenizer_code(folder):
        raise MissingDependency(
            f"{folder / 'tokenization_chatglm.py'} is the 2023-09 version, which does not run on transformers "
            f"{transformers_version} (it needs 4.33 or older)",
            hint='pip install "transformers==4.33.3" in this environment, or replace the file with the current '
                 "tokenization_chatglm.py of THUDM/chatglm2-6b")


def old_tokenizer_code(folder: Path) -> bool:
    """True for the tokenization_chatglm.py that calls super().__init__ before it builds its SPTokenizer."""
    try:
        text = (folder / "tokenization_chatglm.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    init = text.find("super().__init__(")
    builds = text.find("self.tokenizer = SPTokenizer(")
    return 0 <= init < builds


def load_official(folder: Path, prof):
    version = check_transformers()
    from glmsetup.runtime.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder, native=False)
    if not ckpt.official:
        raise ModelError(f"{folder} is a converted folder: it has no remote code to run",
                         hint="point backend = \"official\" at the original chatglm2-6b folder")
    check_remote_code(folder, ckpt.raw_config, version)
    import torch
    from transformers import AutoModel, AutoTokenizer

    if prof.device == "cuda" and not torch.cuda.is_available():
        raise ResourceError("the official backend on cuda needs an NVIDIA GPU, and torch sees none",
                            hint="use --profile official-cpu or a native CPU profile")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    if prof.device == "cuda":
        if prof.quantization_bits and not ckpt.quantization_bit:
            model = model.half().quantize(prof.quantization_bits).cuda()
        else:
            model = model.half().cuda() if not ckpt.quantization_bit else model.cuda()
    else:
        model = model.float()
    model = adapt(model.eval())
    model.profile = prof
    model.checkpoint_path = folder
    return tokenizer, model


# -- glmsetup's chat conventions on the official methods -----------------------------------------------

def _event_stop(event: threading.Event):
    """A transformers StoppingCriteria that is met once `event` is set (checked after every token)."""
    import torch
    from transformers import StoppingCriteria

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            # a bool per row works for every transformers the official code runs on
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return EventStop()


def official_kwargs(kwargs: dict) -> tuple[dict, Optional[threading.Event]]:
    """(the kwargs for the official chat/stream_chat, the stop event): glmsetup's conventions mapped.

    temperature 0 (or do_sample=False) becomes plain greedy decoding (the official code raises on 0);
    stop_event becomes a stopping criterion; the caller's logits_processor list is copied, as the
    official code appends its guard to the list it is given.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs = dict(kwargs)
    stop_event = kwargs.pop("stop_event", None)
    temperature, top_p = kwargs.get("temperature", 0.8), kwargs.get("top_p", 0.8)
    if temperature is not None and temperature < 0:
        raise UsageError(f"temperature must be >= 0, not {temperature}", hint="0 means greedy; 0.8 is the official default")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], not {top_p}", hint="0.8 is the official default")
    if not kwargs.get("do_sample", True) or temperature == 0:
        # the same argmax; no warper that would divide by 0 (stream_generate builds them even for greedy)
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0)
    if kwargs.get("logits_processor") is not None:
        kwargs["logits_processor"] = LogitsProcessorList(list(kwargs["logits_processor"]))
    if stop_event is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [*(kwargs.get("stopping_criteria") or []), _event_stop(stop_event)])
    return kwargs, stop_event


def adapt(model):
    """Wrap the model's official chat/stream_chat (same signatures) with glmsetup's conventions."""
    official_chat, official_stream = model.chat, model.stream_chat

    def chat(tokenizer, query: str, history=None, max_length: int = 8192, num_beams=1, do_sample=True,
             top_p=0.8, temperature=0.8, logits_processor=None, **kwargs):
        kwargs, _ = official_kwargs(dict(max_length=max_length, num_beams=num_beams, do_sample=do_sample,
                                         top_p=top_p, temperature=temperature, logits_processor=logits_processor,
                                         **kwargs))
        return official_chat(tokenizer, query, history, **kwargs)

    def stream_chat(tokenizer, query: str, history=None, past_key_values=None, max_length: int = 8192,
                    do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None,
                    return_past_key_values=False, **kwargs):
        kwargs, stop_event = official_kwargs(dict(max_length=max_length, do_sample=do_sample, top_p=top_p,
                                                  temperature=temperature, logits_processor=logits_processor,
                                                  **kwargs))
        gen = official_stream(tokenizer, query, history, past_key_values=past_key_values,
                              return_past_key_values=return_past_key_values, **kwargs)
        try:
            for item in gen:
                yield item
                if stop_event is not None and stop_event.is_set():
                    return
        finally:
            gen.close()

    chat.__doc__ = "The official chat(); stop_event ends the answer after the current token, temperature 0 is greedy."
    stream_chat.__doc__ = "The official stream_chat(); stop_event ends the stream between two yields."
    model.chat, model.stream_chat = chat, stream_chat
    return model
