# Sourced by scripts/official_env.sh and scripts/vllm_env.sh: the steps every side environment shares.
#   venv_open VENV STAMP MODULE...   lock VENV (pytest workers may ask at the same time: one builds,
#                                    the others wait); exit 0 at once when its stamp is STAMP and every
#                                    MODULE imports; else drop the stamp and make the venv if missing.
#   venv_close VENV STAMP            write the stamp: the build is complete.
venv_open() {
  local venv="$1" stamp="$2"
  shift 2
  mkdir -p "$venv"
  exec 9>"$venv/.lock"
  flock 9
  if [ -f "$venv/.glmsetup-stamp" ] && [ "$(cat "$venv/.glmsetup-stamp")" = "$stamp" ] \
     && "$venv/bin/python" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@" 2>/dev/null; then
    exit 0
  fi
  rm -f "$venv/.glmsetup-stamp"
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
}

venv_close() {
  echo "$2" > "$1/.glmsetup-stamp"
}
