"""Video files, read with OpenCV (its FFmpeg backend where present).

``frame_index`` counts the frames read since the file was opened, from 0, so it is the frame's
position in the file and matches a ground-truth file's frame numbers. A corrupt frame that
cannot be read still takes its number (later frames keep theirs); a loop reopens the file and
numbering starts again at 0. A frame the decoder replaces silently (FFmpeg often repeats the
previous picture for a damaged packet) is not seen as an error.

End of file or a corrupt frame? Both make ``read()`` return False. A failure before the end the
container announces (``CAP_PROP_FRAME_COUNT``, minus one for formats where it is an estimate)
is a corrupt frame: it is counted (:meth:`FileSource.pop_read_errors`) and reading goes on with
the next frame. After ``MAX_FAILURES`` failures in a row the file is taken as truncated: it
ends there, counted as one more error, with a warning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2

from edge_stn.errors import FrameReadError, SourceError
from edge_stn.records import Frame
from edge_stn.video.base import FrameSource
from edge_stn.video.opencv import as_bgr, ffmpeg_available
from edge_stn.video.pool import PooledReader

logger = logging.getLogger(__name__)

MAX_FAILURES = 10
"""Failed reads in a row after which a file is taken as truncated (reads at the end of a file
fail at once, so trying is cheap)."""


def check_video_file(camera_id: str, path: Path) -> None:
    """A SourceError unless ``path`` is an existing file."""
    if not path.exists():
        raise SourceError(f"camera {camera_id}: no such video file", path=path)
    if not path.is_file():
        raise SourceError(f"camera {camera_id}: not a file", path=path)


class FileSource(FrameSource):
    is_live = False

    def __init__(self, camera_id: str, path: str | Path) -> None:
        self.camera_id = camera_id
        self.path = Path(path)
        self._cap: cv2.VideoCapture | None = None
        self._index = 0
        self._announced = 0
        self._errors = 0
        self._reader = PooledReader()

    @property
    def description(self) -> str:
        return f"video file {self.path}"

    @property
    def announced_frames(self) -> int:
        """Frames the container announces (0: unknown); valid while open."""
        return self._announced

    def open(self) -> None:
        self.close()
        check_video_file(self.camera_id, self.path)
        api = cv2.CAP_FFMPEG if ffmpeg_available() else cv2.CAP_ANY
        cap = cv2.VideoCapture(str(self.path), api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"camera {self.camera_id}: OpenCV cannot read this video (not a video, "
                "truncated before its index, or a codec this OpenCV build lacks)",
                path=self.path,
            )
        self._cap = cap
        self._index = 0
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._announced = int(count) if count > 0 else 0

    def read(self) -> Frame | None:
        if self._cap is None:
            raise FrameReadError(f"camera {self.camera_id}: read before open", path=self.path)
        failures = 0
        while True:
            ok, image = self._reader.read(self._cap)
            img = as_bgr(image) if ok else None
            if img is not None:
                frame = Frame(self.camera_id, self._index + failures, time.time(), img)
                self._index = frame.index + 1
                self._errors += failures
                return frame
            position = self._index + failures
            if position >= self._announced - 1:
                self._errors += failures
                return None  # the end (a failure on the last announced frame is taken as it)
            failures += 1
            if failures >= MAX_FAILURES:
                self._errors += 1
                logger.warning(
                    "camera %s: %s: no frame can be read after frame %d of the %d it announces "
                    "(truncated or corrupt): the file ends here",
                    self.camera_id,
                    self.path,
                    self._index,
                    self._announced,
                )
                return None

    def pop_read_errors(self) -> int:
        n, self._errors = self._errors, 0
        return n

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
