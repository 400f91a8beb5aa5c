#!/bin/sh
# Create .venv (if missing) and install twinloop with its test, RL and Ray extras, then warm
# numba's cache (python -m twinloop.cli.warmup) so that no command compiles on its first run.
# Only Python 3.11 and pip are needed; torch is pinned to its CPU build by constraints.txt.
# pip's output goes to .venv/install.log and is shown only when the install fails.
#
# An up-to-date environment is not reinstalled: .venv/install.stamp holds a hash of what the
# install depends on (pyproject.toml, constraints.txt, this script, the Python and the installed
# distributions); pip runs only when it differs (a fresh clone, a changed dependency, a package
# removed by hand). Likewise .venv/warm.stamp holds a hash of the sources with compiled
# kernels: the warm-up runs again after one of them changed. TWINLOOP_REINSTALL=1 forces both.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=$(sh scripts/stamp.sh install)
if [ "${TWINLOOP_REINSTALL:-0}" = 1 ] || [ "$(cat .venv/install.stamp 2>/dev/null)" != "$stamp" ]; then
  rm -f .venv/install.stamp .venv/warm.stamp
  log=.venv/install.log
  if ! .venv/bin/python -m pip install -c constraints.txt -e ".[test]" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    echo "install.sh: pip install failed (full log: $log)" >&2
    exit 1
  fi
  .venv/bin/python -c "import twinloop.plant, gymnasium, numba, ray, stable_baselines3, optuna" \
    || { echo "install.sh: the install is incomplete (log: $log)" >&2; exit 1; }
  sh scripts/stamp.sh install >.venv/install.stamp
fi
warm=$(sh scripts/stamp.sh warm)
if [ "${TWINLOOP_REINSTALL:-0}" = 1 ] || [ "$(cat .venv/warm.stamp 2>/dev/null)" != "$warm" ]; then
  echo "install.sh: compiling the models once (numba cache; about a minute)..." >&2
  if .venv/bin/python -m twinloop.cli.warmup >&2; then
    echo "$warm" >.venv/warm.stamp
  else
    echo "install.sh: the warm-up failed; those commands compile on their first run" >&2
  fi
fi
