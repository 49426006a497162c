"""Frame sources and reader threads (edge_stn.video) on real files written by OpenCV.

Live-source behaviour is tested with the synthetic camera (a real wall-clock source), an
unreachable rtsp:// URL (real FFmpeg open failures) and, where a stream has to break or hang on
cue, a fake USB capture. Nothing here asserts timing: pacing is tested on a fake clock.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_stn import cli
from edge_stn.config import CameraConfig
from edge_stn.data.scenes import INK_THRESHOLD
from edge_stn.errors import FrameReadError, SourceError
from edge_stn.records import Frame
from edge_stn.video import (
    Backoff,
    CameraReader,
    FileSource,
    FrameBuffer,
    FrameSource,
    LiveSource,
    MotionSettings,
    MovingDigits,
    Pacer,
    SyntheticCamera,
    make_reader,
    make_source,
)
from edge_stn.video.factory import file_camera_problems
from edge_stn.video.opencv import FFMPEG_OPTIONS_ENV, _CaptureOptions, ffmpeg_options
from edge_stn.video.synthetic import load_digit_asset

W, H = 64, 48


def frame_image(i: int) -> np.ndarray:
    """Frame ``i`` of a test video: noise on top (so packets are not tiny) and ``i`` in binary
    below, one 8x8 block per bit, coarse enough to survive lossy coding."""
    img = np.full((H, W, 3), 0, np.uint8)
    img[: H // 2] = np.random.default_rng(i).integers(0, 255, (H // 2, W, 3), dtype=np.uint8)
    for bit in range(8):
        if i >> bit & 1:
            img[32:40, 8 * bit : 8 * bit + 8] = 255
    return img


def frame_number(img: np.ndarray) -> int:
    blocks = img[33:39].reshape(6, 8, 8, 3)[:, :, 1:7].mean(axis=(0, 2, 3))
    return sum(1 << bit for bit in range(8) if blocks[bit] > 128)


def write_video(path: Path, n: int, fourcc: str = "mp4v") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), 10, (W, H))
    assert writer.isOpened()
    for i in range(n):
        writer.write(frame_image(i))
    writer.release()
    return path


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def drain(reader: CameraReader, limit: int = 1000, timeout: float = 10.0) -> list[Frame]:
    """Every frame until the camera finishes (or ``limit`` frames)."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < limit and not reader.finished and time.monotonic() < deadline:
        f = reader.get(timeout=0.2)
        if f is not None:
            frames.append(f)
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """The stop event; set at teardown so no reader outlives its test."""
    event = threading.Event()
    yield event
    event.set()


def file_reader(path: Path, stop: threading.Event, **kw: Any) -> CameraReader:
    return CameraReader("cam0", lambda: FileSource("cam0", path), stop, **kw)


def fast_backoff() -> Backoff:
    return Backoff(initial=0.02, cap=0.05, rng=random.Random(0))


# ---------------------------------------------------------------- files


def test_file_delivers_every_frame_in_order_then_ends(tmp_path: Path, stop: threading.Event):
    video = write_video(tmp_path / "v.mp4", 25)
    reader = file_reader(video, stop, queue_size=2)  # a small buffer: the reader must wait
    reader.start()
    time.sleep(0.1)  # let it fill the buffer and block
    frames = drain(reader)
    assert [f.index for f in frames] == list(range(25))
    assert [frame_number(f.image) for f in frames] == list(range(25))
    assert all(f.camera_id == "cam0" and f.image.shape == (H, W, 3) for f in frames)
    assert all(a.capture_ts <= b.capture_ts for a, b in itertools.pairwise(frames))
    assert reader.join(1.0)
    s = reader.stats()
    assert (s.state, s.frames, s.read_errors, s.dropped_stale) == ("ended", 25, 0, 0)
    assert s.last_index == 24 and s.last_frame_ts == frames[-1].capture_ts
    assert reader.get(timeout=0.01) is None and reader.finished


def test_file_loop_restarts_frame_index(tmp_path: Path, stop: threading.Event):
    video = write_video(tmp_path / "v.mp4", 5)
    reader = file_reader(video, stop, on_end="loop")
    reader.start()
    frames = drain(reader, limit=13)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4] * 2 + [0, 1, 2]
    assert [frame_number(f.image) for f in frames] == [f.index for f in frames]
    assert reader.stats().loops >= 2
    stop.set()
    assert reader.join(1.0)
    assert reader.stats().state == "stopped"


def test_missing_or_unreadable_file_is_a_clear_source_error(tmp_path: Path, stop: threading.Event):
    missing = tmp_path / "nope.mp4"
    source = make_source(CameraConfig(id="cam1", source=str(missing)))  # checked at open
    with pytest.raises(SourceError, match=r"nope\.mp4: camera cam1: no such video file"):
        source.open()
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video\n")
    with pytest.raises(SourceError, match="OpenCV cannot read this video"):
        FileSource("cam0", junk).open()
    good = write_video(tmp_path / "v.mp4", 2)
    cameras = [
        CameraConfig(id=name, source=str(path))
        for name, path in (("a", missing), ("b", junk), ("c", good), ("d", tmp_path))
    ]
    problems = file_camera_problems([*cameras, CameraConfig(id="live", source="synthetic")])
    assert sorted(problems) == ["a", "b", "d"]
    assert "no such video file" in str(problems["a"]) and "not a file" in str(problems["d"])
    # In a reader the failure ends the camera, counted; nothing escapes the thread.
    for path in (junk, missing):
        reader = file_reader(path, stop)
        reader.start()
        assert reader.join(2.0)
        s = reader.stats()
        assert (s.state, s.open_errors, s.frames) == ("failed", 1, 0) and reader.finished


def test_corrupt_frames_mid_file_are_counted_and_survived(tmp_path: Path, stop: threading.Event):
    data = bytearray(write_video(tmp_path / "v.mp4", 20).read_bytes())
    at = len(data) // 2
    data[at : at + 3000] = bytes(3000)  # a few frames' worth of packets zeroed
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    reader = file_reader(bad, stop)
    reader.start()
    frames = drain(reader)
    assert reader.join(1.0)
    s = reader.stats()
    assert s.state == "ended" and s.read_errors >= 1
    # A corrupt frame keeps its number, so every frame after it keeps its position.
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] == 19
    assert len(frames) + s.read_errors == 20
    assert all(abs(frame_number(f.image) - f.index) <= 1 for f in frames)


def test_truncated_file_ends_early_with_an_error(tmp_path: Path, stop: threading.Event):
    data = write_video(tmp_path / "v.avi", 20, "MJPG").read_bytes()  # AVI: readable when cut
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    reader = file_reader(cut, stop)
    reader.start()
    frames = drain(reader)
    assert reader.join(1.0)
    s = reader.stats()
    assert 3 <= len(frames) < 20 and [f.index for f in frames] == list(range(len(frames)))
    assert (s.state, s.read_errors) == ("ended", 1)


# ---------------------------------------------------------------- live sources


def test_live_source_keeps_only_the_newest_frame(stop: threading.Event):
    settings = MotionSettings(count=1, clutter=0)
    reader = CameraReader(
        "syn",
        lambda: SyntheticCamera("syn", width=W, height=H, fps=100, settings=settings),
        stop,
    )
    reader.start()
    first = reader.get(timeout=5)
    assert first is not None
    time.sleep(0.3)  # a slow pipeline: about 30 frames come meanwhile
    newest = reader.stats().last_index
    second = reader.get(timeout=1)
    assert second is not None and newest is not None
    s = reader.stats()
    assert s.dropped_stale > 0 and s.state == "running"
    assert second.index - first.index > 1  # stale frames were dropped, not queued
    assert second.index >= newest - 1  # what the pipeline gets is the newest frame
    assert len(reader.buffer) <= 1
    stop.set()
    assert reader.join(1.0)


def test_unreachable_stream_is_retried_with_backoff(stop: threading.Event):
    options_before = os.environ.get(FFMPEG_OPTIONS_ENV)
    url = f"rtsp://127.0.0.1:{free_port()}/x"
    cam = CameraConfig(id="rtsp1", source=url, open_timeout_s=0.5, read_timeout_s=0.5)
    reader = make_reader(cam, stop, backoff=fast_backoff())
    assert isinstance(reader._source, LiveSource) and reader.is_live
    reader.start()
    assert wait_for(lambda: reader.stats().reconnects >= 2)
    assert reader.is_alive()
    assert reader.stats().state in ("opening", "reconnecting") and reader.stats().frames == 0
    stop.set()
    assert reader.join(1.0)
    assert reader.stats().state == "stopped" and reader.finished
    # The transport goes through a process-wide variable, set only while opening.
    assert os.environ.get(FFMPEG_OPTIONS_ENV) == options_before


def test_missing_usb_camera_is_counted_and_retried(stop: threading.Event):
    index = next(i for i in range(63, 0, -1) if not Path(f"/dev/video{i}").exists())
    reader = make_reader(CameraConfig(id="usb9", source=index), stop, backoff=fast_backoff())
    reader.start()
    assert wait_for(lambda: reader.stats().open_errors >= 3)
    s = reader.stats()
    assert s.frames == 0 and s.reconnects >= 2 and reader.is_alive() and not reader.finished
    stop.set()
    assert reader.join(1.0)


class MjpegCamera:
    """An IP camera on loopback: MJPEG over HTTP (``multipart/x-mixed-replace``), 100 fps.
    Each connection gets ``frames`` frames, then the server closes it (``end="close"``) or goes
    silent with the connection open (``end="hang"``) until the test ends."""

    def __init__(self, frames: int, end: str) -> None:
        self.frames, self.end = frames, end
        self.connections = 0
        self.done = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(camera.frames):
                        jpeg = cv2.imencode(".jpg", frame_image(i))[1].tobytes()
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                        self.wfile.write(head.encode() + b"\r\n\r\n" + jpeg + b"\r\n")
                        self.wfile.flush()
                        if camera.done.wait(0.01):
                            return
                except OSError:  # the reader hung up
                    return
                if camera.end == "hang":
                    camera.done.wait(10)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.done.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mjpeg_camera() -> Iterator[Callable[[int, str], MjpegCamera]]:
    made: list[MjpegCamera] = []

    def make(frames: int, end: str) -> MjpegCamera:
        made.append(MjpegCamera(frames, end))
        return made[-1]

    yield make
    for camera in made:
        camera.close()


@pytest.mark.parametrize("end", ["close", "hang"])
def test_http_camera_that_drops_or_stalls_is_reconnected(
    end: str, mjpeg_camera: Callable[[int, str], MjpegCamera], stop: threading.Event
):
    camera = mjpeg_camera(10, end)
    cfg = CameraConfig(id="ip0", source=camera.url, open_timeout_s=2, read_timeout_s=0.3)
    reader = make_reader(cfg, stop, backoff=fast_backoff())
    reader.start()
    seen: list[int] = []

    def frames_after_a_reconnect() -> bool:
        frame = reader.poll()
        if frame is not None:
            seen.append(frame.index)
        return reader.stats().reconnects >= 1 and bool(seen) and seen[-1] >= 10

    assert wait_for(frames_after_a_reconnect, timeout=10), reader.stats()
    s = reader.stats()
    assert camera.connections >= 2 and s.state == "running" and reader.is_alive()
    assert seen == sorted(set(seen))  # the capture counter goes on across reconnects
    if end == "hang":  # no frame within the read timeout: the stall watchdog reconnected
        assert s.stalls >= 1
    else:  # the server hung up: reads fail at once, and the reader reconnects
        assert s.read_errors >= 1
    stop.set()
    assert reader.join(1.0)


class FakeUsbCamera:
    """A USB capture at 200 fps that gives ``frames`` frames, then fails each read after
    ``fail_s`` (as a read timeout does), or blocks until ``hang`` is set."""

    def __init__(
        self, frames: int, fail_s: float = 0.0, hang: threading.Event | None = None
    ) -> None:
        self.left = frames
        self.fail_s = fail_s
        self.hang = hang

    def isOpened(self) -> bool:
        return True

    def read(self, image: Any = None, /) -> tuple[bool, Any]:
        if self.left > 0:
            self.left -= 1
            time.sleep(0.005)
            return True, np.zeros((H, W, 3), np.uint8)
        if self.hang is not None:
            self.hang.wait(10)
        time.sleep(self.fail_s)
        return False, None

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


def test_watchdog_abandons_a_read_stuck_in_c(stop: threading.Event):
    hang = threading.Event()
    stuck = LiveSource("usb0", 0, capture_factory=lambda: FakeUsbCamera(2, hang=hang))
    fresh = LiveSource("usb0", 0, capture_factory=lambda: FakeUsbCamera(1000))
    sources = iter([stuck, fresh])
    reader = CameraReader("usb0", lambda: next(sources), stop, stuck_s=0.2)
    reader.start()
    old_thread = reader._thread
    assert wait_for(lambda: reader.stats().frames == 2)
    assert not reader.watchdog()  # not stuck long enough yet
    assert wait_for(reader.watchdog, timeout=3)
    assert reader.stats().stalls == 1 and reader._thread is not old_thread
    assert reader._thread is not None and reader._thread.name == "edge-stn.reader:usb0"
    frame = reader.get(timeout=2)
    if frame is not None and frame.index == 1:  # the old thread's last frame, still queued
        frame = reader.get(timeout=2)
    assert frame is not None and frame.index >= 2  # the capture counter went on
    hang.set()  # the abandoned thread returns from its "C call", sees it is stale, and exits
    assert old_thread is not None
    old_thread.join(2)
    assert not old_thread.is_alive() and reader.is_alive()


class BrokenSource(FrameSource):
    """A live source with a bug: every read raises something that is not a SourceError."""

    is_live = True
    camera_id = "bad"
    description = "broken"

    def open(self) -> None:
        pass

    def read(self) -> Frame | None:
        raise cv2.error("boom")

    def close(self) -> None:
        pass


def test_a_failing_camera_never_raises_out_of_its_thread(stop: threading.Event):
    reader = CameraReader("bad", BrokenSource, stop, backoff=fast_backoff())
    reader.start()
    assert wait_for(lambda: reader.stats().reconnects >= 1)
    assert reader.is_alive() and reader.stats().read_errors >= 3


def test_stop_event_ends_every_reader_within_a_second(tmp_path: Path):
    stop = threading.Event()
    video = write_video(tmp_path / "v.mp4", 10)
    readers = [
        file_reader(video, stop, queue_size=1),  # blocked on its full buffer
        CameraReader("syn", lambda: SyntheticCamera("syn", width=W, height=H), stop),
        make_reader(
            CameraConfig(id="down", source=f"rtsp://127.0.0.1:{free_port()}/x"),
            stop,
            backoff=Backoff(initial=5, cap=5),  # waiting out a long backoff
        ),
    ]
    for r in readers:
        r.start()
    assert wait_for(lambda: all(r.stats().state != "idle" for r in readers))
    assert wait_for(lambda: len(readers[0].buffer) == 1 and readers[1].stats().frames > 0)
    names = {t.name for t in threading.enumerate()}
    assert {"edge-stn.reader:cam0", "edge-stn.reader:syn", "edge-stn.reader:down"} <= names
    stop.set()
    assert all(r.join(1.0) for r in readers), [r.stats() for r in readers]
    assert all(r.stats().state == "stopped" for r in readers)


# ---------------------------------------------------------------- synthetic camera


def test_synthetic_scene_is_a_function_of_seed_and_index():
    a, b = MovingDigits(160, 120, seed=3), MovingDigits(160, 120, seed=3)
    np.testing.assert_array_equal(a.scene(7).image, b.scene(7).image)
    assert a.scene(7).objects == b.scene(7).objects
    assert not np.array_equal(a.scene(7).image, MovingDigits(160, 120, seed=4).scene(7).image)
    assert a.placements(7) != a.placements(8)  # the digits move
    n = len(a.scene(0).objects)
    assert 1 <= n <= 4 and len(a.scene(9).objects) == n  # one segment keeps its digits
    assert {o.label for o in a.scene(0).objects} <= set(range(10))


def test_synthetic_truth_boxes_are_tight_around_the_rendered_digits():
    gen = MovingDigits(
        200,
        150,
        fps=10,
        seed=1,
        settings=MotionSettings(
            count=4, noise=0, blur=0, clutter=0, contrast=255, background=(0, 0)
        ),
    )
    for index in (0, 9, 57, 150):  # 150: another segment, new digits
        scene = gen.scene(index)
        ink = (scene.image > INK_THRESHOLD).astype(np.uint8)
        assert len(scene.objects) == 4
        covered = np.zeros_like(ink)
        for obj in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in obj.box)
            assert obj.box == (x0, y0, x1, y1)
            # The ink around the box (2 px ring included) has exactly the box as its bounds.
            m = 2
            sub = ink[max(0, y0 - m) : y1 + m, max(0, x0 - m) : x1 + m]
            bx, by, bw, bh = cv2.boundingRect(cv2.findNonZero(sub))
            ox, oy = max(0, x0 - m), max(0, y0 - m)
            assert (bx + ox, by + oy, bx + ox + bw, by + oy + bh) == (x0, y0, x1, y1)
            covered[y0:y1, x0:x1] = 1
        assert not np.any(ink & (1 - covered))  # no ink outside the truth boxes


def test_synthetic_camera_is_a_live_source_with_truth():
    cam = SyntheticCamera("syn", width=96, height=64, fps=50, seed=2)
    assert cam.is_live and "96x64 at 50 fps" in cam.description
    with cam:
        frames = [cam.read() for _ in range(3)]
    assert all(f is not None for f in frames)
    f = frames[-1]
    assert f is not None and f.image.shape == (64, 96, 3) and f.camera_id == "syn"
    assert [fr.index for fr in frames if fr] == sorted({fr.index for fr in frames if fr})
    gray = cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(gray, cam.generator.scene(f.index).image)
    assert cam.objects(f.index) == cam.generator.scene(f.index).objects


def test_digit_asset_is_test_split_and_numpy_only():
    pool = load_digit_asset()
    assert pool.images.shape == (100, 28, 28) and pool.images.dtype == np.uint8
    assert np.bincount(pool.labels, minlength=10).tolist() == [10] * 10
    assert pool.name == "test"


# ---------------------------------------------------------------- synth-video


def test_synth_video_writes_a_readable_video_and_matching_truth(
    tmp_path: Path, stop: threading.Event, capsys: pytest.CaptureFixture[str]
):
    out, truth = tmp_path / "s.mp4", tmp_path / "s.json"
    args = ["--frames", "12", "--width", "96", "--height", "64", "--fps", "10", "--seed", "3"]
    assert cli.main(["synth-video", "--out", str(out), "--truth", str(truth), *args]) == 0
    assert "12 frames" in capsys.readouterr().out
    doc = json.loads(truth.read_text())
    assert doc["frame_count"] == 12 and [f["frame_index"] for f in doc["frames"]] == list(range(12))
    obj = doc["frames"][0]["objects"][0]
    assert obj["label"] == str(obj["class_id"]) and len(obj["box"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.mp4"]

    reader = file_reader(out, stop)
    reader.start()
    frames = drain(reader)
    assert [f.index for f in frames] == list(range(12))
    gen = MovingDigits(96, 64, fps=10, seed=3)
    for f in (frames[0], frames[-1]):
        assert f.image.shape == (64, 96, 3)
        gray = cv2.cvtColor(f.image, cv2.COLOR_BGR2GRAY).astype(np.float64)
        assert np.abs(gray - gen.scene(f.index).image).mean() < 4.0  # lossy, but that frame
        truth_boxes = [o["box"] for o in doc["frames"][f.index]["objects"]]
        assert truth_boxes == [list(o.box) for o in gen.scene(f.index).objects]


def test_synth_video_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = str(tmp_path / "no" / "s.mp4")
    assert cli.main(["synth-video", "--out", out, "--truth", str(tmp_path / "t.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["synth-video", "--out", "x.mp4", "--truth", "t.json", "--fps", "0"]) == 2


# ---------------------------------------------------------------- parts


def test_make_source_per_kind(tmp_path: Path):
    video = write_video(tmp_path / "v.mp4", 2)
    assert isinstance(make_source(CameraConfig(source=str(video))), FileSource)
    usb = make_source(CameraConfig(source=0))
    assert isinstance(usb, LiveSource) and usb.description == "USB camera 0"
    rtsp = make_source(CameraConfig(source="rtsp://admin:secret@10.0.0.9/stream"))
    assert rtsp.is_live and "secret" not in rtsp.description and "10.0.0.9" in rtsp.description
    syn = make_source(CameraConfig(source="synthetic", fps=7))
    assert isinstance(syn, SyntheticCamera) and syn.fps == 7
    assert make_reader(CameraConfig(source="synthetic", fps=7), threading.Event()).fps is None


def test_synthetic_camera_takes_size_digits_and_seed_from_its_config():
    cam = CameraConfig(
        source="synthetic", fps=5, synthetic={"width": 320, "height": 200, "objects": 5, "seed": 9}
    )
    syn = make_source(cam)
    assert isinstance(syn, SyntheticCamera) and "320x200" in syn.description
    with syn:
        frame = syn.read()
    assert frame is not None and frame.image.shape == (200, 320, 3)
    assert len(syn.objects(frame.index)) == 5
    other = make_source(
        CameraConfig(
            source="synthetic", synthetic={"width": 320, "height": 200, "objects": 5, "seed": 8}
        )
    )
    assert isinstance(other, SyntheticCamera)
    assert other.objects(0) != syn.objects(0)  # another seed, another scene
    with pytest.raises(ValueError, match="synthetic"):
        CameraConfig(source="/videos/a.mp4", synthetic={"width": 320})


def test_synthetic_noise_changes_every_frame_and_keeps_its_level():
    """Sensor noise of the configured level, fresh in every frame (a window of a shared field
    at a per-frame offset), on a background and clutter that noise does not change."""
    quiet = MotionSettings(count=0, clutter=0, noise=0.0)
    clean = MovingDigits(160, 120, seed=0, settings=quiet).scene(3).image.astype(np.float64)
    gen = MovingDigits(160, 120, seed=0, settings=MotionSettings(count=0, clutter=0, noise=4.0))
    away = clean >= 12  # 3 sigma from 0: clipping cannot shrink the noise there
    r3, r4 = (gen.scene(i).image.astype(np.float64) - clean for i in (3, 4))
    assert away.mean() > 0.3
    assert 3.4 < np.std(r3[away]) < 4.6  # sigma 4, rounded to whole grey levels
    assert abs(np.corrcoef(r3[away], r4[away])[0, 1]) < 0.2  # not a frozen pattern


def test_synthetic_cameras_of_one_rate_tick_together():
    """Frames fall on whole multiples of the period, whenever a camera was opened: cameras of
    one rate deliver at the same instants (the detector's worst case, every time)."""
    now = [100.03]
    cams = [
        SyntheticCamera(f"c{i}", width=32, height=24, fps=10, clock=lambda: now[0])
        for i in range(2)
    ]
    cams[0].open()
    now[0] = 100.07  # the second camera opens 40 ms later
    cams[1].open()
    now[0] = 100.25
    a, b = cams[0].read(), cams[1].read()
    assert a is not None and b is not None and a.index == b.index == 1  # due at 100.1 + i/10


def test_ffmpeg_options_keep_the_operators_own():
    assert ffmpeg_options("tcp", None) == "rtsp_transport;tcp"
    assert ffmpeg_options("udp", "stimeout;5000000") == "stimeout;5000000|rtsp_transport;udp"
    assert ffmpeg_options("tcp", "rtsp_transport;udp") == "rtsp_transport;udp"


def test_capture_options_are_shared_by_one_transport_and_taken_in_turns_by_two(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv(FFMPEG_OPTIONS_ENV, "stimeout;5000000")
    options = _CaptureOptions()
    seen: list[str] = []
    with options.hold("tcp"), options.hold("tcp"):  # the same options: no waiting
        seen.append(os.environ[FFMPEG_OPTIONS_ENV])
        udp_in = threading.Event()
        udp_out = threading.Event()

        def open_udp() -> None:
            with options.hold("udp"):
                seen.append(os.environ[FFMPEG_OPTIONS_ENV])
                udp_in.set()
                udp_out.wait(5)

        udp = threading.Thread(target=open_udp)
        udp.start()
        assert not udp_in.wait(0.2)  # another transport waits for the tcp opens to end
    assert udp_in.wait(5)
    udp_out.set()
    udp.join(5)
    assert seen == ["stimeout;5000000|rtsp_transport;tcp", "stimeout;5000000|rtsp_transport;udp"]
    assert os.environ[FFMPEG_OPTIONS_ENV] == "stimeout;5000000"  # the operator's, restored


def test_live_source_read_before_open_is_a_frame_read_error():
    with pytest.raises(FrameReadError):
        LiveSource("c", 0, capture_factory=lambda: FakeUsbCamera(1)).read()


def test_backoff_is_capped_exponential_with_jitter():
    b = Backoff(initial=0.5, cap=4.0, jitter=0.25, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(7)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0.75 * c <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays[3:])) == 4  # jittered, not in lockstep
    b.reset()
    assert b.next_delay() <= 0.5
    assert Backoff(initial=1, cap=30).ceiling(10_000) == 30  # no overflow
    with pytest.raises(ValueError):
        Backoff(initial=5, cap=1)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pacer_spaces_frames_by_the_configured_rate():
    clock = FakeClock()
    p = Pacer(10, clock)
    assert p.wait_s() == 0  # the first frame goes at once
    p.mark()
    assert p.wait_s() == pytest.approx(0.1)
    clock.t += 0.04
    assert p.wait_s() == pytest.approx(0.06) and not p.due()
    clock.t += 0.04  # within a quarter period of the due time: a live frame is taken
    assert p.due()
    clock.t += 0.02
    p.mark()  # on time: the schedule advances by one period, small delays are caught up
    assert p.wait_s() == pytest.approx(0.1)
    clock.t += 1.0  # a long stall: restart from now rather than burst
    p.mark()
    assert p.wait_s() == pytest.approx(0.1)
    unpaced = Pacer(None, clock)
    unpaced.mark()
    assert unpaced.wait_s() == 0 and unpaced.due() and not unpaced.paced


def test_frame_buffer_put_gives_up_on_stop():
    buf = FrameBuffer(1)
    stop = threading.Event()
    f = Frame("c", 0, time.time(), np.zeros((2, 2, 3), np.uint8))
    assert buf.put(f, stop)
    threading.Timer(0.05, stop.set).start()
    assert not buf.put(f, stop, poll_s=0.01)
    assert buf.put_latest(f) == 1 and len(buf) == 1
    buf.close()
    assert buf.get(0) is f and buf.get(None) is None and buf.drained


def test_synthetic_camera_needs_no_mlxtend():
    code = (
        "import sys; sys.modules['mlxtend'] = None\n"  # any import of mlxtend now fails
        "from edge_stn.video import SyntheticCamera\n"
        "cam = SyntheticCamera(width=64, height=48, fps=100)\n"
        "cam.open(); f = cam.read(); cam.close()\n"
        "assert f is not None and f.image.shape == (48, 64, 3) and cam.objects(f.index)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
