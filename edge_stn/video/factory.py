"""From a camera's config to its source and its reader thread."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from edge_stn.config import CameraConfig, SyntheticConfig
from edge_stn.errors import SourceError
from edge_stn.video.base import FrameSource
from edge_stn.video.file import FileSource
from edge_stn.video.opencv import LiveSource
from edge_stn.video.pacing import Backoff
from edge_stn.video.reader import CameraReader
from edge_stn.video.synthetic import DEFAULT_FPS, MotionSettings, SyntheticCamera


def make_source(camera: CameraConfig) -> FrameSource:
    """The (unopened) source a camera names. Nothing is checked here: a video file that does
    not exist fails at ``open()`` (see :func:`file_camera_problems` for a check at start-up)."""
    kind = camera.kind
    if kind == "synthetic":
        # The synthetic camera produces frames at its own rate: `fps` sets that rate.
        scene = camera.synthetic or SyntheticConfig()
        return SyntheticCamera(
            camera.id,
            width=scene.width,
            height=scene.height,
            fps=camera.fps or DEFAULT_FPS,
            seed=scene.seed,
            settings=MotionSettings()
            if scene.objects is None
            else MotionSettings(count=scene.objects),
        )
    if kind == "file":
        return FileSource(camera.id, Path(str(camera.source)))
    return LiveSource(
        camera.id,
        camera.source,
        open_timeout_s=camera.open_timeout_s,
        read_timeout_s=camera.read_timeout_s,
        rtsp_transport=camera.rtsp_transport,
    )


def file_camera_problems(cameras: Iterable[CameraConfig]) -> dict[str, SourceError]:
    """Open and close every file camera once: why each one that fails cannot be read (no such
    file, not a file, not a video OpenCV can read), by camera id. Live sources are not tried:
    they may come up later, and their readers retry."""
    problems: dict[str, SourceError] = {}
    for camera in cameras:
        if camera.kind != "file":
            continue
        source = FileSource(camera.id, Path(str(camera.source)))
        try:
            source.open()
        except SourceError as exc:
            problems[camera.id] = exc
        finally:
            source.close()
    return problems


def make_reader(
    camera: CameraConfig,
    stop: threading.Event,
    *,
    wakeup: threading.Event | None = None,
    queue_size: int = 4,
    backoff: Backoff | None = None,
) -> CameraReader:
    """The reader thread of a camera (not started). The stall watchdog fires after
    ``read_timeout_s`` without a frame; a call stuck past both timeouts is abandoned."""
    return CameraReader(
        camera.id,
        lambda: make_source(camera),
        stop,
        # A synthetic camera is paced by its own clock; pacing it again would drop frames.
        fps=None if camera.kind == "synthetic" else camera.fps,
        on_end=camera.on_end,
        stall_s=camera.read_timeout_s,
        stuck_s=2.0 * max(camera.open_timeout_s, camera.read_timeout_s) + 1.0,
        queue_size=queue_size,
        backoff=backoff,
        wakeup=wakeup,
    )
