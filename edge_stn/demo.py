"""``edge-stn demo``: the whole product on one machine, with nothing to set up but mosquitto.

A private mosquitto on a free loopback port (config, log and nothing else in a temporary
folder), the daemon in this process on the settings of ``configs/demo.yaml`` (a synthetic camera
of moving digits, the bundled demo model), and a paho (MQTT v5) subscriber that prints a live
line every second, writes the received canonical crops to ``--out``, and at the end scores what
arrived against the synthetic camera's ground truth (:mod:`edge_stn.accuracy`).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_stn.accuracy import Accuracy, RotationError, score_with_pose
from edge_stn.config import load_config
from edge_stn.errors import EdgeStnError
from edge_stn.publish.topics import parse_topic

DEVICE = "demo"
CAMERA = "cam0"
PREFIX = "edge-stn"
HOST = "127.0.0.1"
INSTALL_HINT = "mosquitto is not installed: install it: sudo apt-get install mosquitto"

DEMO_CONFIG = """\
# Written by `edge-stn demo`: the settings of configs/demo.yaml on a private broker.
device_id: {device}
cameras:
  - id: {camera}
    source: synthetic
mqtt:
  host: {host}
  port: {port}
outbox:
  path: {outbox}  # the demo's private folder: nothing is left behind
stats_interval_s: 5
"""


def find_mosquitto() -> str:
    """The mosquitto binary, or an :class:`EdgeStnError` saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    raise EdgeStnError(INSTALL_HINT)


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port != 1883:
            return port


def stop_process(proc: subprocess.Popen[Any], *, kill: bool = False) -> None:
    """SIGKILL or SIGTERM a child that still runs, and reap it (SIGKILL after 5 s of SIGTERM)."""
    if proc.poll() is not None:
        return
    if kill:
        proc.kill()
    else:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class PrivateBroker:
    """A mosquitto on a free loopback port, anonymous, without persistence."""

    def __init__(self, folder: Path) -> None:
        self.binary = find_mosquitto()
        self.port = free_port()
        self.folder = folder
        self.log_path = folder / "mosquitto.log"
        conf = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            "persistence false",
            "set_tcp_nodelay true",  # no Nagle delays (up to 40 ms) on results
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:  # as root, mosquitto would switch to a 'mosquitto' user
            lines.append(f"user {getpass.getuser()}")
        conf.write_text("\n".join(lines) + "\n")
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EdgeStnError(
                    f"mosquitto exited with code {self.proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace').strip()[-300:]}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EdgeStnError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout:g} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


@dataclass
class _Received:
    """What the demo's subscriber saw (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    results: list[dict[str, Any]] = field(default_factory=list)
    publish_ms: list[float] = field(default_factory=list)
    crops: int = 0
    crop_bytes: int = 0
    status: list[str] = field(default_factory=list)
    stats: int = 0


class DemoSubscriber:
    """A paho v5 client on the demo device's topics; crops go to ``out``."""

    def __init__(self, port: int, out: Path) -> None:
        self.out = out
        self.seen = _Received()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-stn-demo-subscriber-{os.getpid()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/{DEVICE}/#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise EdgeStnError(f"the demo subscriber could not subscribe on {HOST}:{port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(PREFIX, msg.topic)
        if parsed is None:
            return
        seen = self.seen
        if parsed.kind == "result":
            doc = json.loads(msg.payload)
            with seen.lock:
                seen.results.append(doc)
                seen.publish_ms.append(1000.0 * (doc["publish_ts"] - doc["capture_ts"]))
        elif parsed.kind == "crop":
            name = f"{parsed.result_id}-{parsed.index}.jpg"
            (self.out / name).write_bytes(msg.payload)
            with seen.lock:
                seen.crops += 1
                seen.crop_bytes += len(msg.payload)
        elif parsed.kind == "status":
            with seen.lock:
                seen.status.append(json.loads(msg.payload)["state"])
        elif parsed.kind == "stats":
            with seen.lock:
                seen.stats += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def demo_accuracy(results: list[dict[str, Any]], fps: float) -> tuple[Accuracy, RotationError]:
    """Score received results against the synthetic camera's truth of the same frame index
    (the scene depends only on seed, settings and index: a fresh camera gives the truth), and
    how upright the matched canonical crops are."""
    from edge_stn.video.synthetic import SyntheticCamera

    truth_camera = SyntheticCamera(CAMERA, fps=fps)
    return score_with_pose(
        (
            [(d["label"], d["box"], d["affine"]) for d in doc["detections"]],
            [(str(o.label), o.box, o.angle) for o in truth_camera.objects(doc["frame_index"])],
        )
        for doc in results
    )


def run_demo(seconds: float = 20.0, out: Path = Path("demo-out")) -> int:
    """Run the demo for ``seconds``; prints live lines and a summary; returns 0."""
    find_mosquitto()  # before anything heavy: the one thing a fresh machine may lack
    from edge_stn.daemon import Daemon
    from edge_stn.video.synthetic import DEFAULT_FPS

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-stn-demo-") as tmp:
        folder = Path(tmp)
        broker = PrivateBroker(folder)
        broker.start()
        subscriber: DemoSubscriber | None = None
        try:
            config_path = folder / "demo.yaml"
            config_path.write_text(
                DEMO_CONFIG.format(
                    device=DEVICE,
                    camera=CAMERA,
                    host=HOST,
                    port=broker.port,
                    outbox=folder / "outbox.sqlite",
                )
            )
            cfg = load_config(config_path)
            fps = cfg.cameras[0].fps or DEFAULT_FPS
            subscriber = DemoSubscriber(broker.port, out)
            print(
                f"edge-stn demo: broker {HOST}:{broker.port}, synthetic camera {fps:g} fps, "
                f"bundled model, {seconds:g} s; crops -> {out}/",
                flush=True,
            )
            daemon = Daemon(cfg, config_path=config_path)
            runner = threading.Thread(
                target=daemon.run,
                kwargs={"install_signals": False},
                name="edge-stn.demo-daemon",
                daemon=True,
            )
            t0 = time.monotonic()
            runner.start()
            try:
                _live(subscriber, t0, seconds)
            except KeyboardInterrupt:
                print("interrupted: stopping", flush=True)
            daemon.request_stop()
            runner.join(10)
            time.sleep(0.3)  # the retained 'offline' and the last acks reach the subscriber
            elapsed = time.monotonic() - t0
            _summary(subscriber, daemon, elapsed, fps)
        finally:
            if subscriber is not None:
                subscriber.close()
            broker.stop()
    return 0


def _live(subscriber: DemoSubscriber, t0: float, seconds: float) -> None:
    seen = subscriber.seen
    last_n, last_t = 0, t0
    next_tick = t0 + 1.0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            return
        time.sleep(max(0.0, min(next_tick, t0 + seconds) - now))
        next_tick += 1.0
        now = time.monotonic()
        with seen.lock:
            n = len(seen.results)
            dets = sum(len(r["detections"]) for r in seen.results)
            recent = seen.publish_ms[-50:]
            crops = seen.crops
        fps = (n - last_n) / max(1e-6, now - last_t)
        last_n, last_t = n, now
        print(
            f"[{now - t0:5.1f} s] {fps:5.1f} fps  results {n:5d}  detections {dets:5d}  "
            f"crops {crops:5d}  publish p50 {_fmt_ms(_median(recent))}",
            flush=True,
        )


def _summary(subscriber: DemoSubscriber, daemon: Any, elapsed: float, fps: float) -> None:
    seen = subscriber.seen
    with seen.lock:
        results = sorted(seen.results, key=lambda r: r["seq"])
        publish_ms = list(seen.publish_ms)
        crops, crop_bytes, status = seen.crops, seen.crop_bytes, list(seen.status)
        stats = seen.stats
    seqs = [r["seq"] for r in results]
    gaps = (seqs[-1] - seqs[0] + 1 - len(set(seqs))) if seqs else 0
    ms = sorted(publish_ms)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))] if ms else None
    acc, rot = demo_accuracy(results, fps)
    counters = daemon.publisher.counters()
    print("summary:")
    print(
        f"  results  {len(results)} in {elapsed:.1f} s ({len(results) / max(elapsed, 1e-6):.1f} "
        f"fps), seq gaps {gaps}, detections {sum(len(r['detections']) for r in results)}"
    )
    print(f"  crops    {crops} received ({crop_bytes / 1024:.0f} KiB) in {subscriber.out}/")
    print(f"  latency  publish_ms p50 {_fmt_ms(_median(ms))}, p90 {_fmt_ms(p90)}")
    print(
        f"  daemon   camera frames dropped (stale) {daemon.readers[0].stats().dropped_stale}, "
        f"result queue drops {daemon.queue_drops}, results dropped {counters.results.dropped}, "
        f"stats messages {stats}, status {' -> '.join(status) or 'none'}"
    )
    print(f"  accuracy {acc.line()}")
    if rot.n:
        print(f"  pose     canonical crops: {rot.line()}")
