#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo [harmonize demo options]   set up, then run the pipeline on the embedded default
#   ./run.sh test [pytest options]           set up, then run the test suite
#   ./run.sh study [--quick] [--out DIR]     set up, then the real two-site study (docs/tb_cxr_study.md)
# Set-up makes .venv (override with HARMONIZE_VENV), installs the CPU build of torch
# first (so no multi-GB CUDA build is pulled in) and then this package; it is skipped
# when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${HARMONIZE_VENV:-.venv}"
TORCH_VERSION="${HARMONIZE_TORCH:-2.13.0}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.harmonize-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  echo "set-up: installing into $VENV (first run or pyproject.toml changed; ~2 min)" >&2
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    echo "set-up: torch==${TORCH_VERSION}" >&2
    python -m pip install -q "torch==${TORCH_VERSION}"
  fi
  echo "set-up: harmonize and its dependencies" >&2
  python -m pip install -q -e ".[dev]"
  echo "set-up: done" >&2
  echo "$want" > "$stamp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    setup
    harmonize demo --out demo_out "$@"
    ;;
  test)
    setup
    python -m pytest -q "$@"
    ;;
  study)
    setup
    python eval/tb_cxr_study.py "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./run.sh demo|test|study|setup [options]" >&2
    exit 2
    ;;
esac
