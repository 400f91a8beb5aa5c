#!/bin/sh
# stamp.sh install|warm — print the hash install.sh compares with .venv/install.stamp or
# .venv/warm.stamp (run from the clone's root, after .venv exists).
#   install: pyproject.toml, constraints.txt, install.sh and this script, the venv's Python
#            version and the names of its installed distributions (name-version.dist-info);
#   warm:    the sources holding numba kernels (every tracked or untracked .py under the
#            package's directories that mentions njit or numba.jit), by path and contents.
set -eu
digest() {  # a hash of standard input: sha256sum (GNU), shasum (macOS) or POSIX cksum
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256 | cut -d' ' -f1
  else
    cksum | tr ' ' -
  fi
}
case "${1:-}" in
  install)
    {
      cat pyproject.toml constraints.txt scripts/install.sh scripts/stamp.sh
      .venv/bin/python -c "import sys; print(sys.version)"
      ls .venv/lib/python*/site-packages 2>/dev/null | grep -e '\.dist-info$' -e '\.egg-link$' -e '^__editable__' || true
    } | digest
    ;;
  warm)
    grep -rl --include='*.py' -e 'njit' -e 'numba.jit' agents campaigns cli evaluation hil hw_bridge \
      plant policies twins 2>/dev/null | LC_ALL=C sort | while read -r f; do
      printf '%s\n' "$f"
      cat "$f"
    done | digest
    ;;
  *)
    echo "usage: stamp.sh install|warm" >&2
    exit 2
    ;;
esac
