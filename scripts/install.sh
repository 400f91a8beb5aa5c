#!/bin/sh
# Create .venv (if missing) and install twinloop with its test and RL extras.
# Only Python 3.11 and pip are needed; torch is pinned to its CPU build by constraints.txt.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import plant, gymnasium, numba, stable_baselines3" \
  || { echo "install.sh: the install failed" >&2; exit 1; }
