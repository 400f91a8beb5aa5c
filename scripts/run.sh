#!/bin/sh
# Install everything, then run the main job: a whole cohort for one day, with a printed summary.
# Extra arguments go to `twinloop simulate` (e.g. --cohort adults --days 7 --carb-error 0.3).
set -eu
cd "$(dirname "$0")/.."
sh scripts/install.sh
exec sh scripts/offline.sh .venv/bin/twinloop simulate "$@"
