#!/usr/bin/env bash
# Make .venv-official: the second environment that runs the official ChatGLM2-6B remote code
# (backend = "official"). It holds what the official code was written for, transformers 4.33.3
# (the newest the 2023-09 tokenization_chatglm.py runs on), the CPU build of torch, and glmsetup
# from this tree with the official, api, web and streamlit extras (not the runtime extra: that one
# needs transformers 4.46+). Gradio is pinned to 6.17.3, the newest release that accepts the
# huggingface_hub < 1.0 transformers 4.33.3 requires (6.18 and later want huggingface_hub >= 1.2;
# pip would backtrack to it anyway, the pin saves the search). tests/official/ runs the official
# code in it and compares with the native runtime in .venv. Re-running is cheap: nothing is
# installed while the stamp matches this script and pyproject.toml. Set GLMSETUP_OFFICIAL_VENV to
# build it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GLMSETUP_OFFICIAL_VENV:-.venv-official}"
TORCH="torch==2.13.0"
TRANSFORMERS="transformers==4.33.3"
GRADIO="gradio==6.17.3"

. scripts/venv_lib.sh
stamp="$(cat "$0" scripts/venv_lib.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
venv_open "$VENV" "$stamp" \
  glmsetup torch transformers fastapi gradio streamlit
echo "building $VENV ($TRANSFORMERS, $TORCH, $GRADIO, glmsetup[official,api,web,streamlit]) ..." >&2
# the CPU build, as scripts/test.sh installs it (GLMSETUP_TORCH_INDEX names another index)
"$VENV/bin/python" -m pip install -q --no-compile --retries 1 "$TORCH" \
  --extra-index-url "${GLMSETUP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
"$VENV/bin/python" -m pip install -q --no-compile "$TRANSFORMERS" "$GRADIO" -e ".[official,api,web,streamlit]"
"$VENV/bin/python" -c "import glmsetup, torch, transformers, gradio, streamlit; assert transformers.__version__ == '${TRANSFORMERS#*==}'"
venv_close "$VENV" "$stamp"
