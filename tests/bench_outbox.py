"""The outbox's share of the latency budget: the daemon on the synthetic camera against a real
mosquitto on loopback, once per outbox mode (synchronous=full, synchronous=normal, in memory).

    PYTHONPATH=. python tests/bench_outbox.py --seconds 20 --cameras 1

Per mode: commit_ms (one outbox transaction of new results, fsync included), outbox_ms (a
result's publish_ts to its hand-over to paho: commit plus queueing), detect_ms, publish_ms and
e2e_ms (a subscriber's receive time - capture_ts), as p50 / p90 / p99 over the run. A
measurement, not a test (speed lives in benchmarks: DESIGN §8); numbers depend on the disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mqtt_broker import Mosquitto

from edge_stn.config import parse_config
from edge_stn.daemon import Daemon


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p * len(xs)) - 1))] if xs else float("nan")


def summary(xs: list[float]) -> str:
    return f"{pct(xs, 0.5):7.2f} {pct(xs, 0.9):7.2f} {pct(xs, 0.99):7.2f}"


def run(mode: str, broker: Mosquitto, folder: Path, seconds: float, cameras: int) -> dict[str, Any]:
    outbox: dict[str, Any] = {"path": str(folder / f"{mode}.outbox")}
    if mode == "memory":
        outbox = {"enabled": False}
    else:
        outbox["synchronous"] = mode
    cfg = parse_config(
        {
            "device_id": f"bench-{mode}",
            "cameras": [{"id": f"cam{i}", "source": "synthetic"} for i in range(cameras)],
            "mqtt": {"host": broker.host, "port": broker.port},
            "outbox": outbox,
            "stats_interval_s": 3600,  # the latency windows are read here, at the end
        }
    )
    e2e: list[float] = []
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        doc = json.loads(msg.payload)
        with lock:
            e2e.append((now - doc["capture_ts"]) * 1000.0)

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"edge-stn/bench-{mode}/cam/+/result", qos=1)
    sub.loop_start()
    daemon = Daemon(cfg)
    pub = daemon.publisher
    runner = threading.Thread(
        target=daemon.run, kwargs={"install_signals": False, "duration_s": seconds}
    )
    runner.start()
    runner.join(seconds + 20)
    time.sleep(0.5)
    sub.disconnect()
    sub.loop_stop()
    lat = pub.latency_samples()
    return {
        "mode": mode,
        "results": pub.counters().results.acked,
        "commit_ms": lat["commit_ms"],
        "outbox_ms": lat["outbox_ms"],
        "detect_ms": daemon._detect_ms.drain(),
        "publish_ms": daemon._publish_ms.drain(),
        "e2e_ms": e2e,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cameras", type=int, default=1)
    ap.add_argument("--modes", default="full,normal,memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-stn-bench-") as tmp:
        folder = Path(tmp)
        broker = Mosquitto(folder / "broker").start()
        try:
            rows = [
                run(m, broker, folder, args.seconds, args.cameras) for m in args.modes.split(",")
            ]
        finally:
            broker.stop()
    print(
        f"{args.cameras} synthetic camera(s) at 15 fps, {args.seconds:g} s per mode; p50 p90 p99 (ms)"
    )
    for r in rows:
        print(f"{r['mode']:>7}: {r['results']} results acknowledged")
        for key in ("commit_ms", "outbox_ms", "detect_ms", "publish_ms", "e2e_ms"):
            if r[key]:
                print(f"         {key:<10} {summary(r[key])}   (n={len(r[key])})")
        if r["commit_ms"] and r["e2e_ms"]:
            share = statistics.median(r["commit_ms"]) / statistics.median(r["e2e_ms"])
            print(f"         commit p50 / e2e p50 = {100 * share:.1f} %")


if __name__ == "__main__":
    main()
