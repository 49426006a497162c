"""The detector stage (DESIGN §7): frames -> proposals -> windows -> one batched ST-CNN call ->
background rejection, score threshold, NMS -> detections with their pixel affine.

:class:`Detector` takes frames from any number of cameras at once. For each frame it finds
proposals on a reduced grayscale copy (:mod:`edge_stn.detect.proposals`, configured per camera),
cuts a window per proposal with the one window extractor (:mod:`edge_stn.windows`, the model's
window spec), and stacks the windows of *all* frames into one ONNX Runtime call (split only above
``max_batch``). A colour frame is never converted to gray as a whole: the proposals use a reduced
copy and refine boxes on their own parts, and each window converts only the part it reads. A window whose best class is the model's background label, or whose best
probability is below ``score_threshold``, is dropped; the survivors of each frame go through
class-agnostic NMS and ``max_per_frame``. Each detection carries:

* ``box``: the proposal's tight ink box (frame pixels, edge coordinates);
* ``affine``: :func:`edge_stn.geometry.frame_from_crop` of the model's theta and the window's
  placement, for the configured crop size ``S`` (crop pixel -> frame pixel);
* ``quad``: the crop's outer corners in frame pixels (top-left, top-right, bottom-right,
  bottom-left);
* ``crop_status`` ``off`` and no crop: the publisher cuts and sends crops.

Every frame yields one :class:`~edge_stn.records.FrameResult` (possibly without detections),
stamped with ``infer_ts`` when the batch is done. A frame whose proposals fail (an OpenCV error
on a corrupt image) is logged, counted in :attr:`Detector.stats` and gets no detections; it never
stops the other frames. Torch-free; ONNX Runtime is reached only through the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.config import CameraConfig, DaemonConfig, DetectionConfig
from edge_stn.detect.nms import nms
from edge_stn.detect.proposals import GrayImage, ProposalFinder, empty_boxes
from edge_stn.errors import ModelError
from edge_stn.geometry import crop_quad, frame_from_crop
from edge_stn.records import Detection, Frame, FrameResult
from edge_stn.runtime.engine import softmax
from edge_stn.windows import (
    WindowPlacement,
    WindowSpec,
    place_window,
    window_bounds,
    window_from_part,
)

if TYPE_CHECKING:
    from edge_stn.runtime.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class DetectorStats:
    """Counters since the detector was made (read by the daemon's stats)."""

    frames: int = 0
    batches: int = 0
    windows: int = 0
    background: int = 0
    """Windows whose best class was the background label."""
    low_score: int = 0
    """Windows whose best probability was below the score threshold."""
    invalid: int = 0
    """Windows whose model outputs were not finite (NaN/inf: an FP16 overflow, a broken model)."""
    suppressed: int = 0
    """Detections removed by NMS or ``max_per_frame``."""
    detections: int = 0
    frame_errors: int = 0
    """Frames whose proposals failed (logged; they got no detections)."""


@dataclass(frozen=True)
class FrameWindows:
    """One frame's proposals, their window placements and the windows ``(N, C, S, S)``."""

    boxes: npt.NDArray[np.float64]
    placements: list[WindowPlacement]
    images: npt.NDArray[np.uint8]


def to_gray(frame: Frame) -> GrayImage:
    """The frame in grayscale (OpenCV's BGR weights), full resolution."""
    return np.asarray(cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY), np.uint8)


def model_window_spec(engine: Engine) -> WindowSpec:
    """The model's window spec, or for a model trained on whole images (no ``window`` in its
    metadata) the box itself resized to the input, without context."""
    spec = engine.window_spec
    if spec is not None:
        return spec
    h, w = engine.input_size
    if h != w:
        raise ModelError(
            f"the detector cuts square windows, but the model's input is {h}x{w} and its "
            "metadata has no window spec",
            path=engine.path,
        )
    logger.info(
        "model %s has no window spec: windows are the proposal boxes, squared, without context",
        engine.name,
    )
    return WindowSpec(size=h, context_margin=0.0, min_side=1.0)


def default_prepare_threads() -> int:
    """Two lanes for proposals and windows where there are two cores or more."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


class Detector:
    """Batched ST-CNN detection over frames of several cameras (see the module docstring).

    ``cameras`` gives each camera's proposal settings and region of interest; frames of a camera
    not listed use the defaults. ``crop_size`` is the side ``S`` of the canonical crop the
    detections' ``affine`` and ``quad`` are computed for. ``max_batch`` splits larger batches
    (the engine splits further for a TensorRT profile).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        detection: DetectionConfig | None = None,
        crop_size: int = 64,
        cameras: Iterable[CameraConfig] = (),
        max_batch: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if engine.channels not in (1, 3):
            raise ModelError(
                f"the detector feeds 1 (gray) or 3 (BGR) channels, the model wants "
                f"{engine.channels}",
                path=engine.path,
            )
        self.engine = engine
        self.detection = detection if detection is not None else DetectionConfig()
        self.crop_size = int(crop_size)
        self.max_batch = max_batch
        self.spec = model_window_spec(engine)
        h, w = engine.input_size
        self.model_size = (w, h)
        self.background_id = engine.background_id
        self._clock = clock
        self._finders: dict[str, ProposalFinder] = {
            cam.id: ProposalFinder(cam.proposals, cam.roi) for cam in cameras
        }
        self._default_finder = ProposalFinder()
        self.stats = DetectorStats()
        self._stats_lock = threading.Lock()
        threads = self.detection.prepare_threads
        self.prepare_threads = threads if threads is not None else default_prepare_threads()
        self._helpers: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, engine: Engine, config: DaemonConfig, **kw: Any) -> Detector:
        """A detector for the daemon's cameras, detection settings and crop size."""
        return cls(
            engine,
            detection=config.detection,
            crop_size=config.crops.size,
            cameras=config.cameras,
            **kw,
        )

    def finder(self, camera_id: str) -> ProposalFinder:
        return self._finders.get(camera_id, self._default_finder)

    # ------------------------------------------------------------ stages

    def proposals(self, frame: Frame, gray: GrayImage | None = None) -> npt.NDArray[np.float64]:
        """Proposal boxes of one frame (none, logged and counted, if the frame breaks them).
        They are found on the colour frame itself (a reduced gray copy, and gray only where
        boxes are refined) unless the caller passes the frame in ``gray``."""
        try:
            return self.finder(frame.camera_id)(frame.image if gray is None else gray)
        except (cv2.error, ValueError) as exc:
            with self._stats_lock:
                self.stats.frame_errors += 1
            logger.warning(
                "camera %s frame %d: proposals failed (%s); no detections for this frame",
                frame.camera_id,
                frame.index,
                str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
            )
            return empty_boxes()

    def windows(
        self, frame: Frame, boxes: npt.NDArray[np.float64], gray: GrayImage | None = None
    ) -> FrameWindows:
        """The model's windows of one frame's boxes, ``(N, C, S, S)`` uint8.

        Each window reads only its own part of the frame (:func:`window_bounds`); for a gray
        model only that part is converted to gray, which gives the same pixels as cutting it
        from a gray copy of the whole frame (``gray``, when the caller has one).
        """
        size = self.spec.size
        c = self.engine.channels
        n = boxes.shape[0]
        images = np.zeros((n, c, size, size), dtype=np.uint8)
        placements = [place_window(b, self.spec) for b in boxes]
        image = frame.image
        for i, p in enumerate(placements):
            bounds = window_bounds(p, size, image.shape)
            if bounds is None:
                continue  # the window misses the frame: black, as extract_window gives
            x0, y0, x1, y1 = bounds
            if c == 1:
                part = (
                    gray[y0:y1, x0:x1]
                    if gray is not None
                    else cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
                )
                images[i, 0] = window_from_part(np.asarray(part), (x0, y0), p, size)
            else:
                for ch in range(3):
                    part = np.ascontiguousarray(image[y0:y1, x0:x1, ch])
                    images[i, ch] = window_from_part(part, (x0, y0), p, size)
        return FrameWindows(boxes, placements, images)

    def prepare(self, frame: Frame) -> FrameWindows:
        """Everything the batch needs from one frame before the model runs: its proposals and
        their windows."""
        return self.windows(frame, self.proposals(frame))

    def _infer(
        self, images: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        n = images.shape[0]
        step = self.max_batch or max(n, 1)
        logits, thetas = [], []
        for i in range(0, max(n, 1), step):
            lo, th = self.engine.infer(images[i : i + step])
            logits.append(lo)
            thetas.append(th)
            self.stats.batches += 1
        return np.concatenate(logits), np.concatenate(thetas)

    def _frame_detections(
        self,
        fw: FrameWindows,
        probs: npt.NDArray[np.float32],
        thetas: npt.NDArray[np.float32],
    ) -> tuple[Detection, ...]:
        det = self.detection
        if fw.boxes.shape[0] == 0:
            return ()
        finite = np.isfinite(probs).all(axis=1) & np.isfinite(thetas).all(axis=(1, 2))
        if not finite.all():
            self.stats.invalid += int((~finite).sum())
            logger.warning("%d window(s) with non-finite model outputs dropped", (~finite).sum())
        class_ids = np.where(finite, np.nan_to_num(probs).argmax(axis=1), 0)
        scores = np.where(finite, probs[np.arange(probs.shape[0]), class_ids], 0.0)
        is_background = finite & (
            class_ids == self.background_id
            if self.background_id is not None
            else np.zeros(class_ids.shape, bool)
        )
        low = finite & ~is_background & (scores < det.score_threshold)
        self.stats.background += int(is_background.sum())
        self.stats.low_score += int(low.sum())
        candidates = np.flatnonzero(finite & ~is_background & ~low)
        if candidates.size == 0:
            return ()
        kept = candidates[nms(fw.boxes[candidates], scores[candidates], det.nms_iou)]
        kept = kept[: det.max_per_frame]
        self.stats.suppressed += int(candidates.size - kept.size)
        crop = (self.crop_size, self.crop_size)
        out = []
        for i in kept:
            p = fw.placements[i]
            affine = frame_from_crop(
                thetas[i],
                window_origin=(p.x0, p.y0),
                window_scale=p.scale,
                model_size=self.model_size,
                crop_size=crop,
            )
            cid = int(class_ids[i])
            out.append(
                Detection(
                    label=self.engine.labels[cid],
                    class_id=cid,
                    score=float(np.clip(scores[i], 0.0, 1.0)),
                    box=fw.boxes[i],
                    quad=crop_quad(affine, crop),
                    affine=affine,
                )
            )
        return tuple(out)

    # ------------------------------------------------------------ the stage

    def _prepare_all(self, frames: Sequence[Frame]) -> list[FrameWindows]:
        """Every frame's proposals and windows: frames of several cameras are shared out among
        ``prepare_threads`` lanes (this thread is one), in order."""
        lanes = min(self.prepare_threads, len(frames))
        if lanes < 2:
            return [self.prepare(f) for f in frames]
        if self._helpers is None:
            self._helpers = ThreadPoolExecutor(
                self.prepare_threads - 1, thread_name_prefix="edge-stn.prepare"
            )
        futures: dict[int, Future[FrameWindows]] = {
            i: self._helpers.submit(self.prepare, f) for i, f in enumerate(frames) if i % lanes != 0
        }
        mine = {i: self.prepare(f) for i, f in enumerate(frames) if i % lanes == 0}
        return [mine[i] if i in mine else futures[i].result() for i in range(len(frames))]

    def close(self) -> None:
        """Stop the helper threads (a detector replaced by a reload)."""
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)
            self._helpers = None

    def detect(self, frames: Sequence[Frame]) -> list[FrameResult]:
        """One :class:`FrameResult` per frame, in the order given, from one batched model call."""
        return self.finish(frames, self._prepare_all(frames))

    def finish(
        self, frames: Sequence[Frame], per_frame: Sequence[FrameWindows]
    ) -> list[FrameResult]:
        """The model and the rest for frames whose windows are cut (:meth:`prepare`): one
        batched model call, one :class:`FrameResult` per frame in the order given."""
        counts = [fw.images.shape[0] for fw in per_frame]
        total = sum(counts)
        c, s = self.engine.channels, self.spec.size
        batch = (
            np.concatenate([fw.images for fw in per_frame])
            if per_frame
            else np.zeros((0, c, s, s), np.uint8)
        )
        if total:
            logits, thetas = self._infer(batch)
            probs = softmax(logits)
        else:
            probs = np.zeros((0, self.engine.num_classes), np.float32)
            thetas = np.zeros((0, 2, 3), np.float32)
        results_dets = []
        start = 0
        for fw, n in zip(per_frame, counts, strict=True):
            results_dets.append(
                self._frame_detections(fw, probs[start : start + n], thetas[start : start + n])
            )
            start += n
        infer_ts = self._clock()
        self.stats.frames += len(frames)
        self.stats.windows += total
        results = []
        for f, dets in zip(frames, results_dets, strict=True):
            self.stats.detections += len(dets)
            results.append(
                FrameResult(
                    camera_id=f.camera_id,
                    frame_index=f.index,
                    capture_ts=f.capture_ts,
                    infer_ts=infer_ts,
                    width=f.width,
                    height=f.height,
                    detections=dets,
                )
            )
        return results

    def __call__(self, frames: Sequence[Frame]) -> list[FrameResult]:
        return self.detect(frames)


# ------------------------------------------------------------ the pipelined stage (the daemon)

_WAITING, _TAKEN, _DONE = 0, 1, 2


@dataclass(eq=False)
class _Pending:
    detector: Detector
    tag: Any
    frame: Frame
    state: int = _WAITING
    windows: FrameWindows | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Finished:
    """Frames the :class:`PreparePipeline` is done with, in the order they were submitted:
    ``results`` (one per frame), or ``error`` when their model call or one of their
    :meth:`Detector.prepare` calls raised."""

    detector: Detector
    tag: Any
    frames: list[Frame]
    results: list[FrameResult]
    error: BaseException | None = None


class PreparePipeline:
    """The detector stage of the daemon, pipelined: proposals and windows of the frames ahead
    are cut by ``helpers`` threads while the caller's thread runs the model on frames already
    cut, so the model's native time (ONNX Runtime releases the interpreter) overlaps the next
    frames' preparation; on a video file it keeps both cores busy. When no frame is ready for
    the model, the caller cuts one itself, so a batch of several cameras is shared out as the
    two lanes of :meth:`Detector.detect` share it.

    Frames come out in the order they went in (every camera's frames stay in order); the model
    takes the longest run of cut frames at the head, so frames that are ready are never held
    back for slower ones behind them. Each frame keeps the :class:`Detector` it was submitted
    with (a reload swaps detectors) and an opaque ``tag``. Only the caller's thread may call
    :meth:`submit` and :meth:`step`.
    """

    def __init__(self, helpers: int, *, name: str = "edge-stn.prepare") -> None:
        self._items: deque[_Pending] = deque()
        self._cameras: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._help, name=f"{name}-{i}", daemon=True)
            for i in range(max(0, helpers))
        ]
        for t in self._threads:
            t.start()

    def __len__(self) -> int:
        """Frames submitted and not yet returned by :meth:`step`."""
        return len(self._items)

    def in_flight(self, camera_id: str) -> int:
        """Frames of ``camera_id`` submitted and not yet returned (caller's thread)."""
        return self._cameras.get(camera_id, 0)

    def submit(self, detector: Detector, frames: Iterable[Frame], tag: Any = None) -> None:
        items = [_Pending(detector, tag, f) for f in frames]
        for item in items:
            cid = item.frame.camera_id
            self._cameras[cid] = self._cameras.get(cid, 0) + 1
        with self._cond:
            self._items.extend(items)
            self._cond.notify_all()

    def _first_waiting(self) -> _Pending | None:
        for item in self._items:
            if item.state == _WAITING:
                item.state = _TAKEN
                return item
        return None

    def _prepare(self, item: _Pending) -> None:
        try:
            item.windows = item.detector.prepare(item.frame)
        except BaseException as exc:  # handed to the caller with its frame
            item.error = exc
        with self._cond:
            item.state = _DONE
            self._cond.notify_all()

    def _help(self) -> None:
        while True:
            with self._cond:
                item = self._first_waiting()
                while item is None and not self._closed:
                    self._cond.wait()
                    item = self._first_waiting()
                if item is None:
                    return
            self._prepare(item)

    def step(self, timeout: float = 0.0) -> list[Finished]:
        """One piece of work on the caller's thread: the model for the cut frames at the head
        (returned), else cutting the next waiting frame, else waiting at most ``timeout`` s for
        a helper to finish one (returns an empty list for both)."""
        with self._cond:
            ready: list[_Pending] = []
            for item in self._items:  # the cut frames at the head, of one detector and tag
                head = ready[0] if ready else item
                if (
                    item.state != _DONE
                    or item.detector is not head.detector
                    or item.tag is not head.tag
                ):
                    break
                ready.append(item)
            for item in ready:
                self._items.popleft()
                self._cameras[item.frame.camera_id] -= 1
            mine = None if ready else self._first_waiting()
            if not ready and mine is None:
                if self._items and timeout > 0:
                    self._cond.wait(timeout)
                return []
        if mine is not None:
            self._prepare(mine)
            return []
        return self._finish(ready)

    def _finish(self, ready: list[_Pending]) -> list[Finished]:
        """One model call for the run of cut frames between failed preparations (each of
        those comes back alone, with its error)."""
        detector, tag = ready[0].detector, ready[0].tag
        out: list[Finished] = []
        frames: list[Frame] = []
        windows: list[FrameWindows] = []

        def flush() -> None:
            if not frames:
                return
            try:
                out.append(Finished(detector, tag, frames[:], detector.finish(frames, windows)))
            except Exception as exc:  # a runtime fault of the model: the caller logs it
                out.append(Finished(detector, tag, frames[:], [], exc))
            frames.clear()
            windows.clear()

        for item in ready:
            if item.windows is None:  # its preparation raised
                flush()
                out.append(Finished(detector, tag, [item.frame], [], item.error))
            else:
                frames.append(item.frame)
                windows.append(item.windows)
        flush()
        return out

    def close(self) -> None:
        """Let the helper threads end (frames still waiting are dropped with the pipeline)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
