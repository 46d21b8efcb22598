"""The one table of models and where each can be downloaded from.

Every route (`hf`, `modelscope`, `tsinghua`, `git`) reads its repository id, pinned revision and folder
layout from here, so adding a model or moving a repo is a change of data, not code. The official
checksums are the ones published for the HF main revision; the Tsinghua share has none of its own, so
its files are accepted only when they match these or a manifest from another route.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from glmsetup.requirements import FP16_CHECKPOINT_BYTES, INT4_CHECKPOINT_BYTES

HF_ENDPOINT = "https://huggingface.co"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"
TSINGHUA_ENDPOINT = "https://cloud.tsinghua.edu.cn"
TSINGHUA_SHARE = "674208019e314311ab5c"

# (size, sha256) of tokenizer.model, the same file in every ChatGLM2-6B repo (an LFS file too)
TOKENIZER_MODEL = (1_018_370, "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2")
SMALL_FILES = 100_000  # config, code and index files, roughly

# The files of a ChatGLM2 repository, whatever the route (HF, ModelScope, the Tsinghua share, a git clone):
# these names, plus each model's weights. A listed file that matches none is skipped and reported, never
# written (fetch/listing.py); every name is a plain file name at the top of the model folder.
REPO_FILES = frozenset({
    ".gitattributes", "README.md", "MODEL_LICENSE", "LICENSE", "config.json", "configuration.json",
    "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py", "tokenization_chatglm.py",
    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
})
SHARDED_WEIGHTS = re.compile(r"(?:pytorch_model-(\d{5})-of-(\d{5})\.bin|model-(\d{5})-of-(\d{5})\.safetensors)")
SHARD_INDEXES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")
MAX_SHARDS = 64

SOURCES = ("hf", "modelscope", "tsinghua", "git")
WEIGHT_SOURCES = ("hf", "modelscope", "tsinghua")


# Not every value below could be checked against the live servers from where this table was written: the
# ModelScope revisions of the int4 and 32k models and the share's folder names are the ones to confirm
# first when a route answers "revision not found" or an empty listing (`--revision` overrides the former).


@dataclass(frozen=True)
class ModelEntry:
    name: str
    hf_repo: str
    hf_revision: str
    modelscope_id: str
    modelscope_revision: str
    tsinghua_folder: Optional[str]  # sub-folder of the share, None when the share lacks this model
    total_bytes: int  # approximate size of a full download, for plans made before any listing
    # path -> (size, sha256) published for the HF main revision
    official: Dict[str, tuple] = field(default_factory=dict)
    sharded: bool = True  # weights in numbered shards with an index, else single_weights
    single_weights: Tuple[str, ...] = ()

    def expects(self, path: str) -> bool:
        """Whether `path` is one of the files this model's repository holds (see REPO_FILES)."""
        if path in REPO_FILES or path in self.single_weights:
            return True
        if not self.sharded:
            return False
        if path in SHARD_INDEXES:
            return True
        match = SHARDED_WEIGHTS.fullmatch(path)
        if not match:
            return False
        number, total = (int(g) for g in match.groups() if g is not None)
        return 1 <= number <= total <= MAX_SHARDS


MODELS: Dict[str, ModelEntry] = {
    "chatglm2-6b": ModelEntry(
        name="chatglm2-6b",
        hf_repo="zai-org/chatglm2-6b",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b",
        modelscope_revision="v1.0.12",
        tsinghua_folder="chatglm2-6b",
        total_bytes=FP16_CHECKPOINT_BYTES + TOKENIZER_MODEL[0] + SMALL_FILES,
        official={
            "pytorch_model-00001-of-00007.bin": (
                1_827_780_615, "cdf1bf57d519abe11043e9121314e76bc0934993e649a9e438a4b0894f4e6ee8"),
            "tokenizer.model": TOKENIZER_MODEL,
        },
    ),
    "chatglm2-6b-int4": ModelEntry(
        name="chatglm2-6b-int4",
        hf_repo="zai-org/chatglm2-6b-int4",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b-int4",
        modelscope_revision="v1.0.3",
        tsinghua_folder="chatglm2-6b-int4",
        total_bytes=INT4_CHECKPOINT_BYTES + TOKENIZER_MODEL[0] + SMALL_FILES,
        sharded=False,
        single_weights=("pytorch_model.bin", "model.safetensors"),
        official={
            "pytorch_model.bin": (
                INT4_CHECKPOINT_BYTES, "783e9eac82c278f1e57ba93344a96580fd6f2cd222c8703f25998bb16926688e"),
            "tokenizer.model": TOKENIZER_MODEL,
        },
    ),
    "chatglm2-6b-32k": ModelEntry(
        name="chatglm2-6b-32k",
        hf_repo="zai-org/chatglm2-6b-32k",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b-32k",
        modelscope_revision="v1.0.2",
        tsinghua_folder=None,
        total_bytes=FP16_CHECKPOINT_BYTES + TOKENIZER_MODEL[0] + SMALL_FILES,
        official={
            "tokenizer.model": TOKENIZER_MODEL,
        },
    ),
}

DEFAULT_MODEL = "chatglm2-6b"


def get_model(name: str) -> ModelEntry:
    """Look up a model by its short name or by its HF/ModelScope repo id."""
    from glmsetup.errors import UsageError

    if name in MODELS:
        return MODELS[name]
    for entry in MODELS.values():
        if name in (entry.hf_repo, entry.modelscope_id) or name.lower().endswith("/" + entry.name):
            return entry
    raise UsageError(f"unknown model '{name}'", hint="choose one of: " + ", ".join(MODELS))
