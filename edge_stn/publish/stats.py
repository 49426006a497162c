"""Measurements for the ``stats`` message: latency samples per interval and this process's CPU
and memory (standard library only: ``/proc`` on Linux, ``resource`` elsewhere)."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import deque
from typing import Any


class LatencyWindow:
    """The latency samples (ms) of one stats interval, at most ``maxlen`` (the newest kept).

    Thread-safe: stages ``add`` while the stats thread ``drain``\\ s.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self._samples: deque[float] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples.append(float(ms))

    def drain(self) -> list[float]:
        """The samples since the last drain (and forget them)."""
        with self._lock:
            out = list(self._samples)
            self._samples.clear()
        return out


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is the peak, in KiB on Linux and bytes on macOS: better than nothing.
        return int(peak if sys.platform == "darwin" else peak * 1024) or None


class ProcessMeter:
    """CPU (percent of one core, averaged since the previous sample) and memory of this process."""

    def __init__(self) -> None:
        self._last_wall = time.monotonic()
        self._last_cpu = time.process_time()

    def sample(self) -> dict[str, Any]:
        wall, cpu = time.monotonic(), time.process_time()
        dt = wall - self._last_wall
        percent = 100.0 * (cpu - self._last_cpu) / dt if dt > 0 else 0.0
        self._last_wall, self._last_cpu = wall, cpu
        return {
            "cpu_percent": round(percent, 1),
            "rss_bytes": _rss_bytes(),
            "threads": threading.active_count(),
        }
