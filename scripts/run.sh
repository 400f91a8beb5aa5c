#!/bin/sh
# Install what is missing or out of date (scripts/install.sh: nothing when the environment is up
# to date), then run the main job: the closed loop on the adult cohort for one day, with a
# printed summary and a recording. The placement is chosen by the run's cost (`--placement auto`:
# inline for a run this small; the agents become Ray actors on an embedded, loopback-only Ray
# with --placement ray). Extra arguments go to `twinloop run` (e.g. --cohort all --days 7).
set -eu
cd "$(dirname "$0")/.."
sh scripts/install.sh
exec sh scripts/offline.sh .venv/bin/twinloop run "$@"
