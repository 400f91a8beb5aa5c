#!/bin/sh
# Install the system tools the tests use: socat (pty pairs) and mbpoll (a third-party Modbus
# client) for HIL, and a headless Chromium (Debian's chromium-headless-shell; any chromium on
# PATH will do) that renders the HTML reports at a real viewport size
# (tests/campaigns/test_report_layout.py). Does nothing when all are present; uses sudo when not
# root.
set -eu
missing=""
command -v socat >/dev/null 2>&1 || missing="$missing socat"
command -v mbpoll >/dev/null 2>&1 || missing="$missing mbpoll"
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  missing="$missing chromium-headless-shell"
fi
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system.sh: please install:$missing (no apt-get here)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
