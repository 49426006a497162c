"""Frame sources (file, USB, rtsp/http, synthetic) and their reader threads (NumPy + OpenCV).

:func:`make_reader` turns a camera's config into a :class:`CameraReader`: one named thread that
opens the source, reconnects it, and hands frames to the pipeline through a bounded buffer
(live sources: newest frame only; files: every frame). See :mod:`edge_stn.video.reader`.
"""

from edge_stn.video.base import FrameSource
from edge_stn.video.factory import make_reader, make_source
from edge_stn.video.file import FileSource
from edge_stn.video.opencv import LiveSource
from edge_stn.video.pacing import Backoff, Pacer
from edge_stn.video.reader import CameraReader, FrameBuffer, ReaderStats
from edge_stn.video.synthetic import MotionSettings, MovingDigits, SyntheticCamera

__all__ = [
    "Backoff",
    "CameraReader",
    "FileSource",
    "FrameBuffer",
    "FrameSource",
    "LiveSource",
    "MotionSettings",
    "MovingDigits",
    "Pacer",
    "ReaderStats",
    "SyntheticCamera",
    "make_reader",
    "make_source",
]
