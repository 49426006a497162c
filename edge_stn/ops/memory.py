"""Where the daemon's freed frames go: back to the kernel, not into malloc's free lists.

Every frame is a few MB (a 720p BGR frame is 2.7 MB), allocated by the thread that reads it and
freed by whichever stage drops it last. glibc's malloc serves blocks above its *mmap threshold*
with their own mapping, returned to the kernel on ``free``; but the threshold is dynamic: the
first freed mapping raises it to that size (up to 32 MB), and from then on frames come from the
per-thread heaps ("arenas"), where freed frames stay resident as free space, one high-water mark
per thread. With four cameras that was about 50 MB of the daemon's resident memory
(docs/benchmarks.md). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
dynamic adjustment off) keeps frames out of the heaps; smaller blocks are unaffected.

Only glibc has ``mallopt`` with this meaning; elsewhere (musl, macOS) nothing is changed. An
operator's ``MALLOC_MMAP_THRESHOLD_`` environment variable wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""
FRAME_MMAP_THRESHOLD = 1 << 20
"""1 MiB: a 640x480 BGR frame (0.9 MB) and anything larger get their own mapping."""


def release_frames_to_the_kernel(threshold: int = FRAME_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("GLIBC_TUNABLES"):
        return False  # the operator chose
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc: its mallopt numbers mean other things, or nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
    if ok:
        logger.debug("malloc: blocks of %d bytes and more are mapped on their own", threshold)
    return ok
