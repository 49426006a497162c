"""Operations (issue 7, parts 1 and 4): sd_notify over a real unix datagram socket and the
watchdog that stops when a stage hangs; /metrics and /healthz over real HTTP from a running
daemon (real mosquitto, real ONNX Runtime, the synthetic camera); health rules; JSON logs and
the secret filter; disk and clock checks."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until

from edge_stn.config import config_hash, load_config
from edge_stn.ops.health import (
    CameraProgress,
    HealthLimits,
    HealthMonitor,
    Heartbeats,
    OutboxLevel,
)
from edge_stn.ops.host import CLOCK_FLOOR, TIME_ERROR, clock_status, disk_status
from edge_stn.ops.logs import JsonFormatter, SecretFilter
from edge_stn.ops.sdnotify import Notifier
from edge_stn.publish.client import PublisherLimits
from edge_stn.publish.payloads import load_schema

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "edge-stn-dashboard.json"

# ---------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket standing in for systemd's (a short path: sun_path is
    limited to 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def received(sock: socket.socket, seconds: float, until: str | None = None) -> list[str]:
    """Every datagram that arrives within ``seconds`` (or up to the first ``until``)."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until is not None and out[-1].startswith(until):
            break
    return out


def test_notifier_speaks_the_protocol(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_s == 4.0
    assert n.ready("running") and n.watchdog() and n.stopping()
    assert received(sock, 0.3) == ["READY=1\nSTATUS=running", "WATCHDOG=1", "STOPPING=1"]
    assert n.reloading()
    msg = received(sock, 0.3)[0].split("\n")
    assert msg[0] == "RELOADING=1" and msg[1].startswith("MONOTONIC_USEC=")
    # The watchdog belongs to another process: not ours to ping.
    assert (
        Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_s
        is None
    )
    # Outside systemd: a no-op.
    assert not Notifier({}).enabled and not Notifier({}).ready()
    # The manager went away: logged, never raised.
    gone = Notifier({"NOTIFY_SOCKET": path + "-gone"})
    assert gone.ready() is False


def test_notifier_abstract_socket() -> None:
    name = f"edge-stn-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"


def daemon_config(folder: Path, broker: Mosquitto, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "device_id": "gw1",
        "model": {"providers": ["cpu"], "intra_op_threads": 1},
        "cameras": [{"id": "cam0", "source": "synthetic", "fps": 10}],
        "mqtt": {"host": broker.host, "port": broker.port},
        "stats_interval_s": 1,
    }
    doc.update(extra)
    path = folder / "daemon.yaml"
    path.write_text(json.dumps(doc))
    return path


class Running:
    """A daemon running in a background thread (its run loop is the stage supervisor)."""

    def __init__(self, cfg_path: Path, **kw: Any) -> None:
        from edge_stn.daemon import Daemon

        self.daemon = Daemon(load_config(cfg_path), config_path=cfg_path, **kw)
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False})

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


def test_watchdog_is_pinged_only_while_every_stage_is_alive(
    mosquitto: Mosquitto,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    caplog.set_level(logging.INFO, logger="edge_stn")
    run = Running(daemon_config(tmp_path, mosquitto, metrics={"port": 0}), notifier=notifier)
    detector = run.daemon.detector
    release = threading.Event()
    real_finish = detector.finish

    def hung_finish(frames: Any, windows: Any) -> Any:
        if hang.is_set():
            release.wait(30)  # the model call stuck, as a wedged driver would leave it
        return real_finish(frames, windows)

    hang = threading.Event()
    detector.finish = hung_finish  # type: ignore[method-assign]
    with run:
        first = received(sock, 3.0)
        # systemctl status says what a long start-up (a TensorRT build) is doing, then READY
        assert first[0].startswith("STATUS=loading the model "), first
        assert first[1].startswith("READY=1"), first
        assert first.count("WATCHDOG=1") >= 2, first
        hang.set()
        # stage timeout = half the watchdog period (2 s): the pings stop, the hang is named
        assert wait_until(
            lambda: any("detector made no progress" in r.getMessage() for r in caplog.records), 6
        )
        received(sock, 0.3)  # what was in flight
        silent = received(sock, 2.5)
        assert "WATCHDOG=1" not in silent, silent
        assert run.daemon.supervisor.health_document()["checks"]["stages"]["ok"] is False
        server = run.daemon.supervisor.server
        assert server is not None
        code, body = get(f"http://127.0.0.1:{server.port}/livez")
        assert code == 503 and json.loads(body)["checks"]["stages"]["ok"] is False
        release.set()
        assert "WATCHDOG=1" in received(sock, 5.0, until="WATCHDOG=1"), "pings resume"
    assert "STOPPING=1" in "".join(received(sock, 0.5))


# ---------------------------------------------------------------- metrics and /healthz


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def value(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    hits = [
        v for lab, v in metrics.get(name, []) if all(lab.get(k) == w for k, w in labels.items())
    ]
    assert len(hits) == 1, (name, labels, metrics.get(name))
    return hits[0]


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    return status, json.loads(body)


def test_metrics_and_healthz_of_a_running_daemon(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg_path = daemon_config(
        tmp_path,
        mosquitto,
        metrics={"port": 0},
        model={"providers": ["cpu"], "intra_op_threads": 1, "fallback_dir": str(tmp_path / "m")},
        # every disk is "full" below 1 EB free: reported, but not unhealthy
        health={"broker_grace_s": 3, "outbox_max_percent": 50, "min_free_mb": 1e12},
        # the smallest outbox (256 KiB for data): half full within seconds without a broker
        outbox={"max_bytes": "512KiB"},
    )
    sub = Subscriber(mosquitto, ["edge-stn/gw1/status", "edge-stn/gw1/stats"])
    limits = PublisherLimits(reconnect_min_s=1, reconnect_max_s=1)
    run = Running(cfg_path, limits=limits)
    server = run.daemon.supervisor.server
    assert server is not None
    port = server.port
    try:
        with run:
            assert wait_until(lambda: healthz(port)[0] == 200, 15), healthz(port)
            assert wait_until(
                lambda: value(scrape(port), "edge_stn_camera_fps", camera="cam0") > 1, 10
            )
            m = scrape(port)
            assert value(m, "edge_stn_camera_frames_processed_total", camera="cam0") > 0
            assert value(m, "edge_stn_detect_latency_seconds_count", camera="cam0") > 0
            assert value(m, "edge_stn_publish_latency_seconds_count", camera="cam0") > 0
            assert value(m, "edge_stn_mqtt_connected") == 1
            assert value(m, "edge_stn_mqtt_messages_total", kind="results", outcome="acked") > 0
            assert value(m, "edge_stn_outbox_messages") >= 0
            assert value(m, "edge_stn_clock_synchronized") in (1, 0, -1)
            assert value(m, "edge_stn_disk_low", path=str(tmp_path / "m")) == 1
            assert value(m, "edge_stn_healthy") == 1
            assert "process_cpu_seconds_total" in m
            # every metric the example Grafana dashboard queries exists
            dashboard = json.loads(DASHBOARD.read_text())
            exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
            used = set(re.findall(r"\b(?:edge_stn|process)_[a-z_]+", exprs))
            assert len(used) > 10 and used <= set(m), used - set(m)
            (info,) = m["edge_stn_info"]
            # the status message and the metrics tell the same story
            status = wait_until(lambda: sub.on(lambda x: x.topic.endswith("/status")), 5)
            assert status
            online = json.loads(sub.on(lambda x: x.topic.endswith("/status"))[0].payload)
            labels = info[0]
            assert online["state"] == "online"
            assert labels["model_sha256"] == online["model"]["sha256"] == run.daemon.engine.sha256
            assert labels["config_hash"] == online["config_hash"] == config_hash(run.daemon.config)
            assert labels["epoch"] == online["epoch"] and labels["version"] == online["version"]
            code, doc = healthz(port)
            assert code == 200 and doc["healthy"] is True
            assert any(w.startswith(f"disk {tmp_path / 'm'}") for w in doc["warnings"])
            assert wait_until(lambda: sub.on(lambda x: x.topic.endswith("/stats")), 5)
            stats = json.loads(sub.on(lambda x: x.topic.endswith("/stats"))[-1].payload)
            jsonschema.Draft202012Validator(load_schema("stats")).validate(stats)
            assert stats["health"]["healthy"] is True and stats["health"]["warnings"]

            # The broker goes away: the outbox fills first (limit 50 %), then the grace ends.
            mosquitto.stop()
            assert wait_until(lambda: healthz(port)[1]["checks"]["outbox"]["ok"] is False, 10)
            assert wait_until(lambda: healthz(port)[1]["checks"]["broker"]["ok"] is False, 10)
            code, doc = healthz(port)
            assert code == 503 and doc["healthy"] is False
            assert "unreachable for" in doc["checks"]["broker"]["detail"]
            live_code, live = get(f"http://127.0.0.1:{port}/livez")
            assert live_code == 200 and json.loads(live)["alive"] is True  # no restart for that
            assert value(scrape(port), "edge_stn_mqtt_connected") == 0
            mosquitto.start()
            assert wait_until(lambda: healthz(port)[0] == 200, 20), healthz(port)
            assert value(scrape(port), "edge_stn_mqtt_reconnects_total") >= 1
            assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
            assert get(f"http://127.0.0.1:{port}/livez")[0] == 200
    finally:
        sub.close()
    with pytest.raises(OSError):  # the endpoint closed with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_healthz_names_a_camera_without_frames(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from edge_stn.demo import free_port

    dead = f"rtsp://127.0.0.1:{free_port()}/nothing-listens-here"
    cameras = [
        {"id": "cam0", "source": "synthetic", "fps": 10},
        {"id": "door", "source": dead, "open_timeout_s": 1},
    ]
    cfg_path = daemon_config(
        tmp_path, mosquitto, cameras=cameras, metrics={"port": 0}, health={"camera_stale_s": 1}
    )
    run = Running(cfg_path)
    assert run.daemon.supervisor.server is not None
    port = run.daemon.supervisor.server.port
    with run:
        assert wait_until(lambda: healthz(port)[0] == 503, 10)
        code, doc = healthz(port)
        assert code == 503, doc
        detail = doc["checks"]["cameras"]["detail"]
        assert "door" in detail and "cam0" not in detail, detail
        assert doc["checks"]["broker"]["ok"] and doc["checks"]["stages"]["ok"]


def test_metrics_port_in_use_is_a_start_up_error(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from edge_stn.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg_path = daemon_config(tmp_path, mosquitto, metrics={"port": port})
        assert main(["run", "--config", str(cfg_path)]) == 2


# ---------------------------------------------------------------- health rules


def test_health_rules() -> None:
    now = [100.0]
    mon = HealthMonitor(
        HealthLimits(camera_stale_s=10, broker_grace_s=60, outbox_max_percent=90),
        clock=lambda: now[0],
    )
    empty = OutboxLevel(0, 0, 100, 1000)

    def check(**kw: Any) -> dict[str, bool]:
        args: dict[str, Any] = {
            "cameras": [CameraProgress("a", 0, False)],
            "connected": False,
            "outbox": empty,
            "stale_stages": [],
        }
        args.update(kw)
        return {k: c.ok for k, c in mon.observe(**args).checks.items()}

    assert all(check().values())  # at start: benefit of doubt, broker not yet up (grace)
    now[0] = 111.0
    assert check()["cameras"] is False  # no frame for 11 s
    assert check(cameras=[CameraProgress("a", 5, False)])["cameras"] is True
    now[0] = 122.0
    assert check(cameras=[CameraProgress("a", 5, True)])["cameras"] is True  # ended: not counted
    assert check(connected=True, cameras=[CameraProgress("a", 6, False)])["broker"] is True
    now[0] = 181.0
    assert check(cameras=[CameraProgress("a", 7, False)])["broker"] is True  # down 0 s
    now[0] = 242.0
    assert check(cameras=[CameraProgress("a", 8, False)])["broker"] is False  # down 61 s
    assert check(outbox=OutboxLevel(10, 950, 100, 1000))["outbox"] is False  # bytes 95 %
    assert check(outbox=OutboxLevel(89, 0, 100, 1000))["outbox"] is True
    assert check(stale_stages=["publisher"])["stages"] is False
    report = mon.report()
    assert report is not None
    assert report.to_dict(now_mono=report.mono + 11)["checks"]["supervisor"]["ok"] is False


def test_heartbeats() -> None:
    beats = Heartbeats(["a", "b"])
    assert beats.stale(1.0, now=time.monotonic() + 5) == ["a", "b"]
    beats.done("b")
    beats.beat("a")
    assert beats.stale(1.0) == []
    assert beats.stale(1.0, now=time.monotonic() + 5) == ["a"]


def test_clock_and_disk_checks(tmp_path: Path) -> None:
    assert clock_status(now=0.0).synchronized is False  # 1970: a board without an RTC
    assert clock_status(now=CLOCK_FLOOR + 1, kernel_state=lambda: TIME_ERROR).synchronized is False
    assert clock_status(now=CLOCK_FLOOR + 1, kernel_state=lambda: 0).synchronized is True
    assert clock_status(now=CLOCK_FLOOR + 1, kernel_state=lambda: None).synchronized is None
    assert clock_status().synchronized in (True, False, None)  # the real kernel answers
    missing = tmp_path / "not" / "yet"
    (low,) = disk_status([missing, missing], min_free_bytes=1 << 62)
    assert low.low and low.path == str(missing) and 0 < low.free_bytes <= low.total_bytes
    (ok,) = disk_status([tmp_path], min_free_bytes=0)
    assert not ok.low


# ---------------------------------------------------------------- logs


def test_json_logs_mask_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter(["hunter2-secret", "x"]))
    log = logging.getLogger("edge_stn.test_ops")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting with %s to %s", "hunter2-secret", "broker")
        try:
            raise RuntimeError("password hunter2-secret rejected")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [d["level"] for d in lines] == ["warning", "error"]
    assert lines[0]["message"] == "connecting with ********** to broker"
    assert lines[0]["logger"] == "edge_stn.test_ops" and lines[0]["time"].endswith("Z")
    assert "RuntimeError: password ********** rejected" in lines[1]["exc"]
    assert "hunter2-secret" not in stream.getvalue()
