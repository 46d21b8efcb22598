#!/usr/bin/env bash
# benchmarks/gpu_check.py on a CUDA machine, with that machine's own python (torch with CUDA,
# transformers >= 4.46, sentencepiece, safetensors) and glmsetup from this tree, no install.
#
#   benchmarks/gpu_check.sh                 # the full check (28 layers), table on stdout, JSON to $OUT
#   benchmarks/gpu_check.sh --smoke         # the CPU stand-in
#
# The real tokenizer.model is used when shared/fixtures/upstream/chatglm2-6b/ is inside the tree (copy
# it there before sending the tree to a machine that cannot see ../shared) or GLMSETUP_TOKENIZER names it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
"$PY" -c "import torch, transformers, sentencepiece, safetensors, packaging" \
  || { echo "gpu_check.sh: $PY lacks one of torch, transformers, sentencepiece, safetensors, packaging" >&2; exit 1; }
exec "$PY" benchmarks/gpu_check.py --work "${GLMSETUP_GPU_CHECK_WORK:-/tmp/glmsetup-gpu-check}" "$@"
