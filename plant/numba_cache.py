"""Keep numba's on-disk cache honest across modules.

``numba.njit(cache=True)`` keys a function's cached machine code on its *own* source file's
time stamp and size only: a kernel that inlines or calls a compiled function of another module
keeps running the old code of that module after it changes (numba's documentation lists this
limitation: "changes in other files are not detected"). A module that compiles in functions of
other modules calls :func:`drop_stale_cache` at import with those modules' files: when their
contents changed since the cache was written, the module's cache files are removed and numba
compiles afresh on first call.

Only numba's default cache location (``__pycache__`` beside the source) is handled; with
``NUMBA_CACHE_DIR`` set, clear that directory after changing a kernel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


def _digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def drop_stale_cache(module_file: str, dependencies: Sequence[str]) -> bool:
    """Remove ``module_file``'s numba cache if a file of ``dependencies`` changed since.

    Args:
        module_file: the ``__file__`` of the module whose kernels compile the others in.
        dependencies: the ``__file__`` of each module whose compiled functions it uses.

    Returns:
        True when cache files were removed. An unwritable cache directory is left alone
        (numba then does not cache there either).

    """
    source = Path(module_file)
    cache_dir = source.parent / "__pycache__"
    stamp = cache_dir / f"{source.stem}.numba-deps"
    digest = _digest([Path(d) for d in dependencies])
    try:
        if stamp.read_text() == digest:
            return False
    except OSError:
        pass
    removed = False
    try:
        for pattern in (f"{source.stem}.*.nbi", f"{source.stem}.*.nbc"):
            for f in cache_dir.glob(pattern):
                f.unlink(missing_ok=True)
                removed = True
        cache_dir.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        return removed
    return removed
