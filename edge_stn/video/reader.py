"""One reader thread per camera: it opens its source, reads frames and hands them to the next
stage through a bounded :class:`FrameBuffer` (DESIGN §7, STYLE 3 and 5).

- **Live sources keep only the newest frame.** The buffer holds one frame; a new frame replaces
  an unread one, counted in ``dropped_stale``. Capture never waits for the pipeline, so an RTSP
  stream is drained as fast as it comes and never lags behind the scene.
- **Files deliver every frame.** The reader blocks on a full buffer (waiting in short timeouts
  that watch the stop event, never spinning) until the pipeline takes a frame.
- **Pacing** (``fps``): a file waits until its next frame is due (absent: as fast as the
  pipeline takes them); a live source skips the frames that arrive early (``skipped_fps``).
- **End of file**: ``on_end="stop"`` ends the camera (its buffer is closed: :attr:`finished`
  turns True once the pipeline took the last frame); ``"loop"`` reopens the file, and the
  frame index starts again at 0 (it names the frame's position in the file, so a ground-truth
  file matches every pass; ``loops`` counts the passes).
- **Failures never leave the thread.** A failed read counts in ``read_errors``; a file goes on
  with the next frame, a live source retries and reconnects after a few failures in a row, or
  at once when no frame came for ``stall_s`` (the stall watchdog, ``stalls``). A file that cannot
  be opened fails its camera (state ``failed``); a live source is reopened with capped
  exponential backoff and jitter (``reconnects``) until the stop event is set.
- **Stuck C calls.** OpenCV's open and read timeouts should return every call, but a driver can
  still hang. :meth:`CameraReader.watchdog`, called periodically by whoever owns the readers,
  abandons a thread stuck longer than ``stuck_s`` in ``open()`` or ``read()`` (a thread in a C
  call cannot be interrupted) and starts a fresh one with a new source (counted in ``stalls``).
  At shutdown such a thread is not waited for: reader threads are daemon threads.

Threads are named ``edge-stn.reader:<camera>`` so a stack dump tells who is who.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edge_stn.errors import FrameReadError, SourceError
from edge_stn.records import Frame
from edge_stn.video.base import FrameSource
from edge_stn.video.pacing import Backoff, Pacer

logger = logging.getLogger(__name__)

ReaderState = Literal["idle", "opening", "running", "reconnecting", "ended", "failed", "stopped"]

LIVE_FAILURES_BEFORE_RECONNECT = 3
"""Failed reads in a row after which a live source is reopened (a dead RTSP session fails every
read at once; waiting for the stall timeout would only delay the reconnect)."""

FILE_FAILURES_BEFORE_END = 50
"""Read errors in a row after which a file is given up (a backstop: a file source skips corrupt
frames and ends a truncated file by itself)."""

RETRY_WAIT_S = 0.1
"""Pause after a failed live read, so a source that fails at once is never spun on."""


@dataclass
class ReaderStats:
    """Counters of one camera's reader (a snapshot: :meth:`CameraReader.stats`).

    ``frames``: frames read; ``dropped_stale``: live frames replaced before the pipeline took
    them; ``skipped_fps``: live frames skipped to keep to ``fps``; ``read_errors``: failed reads;
    ``reconnects``: reopen attempts of a live source; ``stalls``: reopens because no frame came
    for ``stall_s``, or a thread stuck in a call; ``loops``: completed passes of a looping file;
    ``last_frame_ts``: capture time (Unix s) and ``last_index`` frame index of the last frame.
    """

    camera_id: str
    state: ReaderState = "idle"
    frames: int = 0
    dropped_stale: int = 0
    skipped_fps: int = 0
    read_errors: int = 0
    reconnects: int = 0
    stalls: int = 0
    loops: int = 0
    last_frame_ts: float | None = None
    last_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FrameBuffer:
    """A bounded buffer of frames between a reader and the pipeline.

    ``wakeup`` (optional, shared by several buffers) is set after every put and at close, so
    one consumer can wait for any of its cameras: ``wakeup.wait(t); wakeup.clear()``, then poll
    every buffer (a put after the clear sets it again).
    """

    def __init__(self, maxsize: int, wakeup: threading.Event | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._frames: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._wakeup = wakeup

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)

    def _notify(self) -> None:
        self._cond.notify_all()
        if self._wakeup is not None:
            self._wakeup.set()

    def put_latest(self, frame: Frame) -> int:
        """Add ``frame``, dropping the oldest frames to make room; returns how many it dropped."""
        with self._cond:
            dropped = 0
            while len(self._frames) >= self.maxsize:
                self._frames.popleft()
                dropped += 1
            self._frames.append(frame)
            self._notify()
            return dropped

    def put(self, frame: Frame, stop: threading.Event, poll_s: float = 0.1) -> bool:
        """Add ``frame``, waiting while the buffer is full; False if ``stop`` was set first."""
        with self._cond:
            while len(self._frames) >= self.maxsize:
                if stop.is_set():
                    return False
                self._cond.wait(poll_s)
            self._frames.append(frame)
            self._notify()
            return True

    def get(self, timeout: float | None = None) -> Frame | None:
        """The oldest frame, waiting up to ``timeout`` s; None on timeout or once closed and
        empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._frames:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def get_nowait(self) -> Frame | None:
        with self._cond:
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        """No more frames will come (the frames held can still be taken)."""
        with self._cond:
            self._closed = True
            self._notify()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def drained(self) -> bool:
        """Closed and empty: the consumer has taken the last frame."""
        with self._cond:
            return self._closed and not self._frames


def _log_attempt(attempt: int) -> int:
    """Log level for the n-th failed (re)open: a warning at 1, 2, 4, 8, ..., debug otherwise,
    so a camera that stays down does not flood the log."""
    return logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG


class CameraReader:
    """The reader thread of one camera. ``source_factory`` makes a fresh, unopened source (it is
    called once here, and again only when :meth:`watchdog` replaces a stuck thread)."""

    def __init__(
        self,
        camera_id: str,
        source_factory: Callable[[], FrameSource],
        stop: threading.Event,
        *,
        fps: float | None = None,
        on_end: Literal["stop", "loop"] = "stop",
        stall_s: float = 5.0,
        stuck_s: float | None = None,
        queue_size: int = 4,
        backoff: Backoff | None = None,
        wakeup: threading.Event | None = None,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        self.camera_id = camera_id
        self._factory = source_factory
        self._source = source_factory()
        self.is_live = self._source.is_live
        self.stop_event = stop
        self.fps = fps
        self.on_end = on_end
        self.stall_s = stall_s
        self.stuck_s = stuck_s if stuck_s is not None else 3.0 * stall_s
        self.backoff = backoff or Backoff()
        self.buffer = FrameBuffer(1 if self.is_live else queue_size, wakeup)
        self._lock = threading.Lock()
        self._stats = ReaderStats(camera_id)
        self._gen = 0
        self._busy_since: float | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ owner's side

    @property
    def thread_name(self) -> str:
        return f"edge-stn.reader:{self.camera_id}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"reader of camera {self.camera_id} already started")
        self._spawn(self._source)

    def _spawn(self, source: FrameSource) -> None:
        gen = self._gen
        self._thread = threading.Thread(
            target=self._run, args=(gen, source), name=self.thread_name, daemon=True
        )
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (after the stop event, or the end of a file); True if it ended.
        A thread stuck in a C call is left behind (it is a daemon thread)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> ReaderStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def get(self, timeout: float | None = None) -> Frame | None:
        return self.buffer.get(timeout)

    def poll(self) -> Frame | None:
        return self.buffer.get_nowait()

    @property
    def finished(self) -> bool:
        """The camera ended (end of file, failure, stop) and its last frame was taken."""
        return self.buffer.drained

    def watchdog(self) -> bool:
        """Abandon a thread stuck in ``open()``/``read()`` for longer than ``stuck_s`` and start
        a new one on a fresh source; True if it did. Call it every second or so."""
        with self._lock:
            since = self._busy_since
            if since is None or time.monotonic() - since <= self.stuck_s:
                return False
            if self._stats.state in ("ended", "failed", "stopped") or self.stop_event.is_set():
                return False
            self._gen += 1
            self._busy_since = None
            self._stats.stalls += 1
            last = self._stats.last_index
        logger.error(
            "camera %s: %s stuck for %.1f s in a call to OpenCV: thread abandoned",
            self.camera_id,
            self._source.description,
            time.monotonic() - since,
        )
        if not self.is_live:
            # A file would start over from its first frame: end the camera instead.
            self._set(state="failed")
            self.buffer.close()
            return True
        source = self._factory()
        if last is not None:
            source.resume_after(last)
        self._source = source
        self._spawn(source)
        return True

    # ------------------------------------------------------------ the thread

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._stats, name, value)

    def _add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def _current(self, gen: int) -> bool:
        return self._gen == gen and not self.stop_event.is_set()

    def _busy(self, gen: int, on: bool) -> None:
        """Mark the thread as inside (or out of) a source call, for :meth:`watchdog`; an
        abandoned thread coming back must not clear its replacement's mark."""
        with self._lock:
            if self._gen == gen:
                self._busy_since = time.monotonic() if on else None

    def _run(self, gen: int, source: FrameSource) -> None:
        try:
            self._loop(gen, source)
        except Exception:
            logger.exception("camera %s: reader failed", self.camera_id)
            if self._gen == gen:
                self._set(state="failed")
        finally:
            try:
                source.close()
            except Exception:
                logger.exception("camera %s: closing %s failed", self.camera_id, source)
            if self._gen == gen:
                with self._lock:
                    if self._stats.state not in ("ended", "failed"):
                        self._stats.state = "stopped"
                self.buffer.close()

    def _open(self, gen: int, source: FrameSource, attempt: int) -> bool:
        """One open attempt (after the backoff delay for a retry); False if it failed."""
        if attempt > 0 and self.is_live:
            delay = self.backoff.next_delay()
            self._set(state="reconnecting")
            if self.stop_event.wait(delay) or not self._current(gen):
                return False
            self._add("reconnects")
        self._set(state="opening")
        self._busy(gen, True)
        try:
            source.open()
        except SourceError as exc:
            if self.is_live:
                logger.log(_log_attempt(attempt + 1), "%s (attempt %d)", exc, attempt + 1)
            else:
                logger.error("%s", exc)
            return False
        finally:
            self._busy(gen, False)
        if self._gen != gen:
            return False  # abandoned while opening
        self._set(state="running")
        return True

    def _loop(self, gen: int, source: FrameSource) -> None:
        live = self.is_live
        pacer = Pacer(self.fps)
        opened = False
        attempt = 0  # open attempts since the last good frame
        failures = 0  # failed reads in a row
        pass_frames = 0  # frames of this pass over a file
        last_progress = time.monotonic()
        while self._current(gen):
            if not opened:
                if not self._open(gen, source, attempt):
                    if not self._current(gen):
                        return
                    if not live:
                        self._set(state="failed")
                        return
                    attempt += 1
                    continue
                if not self._current(gen):
                    return
                opened, failures, pass_frames = True, 0, 0
                last_progress = time.monotonic()
            if not live and pacer.paced:
                wait = pacer.wait_s()
                if wait > 0 and self.stop_event.wait(wait):
                    return
            frame: Frame | None
            self._busy(gen, True)
            try:
                frame = source.read()
                if frame is None and live:
                    raise FrameReadError(f"camera {self.camera_id}: live source returned no frame")
            except FrameReadError as exc:
                error: Exception | None = exc
                frame = None
            except Exception as exc:  # a bug or an OpenCV error: counted and survived
                if failures == 0:  # once per run of failures, not at every retry
                    logger.exception("camera %s: unexpected error while reading", self.camera_id)
                error = exc
                frame = None
            else:
                error = None
            finally:
                self._busy(gen, False)
            if self._gen != gen:
                return  # abandoned by the watchdog while in read(): drop what it read
            skipped = source.pop_read_errors()
            if skipped:
                self._add("read_errors", skipped)

            if error is not None:
                failures += 1
                self._add("read_errors")
                logger.debug("camera %s: %s", self.camera_id, error)
                if not live:
                    if failures >= FILE_FAILURES_BEFORE_END:
                        logger.error(
                            "camera %s: %d failed reads in a row: giving up %s",
                            self.camera_id,
                            failures,
                            source.description,
                        )
                        self._set(state="failed")
                        return
                    continue
                stalled = time.monotonic() - last_progress >= self.stall_s
                if stalled or failures >= LIVE_FAILURES_BEFORE_RECONNECT:
                    if stalled:
                        self._add("stalls")
                    why = (
                        f"no frame for {self.stall_s:g} s"
                        if stalled
                        else f"{failures} failed reads"
                    )
                    logger.warning(
                        "camera %s: %s: reconnecting to %s", self.camera_id, why, source.description
                    )
                    source.close()
                    opened = False
                    attempt += 1
                elif self.stop_event.wait(RETRY_WAIT_S):
                    return
                continue

            if frame is None:  # end of file
                if self.on_end == "loop" and pass_frames > 0:
                    self._add("loops")
                    source.close()
                    opened = False
                    continue
                if pass_frames == 0 and self.on_end == "loop":
                    logger.error("camera %s: %s has no frame to loop", self.camera_id, source)
                    self._set(state="failed")
                else:
                    self._set(state="ended")
                return

            failures, attempt = 0, 0
            self.backoff.reset()
            pass_frames += 1
            last_progress = time.monotonic()
            with self._lock:
                self._stats.frames += 1
                self._stats.last_frame_ts = frame.capture_ts
                self._stats.last_index = frame.index
            if live:
                if pacer.paced and not pacer.due():
                    self._add("skipped_fps")
                    continue
                dropped = self.buffer.put_latest(frame)
                if dropped:
                    self._add("dropped_stale", dropped)
            elif not self.buffer.put(frame, self.stop_event):
                return
            pacer.mark()
