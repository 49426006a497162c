"""A real RTSP server on loopback for live-source tests (DESIGN §8), and H.264 test videos.

Registered as a pytest plugin in ``conftest.py``. The fixture ``rtsp_server_factory`` makes
:class:`RtspServer` objects: each serves one H.264 MP4 (made by :func:`write_h264` with Debian's
``ffmpeg`` and libx264, as cameras send H.264) at ``rtsp://127.0.0.1:<free port>/<path>``
through GStreamer's RTSP server (``tests/rtsp_serve.py``, run by the system ``/usr/bin/python3``
because the GStreamer bindings are Debian packages, not pip ones). A server can be stopped
(``kill -9`` or a clean stop), frozen (SIGSTOP: its connections stay open and go silent) and
restarted on the same port. Every server is killed after its test.

The tests skip, saying what to install, where ffmpeg or the GStreamer RTSP server is missing
(``apt-get install ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
gstreamer1.0-plugins-good gstreamer1.0-plugins-bad``; ``.ci/run`` and ``deploy/dev-setup.sh``
install them).
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_broker import wait_until

from edge_stn.demo import free_port, stop_process

SYSTEM_PYTHON = "/usr/bin/python3"
SERVE = Path(__file__).with_name("rtsp_serve.py")
HOST = "127.0.0.1"
APT_PACKAGES = (
    "ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)
_PROBE = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("filesrc", "qtdemux", "h264parse", "rtph264pay")
           if Gst.ElementFactory.find(e) is None]
print(" ".join(missing))
"""


@functools.cache
def rtsp_unavailable() -> str | None:
    """Why the RTSP server cannot run here (None when it can)."""
    if shutil.which("ffmpeg") is None:
        return "ffmpeg is not installed"
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} (the system Python with GStreamer bindings) is missing"
    try:
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {SYSTEM_PYTHON}: {exc}"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"the GStreamer RTSP server bindings do not load ({last})"
    if probe.stdout.strip():
        return f"GStreamer elements missing: {probe.stdout.strip()}"
    return None


def require_rtsp() -> None:
    reason = rtsp_unavailable()
    if reason is not None:
        pytest.skip(f"RTSP server unavailable: {reason} (apt-get install {APT_PACKAGES})")


def write_h264(path: Path, frames: Iterable[np.ndarray], fps: float, *, gop: int = 10) -> Path:
    """An MP4 of H.264 (libx264, yuv420p, no B-frames, a key frame every ``gop`` frames) from
    BGR frames of one even size, written by Debian's ffmpeg."""
    it = iter(frames)
    first = next(it)
    h, w = first.shape[:2]
    cmd = [
        "ffmpeg", "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(gop), "-bf", "0",
        "-movflags", "+faststart", str(path),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for frame in (first, *it):
            proc.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
    finally:
        proc.stdin.close()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"ffmpeg could not write {path}:\n{err}")
    return path


def transcode_h264(src: Path, dst: Path, *, gop: int = 10) -> Path:
    """``src`` (any video ffmpeg reads) re-encoded as H.264 in an MP4, same size and rate."""
    cmd = [
        "ffmpeg", "-v", "error", "-y", "-i", str(src),
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(gop), "-bf", "0",
        "-movflags", "+faststart", str(dst),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return dst


class RtspServer:
    """GStreamer's RTSP server of one video on a fixed loopback port (restartable there)."""

    def __init__(
        self, workdir: Path, video: Path, *, path: str = "/stream", port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.video = video
        self.path = path
        self.port = port or free_port()
        self.log_path = workdir / "rtsp-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"rtsp://{HOST}:{self.port}{self.path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def clients(self) -> int:
        """Connections accepted since the first start (over every restart)."""
        return sum(1 for line in self.log().splitlines() if line.startswith("client "))

    def start(self, timeout: float = 20.0) -> RtspServer:
        require_rtsp()
        readies = self.log().count(f"ready {self.port}")
        cmd = [SYSTEM_PYTHON, str(SERVE), "--host", HOST, "--port", str(self.port)]
        cmd += ["--video", str(self.video), "--path", self.path]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._paused = False

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the RTSP server exited {self.proc.returncode}:\n{self.log()}")
            return self.log().count(f"ready {self.port}") > readies

        if not wait_until(ready, timeout, 0.05):
            self.stop()
            raise RuntimeError(f"the RTSP server did not start:\n{self.log()}")
        return self

    def stop(self, *, kill: bool = True) -> None:
        """``kill -9`` (default) or SIGTERM; the port is free again when this returns."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._paused:
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        stop_process(proc, kill=kill)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is sent or answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def restart(self, timeout: float = 20.0) -> RtspServer:
        self.stop()
        return self.start(timeout)


class SilentListener:
    """A TCP port on loopback that accepts connections and never answers: an RTSP camera whose
    server hangs. Opening it can only end by the open timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)  # the kernel completes the handshakes; nobody reads or writes
        self.port = int(self.sock.getsockname()[1])

    def url(self, path: str = "/stream") -> str:
        return f"rtsp://{HOST}:{self.port}{path}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def rtsp_server_factory(tmp_path: Path) -> Iterator[Callable[..., RtspServer]]:
    """Make RTSP servers (``make(video, path="/stream", port=None)``, not started); every
    server is killed after the test."""
    require_rtsp()
    made: list[RtspServer] = []

    def make(video: Path, **kwargs: Any) -> RtspServer:
        server = RtspServer(tmp_path / f"rtsp{len(made)}", video, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def silent_listener() -> Iterator[SilentListener]:
    listener = SilentListener()
    yield listener
    listener.close()
