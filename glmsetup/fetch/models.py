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

from glmsetup.requirements import INT4_CHECKPOINT_BYTES

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
# ModelScope revisions of the int4 and 32k models are unconfirmed. When a pinned revision does not exist,
# the ModelScope route lists the model's revisions and takes the newest whose files match these checksums
# (fetch/modelscope.py); `--revision` overrides the pin.


@dataclass(frozen=True)
class ModelEntry:
    name: str
    hf_repo: str
    hf_revision: str
    modelscope_id: str
    modelscope_revision: str
    tsinghua_folder: Optional[str]  # sub-folder of the share, None when the share lacks this model
    total_bytes: int  # approximate size of a full download, for plans made before any listing
    # path -> (size, sha256) published for the HF main revision; sha256 None: size only, unverified
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

    def is_weight(self, path: str) -> bool:
        """A big (LFS) file: a weight shard, a single weight file, tokenizer.model (what the share holds)."""
        return path == "tokenizer.model" or path in self.official or path in self.single_weights \
            or bool(SHARDED_WEIGHTS.fullmatch(path))

    def required_files(self) -> Tuple[str, ...]:
        """Every file a complete folder of this model holds: code and configs, the index, the weights."""
        return CODE_FILES + (SHARD_INDEXES[:1] if self.sharded else ()) + tuple(sorted(self.official))

    def unverified(self, path: str) -> bool:
        """A published file glmsetup knows only by size (no confirmed sha256)."""
        entry = self.official.get(path)
        return entry is not None and entry[1] is None


# The published weights, (size, sha256) from the Hugging Face LFS pointers of each repository. No public
# sha256 of the INT4 model's pytorch_model.bin could be confirmed: its entry is (size, None), "size only,
# unverified" (`verify` says so); its bytes are checked against a hub's manifest when one answers.
CHATGLM2_6B_WEIGHTS = {
    "pytorch_model-00001-of-00007.bin": (1_827_780_615, "cdf1bf57d519abe11043e9121314e76bc0934993e649a9e438a4b0894f4e6ee8"),
    "pytorch_model-00002-of-00007.bin": (1_968_299_005, "1cd596bd15905248b20b755daf12a02a8fa963da09b59da7fdc896e17bfa518c"),
    "pytorch_model-00003-of-00007.bin": (1_927_414_561, "812edc55c969d2ef82dcda8c275e379ef689761b13860da8ea7c1f3a475975c8"),
    "pytorch_model-00004-of-00007.bin": (1_815_225_523, "555c17fac2d80e38ba332546dc759b6b7e07aee21e5d0d7826375b998e5aada3"),
    "pytorch_model-00005-of-00007.bin": (1_968_299_069, "cb85560ccfa77a9e4dd67a838c8d1eeb0071427fd8708e18be9c77224969ef48"),
    "pytorch_model-00006-of-00007.bin": (1_927_414_561, "09ebd811227d992350b92b2c3491f677ae1f3c586b38abe95784fd2f7d23d5f2"),
    "pytorch_model-00007-of-00007.bin": (1_052_808_067, "316e007bc727f3cbba432d29e1d3e35ac8ef8eb52df4db9f0609d091a43c69cb"),
}
CHATGLM2_6B_32K_WEIGHTS = {
    "pytorch_model-00001-of-00007.bin": (1_827_780_295, "c794be25cff4986167e05d6d54d8c458604993c81addb16054190d8a0bd0fa0b"),
    "pytorch_model-00002-of-00007.bin": (1_968_298_621, "1907a34377bf8c7ff0abcaadc00fdbe003f1198a1033eb92e319b6787a29f4f9"),
    "pytorch_model-00003-of-00007.bin": (1_927_414_113, "fb64094c706db244141cf5bca01751a5da88acead6d14240f4bd37a505d4ae2f"),
    "pytorch_model-00004-of-00007.bin": (1_815_225_011, "8aefe09a831c8f9056d4deb67f5ec49bf1a8e5727040d9933f419beb66469ad2"),
    "pytorch_model-00005-of-00007.bin": (1_968_298_621, "5787d31f1d996b37aea76f6822dfba4a3e82b25f6d3496d9a648702a65bc8a43"),
    "pytorch_model-00006-of-00007.bin": (1_927_414_113, "349a40c2e9b465c16b94c3aa2aca6978013ce6993dce4950051d68c7817daf89"),
    "pytorch_model-00007-of-00007.bin": (1_052_808_003, "175cf78ee3bd29ee021894dda6bbc8dbeed8f0449026b15e87dfc66d84e7c11b"),
}
INT4_WEIGHTS = {"pytorch_model.bin": (INT4_CHECKPOINT_BYTES, None)}  # size only, unverified

# The small files every ChatGLM2 repository needs besides its weights (config, tokenizer config, the remote
# code the official loader runs); the sharded models add their index. README.md, MODEL_LICENSE and
# .gitattributes are fetched when listed but a folder works without them.
CODE_FILES = ("config.json", "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py",
              "tokenization_chatglm.py", "tokenizer_config.json")


def _total(weights: dict) -> int:
    return sum(size for size, _sha in weights.values()) + TOKENIZER_MODEL[0] + SMALL_FILES


MODELS: Dict[str, ModelEntry] = {
    "chatglm2-6b": ModelEntry(
        name="chatglm2-6b",
        hf_repo="zai-org/chatglm2-6b",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b",
        modelscope_revision="v1.0.12",
        tsinghua_folder="chatglm2-6b",
        total_bytes=_total(CHATGLM2_6B_WEIGHTS),
        official={**CHATGLM2_6B_WEIGHTS, "tokenizer.model": TOKENIZER_MODEL},
    ),
    "chatglm2-6b-int4": ModelEntry(
        name="chatglm2-6b-int4",
        hf_repo="zai-org/chatglm2-6b-int4",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b-int4",
        modelscope_revision="v1.0.3",
        tsinghua_folder="chatglm2-6b-int4",
        total_bytes=_total(INT4_WEIGHTS),
        sharded=False,
        single_weights=("pytorch_model.bin", "model.safetensors"),
        official={**INT4_WEIGHTS, "tokenizer.model": TOKENIZER_MODEL},
    ),
    "chatglm2-6b-32k": ModelEntry(
        name="chatglm2-6b-32k",
        hf_repo="zai-org/chatglm2-6b-32k",
        hf_revision="main",
        modelscope_id="ZhipuAI/chatglm2-6b-32k",
        modelscope_revision="v1.0.2",
        tsinghua_folder=None,
        total_bytes=_total(CHATGLM2_6B_32K_WEIGHTS),
        official={**CHATGLM2_6B_32K_WEIGHTS, "tokenizer.model": TOKENIZER_MODEL},
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


FULL_SIZE = {"num_layers": 28, "hidden_size": 4096}  # the published checkpoints' shape (a tiny test model differs)


def model_of_config(config) -> Optional[str]:
    """The table's model a config.json describes, or None for anything but a full-size ChatGLM2-6B."""
    if not isinstance(config, dict) or config.get("model_type") != "chatglm":
        return None
    if any(config.get(k) != v for k, v in FULL_SIZE.items()):
        return None
    if config.get("quantization_bit"):
        return "chatglm2-6b-int4"
    rope = config.get("rope_ratio")
    if isinstance(rope, (int, float)) and not isinstance(rope, bool) and rope > 1:
        return "chatglm2-6b-32k"
    return "chatglm2-6b"
