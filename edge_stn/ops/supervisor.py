"""The daemon's operations side, ticked once a second by its run loop (the stage supervisor).

Each :meth:`Supervisor.tick`:

* checks the stage heartbeats (:class:`~edge_stn.ops.health.Heartbeats`) and pings the systemd
  watchdog (``WATCHDOG=1``) only while every stage loop is alive, so systemd restarts a hung
  daemon (``WatchdogSec=`` in the unit), not only a dead one; a hung stage is logged once, by
  name;
* observes cameras, broker and outbox for :mod:`edge_stn.ops.health` (``/healthz``, stats);
* every :data:`HOST_CHECK_S` measures free disk space and asks whether the clock is
  synchronised (:mod:`edge_stn.ops.host`);
* keeps the per-camera fps of the last few seconds for the metrics.

It also sends ``READY=1`` (:meth:`started`), ``RELOADING=1``/``READY=1`` around a reload and
``STOPPING=1`` (:meth:`stopping`), and owns the metrics endpoint when ``metrics:`` is configured.

The outbox's fill (:attr:`Supervisor.outbox_level`) is what waits for the broker (messages
stored or not yet committed) against the durable outbox's byte budget (``outbox.max_bytes``
less its WAL reserve; the outbox sheds beyond it); its folder is among the disks watched.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_stn.config import TensorRTProvider
from edge_stn.ops.health import (
    HEARTBEAT_STALE_S,
    CameraProgress,
    HealthLimits,
    HealthMonitor,
    HealthReport,
    Heartbeats,
    OutboxLevel,
)
from edge_stn.ops.host import ClockStatus, DiskStatus, clock_status, disk_status
from edge_stn.ops.sdnotify import Notifier

if TYPE_CHECKING:
    from edge_stn.daemon import Daemon
    from edge_stn.ops.metrics import DaemonMetrics, MetricsServer, Snapshot

logger = logging.getLogger(__name__)

HOST_CHECK_S = 30.0
FPS_WINDOW_S = 5.0
STATUS_EVERY_S = 10.0


class Supervisor:
    def __init__(self, daemon: Daemon, notifier: Notifier | None = None) -> None:
        self.daemon = daemon
        cfg = daemon.config
        self.notifier = notifier if notifier is not None else Notifier()
        self.heartbeats: Heartbeats = daemon.heartbeats
        watchdog = self.notifier.watchdog_s
        # A stage must beat well within the watchdog period, so a hang is caught in time.
        stage_timeout = (
            min(HEARTBEAT_STALE_S, max(2.0, watchdog / 2)) if watchdog else HEARTBEAT_STALE_S
        )
        h = cfg.health
        self.health = HealthMonitor(
            HealthLimits(h.camera_stale_s, h.broker_grace_s, h.outbox_max_percent, stage_timeout)
        )
        self.outbox_level: Callable[[], OutboxLevel] = self._outbox_level
        self.disk_paths: list[Path] = self._default_disk_paths()
        self._min_free = int(h.min_free_mb * 1e6)
        self._disks: list[DiskStatus] = []
        self._clock: ClockStatus | None = None
        self._next_host_check = 0.0
        self._next_status = 0.0
        self._fps: dict[str, deque[tuple[float, int]]] = {}
        self._hung: frozenset[str] = frozenset()
        self.watchdog_pings = 0
        self.metrics: DaemonMetrics | None = None
        self.server: MetricsServer | None = None
        if cfg.metrics is not None:
            from edge_stn.ops.metrics import DaemonMetrics, MetricsServer

            self.metrics = DaemonMetrics(self.snapshot)
            self.server = MetricsServer(
                cfg.metrics.host, cfg.metrics.port, self.metrics, self.health_document
            )

    # ------------------------------------------------------------ life cycle

    def _default_disk_paths(self) -> list[Path]:
        cfg = self.daemon.config
        paths: list[Path] = []
        outbox = cfg.outbox.resolved_path(cfg.device_id)
        if outbox is not None:
            paths.append(outbox.parent)
        if cfg.model.fallback_dir is not None:
            paths.append(cfg.model.fallback_dir)
        trt = cfg.model.provider("tensorrt")
        if isinstance(trt, TensorRTProvider) and "TensorrtExecutionProvider" in getattr(
            self.daemon.engine, "providers", []
        ):
            paths.append(trt.options.engine_cache_dir)
        paths += [Path(p) for p in os.environ.get("STATE_DIRECTORY", "").split(":") if p]
        return paths

    def started(self) -> None:
        """The daemon runs: metrics endpoint up, first health report, ``READY=1``."""
        n = len(self.daemon.readers)
        self.notifier.ready(f"running: {n} camera(s), broker {self.daemon.config.mqtt.broker}")
        self.tick()  # the first health report exists before anyone can ask for it
        if self.server is not None:
            self.server.start()
        if self.notifier.enabled:
            logger.info(
                "systemd: READY=1 sent%s",
                f"; watchdog every {self.notifier.watchdog_s:g} s"
                if self.notifier.watchdog_s
                else "",
            )

    def stopping(self) -> None:
        self.notifier.stopping("stopping")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.notifier.close()

    # ------------------------------------------------------------ the tick

    def tick(self) -> HealthReport:
        now = time.monotonic()
        stale = self.heartbeats.stale(self.health.limits.stage_timeout_s, now)
        hung = frozenset(stale)
        if hung - self._hung:
            logger.error(
                "stage(s) %s made no progress for over %g s: the daemon is hung there%s",
                ", ".join(sorted(hung - self._hung)),
                self.health.limits.stage_timeout_s,
                "; the systemd watchdog is no longer pinged (systemd will restart it)"
                if self.notifier.watchdog_s
                else "",
            )
        elif self._hung and not hung:
            logger.warning("every stage makes progress again")
        self._hung = hung
        if not stale and self.notifier.watchdog_s and self.notifier.watchdog():
            self.watchdog_pings += 1
        if now >= self._next_host_check:
            self._next_host_check = now + HOST_CHECK_S
            self._disks = disk_status(self.disk_paths, self._min_free)
            self._clock = clock_status()
        cameras = []
        for reader in self.daemon.readers:
            s = reader.stats()
            cameras.append(CameraProgress(reader.camera_id, s.frames, reader.finished))
        processed = self.daemon.processed()
        for cam, n in processed.items():
            window = self._fps.setdefault(cam, deque())
            window.append((now, n))
            while len(window) > 2 and now - window[0][0] > FPS_WINDOW_S:
                window.popleft()
        pub = self.daemon.publisher
        report = self.health.observe(
            cameras=cameras,
            connected=pub.connected,
            outbox=self.outbox_level(),
            stale_stages=stale,
            disks=self._disks,
            clock=self._clock,
            broker_error=pub.last_error,
        )
        if self.notifier.enabled and now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            fps = sum(self.fps().values())
            state = "healthy" if report.healthy else "UNHEALTHY"
            broker = "connected" if pub.connected else "not connected"
            self.notifier.status(f"{state}: {fps:.1f} fps, broker {broker}")
        return report

    def _outbox_level(self) -> OutboxLevel:
        pub = self.daemon.publisher
        c = pub.counters()
        live = int(c.outbox.get("live_bytes", 0))
        return OutboxLevel(c.pending, live, None, pub.outbox.data_budget)

    # ------------------------------------------------------------ reports

    def fps(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for cam, window in self._fps.items():
            (t0, n0), (t1, n1) = window[0], window[-1]
            out[cam] = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return out

    def health_document(self) -> dict[str, Any]:
        report = self.health.report()
        if report is None:
            return {"healthy": False, "checks": {}, "warnings": ["not started"]}
        return report.to_dict()

    def health_summary(self) -> dict[str, Any]:
        """The ``health`` part of the stats document."""
        doc = self.health_document()
        return {
            "healthy": doc["healthy"],
            "failing": sorted(k for k, c in doc["checks"].items() if not c["ok"]),
            "warnings": doc["warnings"],
        }

    def snapshot(self) -> Snapshot:
        from edge_stn.ops.metrics import CameraSnapshot, Snapshot

        d = self.daemon
        fps = self.fps()
        processed = d.processed()
        cams = []
        for reader in d.readers:
            s = reader.stats()
            cams.append(
                CameraSnapshot(
                    reader.camera_id,
                    fps.get(reader.camera_id, 0.0),
                    processed.get(reader.camera_id, 0),
                    s.frames,
                    s.dropped_stale,
                    s.read_errors,
                    s.reconnects,
                    s.stalls,
                    reader.finished,
                )
            )
        pi = d.publisher.info  # what the status message says
        info = {
            "device": pi.device,
            "version": pi.version,
            "model": pi.model.name,
            "model_sha256": pi.model.sha256,
            "config_hash": pi.config_hash,
            "epoch": pi.epoch,
        }
        return Snapshot(
            info=info,
            cameras=cams,
            drops=d.drop_counts(),
            mqtt=d.publisher.counters().to_dict(),
            outbox=self.outbox_level(),
            health=self.health.report(),
            disks=list(self._disks),
            clock=self._clock,
        )
