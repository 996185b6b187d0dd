"""glibc malloc tuning for a long-running worker: a bounded number of arenas keeps memory flat.

glibc gives threads their own malloc arenas (up to 8 per core), and a worker's threads (fetch, decode, forward,
Celery's pool) each churn through ~100 KB-1 MB buffers: every arena keeps its own free space, so RSS crept up
by 5-6% over the first ~5,000 images after warm-up before it levelled off. With 2 arenas it stayed within
+-1% (and ~80 MB lower), for up to ~4% more CPU per image (2 CPU cores, default CNN; within run-to-run
noise in later A/B runs). 4 arenas drifted up to +5%, and a periodic malloc_trim with the default arenas
+3%. A fixed mmap threshold also flattened it, but cost ~20% throughput in page faults. Not glibc (musl,
macOS): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads that allocate from now on; False where there is no glibc."""
    if arenas <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return ok
