"""The requirements table and the memory estimator: pure functions, one source of truth.

doctor, estimate, run and the runtime's `auto` profile all read this module, so "what fits this
machine" is decided once. Memory is in decimal GB, like the official figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from glmsetup.profiles import Profile

GB = 1e9

# --- The model (chatglm2.md section 1) -------------------------------------------------------------
NUM_LAYERS = 28
HIDDEN = 4096
FFN = 13696
HEADS = 32
HEAD_DIM = 128
KV_GROUPS = 2
VOCAB = 65024
SEQ_LENGTH = 32768  # every variant's seq_length: the official RoPE table has no position past it
CHAT_MAX_LENGTH = 8192  # the official chat() default of chatglm2-6b and -int4 (chat-tuned at 8K)
PARAMETERS = 6_243_584_000
# The four linear layers of one block (what quantization touches), as (rows, cols).
BLOCK_LINEARS = ((HEADS * HEAD_DIM + 2 * KV_GROUPS * HEAD_DIM, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN))
QUANTIZABLE = NUM_LAYERS * sum(r * c for r, c in BLOCK_LINEARS)  # 5,710,903,296
QUANT_ROWS = NUM_LAYERS * sum(r for r, _ in BLOCK_LINEARS)  # one scale per output row
UNQUANTIZED = PARAMETERS - QUANTIZABLE  # embedding, output layer, norms, qkv bias
FP16_CHECKPOINT_BYTES = 12_487_241_401  # the seven official .bin shards
INT4_CHECKPOINT_BYTES = 3_923_712_365

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def context_limits(seq_length: int = SEQ_LENGTH, rope_ratio: float = 1) -> tuple[int, int]:
    """(longest context, default max_length of chat) for a variant's seq_length and rope_ratio.

    chatglm2-6b and -int4: (32768, 8192); chatglm2-6b-32k (rope_ratio 16, positions interpolated for
    32K) defaults to its whole seq_length, as its official chat() does.
    """
    return seq_length, seq_length if rope_ratio != 1 else min(CHAT_MAX_LENGTH, seq_length)


def kv_bytes_per_token(dtype: str = "float16") -> int:
    """28 layers x (k, v) x 2 KV groups x 128 dims: 28 KiB per token in fp16."""
    return NUM_LAYERS * 2 * KV_GROUPS * HEAD_DIM * DTYPE_BYTES[dtype]


# --- The requirements table (the seed's table, the official README's measurements beside it) ------
@dataclass(frozen=True)
class Requirement:
    precision: str
    inference_gb: float
    finetune_gb: float
    measured_encode_2048_gb: Optional[float]
    measured_generate_8192_gb: Optional[float]
    device: str = "cuda"
    note: str = ""


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("fp16", 13, 14, 13.1, 12.8, note="multi-turn chat grows to 14-15 GB"),
    Requirement("int8", 8, 9, 8.2, 8.1, note="multi-turn chat grows to about 10 GB"),
    Requirement("int4", 6, 7, 5.5, 5.1, note="multi-turn chat grows to 6-7 GB"),
    Requirement("fp32", 32, 0, None, None, device="cpu",
                note="CPU: any CPU, 32 GB RAM recommended (fp32 needs about 25 GB), SSD strongly preferred"),
)
DISK_FREE_GB = 30  # "more than 30 GB free disk": the shards plus a converted copy
MIN_PYTHON = (3, 8)
NATIVE_TRANSFORMERS = "4.46"  # GlmForCausalLM
OFFICIAL_TRANSFORMERS_MAX = "4.41"  # the remote code's generate/chat break after this
OLD_TOKENIZER_TRANSFORMERS_MAX = "4.33"  # tokenizer files older than Oct 2023
MIN_TORCH = "2.0"  # scaled_dot_product_attention
MIN_STREAMLIT = "1.24"  # st.chat_message


# --- The estimator ----------------------------------------------------------------------------------
CUDA_CONTEXT = 0.45 * GB  # the CUDA context and cuBLAS workspace of one process, per card
PROCESS_OVERHEAD_CPU = 0.5 * GB  # Python, torch and transformers in RAM


@dataclass
class Estimate:
    profile: str
    device: str
    precision: str
    context: int
    weights: float
    kv_cache: float
    activations: float
    workspace: float
    runtime: float
    per_device: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.workspace + self.runtime

    def to_dict(self) -> dict:
        return {
            "profile": self.profile, "device": self.device, "precision": self.precision,
            "context": self.context,
            "bytes": {"weights": round(self.weights), "kv_cache": round(self.kv_cache),
                      "activations": round(self.activations), "workspace": round(self.workspace),
                      "runtime": round(self.runtime), "total": round(self.total)},
            "per_device_total": [round(b) for b in self.per_device],
        }


def weight_bytes(dtype: str, bits: int = 0) -> float:
    """Bytes of the weights: block linears at `bits` (with one 16-bit scale per row), the rest 16/32-bit."""
    width = DTYPE_BYTES[dtype]
    if not bits:
        return PARAMETERS * width
    rest = max(width, 2) if dtype != "float32" else 4
    return QUANTIZABLE * bits / 8 + QUANT_ROWS * 2 + UNQUANTIZED * rest


def estimate(profile: Profile, context: int = 2048) -> Estimate:
    """Peak memory while encoding `context` tokens and generating (batch 1), by part."""
    if context < 1:
        raise ValueError("context must be at least 1 token")
    dtype = profile.dtype
    act_dtype_bytes = DTYPE_BYTES[dtype]
    weights = weight_bytes(dtype, profile.quantization_bits)
    kv = kv_bytes_per_token(dtype) * context
    # Prefill activations: hidden states (a few copies), the SwiGLU intermediate (gate+up, product),
    # and logits of the last position only; attention is O(n) with scaled_dot_product_attention.
    chunk = min(context, 8192)
    activations = chunk * act_dtype_bytes * (4 * HIDDEN + 3 * FFN) + VOCAB * 4 * 2
    workspace = 0.0
    if profile.quantization_bits:
        # Weight-only kernels unpack the largest layer to 16 bit (twice, with the allocator's slack).
        largest = max(r * c for r, c in BLOCK_LINEARS)
        workspace = 2 * largest * 2
    runtime = CUDA_CONTEXT if profile.device == "cuda" else PROCESS_OVERHEAD_CPU if profile.device == "cpu" else 0.3 * GB
    est = Estimate(profile.name, profile.device, profile.precision, context, weights, kv, activations, workspace, runtime)
    if profile.num_gpus > 1:
        # Embedding and output layer on the first card, the 28 blocks spread evenly.
        edge = 2 * VOCAB * HIDDEN * DTYPE_BYTES[dtype]
        per_block_share = (weights - edge) / profile.num_gpus
        per_kv = kv / profile.num_gpus
        est.per_device = [
            per_block_share + per_kv + activations + CUDA_CONTEXT + (edge if i == 0 else 0)
            for i in range(profile.num_gpus)
        ]
    return est


def disk_needed(precision: str = "fp16") -> float:
    """Bytes of disk a download needs (the converted copy for the native runtime comes on top)."""
    return INT4_CHECKPOINT_BYTES if precision == "int4" else FP16_CHECKPOINT_BYTES


# --- Fine-tuning: the table's second column ----------------------------------------------------------
@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning run's memory depends on; the defaults are the official ptuning/train.sh."""

    method: str = "ptuning"  # ptuning | lora
    pre_seq_len: int = 128
    prefix_projection: bool = False
    lora_rank: int = 8
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj")
    max_source_length: int = 64
    max_target_length: int = 128
    batch_size: int = 1
    gradient_checkpointing: bool = True


FINETUNE_METHODS = ("ptuning", "lora")
# (in, out) of each linear LoRA can target, per layer
LORA_SHAPES = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, KV_GROUPS * HEAD_DIM),
               "v_proj": (HIDDEN, KV_GROUPS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN),
               "gate_up_proj": (HIDDEN, 2 * FFN), "down_proj": (FFN, HIDDEN)}
# PyTorch's CUDA caching allocator keeps freed blocks for reuse; while training, the held memory
# stays above the live tensors (large dequantization buffers alternate with small activations). This
# is the one figure fitted to the official table rather than derived: with it the estimate lands
# within 6% of 14 / 9 / 7 GB at train.sh's settings (the live tensors alone: 13.2 / 8.0 / 5.1 GB).
TRAIN_RESERVE_CUDA = 1.5 * GB


def finetune_trainable(s: FinetuneSettings) -> int:
    """Trainable parameters: the prefix encoder (P-tuning v2) or the LoRA A/B matrices."""
    if s.method == "ptuning":
        width = NUM_LAYERS * 2 * KV_GROUPS * HEAD_DIM
        return s.pre_seq_len * width + ((2 * width * HIDDEN + HIDDEN + width) if s.prefix_projection else 0)
    return NUM_LAYERS * s.lora_rank * sum(sum(LORA_SHAPES[t]) for t in s.lora_targets)


@dataclass
class FinetuneEstimate:
    profile: str
    device: str
    precision: str
    method: str
    settings: FinetuneSettings
    weights: float
    trainable: float
    gradients: float
    optimizer: float
    activations: float
    workspace: float
    runtime: float
    reserve: float
    per_device: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.activations
                + self.workspace + self.runtime + self.reserve)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        parts = ("weights", "trainable", "gradients", "optimizer", "activations", "workspace", "runtime", "reserve")
        return {"profile": self.profile, "device": self.device, "precision": self.precision, "method": self.method,
                "settings": {**asdict(self.settings), "lora_targets": list(self.settings.lora_targets)},
                "trainable_parameters": finetune_trainable(self.settings),
                "bytes": {**{p: round(getattr(self, p)) for p in parts}, "total": round(self.total)},
                "per_device_total": []}


def finetune_estimate(profile: Profile, s: FinetuneSettings = FinetuneSettings()) -> FinetuneEstimate:
    """Peak memory of one training step (glmsetup finetune, batch s.batch_size), by part.

    The trainable parameters, their gradients and AdamW's two moments are float32. Activations: the
    sequence is max_source_length + max_target_length + 1 tokens (the official padding), the keys
    pre_seq_len more; with gradient checkpointing every layer keeps its input and one layer at a time
    is recomputed with its gradients; the output layer runs on the answer positions only (float32
    logits, their softmax and gradient). Quantized weights add the dequantized layer the backward
    pass multiplies with (the inference workspace).
    """
    if s.method not in FINETUNE_METHODS:
        raise ValueError(f"method must be one of {FINETUNE_METHODS}")
    dtype = profile.dtype
    act = DTYPE_BYTES[dtype]
    n = finetune_trainable(s)
    B = s.batch_size
    seq = s.max_source_length + s.max_target_length + 1
    keys = seq + (s.pre_seq_len if s.method == "ptuning" else 0)
    layer = B * seq * act * (4 * HIDDEN + 3 * FFN) * 2 + B * HEADS * seq * keys * 4  # a layer and its grads
    kept = NUM_LAYERS * B * seq * HIDDEN * act if s.gradient_checkpointing else NUM_LAYERS * layer
    logits = B * (s.max_target_length + 1) * VOCAB * 4 * 3
    prefix = 2 * B * s.pre_seq_len * NUM_LAYERS * 2 * KV_GROUPS * HEAD_DIM * act if s.method == "ptuning" else 0
    activations = kept + layer + logits + prefix
    workspace = 2 * max(r * c for r, c in BLOCK_LINEARS) * 2 if profile.quantization_bits else 0.0
    runtime = CUDA_CONTEXT if profile.device == "cuda" else PROCESS_OVERHEAD_CPU if profile.device == "cpu" else 0.3 * GB
    reserve = TRAIN_RESERVE_CUDA if profile.device == "cuda" else 0.0
    return FinetuneEstimate(profile.name, profile.device, profile.precision, s.method, s,
                            weight_bytes(dtype, profile.quantization_bits), 4.0 * n, 4.0 * n, 8.0 * n,
                            activations, workspace, runtime, reserve)
