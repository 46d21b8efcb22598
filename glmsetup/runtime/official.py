"""The `official` backend: the remote code of the model folder, run exactly as the tutorial does.

`AutoTokenizer/AutoModel.from_pretrained(folder, trust_remote_code=True)`, then `.float()` on CPU,
`.half().cuda()` on a GPU, `.half().quantize(n).cuda()` for int8/int4 (a chatglm2-6b-int4 folder
is already quantized: `.cuda()` or `.float()`). That code only runs on transformers <= 4.41
(chatglm2.md section 2), so a newer install is refused before anything is loaded.
"""
from __future__ import annotations

from pathlib import Path

from glmsetup.errors import MissingDependency, ModelError, ResourceError

MAX_TRANSFORMERS = "4.41.99"
REMOTE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")


def check_transformers() -> str:
    import transformers
    from packaging.version import Version

    version = transformers.__version__
    if Version(version) > Version(MAX_TRANSFORMERS):
        raise MissingDependency(
            f"the official remote code cannot run on transformers {version} (it works up to 4.41; "
            "the official requirements pin 4.30.2)",
            hint='use the native backend (--profile cpu, cuda-fp16, ...), or a separate environment with '
                 'pip install "transformers==4.30.2" for backend = "official"')
    return version


def load_official(folder: Path, prof):
    check_transformers()
    import torch
    from transformers import AutoModel, AutoTokenizer

    from glmsetup.runtime.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    if not ckpt.official:
        raise ModelError(f"{folder} is a converted folder: it has no remote code to run",
                         hint="point backend = \"official\" at the original chatglm2-6b folder")
    missing = [name for name in REMOTE_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder / missing[0]} is missing: the official backend runs the folder's own code",
                         hint="`glmsetup fetch` downloads the complete folder; or use the native backend")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    if prof.device == "cuda":
        if not torch.cuda.is_available():
            raise ResourceError("the official backend on cuda needs an NVIDIA GPU, and torch sees none",
                                hint="use --profile official-cpu or a native CPU profile")
        if prof.quantization_bits and not ckpt.quantization_bit:
            model = model.half().quantize(prof.quantization_bits).cuda()
        else:
            model = model.half().cuda() if not ckpt.quantization_bit else model.cuda()
    else:
        model = model.float()
    model = model.eval()
    model.profile = prof
    model.checkpoint_path = folder
    return tokenizer, model
