"""One daemon run for a benchmark: ``edge-stn run`` in its own process (so its memory and CPU
are its own, and a PyTorch loaded by the model section cannot inflate them), a real mosquitto,
and a subscriber here that stamps every result when it arrives.

:class:`ResultCollector` subscribes to the device's results (QoS 1, as a consumer would) and
stats; it only records ``(arrival time, topic, payload)`` in paho's callback and parses later, so
the stamp is as close to the arrival as Python allows. :class:`ProcessProbe` reads the daemon's
CPU time and resident memory from ``/proc``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

import edge_stn
from edge_stn.errors import EdgeStnError
from edge_stn.publish.client import disable_nagle

logger = logging.getLogger(__name__)

DEVICE = "bench"
PREFIX = "edge-stn"
HOST = "127.0.0.1"
SAMPLE_S = 0.25


def reduce_to_for(width: int) -> int:
    """The proposals' reduced copy for a frame ``width`` pixels wide: a quarter of it, at least
    the default 320. At 1080p the default 320 (a sixth) loses the thin strokes of digits under
    ~30 px and finds only 3 of the 5 digits per frame: a benchmark that processed fewer objects
    would flatter the daemon."""
    return max(320, width // 4)


STOP_WAIT_S = 10.0


class BenchError(EdgeStnError):
    """A benchmark run failed (a daemon that exited early, a broker that went away)."""

    exit_code = 1


@dataclass(frozen=True)
class Received:
    """One result as the subscriber saw it (times in Unix seconds)."""

    camera: str
    frame_index: int
    capture_ts: float
    infer_ts: float
    publish_ts: float
    recv_ts: float
    detections: int

    @property
    def e2e_ms(self) -> float:
        return (self.recv_ts - self.capture_ts) * 1000.0

    @property
    def detect_ms(self) -> float:
        return (self.infer_ts - self.capture_ts) * 1000.0

    @property
    def publish_ms(self) -> float:
        return (self.publish_ts - self.capture_ts) * 1000.0


class ResultCollector:
    """A paho (MQTT v5) subscriber to one device's results and stats."""

    def __init__(self, port: int, device: str = DEVICE, host: str = HOST) -> None:
        self._raw: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._subscribed = threading.Event()
        self.result_filter = f"{PREFIX}/{device}/cam/+/result"
        self.stats_topic = f"{PREFIX}/{device}/stats"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-stn-bench-{os.getpid()}-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_socket_open = disable_nagle
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(
            [(self.result_filter, 1), (self.stats_topic, 0)]
        )
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise BenchError(f"the benchmark's subscriber could not subscribe on {host}:{port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        with self._lock:
            self._raw.append((now, msg.topic, bytes(msg.payload)))
        if msg.topic != self.stats_topic:
            self._first.set()

    def wait_first_result(self, timeout: float) -> bool:
        return self._first.wait(timeout)

    def count(self) -> int:
        with self._lock:
            return len(self._raw)

    def results(self) -> list[Received]:
        with self._lock:
            raw = list(self._raw)
        out = []
        for recv, topic, payload in raw:
            if topic == self.stats_topic:
                continue
            doc = json.loads(payload)
            out.append(
                Received(
                    camera=doc["camera"],
                    frame_index=int(doc["frame_index"]),
                    capture_ts=float(doc["capture_ts"]),
                    infer_ts=float(doc["infer_ts"]),
                    publish_ts=float(doc["publish_ts"]),
                    recv_ts=recv,
                    detections=len(doc["detections"]),
                )
            )
        return out

    def stats(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            raw = list(self._raw)
        return [(recv, json.loads(p)) for recv, topic, p in raw if topic == self.stats_topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class ProcSample:
    ts: float
    """Unix seconds."""
    cpu_s: float
    """User + system CPU seconds of the process so far."""
    rss_bytes: int
    hwm_bytes: int
    """Peak resident memory so far (VmHWM)."""


class ProcessProbe:
    """CPU time and resident memory of one process, from ``/proc/<pid>`` (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> ProcSample | None:
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            rss = hwm = 0
            with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        # After the ')': state is field 0, utime field 11, stime field 12 (man 5 proc).
        cpu = (int(fields[11]) + int(fields[12])) / self._tick
        return ProcSample(time.time(), cpu, rss, hwm)


@dataclass
class DaemonRun:
    """What one run measured. ``window`` is the measured interval (Unix seconds): for a live run
    from the end of the warm-up to the stop, for a file the whole run."""

    started_ts: float
    first_result_ts: float | None
    exit_code: int | None
    window: tuple[float, float]
    results: list[Received]
    stats: list[tuple[float, dict[str, Any]]]
    samples: list[ProcSample] = field(default_factory=list)

    @property
    def first_result_s(self) -> float | None:
        return None if self.first_result_ts is None else self.first_result_ts - self.started_ts

    def sample_at(self, ts: float) -> ProcSample | None:
        """The last sample taken at or before ``ts`` (the first one if none was)."""
        best = None
        for s in self.samples:
            if s.ts <= ts:
                best = s
        return best or (self.samples[0] if self.samples else None)

    def cpu_percent(self) -> float | None:
        """CPU of the daemon over the window, in percent of one core."""
        a, b = self.sample_at(self.window[0]), self.sample_at(self.window[1])
        if a is None or b is None or b.ts <= a.ts:
            return None
        return 100.0 * (b.cpu_s - a.cpu_s) / (b.ts - a.ts)

    def cpu_ms_per_result(self) -> float | None:
        """The daemon's CPU time over the window per result captured in it."""
        a, b = self.sample_at(self.window[0]), self.sample_at(self.window[1])
        if a is None or b is None or b.ts <= a.ts:
            return None
        n = sum(1 for r in self.results if a.ts <= r.capture_ts < b.ts)
        return 1000.0 * (b.cpu_s - a.cpu_s) / n if n else None

    def cpu_ms_per_frame(self) -> float | None:
        """The daemon's CPU time per frame published, between its first and its last sample
        after the first result (start-up excluded; the frames counted are those captured
        between the two samples)."""
        if self.first_result_ts is None:
            return None
        after = [s for s in self.samples if s.ts >= self.first_result_ts]
        if len(after) < 2:
            return None
        a, b = after[0], after[-1]
        n = sum(1 for r in self.results if a.ts <= r.capture_ts < b.ts)
        return 1000.0 * (b.cpu_s - a.cpu_s) / n if n else None

    def rss_end_bytes(self) -> int | None:
        s = self.sample_at(self.window[1])
        return s.rss_bytes if s else None

    def rss_peak_bytes(self) -> int | None:
        return max((s.hwm_bytes for s in self.samples), default=None)


def daemon_env() -> dict[str, str]:
    """The environment of the daemon process: this one's, with this edge_stn first on the path
    (a source checkout benchmarks itself, not an installed copy)."""
    env = dict(os.environ)
    root = str(Path(edge_stn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def run_daemon(
    folder: Path,
    name: str,
    config: dict[str, Any],
    *,
    port: int,
    live_seconds: float | None = None,
    warmup_s: float = 0.0,
    timeout_s: float = 600.0,
) -> DaemonRun:
    """Run ``edge-stn run`` on ``config`` (written to ``folder/<name>.yaml``).

    ``live_seconds`` None: wait for the daemon to end by itself (files without loop), at most
    ``timeout_s``. Otherwise measure ``live_seconds`` after ``warmup_s`` counted from the first
    result, then stop it with SIGTERM (as a service manager would).
    """
    cfg_path = folder / f"{name}.yaml"
    # Every run gets a fresh outbox of its own: the default one (in the user's state folder)
    # would carry results a stopped run left behind into the next run's measurement.
    outbox = folder / f"{name}-outbox.sqlite"
    for leftover in (outbox, *(outbox.with_name(outbox.name + s) for s in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    config = {**config, "outbox": {**config.get("outbox", {}), "path": str(outbox)}}
    cfg_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    log_path = folder / f"{name}.log"
    collector = ResultCollector(port, config["device_id"])
    samples: list[ProcSample] = []
    try:
        with log_path.open("wb") as log:
            started = time.time()
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge_stn.cli", "run", "--config", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=daemon_env(),
                # Not the caller's folder: `python -m` puts it first on sys.path, and an
                # edge_stn there (another checkout) would be benchmarked instead of this one.
                cwd=folder,
            )
        probe = ProcessProbe(proc.pid)
        try:
            first_ts, window = _supervise(
                proc, probe, samples, collector, started, live_seconds, warmup_s, timeout_s
            )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        time.sleep(0.3)  # the last acknowledgements and results reach the subscriber
        if first_ts is None:
            raise BenchError(
                f"daemon run {name!r} published no result (exit code {proc.returncode}): "
                f"{_log_tail(log_path)}"
            )
        if proc.returncode not in (0, None):
            raise BenchError(
                f"daemon run {name!r} exited with code {proc.returncode}: {_log_tail(log_path)}"
            )
        return DaemonRun(
            started_ts=started,
            first_result_ts=first_ts,
            exit_code=proc.returncode,
            window=window,
            results=collector.results(),
            stats=collector.stats(),
            samples=samples,
        )
    finally:
        collector.close()


def _supervise(
    proc: subprocess.Popen[bytes],
    probe: ProcessProbe,
    samples: list[ProcSample],
    collector: ResultCollector,
    started: float,
    live_seconds: float | None,
    warmup_s: float,
    timeout_s: float,
) -> tuple[float | None, tuple[float, float]]:
    deadline = time.monotonic() + timeout_s
    first_ts: float | None = None
    window_start = window_end = None
    while time.monotonic() < deadline:
        s = probe.sample()
        if s is not None:
            samples.append(s)
        if first_ts is None and collector.wait_first_result(0.0):
            first_ts = min(r.recv_ts for r in collector.results())
            if live_seconds is not None:
                window_start = first_ts + warmup_s
                window_end = window_start + live_seconds
        if proc.poll() is not None:
            break
        now = time.time()
        if window_end is not None and now >= window_end:
            samples.append(probe.sample() or samples[-1])
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                logger.warning("the daemon did not stop within %g s of SIGTERM", STOP_WAIT_S)
            break
        time.sleep(SAMPLE_S)
    else:
        logger.warning("daemon run timed out after %g s", timeout_s)
    end = time.time()
    if window_start is None:
        return first_ts, (started, end)
    return first_ts, (window_start, window_end if window_end is not None else end)
