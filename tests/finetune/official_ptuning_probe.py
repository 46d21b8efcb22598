"""Run in .venv-official: the official remote code with a P-tuning prefix, loaded as ptuning/web_demo.py does.

    python official_ptuning_probe.py < request.json

request: folder (a model folder with the remote code), pre_seq_len, prefix_projection, prompt, and either
checkpoint (a P-tuning checkpoint to load) or save (a folder to write one into the way the official
PrefixTrainer._save does: save_pretrained with only the parameters that require grad, after giving the
prefix encoder random values). Prints one line "PROBE-JSON {ids, logits}" (fp32 logits of every position).
"""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    req = json.loads(sys.stdin.read())
    folder = req["folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.pre_seq_len = req["pre_seq_len"]
    config.prefix_projection = req["prefix_projection"]
    model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=True)
    if req.get("checkpoint"):
        prefix_state_dict = torch.load(os.path.join(req["checkpoint"], "pytorch_model.bin"))
        new_prefix_state_dict = {}
        for k, v in prefix_state_dict.items():
            if k.startswith("transformer.prefix_encoder."):
                new_prefix_state_dict[k[len("transformer.prefix_encoder."):]] = v
        model.transformer.prefix_encoder.load_state_dict(new_prefix_state_dict)
    if req.get("save"):
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.transformer.prefix_encoder.parameters():
                p.normal_(0, 0.5)
        model.transformer.prefix_encoder.float()
        state = model.state_dict()
        filtered = {k: state[k] for k, v in model.named_parameters() if v.requires_grad}
        model.save_pretrained(req["save"], state_dict=filtered)
    model = model.float().eval()
    ids = tokenizer([req["prompt"]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    print("PROBE-JSON " + json.dumps({"ids": ids[0].tolist(), "logits": logits.tolist()}))


if __name__ == "__main__":
    main()
