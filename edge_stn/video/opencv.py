"""Opening OpenCV captures, and the live OpenCV source: USB cameras and rtsp/http(s) URLs.

URLs go through OpenCV's FFmpeg backend with ``CAP_PROP_OPEN_TIMEOUT_MSEC`` and
``CAP_PROP_READ_TIMEOUT_MSEC`` passed *at open* (in the ``params`` list; set afterwards they
are ignored), so a dead stream cannot hold a reader in ``open()`` or ``read()`` forever.

The RTSP transport has no capture property: FFmpeg takes it from the environment variable
``OPENCV_FFMPEG_CAPTURE_OPTIONS`` (``rtsp_transport;tcp``), which OpenCV reads while opening.
That variable is process-wide, so :func:`open_url` holds it (:class:`_CaptureOptions`): opens
that need the same options run at the same time, the variable is set before the first of them
and restored after the last; an open that needs other options (another camera's transport)
waits until those are done. So cameras with one transport never wait for each other (a hung
camera's open does not delay a good camera's reconnect), and mixed transports take turns.
Anything else in the process that opens FFmpeg captures meanwhile may see our options. Options
the operator put in that variable are kept; an ``rtsp_transport`` among them wins over the
config's.

USB cameras open with ``CAP_ANY`` (V4L2 on Linux, GStreamer on a Jetson's system OpenCV) and no
params: backends that do not know a param refuse to open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import cv2
import numpy as np

from edge_stn.config import redact_url
from edge_stn.errors import FrameReadError, SourceError
from edge_stn.records import Frame
from edge_stn.video.base import FrameSource
from edge_stn.video.pool import PooledReader

logger = logging.getLogger(__name__)

FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


class _CaptureOptions:
    """Shared use of ``OPENCV_FFMPEG_CAPTURE_OPTIONS``: any number of opens with the same value
    at once, one value at a time; the operator's own value is restored when the last one ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: str | None = None
        self._users = 0
        self._before: str | None = None

    @contextlib.contextmanager
    def hold(self, transport: str) -> Iterator[None]:
        with self._cond:
            while True:
                if self._users == 0:
                    self._before = os.environ.get(FFMPEG_OPTIONS_ENV)
                    self._value = ffmpeg_options(transport, self._before)
                    os.environ[FFMPEG_OPTIONS_ENV] = self._value
                    break
                if self._value == ffmpeg_options(transport, self._before):
                    break
                self._cond.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    if self._before is None:
                        os.environ.pop(FFMPEG_OPTIONS_ENV, None)
                    else:
                        os.environ[FFMPEG_OPTIONS_ENV] = self._before
                    self._value = None
                    self._cond.notify_all()


_OPTIONS = _CaptureOptions()


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` the sources use (tests pass a fake USB camera)."""

    def isOpened(self) -> bool: ...

    def read(self, image: Any = ..., /) -> tuple[bool, Any]:
        """The next frame, decoded into ``image`` when it has the frame's size."""
        ...

    def get(self, prop: int) -> float: ...

    def release(self) -> None: ...


CaptureFactory = Callable[[], Capture]


def ffmpeg_available() -> bool:
    return bool(cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG))


def ffmpeg_options(transport: str, base: str | None) -> str:
    """``OPENCV_FFMPEG_CAPTURE_OPTIONS`` for one open: the operator's options plus
    ``rtsp_transport`` unless they set it (format ``key;value|key;value``)."""
    parts = [p for p in (base or "").split("|") if p]
    if not any(p.split(";", 1)[0] == "rtsp_transport" for p in parts):
        parts.append(f"rtsp_transport;{transport}")
    return "|".join(parts)


def open_url(
    url: str, *, open_timeout_s: float, read_timeout_s: float, rtsp_transport: str = "tcp"
) -> cv2.VideoCapture:
    """A capture of an rtsp/http(s) URL with open and read timeouts; may be closed (check
    ``isOpened()``)."""
    if not ffmpeg_available():
        logger.warning(
            "OpenCV has no FFmpeg backend: opening %s without open/read timeouts", redact_url(url)
        )
        return cv2.VideoCapture(url, cv2.CAP_ANY)
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        max(1, round(open_timeout_s * 1000)),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        max(1, round(read_timeout_s * 1000)),
    ]
    is_rtsp = url.lower().startswith(("rtsp://", "rtsps://"))
    if not is_rtsp:
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    with _OPTIONS.hold(rtsp_transport):
        return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def as_bgr(image: Any) -> np.ndarray | None:
    """A read image as ``(H, W, 3)`` uint8 BGR, or None when it is not an image."""
    if not isinstance(image, np.ndarray) or image.size == 0 or image.dtype != np.uint8:
        return None
    if image.ndim == 2:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    if image.ndim == 3 and image.shape[2] == 4:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    return None


class LiveSource(FrameSource):
    """A USB camera (``source`` an int) or an rtsp/http(s) URL, read with OpenCV.

    ``frame_index`` is a capture counter of this source: it keeps counting across reconnects,
    so indices never repeat within a run.
    """

    is_live = True

    def __init__(
        self,
        camera_id: str,
        source: str | int,
        *,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        rtsp_transport: str = "tcp",
        capture_factory: CaptureFactory | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.source = source
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.rtsp_transport = rtsp_transport
        self._factory = capture_factory or self._open_capture
        self._cap: Capture | None = None
        self._index = 0
        self._reader = PooledReader()

    @property
    def description(self) -> str:
        if isinstance(self.source, int):
            return f"USB camera {self.source}"
        return str(redact_url(self.source))

    def _open_capture(self) -> Capture:
        if isinstance(self.source, int):
            return cv2.VideoCapture(self.source, cv2.CAP_ANY)
        return open_url(
            self.source,
            open_timeout_s=self.open_timeout_s,
            read_timeout_s=self.read_timeout_s,
            rtsp_transport=self.rtsp_transport,
        )

    def open(self) -> None:
        self.close()
        started = time.monotonic()
        cap = self._factory()
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"camera {self.camera_id}: cannot open {self.description} "
                f"(after {time.monotonic() - started:.1f} s: unreachable, refused, wrong path "
                "or credentials, or no such device)"
            )
        self._cap = cap

    def read(self) -> Frame | None:
        if self._cap is None:
            raise FrameReadError(f"camera {self.camera_id}: read before open")
        ok, image = self._reader.read(self._cap)
        img = as_bgr(image) if ok else None
        if img is None:
            raise FrameReadError(f"camera {self.camera_id}: no frame from {self.description}")
        frame = Frame(self.camera_id, self._index, time.time(), img)
        self._index += 1
        return frame

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def resume_after(self, index: int) -> None:
        self._index = max(self._index, index + 1)
