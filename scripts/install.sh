#!/bin/sh
# Create .venv (if missing) and install twinloop with its test, RL and Ray extras.
# Only Python 3.11 and pip are needed; torch is pinned to its CPU build by constraints.txt.
# pip's output goes to .venv/install.log and is shown only when the install fails.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
log=.venv/install.log
if ! .venv/bin/python -m pip install -c constraints.txt -e ".[test]" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2 || true
  echo "install.sh: pip install failed (full log: $log)" >&2
  exit 1
fi
.venv/bin/python -c "import twinloop.plant, gymnasium, numba, ray, stable_baselines3" \
  || { echo "install.sh: the install is incomplete (log: $log)" >&2; exit 1; }
