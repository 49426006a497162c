"""Host conditions the daemon reports but cannot fix: a full disk and an unsynchronised clock.

* **Disk.** :func:`disk_status` runs ``statvfs`` on each folder the daemon writes to (the
  outbox, the TensorRT engine cache, the model fallback folder) and calls it *low* below
  ``health.min_free_mb``. A missing folder is measured at its nearest existing parent.
* **Clock.** Result times are Unix seconds from the gateway's clock, so a clock that is not
  synchronised puts wrong times on every result. :func:`clock_status` asks the kernel
  (``adjtimex(2)`` with no change requested: the ``TIME_ERROR`` state, which is what
  ``timedatectl`` reports as "System clock synchronized: no"), and also calls a clock before
  :data:`CLOCK_FLOOR` wrong (a board without a real-time clock boots in 1970). Where the
  kernel cannot be asked (not Linux, a seccomp filter) the answer is "unknown", not an alarm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_FLOOR = 1_735_689_600.0
"""2025-01-01T00:00:00Z: a clock before this is wrong (this release did not exist yet)."""
TIME_ERROR = 5
"""adjtimex(2)'s return value when the clock is not synchronised."""


@dataclass(frozen=True)
class DiskStatus:
    path: str
    free_bytes: int
    total_bytes: int
    low: bool


@dataclass(frozen=True)
class ClockStatus:
    synchronized: bool | None
    """True, False, or None when the kernel could not be asked."""
    reason: str


def _existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_status(paths: Iterable[Path], min_free_bytes: int) -> list[DiskStatus]:
    """Free space where the daemon writes (one entry per distinct path)."""
    out: list[DiskStatus] = []
    for path in dict.fromkeys(Path(p) for p in paths):
        try:
            st = os.statvfs(_existing(path))
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        out.append(DiskStatus(str(path), free, st.f_blocks * st.f_frsize, free < min_free_bytes))
    return out


def _kernel_clock_state() -> int | None:
    """adjtimex(2) with modes 0 (read only): the clock state, or None if it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    # struct timex is about 208 bytes on 64-bit Linux; modes (its first field) stays 0.
    buf = ctypes.create_string_buffer(512)
    state = int(libc.adjtimex(buf))
    return state if state >= 0 else None  # EPERM under a seccomp filter, ENOSYS, ...


def clock_status(
    now: float | None = None, *, kernel_state: Callable[[], int | None] = _kernel_clock_state
) -> ClockStatus:
    """Is the wall clock trustworthy? (``now`` and ``kernel_state`` are replaceable for tests.)"""
    now = time.time() if now is None else now
    if now < CLOCK_FLOOR:
        stamp = time.strftime("%Y-%m-%d", time.gmtime(now))
        return ClockStatus(False, f"the clock reads {stamp}, before this release existed")
    state = kernel_state()
    if state is None:
        return ClockStatus(None, "the kernel's synchronisation state is not readable here")
    if state == TIME_ERROR:
        return ClockStatus(
            False, "the kernel says the clock is not synchronised (start NTP: timesyncd, chrony)"
        )
    return ClockStatus(True, "synchronised")
