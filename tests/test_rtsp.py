"""Live RTSP cameras against a real RTSP server on loopback (DESIGN §8): GStreamer's RTSP server
serving an H.264 file made by ffmpeg/libx264, read through OpenCV's FFmpeg backend.

Faults are real: the server is frozen (SIGSTOP), killed (SIGKILL) and restarted on its port; a
socket that accepts and never answers stands for a hung camera. Nothing asserts a duration from
above: waits are bounded, and only lower bounds of delays (which load can only lengthen) are
checked.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until
from rtsp_server import RtspServer, SilentListener, transcode_h264, write_h264
from test_video import frame_image, frame_number

from edge_stn.config import CameraConfig, load_config
from edge_stn.records import Frame
from edge_stn.video import Backoff, CameraReader, make_reader

FPS = 25


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture(scope="module")
def numbered_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 frames (9.6 s at 25 fps) of 64x48 H.264, frame ``i`` showing ``i`` in binary."""
    from rtsp_server import require_rtsp

    require_rtsp()
    path = tmp_path_factory.mktemp("rtsp") / "numbered.mp4"
    return write_h264(path, (frame_image(i) for i in range(240)), FPS)


class RecordingBackoff(Backoff):
    """The reader's real backoff, recording (attempt, delay) of every delay it hands out."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.delays: list[tuple[int, float]] = []

    def next_delay(self) -> float:
        attempt = self.attempts
        delay = super().next_delay()
        self.delays.append((attempt, delay))
        return delay


def take(reader: CameraReader, n: int, timeout: float) -> list[Frame]:
    frames: list[Frame] = []
    wait_until(lambda: _take_one(reader, frames) >= n, timeout, 0.0)
    return frames


def _take_one(reader: CameraReader, frames: list[Frame]) -> int:
    frame = reader.get(timeout=0.05)
    if frame is not None:
        frames.append(frame)
    return len(frames)


def test_rtsp_camera_delivers_the_newest_frame(
    rtsp_server_factory: Callable[..., RtspServer], numbered_video: Path, stop: threading.Event
) -> None:
    server = rtsp_server_factory(numbered_video).start()
    cam = CameraConfig(id="rtsp0", source=server.url, open_timeout_s=10, read_timeout_s=3)
    reader = make_reader(cam, stop)
    assert reader.is_live and len(reader.buffer) == 0 and reader.buffer.maxsize == 1
    reader.start()
    first = reader.get(timeout=20)
    assert first is not None, (reader.stats(), server.log())
    assert first.image.shape == (48, 64, 3)
    # One session plays the file from its first frame: the capture counter is the position.
    assert frame_number(first.image) == first.index
    time.sleep(1.0)  # a slow pipeline: about 25 frames arrive meanwhile
    newest = reader.stats().last_index
    second = reader.get(timeout=2)
    assert second is not None and newest is not None
    s = reader.stats()
    assert s.state == "running" and s.dropped_stale > 0, s
    assert second.index - first.index > 1  # stale frames were dropped, not queued
    assert second.index >= newest  # the pipeline gets the newest frame read so far
    assert frame_number(second.image) == second.index % 256
    assert s.read_errors == 0 and s.reconnects == 0 and s.open_errors == 0
    assert server.clients == 1
    stop.set()
    assert reader.join(2.0)


def test_rtsp_stall_kill_and_restart_reconnect_with_backoff(
    rtsp_server_factory: Callable[..., RtspServer], numbered_video: Path, stop: threading.Event
) -> None:
    server = rtsp_server_factory(numbered_video).start()
    backoff = RecordingBackoff(initial=0.1, cap=0.8, jitter=0.25, rng=random.Random(3))
    cam = CameraConfig(id="rtsp0", source=server.url, open_timeout_s=2, read_timeout_s=1)
    reader = make_reader(cam, stop, backoff=backoff)
    reader.start()
    before = take(reader, 5, timeout=20)
    assert len(before) == 5, (reader.stats(), server.log())

    # 1. The server freezes: the connection stays open and goes silent. The stall watchdog
    # (no frame for read_timeout_s) reconnects; opens to the frozen server hit the open timeout.
    server.pause()
    assert wait_until(lambda: reader.stats().stalls >= 1, 20), reader.stats()
    assert wait_until(lambda: reader.stats().open_errors >= 1, 20), reader.stats()
    assert reader.stats().state in ("opening", "reconnecting")

    # 2. It dies: reopens are refused at once and spaced by the capped, jittered backoff.
    server.stop()
    down_from = len(backoff.delays)
    assert wait_until(lambda: len(backoff.delays) >= down_from + 6, 30), reader.stats()
    for attempt, delay in backoff.delays:
        ceiling = min(0.8, 0.1 * 2**attempt)
        assert 0.75 * ceiling - 1e-9 <= delay <= ceiling + 1e-9, (attempt, delay)
    attempts = [a for a, _ in backoff.delays]
    assert attempts == list(range(len(attempts))), "no reset without a good frame"
    capped = [d for a, d in backoff.delays if a >= 3]
    assert len(capped) >= 3 and len(set(capped)) == len(capped), "jittered at the cap"
    assert reader.is_alive() and reader.stats().state in ("opening", "reconnecting")

    # 3. It comes back on the same port: the reader reconnects and frames flow again.
    frames_before = reader.stats().frames
    server.start()
    after = take(reader, 3, timeout=30)
    assert len(after) == 3, (reader.stats(), server.log())
    s = reader.stats()
    assert s.state == "running" and s.frames > frames_before
    assert s.reconnects == len(backoff.delays) and s.stalls >= 1
    assert s.open_errors >= 6 and s.read_errors >= 1
    # A new session restarts the file, but the capture counter never goes back.
    indices = [f.index for f in before + after]
    assert indices == sorted(set(indices))
    assert frame_number(after[-1].image) < after[-1].index
    assert backoff.attempts == 0, "a good frame resets the backoff"
    assert server.clients >= 2
    stop.set()
    assert reader.join(3.0)


def test_rtsp_open_timeout_is_honoured_and_counted(
    silent_listener: SilentListener, stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    cam = CameraConfig(
        id="hung", source=silent_listener.url(), open_timeout_s=1.0, read_timeout_s=1.0
    )
    reader = make_reader(cam, stop, backoff=Backoff(initial=0.05, cap=0.1))
    with caplog.at_level(logging.WARNING, logger="edge_stn.video.reader"):
        reader.start()
        assert wait_until(lambda: reader.stats().open_errors >= 2, 20), reader.stats()
    s = reader.stats()
    assert s.frames == 0 and s.reconnects >= 1 and reader.is_alive()
    waited = [float(m) for m in re.findall(r"cannot open .* \(after ([0-9.]+) s", caplog.text)]
    assert waited and all(w >= 0.9 for w in waited), caplog.text  # the open timeout, not less
    assert "(attempt 1)" in caplog.text and "hung" in caplog.text
    stop.set()
    assert reader.join(3.0)  # an open in progress ends by its own timeout


# ---------------------------------------------------------------- the daemon


DEVICE = "gw-rtsp"
SCENE_FRAMES = 60


def _daemon_config(folder: Path, broker: Mosquitto, cameras: list[dict[str, Any]]) -> Path:
    doc = {
        "device_id": DEVICE,
        "cameras": cameras,
        "mqtt": {"host": broker.host, "port": broker.port},
        "stats_interval_s": 1,
    }
    path = folder / "daemon.yaml"
    path.write_text(json.dumps(doc))
    return path


def _results(sub: Subscriber, camera: str) -> list[dict[str, Any]]:
    return [
        json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith(f"/cam/{camera}/result"))
    ]


def _last_stats(sub: Subscriber) -> dict[str, Any] | None:
    docs = sub.on(lambda m: m.topic.endswith("/stats"))
    return json.loads(docs[-1].payload) if docs else None


def test_daemon_publishes_an_rtsp_camera_and_survives_dead_ones(
    mosquitto: Mosquitto,
    rtsp_server_factory: Callable[..., RtspServer],
    silent_listener: SilentListener,
    tmp_path: Path,
) -> None:
    """An RTSP camera of digits end to end through a real broker, beside a camera whose server
    never answers (open timeout) and one with nothing listening (refused): those two are
    retried and counted, and the good one goes on."""
    pytest.importorskip("onnxruntime")
    from edge_stn.accuracy import score
    from edge_stn.daemon import Daemon
    from edge_stn.demo import free_port
    from edge_stn.video.synth_video import write_synthetic_video

    scene = write_synthetic_video(
        tmp_path / "scene.mp4", tmp_path / "scene.json", frames=SCENE_FRAMES, fps=15, seed=5
    )
    video = transcode_h264(scene.video, tmp_path / "scene-h264.mp4")
    truth = json.loads(scene.truth.read_text())
    server = rtsp_server_factory(video, path="/digits").start()
    cfg_path = _daemon_config(
        tmp_path,
        mosquitto,
        [
            {"id": "gate", "source": server.url, "open_timeout_s": 10, "read_timeout_s": 3},
            {"id": "hung", "source": silent_listener.url(), "open_timeout_s": 1},
            {"id": "gone", "source": f"rtsp://127.0.0.1:{free_port()}/x", "open_timeout_s": 1},
        ],
    )
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()
    try:

        def dead_ones_counted() -> bool:
            doc = _last_stats(sub)
            return doc is not None and all(
                doc["cameras"][c]["open_errors"] >= 2 for c in ("hung", "gone")
            )

        assert wait_until(lambda: len(_results(sub, "gate")) >= 20, 60), daemon.stats_document()
        assert wait_until(dead_ones_counted, 30), _last_stats(sub)
    finally:
        daemon.request_stop()
        runner.join(15)
        sub.close()
    assert not runner.is_alive()
    results = _results(sub, "gate")
    assert not _results(sub, "hung") and not _results(sub, "gone")
    stats = _last_stats(sub)
    assert stats is not None and stats["cameras"]["gate"]["live"] is True
    assert stats["cameras"]["hung"]["frames"] == 0 and stats["cameras"]["gone"]["frames"] == 0

    # The first session plays the file from frame 0 and the capture counter is the position,
    # so the results of that session can be scored against the file's ground truth.
    by_index = {f["frame_index"]: f["objects"] for f in truth["frames"]}
    scored = [r for r in results if r["frame_index"] < SCENE_FRAMES]
    assert len(scored) >= 10
    acc = score(
        (
            [(d["label"], d["box"]) for d in r["detections"]],
            [(str(o["label"]), o["box"]) for o in by_index[r["frame_index"]]],
        )
        for r in scored
    )
    print(f"rtsp camera: {acc.line()}")
    assert acc.recall is not None and acc.recall >= 0.8, acc.line()
    assert acc.precision is not None and acc.precision >= 0.8, acc.line()
    assert np.all(np.diff([r["seq"] for r in sorted(results, key=lambda r: r["seq"])]) == 1)
