"""The gateway daemon (DESIGN §7): cameras -> detector -> publisher, one place for start, stop
and signals (STYLE 4).

Threads, named so a stack dump tells who is who:

* ``edge-stn.reader:<camera>``: one per camera (:class:`~edge_stn.video.reader.CameraReader`);
  live sources keep only their newest frame, files deliver every frame.
* ``edge-stn.detector``: takes the frame each camera has ready (one per camera per round),
  runs the :class:`~edge_stn.detect.detector.Detector` on them as one batch and puts each
  :class:`~edge_stn.records.FrameResult`, with the frame its crops are cut from, into a bounded
  queue. A live camera's result is dropped (``drops.result_queue``) when the queue is full, so
  capture never waits; a file's result waits for room, so a file yields one result per frame
  and its reader is slowed down instead (files run as fast as the pipeline allows).
* ``edge-stn.publisher``: cuts the canonical crops (:mod:`edge_stn.detect.crops`) and hands the
  result and its crops to :class:`~edge_stn.publish.client.MqttPublisher` (paho's own network
  thread does the rest).
* the caller's thread (:meth:`Daemon.run`): the readers' stall watchdog once a second, the
  ``stats`` message every ``stats_interval_s``, signals, and config reloads.

Start order: publisher (connects in the background), publisher stage, detector stage, readers;
stop in reverse, on one stop event: the readers end, the detector finishes its batch, the
publisher stage drains the queue, and the publisher sends ``offline`` and disconnects. When
every camera has ended (files without ``loop``) the daemon drains the same way and
:meth:`Daemon.run` returns 0.

SIGHUP re-reads and validates the config file. Applied at once: ``detection`` (score threshold,
NMS, max per frame), ``crops.enabled``, ``crops.jpeg_quality``, ``crops.max_payload_bytes`` and
``stats_interval_s``. Everything else (device id, model, cameras, crop size, MQTT) needs a
restart: a reload that changes it says so in the log and keeps the running values. A config
that does not validate is logged and ignored.

Torch-free: ONNX Runtime is reached only through :class:`~edge_stn.runtime.engine.Engine`.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from edge_stn.config import CropConfig, DaemonConfig, load_config
from edge_stn.detect.crops import LazyCrop
from edge_stn.detect.detector import Detector
from edge_stn.errors import EdgeStnError
from edge_stn.publish.client import MqttPublisher, PublishedResult, PublisherLimits
from edge_stn.publish.payloads import ModelInfo, stats_document
from edge_stn.publish.stats import LatencyWindow, ProcessMeter
from edge_stn.records import Frame, FrameResult
from edge_stn.runtime.engine import Engine
from edge_stn.video.factory import make_reader
from edge_stn.video.reader import CameraReader

logger = logging.getLogger(__name__)

RESULT_QUEUE_SIZE = 16
"""Results waiting for the publisher stage (each holds its frame for the crops)."""
STOP_TIMEOUT_S = 5.0
"""SIGTERM to exit, at most (DESIGN §7): the MQTT stop gets what the threads leave of it."""
HOT_RELOADABLE = ("detection", "crops.enabled", "crops.jpeg_quality", "crops.max_payload_bytes")


@dataclass(frozen=True)
class _Work:
    """One processed frame on its way to the publisher stage."""

    result: FrameResult
    frame: Frame


_END = object()
"""Put by the detector stage after its last result: the publisher stage drains and ends."""


class Daemon:
    """The running gateway of one config (see the module docstring).

    Construction does every start-up check that can fail on bad input, so an error is an
    :class:`~edge_stn.errors.EdgeStnError` before any thread runs: the model (missing, corrupt,
    without metadata, sha256 mismatch), the sources (a video file that does not exist), TLS
    files. ``config_path`` is what SIGHUP re-reads.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        config_path: str | Path | None = None,
        engine: Engine | None = None,
        limits: PublisherLimits | None = None,
        queue_size: int = RESULT_QUEUE_SIZE,
        on_published: Callable[[PublishedResult], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.stop_event = threading.Event()
        self._wakeup = threading.Event()
        self._reload_requested = threading.Event()
        self._on_published = on_published
        self.engine = engine if engine is not None else Engine(config.model)
        self.detector = Detector.from_config(self.engine, config, max_batch=self.engine.max_batch)
        self.readers: list[CameraReader] = [
            make_reader(cam, self.stop_event, wakeup=self._wakeup) for cam in config.cameras
        ]
        self._live = {r.camera_id: r.is_live for r in self.readers}
        self.publisher = MqttPublisher.from_config(
            config,
            ModelInfo(name=self.engine.name, sha256=self.engine.sha256),
            limits=limits,
        )
        self._crops: CropConfig = config.crops
        self._stats_interval_s = config.stats_interval_s
        self._queue: queue.Queue[_Work | object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._processed: dict[str, int] = {r.camera_id: 0 for r in self.readers}
        self._queue_drops = 0
        self._publish_drops = 0
        self._stage_errors = 0
        self._detect_ms = LatencyWindow()
        self._publish_ms = LatencyWindow()
        self._meter = ProcessMeter()
        self._detector_thread = threading.Thread(
            target=self._detector_loop, name="edge-stn.detector", daemon=True
        )
        self._publisher_thread = threading.Thread(
            target=self._publisher_loop, name="edge-stn.publisher", daemon=True
        )
        self._started = False
        self._stopped = False
        self.started_at = self.publisher.info.started_at
        self._last_processed: dict[str, int] = {}
        self._last_stats_ts = self.started_at

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start every stage, downstream first, so no frame waits for a stage not yet running."""
        if self._started:
            raise RuntimeError("the daemon was already started")
        self._started = True
        logger.info(
            "daemon %s: model %s on %s, %d camera(s), broker %s",
            self.config.device_id,
            self.engine.name,
            ", ".join(self.engine.providers),
            len(self.readers),
            self.config.mqtt.broker,
        )
        self.publisher.start()
        self._publisher_thread.start()
        self._detector_thread.start()
        for reader in self.readers:
            reader.start()

    def request_stop(self) -> None:
        """Ask every stage to stop (safe from a signal handler or any thread)."""
        self.stop_event.set()
        self._wakeup.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    @property
    def finished(self) -> bool:
        """The pipeline has ended (every camera ended, or stop) and its queue is drained."""
        return self._started and not self._publisher_thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop in reverse order within ``timeout`` s: readers, detector, publisher stage
        (draining what it holds), then the MQTT publisher (``offline``, disconnect)."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + timeout
        self.request_stop()
        if not self._started:
            return
        for reader in reversed(self.readers):
            # A reader stuck in a C call is abandoned (daemon thread), never waited for.
            if not reader.join(max(0.0, min(0.5, deadline - time.monotonic()))):
                logger.warning("camera %s: reader did not stop; abandoned", reader.camera_id)
        self._detector_thread.join(max(0.0, deadline - time.monotonic() - 2.5))
        self._publisher_thread.join(max(0.0, deadline - time.monotonic() - 2.0))
        if self._publisher_thread.is_alive():
            logger.warning("the publisher stage did not drain in time; queued results lost")
        self.publisher.stop(timeout=max(0.5, deadline - time.monotonic() - 0.2))
        counters = self.publisher.counters()
        logger.info(
            "daemon %s stopped: %d results published, %d dropped",
            self.config.device_id,
            counters.results.published,
            counters.results.dropped + self.queue_drops,
        )

    def run(self, *, install_signals: bool = True, duration_s: float | None = None) -> int:
        """Start, supervise until every camera ended or a stop was requested (SIGTERM, SIGINT,
        :meth:`request_stop`, ``duration_s``), stop; returns the exit code (0)."""
        restore: dict[int, Any] = {}
        if install_signals:
            restore = self._install_signals()
        try:
            self.start()
            deadline = None if duration_s is None else time.monotonic() + duration_s
            next_stats = time.monotonic() + self._stats_interval_s
            while not self.stop_event.is_set() and not self.finished:
                self.stop_event.wait(min(1.0, self._stats_interval_s))
                for reader in self.readers:
                    reader.watchdog()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self.reload()
                now = time.monotonic()
                if now >= next_stats:
                    self.publish_stats()
                    next_stats = now + self._stats_interval_s
                if deadline is not None and now >= deadline:
                    break
            if self.finished and not self.stop_event.is_set():
                logger.info("every camera has ended: stopping")
        finally:
            self.stop()
            for signum, handler in restore.items():
                signal.signal(signum, handler)
        return 0

    def _install_signals(self) -> dict[int, Any]:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            logger.info("%s: stopping", signal.Signals(signum).name)
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reload()
            self._wakeup.set()

        previous: dict[int, Any] = {}
        for signum, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop)):
            previous[signum] = signal.signal(signum, handler)
        if hasattr(signal, "SIGHUP"):
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        return previous

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config file and apply what can change while running; False (logged) if
        there is no file or it does not validate."""
        if self.config_path is None:
            logger.warning("SIGHUP: no config file to reload")
            return False
        logger.info("SIGHUP: reloading %s", self.config_path)
        try:
            new = load_config(self.config_path)
        except EdgeStnError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            return False
        old = self.config
        restart = [
            name
            for name, a, b in (
                ("device_id", old.device_id, new.device_id),
                ("model", old.model, new.model),
                ("cameras", old.cameras, new.cameras),
                ("mqtt", old.mqtt, new.mqtt),
                ("crops.size", old.crops.size, new.crops.size),
            )
            if a != b
        ]
        if restart:
            logger.warning(
                "SIGHUP: %s changed: not hot-reloadable, restart the daemon to apply",
                ", ".join(restart),
            )
        self.detector.detection = new.detection
        # The crop size stays: the detector computes every affine for the running size.
        self._crops = new.crops.model_copy(update={"size": old.crops.size})
        self._stats_interval_s = new.stats_interval_s
        logger.info(
            "SIGHUP: applied detection (score >= %g, NMS IoU %g, max %d), crops "
            "(%s, quality %d, <= %d bytes), stats every %g s",
            new.detection.score_threshold,
            new.detection.nms_iou,
            new.detection.max_per_frame,
            "on" if new.crops.enabled else "off",
            new.crops.jpeg_quality,
            new.crops.max_payload_bytes,
            new.stats_interval_s,
        )
        return True

    # ------------------------------------------------------------ the detector stage

    def _next_frames(self) -> list[Frame]:
        frames = []
        for reader in self.readers:
            frame = reader.poll()
            if frame is not None:
                frames.append(frame)
        return frames

    def _detector_loop(self) -> None:
        try:
            while True:
                self._wakeup.clear()  # before polling: a put after this sets it again
                frames = self._next_frames()
                if not frames:
                    if self.stop_event.is_set() or all(r.finished for r in self.readers):
                        break
                    self._wakeup.wait(0.2)
                    continue
                try:
                    results = self.detector.detect(frames)
                except Exception:
                    # A runtime fault (ONNX Runtime error) is logged, counted and survived.
                    with self._lock:
                        self._stage_errors += 1
                    logger.exception("detector failed on a batch of %d frame(s)", len(frames))
                    continue
                for result, frame in zip(results, frames, strict=True):
                    self._detect_ms.add(result.detect_ms)
                    with self._lock:
                        self._processed[result.camera_id] += 1
                    self._enqueue(_Work(result, frame))
        finally:
            self._put_end()

    def _enqueue(self, work: _Work) -> None:
        if self._live.get(work.result.camera_id, True):
            try:
                self._queue.put_nowait(work)
            except queue.Full:
                with self._lock:
                    self._queue_drops += 1
            return
        # A file waits for room: every frame of a file yields a result.
        while True:
            try:
                self._queue.put(work, timeout=0.1)
                return
            except queue.Full:
                if self.stop_event.is_set() and not self._publisher_thread.is_alive():
                    with self._lock:
                        self._queue_drops += 1
                    return

    def _put_end(self) -> None:
        while self._publisher_thread.is_alive():
            try:
                self._queue.put(_END, timeout=0.1)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------------ the publisher stage

    def _crops_of(self, work: _Work) -> list[LazyCrop | None] | None:
        cfg = self._crops
        if not cfg.enabled or not work.result.detections:
            return None
        # Cut and encoded only when the publisher reads them: a dropped result costs none.
        size, image = self.detector.crop_size, work.frame.image
        return [
            LazyCrop(image, d.affine, size, cfg.jpeg_quality, cfg.max_payload_bytes)
            for d in work.result.detections
        ]

    def _publisher_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            assert isinstance(item, _Work)
            # After a stop request, what is queued gets a short wait for room, not the full one.
            timeout = 0.2 if self.stop_event.is_set() else None
            try:
                published = self.publisher.publish_result(
                    item.result, self._crops_of(item), timeout=timeout
                )
            except Exception:
                with self._lock:
                    self._stage_errors += 1
                logger.exception(
                    "camera %s frame %d: publishing failed",
                    item.result.camera_id,
                    item.result.frame_index,
                )
                continue
            if published is None:
                with self._lock:
                    self._publish_drops += 1
                continue
            self._publish_ms.add(published.publish_ms)
            if self._on_published is not None:
                self._on_published(published)

    # ------------------------------------------------------------ stats

    @property
    def queue_drops(self) -> int:
        with self._lock:
            return self._queue_drops

    def processed(self) -> dict[str, int]:
        """Frames processed by the detector, per camera, since start."""
        with self._lock:
            return dict(self._processed)

    def stats_document(self, interval_s: float | None = None) -> dict[str, Any]:
        """The ``stats`` document of the interval since the previous one."""
        interval = interval_s or self._stats_interval_s
        now = time.time()
        with self._lock:
            processed = dict(self._processed)
            drops = {
                "result_queue": self._queue_drops,
                "publish": self._publish_drops,
                "stage_errors": self._stage_errors,
            }
        previous, last_ts = self._last_processed, self._last_stats_ts
        elapsed = max(1e-6, now - last_ts)
        self._last_processed, self._last_stats_ts = processed, now
        cameras: dict[str, dict[str, Any]] = {}
        for reader in self.readers:
            s = reader.stats()
            n = processed.get(reader.camera_id, 0)
            cameras[reader.camera_id] = {
                "fps": (n - previous.get(reader.camera_id, 0)) / elapsed,
                "drops": s.dropped_stale,
                "processed": n,
                "frames": s.frames,
                "skipped_fps": s.skipped_fps,
                "read_errors": s.read_errors,
                "reconnects": s.reconnects,
                "stalls": s.stalls,
                "loops": s.loops,
                "live": reader.is_live,
            }
        det = self.detector.stats
        drops["detector_frame_errors"] = det.frame_errors
        return stats_document(
            device=self.config.device_id,
            epoch=self.publisher.epoch,
            ts=now,
            started_at=self.started_at,
            interval_s=interval,
            cameras=cameras,
            latency_ms={
                "detect_ms": self._detect_ms.drain(),
                "publish_ms": self._publish_ms.drain(),
            },
            mqtt=self.publisher.counters().to_dict(),
            drops=drops,
            process=self._meter.sample(),
        )

    def publish_stats(self) -> bool:
        try:
            return self.publisher.publish_stats(self.stats_document())
        except Exception:
            logger.exception("stats failed")
            return False


def run_daemon(config_path: str | Path) -> int:
    """``edge-stn run --config F``: load, check, run until stopped or every camera ended."""
    cfg = load_config(config_path)
    daemon = Daemon(cfg, config_path=config_path)
    return daemon.run()
