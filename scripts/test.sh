#!/bin/sh
# Install everything, then run the lint, type and test suite, network-isolated (loopback only).
# Extra arguments go to pytest (e.g. -m slow).
set -eu
cd "$(dirname "$0")/.."
sh scripts/install.sh
sh scripts/install-system.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
exec sh scripts/offline.sh .venv/bin/python -m pytest --durations=25 "$@"
