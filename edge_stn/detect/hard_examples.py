"""Hard-example capture (issue 7.7): the windows of low-confidence detections, saved where
``edge-stn train`` reads an image folder, so what the model was unsure of in operation goes
back to training.

Layout of ``hard_examples.dir`` (:mod:`edge_stn.data.folder` reads class subfolders and skips
names that start with a dot)::

    <dir>/<predicted label>/<camera>_<frame index>_<n>_<result id>.png   the window (model input)
    <dir>/.crops/<predicted label>/<same name>.jpg                        the canonical crop
    <dir>/.index.jsonl                                                    one line per example

The PNG is exactly what the model saw: the detector's own window code
(:meth:`edge_stn.detect.detector.Detector.windows`, DESIGN §4) for the detection's box, at the
model input size, gray for a gray model. It is filed under the *predicted* label: the person who
labels moves a misfiled one to its right folder (or to the background class), looking at the
canonical crop beside it (sharper, upright, from the full-resolution frame); the crops sit in a
dot folder so the trainer never mistakes them for training images. The index line says where it
came from: result id, camera, frame index, detection index, score, label, box, file names.

Size cap: once the folder holds ``max_bytes`` (counted at start, then added up), or
``max_files`` examples were saved, saving stops: counted (``skipped_cap``) and logged once. It
does not delete the oldest: a person may be labelling or moving those files, and the first
examples of a new failure are as valuable as the last.

Off the hot path: the publisher stage only queues (frame reference, detection) on a bounded
queue (a full queue is counted, ``dropped``); the ``edge-stn.hard-examples`` thread cuts the
window and crop, encodes and writes. A write that fails (disk full, permissions) is counted
(``errors``), logged (the first, then at most once a minute), its partial files removed, and
never stops the daemon. NumPy + OpenCV.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.config import HardExamplesConfig
from edge_stn.detect.crops import canonical_crop
from edge_stn.errors import ConfigError
from edge_stn.records import Detection, Frame, FrameResult

logger = logging.getLogger(__name__)

QUEUE_SIZE = 32
"""Detections waiting for the writer (each holds a reference to its frame, not a copy)."""
CROPS_DIR = ".crops"
INDEX_FILE = ".index.jsonl"
ERROR_LOG_S = 60.0

WindowFn = Callable[[Frame, npt.NDArray[np.float64]], npt.NDArray[np.uint8]]
"""Cuts the model's windows ``(N, C, S, S)`` of a frame's boxes (the detector's)."""


@dataclass(frozen=True)
class _Job:
    frame: Frame
    detection: Detection
    result_id: str
    index: int
    windows: WindowFn
    crop_size: int


def folder_bytes(root: Path) -> tuple[int, int]:
    """Bytes and image files under ``root`` (what the cap counts at start)."""
    total = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).stat().st_size
                files += name.endswith(".png")
    return total, files


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text) or "unlabelled"


class HardExampleWriter:
    """Saves hard examples of one ``hard_examples`` config (module docstring)."""

    def __init__(self, cfg: HardExamplesConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / CROPS_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the hard-example folder {self.root}: {exc.strerror or exc}",
                key="hard_examples.dir",
            ) from None
        self.bytes, self.files = folder_bytes(self.root)
        self.counts = {"saved": 0, "skipped_cap": 0, "dropped": 0, "errors": 0}
        self._cap_logged = False
        self._error_logged_at = -ERROR_LOG_S
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=QUEUE_SIZE)
        # started with the first example: making a writer only checks and creates the folder
        self._thread = threading.Thread(
            target=self._run, name="edge-stn.hard-examples", daemon=True
        )

    # ------------------------------------------------------------ the publisher stage's side

    def wanted(self, d: Detection) -> bool:
        labels = self.cfg.labels
        return d.score < self.cfg.score_below and (labels is None or d.label in labels)

    def offer(
        self,
        result: FrameResult,
        result_id: str,
        frame: Frame,
        windows: WindowFn,
        crop_size: int,
    ) -> None:
        """Queue the published result's hard detections (never waits: a full queue is
        counted)."""
        for n, d in enumerate(result.detections):
            if not self.wanted(d):
                continue
            if self._thread.ident is None:
                self._thread.start()
            try:
                self._queue.put_nowait(_Job(frame, d, result_id, n, windows, crop_size))
            except queue.Full:
                with self._lock:
                    self.counts["dropped"] += 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (within ``timeout``) and stop the thread."""
        if self._thread.ident is None:
            return  # never started: nothing queued
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.counts, "bytes": self.bytes, "files": self.files}

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._save(job)
            except Exception:  # a bug must not end the thread silently
                logger.exception("hard examples: saving one failed")
                with self._lock:
                    self.counts["errors"] += 1

    def _full(self, size: int) -> bool:
        cfg = self.cfg
        over_files = cfg.max_files is not None and self.files >= cfg.max_files
        return over_files or self.bytes + size > cfg.max_bytes

    def _save(self, job: _Job) -> None:
        d, frame = job.detection, job.frame
        window = job.windows(frame, np.asarray([d.box], dtype=np.float64))[0]  # (C, S, S)
        image = window[0] if window.shape[0] == 1 else window.transpose(1, 2, 0)
        ok, png = cv2.imencode(".png", image)
        crop = canonical_crop(frame.image, d.affine, job.crop_size)
        ok_crop, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not (ok and ok_crop):  # pragma: no cover - OpenCV encodes any uint8 image
            raise ValueError("OpenCV could not encode a hard example")
        label = safe_name(d.label)
        stem = f"{safe_name(frame.camera_id)}_{frame.index:07d}_{job.index}_{job.result_id}"
        window_path = self.root / label / f"{stem}.png"
        crop_path = self.root / CROPS_DIR / label / f"{stem}.jpg"
        line = json.dumps(
            {
                "result_id": job.result_id,
                "n": job.index,
                "camera": frame.camera_id,
                "frame_index": frame.index,
                "capture_ts": frame.capture_ts,
                "label": d.label,
                "score": round(d.score, 5),
                "box": [float(v) for v in d.box],  # exact: the window can be cut again
                "window": str(window_path.relative_to(self.root)),
                "crop": str(crop_path.relative_to(self.root)),
            },
            separators=(",", ":"),
        )
        size = len(png) + len(jpg) + len(line) + 1
        with self._lock:
            if self._full(size):
                self.counts["skipped_cap"] += 1
                first = not self._cap_logged
                self._cap_logged = True
            else:
                first = None
        if first is not None:
            if first:
                logger.warning(
                    "hard examples: %s holds %d bytes in %d examples, the cap (max_bytes %d, "
                    "max_files %s): no more are saved until it is emptied",
                    self.root,
                    self.bytes,
                    self.files,
                    self.cfg.max_bytes,
                    self.cfg.max_files,
                )
            return
        written: list[Path] = []
        try:
            for path, data in ((crop_path, jpg), (window_path, png)):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                written.append(tmp)
                tmp.write_bytes(data.tobytes())
                os.replace(tmp, path)
                written[-1] = path
            with (self.root / INDEX_FILE).open("a", encoding="utf-8") as fh:
                start = fh.tell()
                try:
                    fh.write(line + "\n")
                    fh.flush()
                except OSError:
                    with contextlib.suppress(OSError):
                        fh.truncate(start)  # no half line
                    raise
        except OSError as exc:
            for path in written:  # nothing half-saved: the window, crop and line go together
                with contextlib.suppress(OSError):
                    path.unlink()
            self._failed(exc)
            return
        with self._lock:
            self.counts["saved"] += 1
            self.bytes += size
            self.files += 1

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            self.counts["errors"] += 1
            now = time.monotonic()
            log = now - self._error_logged_at >= ERROR_LOG_S
            if log:
                self._error_logged_at = now
        if log:
            logger.error(
                "hard examples: cannot write to %s: %s (counted; the daemon goes on, examples "
                "are skipped meanwhile)",
                self.root,
                exc.strerror or exc,
            )
