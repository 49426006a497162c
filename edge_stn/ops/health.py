"""What "healthy" means for a gateway, written once (``/healthz``, stats, the systemd watchdog).

The daemon is **healthy** when all of these hold (``health:`` in the config sets N, M, X):

1. ``stages``: the detector and publisher loops are alive: each has reported progress (a
   heartbeat, at least every second while idle) within ``stage_timeout_s``. This is also the
   condition for the systemd watchdog ping, so a hung daemon is restarted, not only a dead one.
2. ``cameras``: every camera that is still running produced a frame within
   ``camera_stale_s`` (N, default 10 s). A camera that ended on purpose (a file at its end)
   does not count; in the first N seconds after start a camera is given the benefit of doubt.
3. ``broker``: the broker connection is up, or has been down (or not yet up) for less than
   ``broker_grace_s`` (M, default 60 s): results wait in the outbox meanwhile.
4. ``outbox``: what waits for the broker fills less than ``outbox_max_percent`` (X, default
   90 %) of the outbox's bounds (its data budget in bytes; a count too, where one is given).

Two conditions are **reported but do not make the daemon unhealthy**, because a restart cannot
fix them: a disk with less than ``min_free_mb`` free where the daemon writes, and a wall clock
that is not synchronised (results carry wrong times). They appear under ``warnings`` in
``/healthz`` and stats, as metrics, and as a log line when they start and when they end.

A report older than :data:`REPORT_MAX_AGE_S` (the supervisor that refreshes it stopped) is
itself unhealthy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_stn.ops.host import ClockStatus, DiskStatus

logger = logging.getLogger(__name__)

REPORT_MAX_AGE_S = 10.0
HEARTBEAT_STALE_S = 30.0
"""Default for a stage loop without a heartbeat: hung (loops beat at least every second)."""


@dataclass(frozen=True)
class OutboxLevel:
    """How full the outbox is: what waits for the broker, against the outbox's bounds.

    ``Supervisor.outbox_level`` gives one: the durable outbox's messages and used bytes against
    its data budget (no count bound)."""

    messages: int
    bytes: int
    max_messages: int | None = None
    max_bytes: int | None = None

    @property
    def percent(self) -> float:
        shares = [
            100.0 * used / cap
            for used, cap in ((self.messages, self.max_messages), (self.bytes, self.max_bytes))
            if cap
        ]
        return max(shares, default=0.0)


class Heartbeats:
    """Progress stamps of the stage loops (monotonic seconds), thread-safe."""

    def __init__(self, names: Iterable[str]) -> None:
        now = time.monotonic()
        self._last = dict.fromkeys(names, now)
        self._done: set[str] = set()
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._last)

    def beat(self, name: str) -> None:
        with self._lock:
            self._last[name] = time.monotonic()

    def done(self, name: str) -> None:
        """The loop ended normally (not hung): it stops counting."""
        with self._lock:
            self._done.add(name)

    def stale(self, limit_s: float, now: float | None = None) -> list[str]:
        """Stages that are neither done nor beat within ``limit_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [n for n, t in self._last.items() if n not in self._done and now - t > limit_s]


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    healthy: bool
    checks: dict[str, Check]
    warnings: list[str]
    ts: float
    """Unix seconds when the report was made."""
    mono: float = field(default_factory=time.monotonic)

    def to_dict(self, now_mono: float | None = None) -> dict[str, Any]:
        age = (time.monotonic() if now_mono is None else now_mono) - self.mono
        healthy = self.healthy and age <= REPORT_MAX_AGE_S
        checks = {k: {"ok": c.ok, "detail": c.detail} for k, c in self.checks.items()}
        if age > REPORT_MAX_AGE_S:
            checks["supervisor"] = {"ok": False, "detail": f"no health report for {age:.0f} s"}
        return {
            "healthy": healthy,
            "ts": round(self.ts, 3),
            "checks": checks,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class CameraProgress:
    camera_id: str
    frames: int
    finished: bool


@dataclass
class HealthLimits:
    camera_stale_s: float = 10.0
    broker_grace_s: float = 60.0
    outbox_max_percent: float = 90.0
    stage_timeout_s: float = HEARTBEAT_STALE_S


class HealthMonitor:
    """Turns observations (one per supervisor tick) into a :class:`HealthReport`."""

    def __init__(self, limits: HealthLimits, *, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._started = clock()
        self._frames: dict[str, tuple[int, float]] = {}
        self._down_since: float | None = self._started
        self._ever_connected = False
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._report: HealthReport | None = None

    def observe(
        self,
        *,
        cameras: Sequence[CameraProgress],
        connected: bool,
        outbox: OutboxLevel,
        stale_stages: Sequence[str],
        disks: Sequence[DiskStatus] = (),
        clock: ClockStatus | None = None,
        broker_error: str | None = None,
    ) -> HealthReport:
        now = self._clock()
        lim = self.limits
        checks: dict[str, Check] = {}

        checks["stages"] = (
            Check(
                False, f"no progress for over {lim.stage_timeout_s:g} s: {', '.join(stale_stages)}"
            )
            if stale_stages
            else Check(True, "detector and publisher loops alive")
        )

        late: list[str] = []
        running = 0
        for cam in cameras:
            seen = self._frames.get(cam.camera_id)
            if seen is None or cam.frames != seen[0]:
                self._frames[cam.camera_id] = (cam.frames, now if cam.frames else self._started)
                seen = self._frames[cam.camera_id]
            if cam.finished:
                continue
            running += 1
            idle = now - seen[1]
            if idle > lim.camera_stale_s:
                late.append(f"{cam.camera_id} ({idle:.1f} s)")
        checks["cameras"] = (
            Check(False, f"no frame within {lim.camera_stale_s:g} s: {', '.join(late)}")
            if late
            else Check(True, f"{running} running camera(s) delivering frames")
        )

        if connected:
            self._down_since = None
            self._ever_connected = True
            checks["broker"] = Check(True, "connected")
        else:
            if self._down_since is None:
                self._down_since = now
            down = now - self._down_since
            what = "unreachable" if self._ever_connected else "not connected yet"
            cause = f": {broker_error}" if broker_error else ""
            checks["broker"] = Check(
                down < lim.broker_grace_s,
                f"{what} for {down:.0f} s (limit {lim.broker_grace_s:g} s){cause}",
            )

        pct = outbox.percent
        checks["outbox"] = Check(
            pct < lim.outbox_max_percent,
            f"{pct:.1f}% full ({outbox.messages} messages, {outbox.bytes} bytes; "
            f"limit {lim.outbox_max_percent:g}%)",
        )

        warnings = [
            f"disk {d.path}: {d.free_bytes / 1e6:.0f} MB free (disk full or nearly)"
            for d in disks
            if d.low
        ]
        if clock is not None and clock.synchronized is False:
            warnings.append(f"clock not synchronised: {clock.reason}")
        self._log_transitions(warnings)

        report = HealthReport(
            all(c.ok for c in checks.values()), checks, warnings, time.time(), now
        )
        with self._lock:
            self._report = report
        return report

    def _log_transitions(self, warnings: list[str]) -> None:
        keys = {w.split(":", 1)[0]: w for w in warnings}
        for key, text in keys.items():
            if key not in self._warned:
                logger.warning("%s", text)
        for key in self._warned - set(keys):
            logger.info("%s: recovered", key)
        self._warned = set(keys)

    def report(self) -> HealthReport | None:
        with self._lock:
            return self._report
