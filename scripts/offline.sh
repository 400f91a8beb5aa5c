#!/bin/sh
# offline.sh CMD [ARG...] — run CMD with loopback as its only network where the OS allows an
# unprivileged network namespace (unshare -rn, then ip link set lo up); otherwise run it as is.
if unshare -rn true 2>/dev/null; then
  exec unshare -rn sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' offline "$@"
fi
echo "offline.sh: network namespaces are not available; running without network isolation" >&2
exec "$@"
