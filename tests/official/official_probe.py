"""Run the same chat operations on one backend and print what came out, as JSON.

    python official_probe.py BACKEND... < request.json      (BACKEND: raw, official or native)

raw       the official remote code loaded the tutorial's way, with no glmsetup at all:
          AutoTokenizer/AutoModel.from_pretrained(folder, trust_remote_code=True).float()
official  glmsetup.load_chat_model(folder, profile="official-cpu") (the official backend)
native    glmsetup.load_chat_model(folder, profile="cpu") (the native runtime)

raw and official need the second environment (.venv-official, transformers 4.33.3); native runs in
the main one. The request names the folder and the operations (see `run`); the answer is one line
"PROBE-JSON {backend: result}" on stdout. Imported by the tests too, to run the native side in-process.
"""
from __future__ import annotations

import json
import sys
import threading


def load(folder: str, backend: str):
    if backend == "raw":
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).float().eval()
        return tokenizer, model
    import glmsetup

    return glmsetup.load_chat_model(folder, profile={"official": "official-cpu", "native": "cpu"}[backend])


def ids_of(tokenizer, text: str) -> list:
    return tokenizer([text], return_tensors="pt")["input_ids"][0].tolist()


def forward_logits(model, tokenizer, prompt: str) -> list:
    """fp32 logits [seq, vocab] of one forward pass over the prompt (gMASK, sop and the text)."""
    import torch

    ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float().tolist()


def greedy(model, tokenizer, op: dict, backend: str) -> dict:
    """One greedy answer; the raw official code gets the official spelling (do_sample=False)."""
    history = [tuple(h) for h in op.get("history", [])]
    limit = {"max_new_tokens": op["max_new_tokens"]} if "max_new_tokens" in op else {"max_length": op["max_length"]}
    if backend == "raw":
        response, _ = model.chat(tokenizer, op["query"], history, do_sample=False, **limit)
    else:
        response, _ = model.chat(tokenizer, op["query"], history, temperature=0, **limit)
    return {"response": response}


def stop_after(model, tokenizer, op: dict) -> dict:
    """stream_chat with a stop_event set by the consumer after the n-th yield: what came out after it."""
    stop = threading.Event()
    seen = []
    for response, _history in model.stream_chat(tokenizer, op["query"], [], temperature=0, max_length=512,
                                                 stop_event=stop):
        seen.append(response)
        if len(seen) == op["n"]:
            stop.set()
    preset = threading.Event()
    preset.set()
    response, _ = model.chat(tokenizer, op["query"], [], temperature=0, max_length=512, stop_event=preset)
    return {"yields": seen, "chat_with_stop_set": response}


def two_turns(model, tokenizer, op: dict) -> dict:
    """What the terminal, web and Streamlit chats do: stream with return_past_key_values, then reuse it."""
    from transformers import LogitsProcessorList

    history, past, out = [], None, []
    processors = LogitsProcessorList()
    for query in op["queries"]:
        response = None
        for response, history, past in model.stream_chat(
                tokenizer, query, history, past_key_values=past, return_past_key_values=True, temperature=0,
                max_new_tokens=op["max_new_tokens"], repetition_penalty=1.0, logits_processor=processors):
            pass
        out.append(response)
    return {"responses": out, "history": [list(h) for h in history], "processors_left": len(processors)}


def run(request: dict, backend: str) -> dict:
    tokenizer, model = load(request["folder"], backend)
    result: dict = {"backend": backend, "vocab_size": tokenizer.vocab_size}
    result["ids"] = [ids_of(tokenizer, t) for t in request.get("texts", [])]
    result["logits"] = [forward_logits(model, tokenizer, p) for p in request.get("forward", [])]
    result["greedy"] = [greedy(model, tokenizer, op, backend) for op in request.get("greedy", [])]
    if backend != "raw":
        result["stop"] = [stop_after(model, tokenizer, op) for op in request.get("stop", [])]
        result["two_turns"] = [two_turns(model, tokenizer, op) for op in request.get("two_turns", [])]
    return result


def main() -> None:
    import torch

    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    results = {backend: run(request, backend) for backend in sys.argv[1:]}
    print("PROBE-JSON " + json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
