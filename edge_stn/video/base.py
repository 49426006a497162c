"""What every frame source is: open, read one frame, close (NumPy + OpenCV, torch-free).

A source builds :class:`~edge_stn.records.Frame` records itself, because only it knows what a
frame's index means (DESIGN §6 ``frame_index``): for a file, the counter of frames read since the
file was opened (0-based; OpenCV's ``CAP_PROP_POS_FRAMES`` after ``read()`` already names the
*next* frame, so it is not used); for a live source, a capture counter that keeps counting across
reconnects. ``capture_ts`` is ``time.time()`` when the read returned.

Sources are used by one thread at a time (their reader, :mod:`edge_stn.video.reader`); they
never start threads of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from edge_stn.records import Frame


class FrameSource(ABC):
    """A camera or a video file.

    ``open()`` raises :class:`~edge_stn.errors.SourceError` when the source cannot be opened
    (the message says what and why). ``read()`` returns the next frame, or ``None`` at the end
    of a file (live sources never end); it raises :class:`~edge_stn.errors.FrameReadError` when
    one read failed but later reads may succeed (a source that skipped failed reads by itself
    reports them through :meth:`pop_read_errors`). ``close()`` is idempotent. After ``close()``,
    ``open()`` starts over: a file from its first frame, a live source with a new connection.
    """

    camera_id: str
    is_live: bool
    """Live sources keep only the newest frame; files deliver every frame."""

    @property
    @abstractmethod
    def description(self) -> str:
        """What the source is, for logs (URL passwords masked)."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> Frame | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def pop_read_errors(self) -> int:
        """Failed reads the source got past by itself since the last call (a file skips a
        corrupt frame and returns the next one); the reader adds them to ``read_errors``."""
        return 0

    def resume_after(self, index: int) -> None:  # noqa: B027 (optional hook, no-op by default)
        """A replacement for an abandoned source continues its capture counter after ``index``
        (live sources); files start over, so they ignore it."""

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.camera_id!r}, {self.description})"
