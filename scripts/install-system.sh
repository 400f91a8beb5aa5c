#!/bin/sh
# Install the system tools the HIL tests use: socat (pty pairs) and mbpoll (a third-party Modbus
# client). Does nothing when both are present; uses sudo when not root.
set -eu
missing=""
command -v socat >/dev/null 2>&1 || missing="$missing socat"
command -v mbpoll >/dev/null 2>&1 || missing="$missing mbpoll"
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
