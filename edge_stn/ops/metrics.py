"""Prometheus metrics and the HTTP endpoint (``/metrics``, ``/healthz``).

Counters are read from the daemon when Prometheus scrapes (a collector over a
:class:`Snapshot`), so the stages pay nothing for them; only the two latency histograms are fed
per frame (:meth:`DaemonMetrics.observe_detect`, :meth:`DaemonMetrics.observe_publish`). Every
metric is listed in docs/operations.md. A private registry per daemon (not the global one), so
two daemons in one process do not collide; process metrics (CPU, memory, file descriptors) come
from prometheus_client's process collector.

The endpoint is a small threaded ``http.server`` on ``metrics.host:metrics.port`` (thread
``edge-stn.metrics``). ``/healthz`` answers 200 with the health report as JSON when healthy and
503 with the same document when not (see :mod:`edge_stn.ops.health`). ``/livez`` answers 200
or 503 on the stage loops alone (what the systemd watchdog checks): the probe to restart on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_stn.errors import ConfigError, MissingExtraError
from edge_stn.ops.health import HealthReport, OutboxLevel
from edge_stn.ops.host import ClockStatus, DiskStatus

logger = logging.getLogger(__name__)

LIVENESS_CHECKS = ("stages", "supervisor")
"""What ``/livez`` looks at: the stage loops and the supervisor, as the systemd watchdog does.
A restart fixes a hung daemon, not a dead camera or a broker outage (those are ``/healthz``)."""
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class CameraSnapshot:
    camera_id: str
    fps: float
    processed: int
    frames: int
    dropped_stale: int
    read_errors: int
    reconnects: int
    stalls: int
    finished: bool


@dataclass(frozen=True)
class Snapshot:
    """What the collector reports, made by the supervisor at scrape time."""

    info: dict[str, str]
    cameras: list[CameraSnapshot]
    drops: dict[str, int]
    mqtt: dict[str, Any]
    outbox: OutboxLevel
    health: HealthReport | None = None
    disks: list[DiskStatus] = field(default_factory=list)
    clock: ClockStatus | None = None


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MissingExtraError(
            "prometheus_client",
            "cpu",
            "the metrics endpoint (metrics: in the config)",
            hint="it is a base dependency of edge-stn: reinstall it",
        ) from None
    return prometheus_client


class _Collector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # collected lazily: no duplicate check against the histograms needed

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._snapshot()
        info = GaugeMetricFamily(
            "edge_stn_info", "the running daemon (value 1)", labels=sorted(s.info)
        )
        info.add_metric([s.info[k] for k in sorted(s.info)], 1)
        yield info

        def cam_family(kind: type, name: str, doc: str, attr: str) -> Any:
            fam = kind(name, doc, labels=["camera"])
            for c in s.cameras:
                fam.add_metric([c.camera_id], float(getattr(c, attr)))
            return fam

        yield cam_family(
            GaugeMetricFamily,
            "edge_stn_camera_fps",
            "frames processed per second, over the last seconds",
            "fps",
        )
        yield cam_family(
            CounterMetricFamily,
            "edge_stn_camera_frames_processed",
            "frames the detector processed",
            "processed",
        )
        yield cam_family(
            CounterMetricFamily,
            "edge_stn_camera_frames_read",
            "frames read from the source",
            "frames",
        )
        yield cam_family(
            CounterMetricFamily,
            "edge_stn_camera_frames_dropped",
            "live frames replaced by a newer one before the detector took them",
            "dropped_stale",
        )
        yield cam_family(
            CounterMetricFamily, "edge_stn_camera_read_errors", "failed reads", "read_errors"
        )
        yield cam_family(
            CounterMetricFamily, "edge_stn_camera_reconnects", "source reconnects", "reconnects"
        )
        yield cam_family(
            CounterMetricFamily,
            "edge_stn_camera_stalls",
            "reads that stalled past read_timeout_s",
            "stalls",
        )
        yield cam_family(
            GaugeMetricFamily,
            "edge_stn_camera_finished",
            "1 when the camera ended (a file at its end)",
            "finished",
        )

        drops = CounterMetricFamily(
            "edge_stn_dropped", "results or frames dropped by a daemon stage", labels=["stage"]
        )
        for stage, n in sorted(s.drops.items()):
            drops.add_metric([stage], float(n))
        yield drops

        m = s.mqtt
        yield GaugeMetricFamily(
            "edge_stn_mqtt_connected",
            "1 while an accepted broker connection is up",
            value=float(bool(m.get("connected"))),
        )
        for key, doc in (
            ("connects", "accepted broker connections"),
            ("reconnects", "accepted connections after the first"),
            ("connect_refusals", "CONNACKs refusing the connection (credentials, authorization)"),
            ("connect_failures", "connection attempts that failed before a CONNACK (network, TLS)"),
        ):
            yield CounterMetricFamily(f"edge_stn_mqtt_{key}", doc, value=float(m.get(key, 0)))
        msgs = CounterMetricFamily(
            "edge_stn_mqtt_messages",
            "MQTT messages by kind and outcome (published: handed "
            "to MQTT; acked; refused by the broker; dropped before MQTT)",
            labels=["kind", "outcome"],
        )
        for kind in ("results", "crops", "tracks", "status", "stats"):
            for outcome, n in sorted((m.get(kind) or {}).items()):
                msgs.add_metric([kind, outcome], float(n))
        yield msgs

        o = s.outbox
        yield GaugeMetricFamily(
            "edge_stn_outbox_messages", "messages waiting for the broker", value=float(o.messages)
        )
        yield GaugeMetricFamily(
            "edge_stn_outbox_bytes",
            "bytes the outbox's database uses for what waits for the broker",
            value=float(o.bytes),
        )
        yield GaugeMetricFamily(
            "edge_stn_outbox_fill_ratio",
            "outbox fill, 0..1, of its count or byte bound (the fuller)",
            value=o.percent / 100.0,
        )

        if s.health is not None:
            d = s.health.to_dict()
            yield GaugeMetricFamily(
                "edge_stn_healthy", "1 when /healthz says healthy", value=float(d["healthy"])
            )
            checks = GaugeMetricFamily(
                "edge_stn_health_check", "1 when a health check passes", labels=["check"]
            )
            for name, c in sorted(d["checks"].items()):
                checks.add_metric([name], float(c["ok"]))
            yield checks
        free = GaugeMetricFamily(
            "edge_stn_disk_free_bytes", "free bytes where the daemon writes", labels=["path"]
        )
        low = GaugeMetricFamily(
            "edge_stn_disk_low", "1 when below health.min_free_mb", labels=["path"]
        )
        for disk in s.disks:
            free.add_metric([disk.path], float(disk.free_bytes))
            low.add_metric([disk.path], float(disk.low))
        yield free
        yield low
        if s.clock is not None:
            value = {True: 1.0, False: 0.0, None: -1.0}[s.clock.synchronized]
            yield GaugeMetricFamily(
                "edge_stn_clock_synchronized", "1 synchronised, 0 not, -1 unknown", value=value
            )


class DaemonMetrics:
    """The daemon's registry: latency histograms fed by the stages, the rest collected."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        prom = _prometheus()
        from prometheus_client import CollectorRegistry, Histogram, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.detect_seconds = Histogram(
            "edge_stn_detect_latency_seconds",
            "capture to detector done (detect_ms), per frame",
            ["camera"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "edge_stn_publish_latency_seconds",
            "capture to handed to MQTT (publish_ms), per result",
            ["camera"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_Collector(snapshot))
        self._prom = prom

    def observe_detect(self, camera: str, ms: float) -> None:
        self.detect_seconds.labels(camera).observe(max(0.0, ms) / 1000.0)

    def observe_publish(self, camera: str, ms: float) -> None:
        self.publish_seconds.labels(camera).observe(max(0.0, ms) / 1000.0)

    def exposition(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body, ctype = self.server.metrics.exposition()
                self._send(200, body, ctype)
            elif path == "/healthz":
                doc = self.server.health()
                self._send(
                    200 if doc["healthy"] else 503,
                    json.dumps(doc).encode() + b"\n",
                    "application/json",
                )
            elif path == "/livez":
                doc = self.server.health()
                checks = doc.get("checks", {})
                alive = all(checks.get(k, {}).get("ok", True) for k in LIVENESS_CHECKS)
                live = {
                    "alive": alive and bool(checks),
                    "checks": {k: checks[k] for k in LIVENESS_CHECKS if k in checks},
                }
                self._send(
                    200 if live["alive"] else 503,
                    json.dumps(live).encode() + b"\n",
                    "application/json",
                )
            elif path == "/":
                self._send(
                    200, b"edge-stn: /metrics /healthz /livez\n", "text/plain; charset=utf-8"
                )
            else:
                self._send(
                    404, b"not found: /metrics /healthz /livez\n", "text/plain; charset=utf-8"
                )
        except Exception:  # a bug in a collector must not end the server
            logger.exception("metrics endpoint: %s failed", path)
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics endpoint: " + format, *args)


class MetricsServer(ThreadingHTTPServer):
    """``/metrics`` and ``/healthz`` on a background thread; :meth:`close` stops it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        host: str,
        port: int,
        metrics: DaemonMetrics,
        health: Callable[[], dict[str, Any]],
    ) -> None:
        self.metrics = metrics
        self.health = health
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}", key="metrics"
            ) from None
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edge-stn.metrics",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("metrics: http://%s:%d/metrics and /healthz", self.server_address[0], self.port)

    def close(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join(2.0)
        self.server_close()
