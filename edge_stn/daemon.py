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
* ``edge-stn.publisher``: gives detections their track ids (:mod:`edge_stn.detect.track_crops`),
  cuts the canonical crops (:mod:`edge_stn.detect.crops`) and hands the result and its crops to
  :class:`~edge_stn.publish.client.MqttPublisher` (paho's own network thread does the rest);
  under ``crops.policy: best_per_track`` it keeps each track's best crop and hands it over with
  a track announcement when the track ends; it queues hard examples for
  ``edge-stn.hard-examples`` (:mod:`edge_stn.detect.hard_examples`).
* ``edge-stn.model-loader``: builds an :class:`~edge_stn.runtime.engine.Engine` (trust check,
  ONNX Runtime session and warm-up) at start-up and after a reload that changes the model, so
  signals are handled meanwhile (a TensorRT engine build takes minutes).
* ``edge-stn.commands`` (with ``commands.enabled``): remote commands
  (:mod:`edge_stn.ops.commands`); what they change runs on the caller's thread, as a reload.
* the caller's thread (:meth:`Daemon.run`): the readers' stall watchdog and the operations
  supervisor (:mod:`edge_stn.ops.supervisor`: stage heartbeats, systemd notify and watchdog,
  health, metrics) once a second, the ``stats`` message every ``stats_interval_s``, signals,
  and config reloads. It goes on while a model loads.

Start-up (:func:`run_daemon`): the config is validated; file cameras are opened once, and when
every camera is a file that cannot be read the daemon refuses to start (exit code 2, one line
naming the source and the problem; a camera that fails among others is logged, counted in its
stats and the others go on); the model is checked (``model.sha256``, ``model.trust``: a refusal
is exit code 2), loaded and warmed up on the loader thread while SIGTERM/SIGINT are already
handled (a stop then exits 0 at once); a model that fails to load or warm up is replaced by the
last good one kept in ``model.fallback_dir`` (:mod:`edge_stn.runtime.fallback`). Then the
stages start downstream first: publisher (connects in the background), publisher stage,
detector stage, readers, and systemd hears ``READY=1``; they stop in reverse, on one stop
event: the readers end, the detector finishes its batch, the publisher stage drains the queue,
and the publisher sends ``offline`` and disconnects. When every camera has ended (files without
``loop``) the daemon drains the same way and :meth:`Daemon.run` returns 0.

SIGHUP re-reads and validates the config file and applies it while running:

* ``cameras``: cameras removed are stopped, cameras added are started, a camera whose source
  settings changed (``source``, ``fps``, ``on_end``, timeouts, ``rtsp_transport``) is restarted;
  a change of only ``proposals`` or ``roi`` applies without touching its reader, and unchanged
  cameras are not disturbed;
* ``detection``, ``crops`` (all of it), ``tracking`` and ``stats_interval_s`` apply from the
  next frame; a changed ``hard_examples`` gets a new writer (one whose folder cannot be made is
  not applied: the running one is kept);
* ``model``: the new model is checked (sha256, trust), loaded and warmed up on the loader thread
  while the running one goes on, and swapped in only when that succeeded (it then becomes the
  last good model of ``model.fallback_dir``); otherwise the running model stays and the log
  says why. Results name the model that produced them, and the retained ``online`` status is
  published again with the new model and config hash;
* ``device_id``, ``mqtt`` and ``outbox`` need a restart (they define the MQTT session, its
  topics and its queue): a reload that changes them says so in the log and keeps the running
  values.

A config that does not validate is logged in one line and the running config is kept.

Torch-free: ONNX Runtime is reached only through :class:`~edge_stn.runtime.engine.Engine`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from edge_stn.config import (
    CameraConfig,
    CropConfig,
    DaemonConfig,
    ModelConfig,
    config_hash,
    load_config,
    redact_url,
)
from edge_stn.detect.crops import LazyCrop
from edge_stn.detect.detector import Detector, Finished, PreparePipeline
from edge_stn.detect.hard_examples import HardExampleWriter
from edge_stn.detect.track_crops import TrackStage
from edge_stn.errors import EdgeStnError, SourceError
from edge_stn.ops.commands import MAIN_THREAD_TIMEOUT_S, CommandFailed, CommandRunner
from edge_stn.ops.cpu import opencv_on_calling_threads
from edge_stn.ops.health import Heartbeats
from edge_stn.ops.logs import config_secrets, configure_logging
from edge_stn.ops.memory import release_frames_to_the_kernel
from edge_stn.ops.sdnotify import Notifier
from edge_stn.ops.supervisor import Supervisor
from edge_stn.publish.client import MqttPublisher, PublishedResult, PublisherLimits
from edge_stn.publish.payloads import ModelInfo, stats_document
from edge_stn.publish.stats import LatencyWindow, ProcessMeter
from edge_stn.publish.topics import subscription
from edge_stn.records import ChosenCrop, Frame, FrameResult
from edge_stn.runtime.engine import Engine, verify_model_file
from edge_stn.runtime.fallback import FallbackStore, open_engine
from edge_stn.video.factory import file_camera_problems, make_reader
from edge_stn.video.reader import CameraReader

logger = logging.getLogger(__name__)

RESULT_QUEUE_SIZE = 16
"""Results waiting for the publisher stage (each holds its frame for the crops)."""
FILE_FRAMES_IN_STAGE = 2
"""Frames of one video file in the detector stage at most: the one the model runs and the next,
being cut. A live camera has one: its next frame waits in the reader, which replaces it with a
newer one (a counted drop) rather than let it age behind the model."""
STOP_TIMEOUT_S = 5.0
"""SIGTERM to exit, at most (DESIGN §7): the MQTT stop gets what the threads leave of it."""
LOADER_THREAD = "edge-stn.model-loader"
RESTART_ONLY = ("device_id", "mqtt", "outbox")
"""Config sections a reload cannot change: they define the MQTT session and its topics."""
READER_FIELDS = ("source", "fps", "on_end", "open_timeout_s", "read_timeout_s", "rtsp_transport")
"""A camera's settings its reader depends on: a change restarts the reader (proposals and
region of interest are the detector's, and apply without touching it)."""


class StartupInterrupted(Exception):
    """A stop (SIGTERM, SIGINT) arrived while the daemon was starting (loading its model)."""


# ------------------------------------------------------------ loading a model off the main thread


class ModelLoad:
    """An :class:`Engine` built (trust check, session and warm-up) on a thread of its own, so
    the caller stays responsive to signals. The thread is a daemon thread: a stop does not wait
    for it. With ``fallback`` (start-up) a model that fails to load or warm up is replaced by
    the last good one of ``model.fallback_dir`` (:func:`~edge_stn.runtime.fallback.open_engine`);
    without it (a reload) the failure is the result, and the running model stays."""

    def __init__(self, model: ModelConfig, *, fallback: bool = False) -> None:
        self.model = model
        self.fallback = fallback
        self.started = time.monotonic()
        self._done = threading.Event()
        self._engine: Engine | None = None
        self._error: BaseException | None = None
        self.listeners: list[Callable[[str | None], None]] = []
        """told how the swap ended, on the daemon's main thread: None (swapped in) or why not
        (a remote ``model`` command waits so)"""
        self._thread = threading.Thread(target=self._load, name=LOADER_THREAD, daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._engine = open_engine(self.model) if self.fallback else Engine(self.model)
        except BaseException as exc:  # handed to whoever waits for the result
            self._error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def settle(self, error: str | None) -> None:
        """Tell the listeners how the swap ended (once)."""
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                listener(error)
            except Exception:
                logger.exception("a model swap listener failed")

    def result(self) -> Engine:
        """The engine, or the load's error (a :class:`~edge_stn.errors.ModelError`, ...)."""
        if not self._done.is_set():
            raise RuntimeError("the model load has not finished")
        if self._error is not None:
            raise self._error
        assert self._engine is not None
        return self._engine


def load_engine(
    model: ModelConfig, stop: threading.Event | None = None, *, fallback: bool = False
) -> Engine:
    """Load and warm up ``model`` on the loader thread (see :class:`ModelLoad`); raises
    :class:`StartupInterrupted` as soon as ``stop`` is set (the load is abandoned), and the
    load's own error otherwise."""
    load = ModelLoad(model, fallback=fallback)
    while not load.wait(0.05):
        if stop is not None and stop.is_set():
            raise StartupInterrupted(f"stopped while loading the model {model.model_path}")
    return load.result()


def model_info(engine: Engine) -> ModelInfo:
    return ModelInfo(name=engine.name, sha256=engine.sha256)


def check_cameras(cameras: list[CameraConfig]) -> None:
    """Refuse a config none of whose cameras can run: every one a video file that cannot be
    read. A :class:`SourceError` naming the (first) source and the problem; a file camera that
    fails among others is left to its reader (logged, counted, the others go on)."""
    problems = file_camera_problems(cameras)
    if not problems or len(problems) < len(cameras):
        return
    first = next(iter(problems.values()))
    more = f" (and {len(problems) - 1} more: no camera can be read)" if len(problems) > 1 else ""
    raise SourceError(first.detail + more, path=first.path, key=first.key)


def _reader_settings(camera: CameraConfig) -> tuple[Any, ...]:
    return tuple(getattr(camera, name) for name in READER_FIELDS)


def handle_signals(on_stop: Callable[[], None], on_reload: Callable[[], None]) -> dict[int, Any]:
    """SIGTERM and SIGINT call ``on_stop``, SIGHUP ``on_reload``; returns the previous handlers
    (for :func:`restore_signals`). Only from the main thread."""

    def stop_handler(signum: int, frame: FrameType | None) -> None:
        logger.info("%s: stopping", signal.Signals(signum).name)
        on_stop()

    def hup_handler(signum: int, frame: FrameType | None) -> None:
        on_reload()

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, stop_handler)
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hup_handler)
    return previous


def restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@dataclass(frozen=True)
class _Stage:
    """The detector and the model it runs, swapped together by a reload."""

    detector: Detector
    model: ModelInfo


@dataclass(frozen=True)
class _Work:
    """One processed frame on its way to the publisher stage, with the model that processed it
    and the crop size its affines are computed for (both may change by a reload)."""

    result: FrameResult
    frame: Frame
    model: ModelInfo
    crop_size: int
    last: bool = True
    """the last result of its detector batch: the outbox commits the batch with it"""


_END = object()
"""Put by the detector stage after its last result: the publisher stage drains and ends."""


class Daemon:
    """The running gateway of one config (see the module docstring).

    Construction does every start-up check that can fail on bad input, so an error is an
    :class:`~edge_stn.errors.EdgeStnError` before any thread runs: the model (missing, corrupt,
    without metadata, sha256 mismatch, unsigned or not allow-listed under ``model.trust``; a
    model that only fails to load or warm up falls back to the last good one), the sources (no
    camera can be read: every one a video file that is missing or unreadable), TLS files.
    Without ``engine`` the model is loaded on the loader thread, and a ``stop_event`` set
    meanwhile raises :class:`StartupInterrupted`. ``config_path`` is what SIGHUP re-reads.
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
        stop_event: threading.Event | None = None,
        reload_event: threading.Event | None = None,
        main_wakeup: threading.Event | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._wakeup = threading.Event()
        self._reload_requested = reload_event if reload_event is not None else threading.Event()
        # Wakes the main loop at once for a stop, a reload or a command's call (it otherwise
        # looks once a second); whoever sets stop_event or reload_event from outside sets it too.
        self._main_wakeup = main_wakeup if main_wakeup is not None else threading.Event()
        self._on_published = on_published
        check_cameras(config.cameras)
        notifier = notifier if notifier is not None else Notifier()
        if engine is None:
            verify_model_file(config.model)  # a refusal is one line, before any log or thread
            if config.model.bundled_build:
                logger.info("model: bundled demo (%s)", config.model.bundled_build)
            logger.info("loading the model %s", config.model.model_path)
            notifier.status(f"loading the model {config.model.model_path}")
            # a model that fails to load or warm up falls back to the last good one
            engine = load_engine(config.model, self.stop_event, fallback=True)
        self.engine = engine
        self._stage = _Stage(self._make_detector(engine, config), model_info(engine))
        self._loading: ModelLoad | None = None
        self._lock = threading.Lock()
        self._processed: dict[str, int] = {}
        self.readers: list[CameraReader] = []
        self._reader_stops: dict[str, threading.Event] = {}
        self._live: dict[str, bool] = {}
        for cam in config.cameras:
            self._add_reader(cam)
        # before the outbox is opened: a folder that cannot be made refuses the start cleanly
        self._hard = HardExampleWriter(config.hard_examples) if config.hard_examples else None
        self.publisher = MqttPublisher.from_config(config, self._stage.model, limits=limits)
        self._crops: CropConfig = config.crops
        # Issue 7.6/7.7: track ids and the crop policy, hard examples (publisher stage).
        self._tracks = TrackStage(
            config.tracking, config.crops, self.publisher.outbox.next_track_ids()
        )
        self._stats_interval_s = config.stats_interval_s
        self._queue: queue.Queue[_Work | object] = queue.Queue(maxsize=queue_size)
        self._queue_drops = 0
        self._publish_drops = 0
        self._stage_errors = 0
        self._model_load_failures = 0
        self._latest_frames: dict[str, Frame] = {}
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
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
        # Operations (issue 7): stage heartbeats, systemd notify/watchdog, health, metrics.
        self.heartbeats = Heartbeats(("detector", "publisher"))
        self.supervisor = Supervisor(self, notifier)
        # Remote commands (issue 7): their own thread; this object is their CommandTarget.
        self.commands: CommandRunner | None = None
        if config.commands.enabled:
            self.commands = CommandRunner(self, self.publisher.topics, self.publisher)
            cmd_filter = subscription(config.mqtt.topic_prefix, "cmd", device=config.device_id)
            self.publisher.listen_commands(cmd_filter, self.commands.offer)

    @staticmethod
    def _make_detector(engine: Engine, config: DaemonConfig) -> Detector:
        return Detector.from_config(engine, config, max_batch=engine.max_batch)

    @property
    def detector(self) -> Detector:
        """The detector in use (a reload may replace it)."""
        return self._stage.detector

    def _add_reader(self, camera: CameraConfig) -> CameraReader:
        """Make (not start) the reader of a camera, with a stop event of its own so a reload
        can stop it alone; :meth:`request_stop` sets them all."""
        stop = threading.Event()
        reader = make_reader(camera, stop, wakeup=self._wakeup)
        self._reader_stops[camera.id] = stop
        self._live = {**self._live, camera.id: reader.is_live}
        with self._lock:
            self._processed.setdefault(camera.id, 0)
        self.readers = [*self.readers, reader]  # replaced, never mutated: others iterate it
        return reader

    def _remove_reader(self, camera_id: str) -> None:
        """Stop a camera's reader and forget it (not waited for: it ends by itself, a thread
        stuck in a C call is abandoned)."""
        stop = self._reader_stops.pop(camera_id, None)
        if stop is not None:
            stop.set()
        self.readers = [r for r in self.readers if r.camera_id != camera_id]

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
        if self.commands is not None:
            self.commands.start()
        self.publisher.start()
        self._publisher_thread.start()
        self._detector_thread.start()
        for reader in self.readers:
            reader.start()

    def request_stop(self) -> None:
        """Ask every stage to stop (safe from a signal handler or any thread)."""
        self.stop_event.set()
        for stop in list(self._reader_stops.values()):
            stop.set()
        self._wakeup.set()
        self._main_wakeup.set()

    def request_reload(self) -> None:
        self._reload_requested.set()
        self._main_wakeup.set()

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
            if self._hard is not None:
                self._hard.close()
            self.supervisor.close()
            return
        self.supervisor.stopping()
        for reader in reversed(self.readers):
            # A reader stuck in a C call is abandoned (daemon thread), never waited for.
            if not reader.join(max(0.0, min(0.5, deadline - time.monotonic()))):
                logger.warning("camera %s: reader did not stop; abandoned", reader.camera_id)
        self._detector_thread.join(max(0.0, deadline - time.monotonic() - 2.5))
        self._publisher_thread.join(max(0.0, deadline - time.monotonic() - 2.0))
        if self._publisher_thread.is_alive():
            logger.warning("the publisher stage did not drain in time; queued results lost")
        if self._loading is not None:
            self._loading.settle("the daemon stopped")
        if self.commands is not None:
            self.commands.stop(timeout=0.5)
        self.publisher.stop(timeout=max(0.5, deadline - time.monotonic() - 0.2))
        self.supervisor.close()
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
            restore = handle_signals(self.request_stop, self._on_hup)
        try:
            if self.stop_event.is_set():  # stopped before it started: nothing to undo
                logger.info("stop requested before the daemon started")
                self._stopped = True
                self.supervisor.close()
                return 0
            self.start()
            self.supervisor.started()
            deadline = None if duration_s is None else time.monotonic() + duration_s
            next_stats = time.monotonic() + self._stats_interval_s
            while not self.stop_event.is_set() and not self.finished:
                self._main_wakeup.wait(min(1.0, self._stats_interval_s))
                self._main_wakeup.clear()  # what woke it is handled below, in this pass
                for reader in self.readers:
                    reader.watchdog()
                self.supervisor.tick()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self.reload()
                self._run_calls()
                self._check_model_load()
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
            restore_signals(restore)
        return 0

    def _on_hup(self) -> None:
        self.request_reload()
        self._wakeup.set()

    # ------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config file and apply it (see the module docstring); False (logged in
        one line, the running config kept) if there is no file or it does not validate."""
        if self.config_path is None:
            logger.warning("SIGHUP: no config file to reload")
            return False
        logger.info("SIGHUP: reloading %s", self.config_path)
        self.supervisor.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except EdgeStnError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: %s", exc)
            self.supervisor.notifier.ready()
            return False
        old = self.config
        restart = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        if restart:
            logger.warning(
                "SIGHUP: %s changed: not applied (it defines the MQTT session): restart the "
                "daemon to apply it",
                " and ".join(restart),
            )
        new = new.model_copy(update={name: getattr(old, name) for name in RESTART_ONLY})
        self._reload_model(new.model)
        # Until a new model is swapped in, the running config names the running model.
        self._apply(new.model_copy(update={"model": old.model}))
        self.supervisor.notifier.ready()
        return True

    def _reload_model(self, wanted: ModelConfig) -> None:
        loading = self._loading
        if loading is not None and loading.model == wanted:
            return  # already on its way
        if loading is not None:
            logger.warning(
                "SIGHUP: the model %s still loading is abandoned for %s",
                loading.model.model_path,
                wanted.model_path,
            )
            loading.settle(f"abandoned for {wanted.model_path} (a reload or another command)")
            self._loading = None
        if wanted == self.config.model:
            return
        logger.info(
            "SIGHUP: loading the model %s (the running model %s stays until it is ready)",
            wanted.model_path,
            self.engine.name,
        )
        self._loading = ModelLoad(wanted)

    def _check_model_load(self) -> None:
        """Swap in a model a reload loaded, once it is ready (or say why it was not)."""
        load = self._loading
        if load is None or not load.done:
            return
        self._loading = None
        took = time.monotonic() - load.started
        try:
            engine = load.result()
            detector = self._make_detector(engine, self.config)
        except Exception as exc:  # refused (trust, sha256), corrupt, or the warm-up failed
            with self._lock:
                self._model_load_failures += 1
            logger.error(
                "SIGHUP: new model refused, keeping %s (sha256 %s...): %s",
                self.engine.name,
                self.engine.sha256[:12],
                exc,
            )
            load.settle(str(exc))
            return
        previous = self.engine
        detector.stats = self.detector.stats
        self.engine = engine
        self._stage = _Stage(detector, model_info(engine))
        self.config = self.config.model_copy(update={"model": load.model})
        self.publisher.update_info(config_hash=config_hash(self.config))
        logger.info(
            "SIGHUP: model %s (sha256 %s..., on %s) loaded and warmed up in %.1f s: swapped in "
            "for %s (sha256 %s...)",
            engine.name,
            engine.sha256[:12],
            ", ".join(engine.providers),
            took,
            previous.name,
            previous.sha256[:12],
        )
        if load.model.fallback_dir is not None:
            try:
                FallbackStore(load.model.fallback_dir).keep(engine)  # the new last good model
            except Exception:  # best effort: the swap stands without a copy
                logger.exception("cannot keep model %s for fallback", engine.path)
        load.settle(None)

    def _swap_hard_examples(self, new: DaemonConfig) -> DaemonConfig:
        """A changed ``hard_examples`` gets a new writer; one whose folder cannot be made
        keeps the running one (logged)."""
        if new.hard_examples == self.config.hard_examples:
            return new
        try:
            writer = HardExampleWriter(new.hard_examples) if new.hard_examples else None
        except EdgeStnError as exc:
            logger.error("SIGHUP: hard_examples not applied, keeping the running one: %s", exc)
            return new.model_copy(update={"hard_examples": self.config.hard_examples})
        old, self._hard = self._hard, writer
        if old is not None:
            old.close()
        return new

    def _apply(self, new: DaemonConfig) -> None:
        """Apply a reloaded config (device id, MQTT and model already settled)."""
        new = self._swap_hard_examples(new)
        old = {c.id: c for c in self.config.cameras}
        wanted = {c.id: c for c in new.cameras}
        removed = [cid for cid in old if cid not in wanted]
        added = [cid for cid in wanted if cid not in old]
        restarted = [
            cid
            for cid in wanted
            if cid in old and _reader_settings(old[cid]) != _reader_settings(wanted[cid])
        ]
        for cid in removed + restarted:
            self._remove_reader(cid)
        # The detector first: a new camera's first frame finds its proposal settings.
        stage = self._stage
        detector = self._make_detector(self.engine, new)
        detector.stats = stage.detector.stats
        self._stage = _Stage(detector, stage.model)
        self._crops = new.crops
        self._tracks.configure(new.tracking, new.crops)
        self._stats_interval_s = new.stats_interval_s
        self.config = new
        started = self._started and not self.stop_event.is_set()
        for cid in added + restarted:
            reader = self._add_reader(wanted[cid])
            if started:
                reader.start()
        order = list(wanted)
        self.readers = sorted(self.readers, key=lambda r: order.index(r.camera_id))
        self.publisher.update_info(
            config_hash=config_hash(new), cameras=tuple(c.id for c in new.cameras)
        )
        changes = [
            f"{label} {', '.join(ids)}"
            for label, ids in (("added", added), ("removed", removed), ("restarted", restarted))
            if ids
        ]
        for cid in added + restarted:
            logger.info("SIGHUP: camera %s: %s", cid, redact_url(wanted[cid].source))
        det, crops = new.detection, new.crops
        logger.info(
            "SIGHUP: applied detection (score >= %g, NMS IoU %g, max %d), crops "
            "(%s, %d px, quality %d, <= %d bytes), stats every %g s; cameras: %s",
            det.score_threshold,
            det.nms_iou,
            det.max_per_frame,
            "on" if crops.enabled else "off",
            crops.size,
            crops.jpeg_quality,
            crops.max_payload_bytes,
            new.stats_interval_s,
            "; ".join(changes) if changes else "unchanged",
        )

    # ------------------------------------------------------------ remote commands

    def _on_main(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` on the main thread (the one that reloads), wait for it and return its
        result or raise its exception; :class:`CommandFailed` if it does not run in time."""
        future: Future[Any] = Future()
        self._calls.put((call, future))
        self._main_wakeup.set()
        try:
            return future.result(MAIN_THREAD_TIMEOUT_S)
        except FutureTimeout:
            future.cancel()
            raise CommandFailed(
                f"the daemon did not carry it out within {MAIN_THREAD_TIMEOUT_S:g} s"
            ) from None

    def _run_calls(self) -> None:
        while True:
            try:
                call, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def reload_config(self) -> dict[str, Any]:
        """The ``reload`` command: as SIGHUP, and say what changed (CommandTarget)."""

        def reload() -> dict[str, Any]:
            if self.config_path is None:
                raise CommandFailed("the daemon was started without a config file to reload")
            try:
                new = load_config(self.config_path)
            except EdgeStnError as exc:
                raise CommandFailed(
                    f"config not reloaded, the running one is kept: {exc}"
                ) from None
            old = self.config
            changed = [k for k in DaemonConfig.model_fields if getattr(old, k) != getattr(new, k)]
            self.reload()
            return {
                "changed": [k for k in changed if k not in RESTART_ONLY],
                "needs_restart": [k for k in changed if k in RESTART_ONLY],
                "model_loading": self._loading is not None,
                "config_hash": config_hash(self.config),
            }

        result: dict[str, Any] = self._on_main(reload)
        return result

    def update_config(self, change: Callable[[DaemonConfig], DaemonConfig]) -> DaemonConfig:
        """The ``thresholds`` command: apply ``change(config)`` live (CommandTarget)."""

        def apply() -> DaemonConfig:
            new = change(self.config)
            self._apply(new)
            return self.config

        result: DaemonConfig = self._on_main(apply)
        return result

    def latest_frame(self, camera: str) -> Frame | None:
        return self._latest_frames.get(camera)

    def swap_model(self, model: ModelConfig, on_done: Callable[[str | None], None]) -> bool:
        """The ``model`` command: load ``model`` as a reload would (CommandTarget)."""

        def swap() -> bool:
            self._reload_model(model)
            load = self._loading
            if load is None or load.model != model:
                return False
            load.listeners.append(on_done)
            return True

        started: bool = self._on_main(swap)
        return started

    # ------------------------------------------------------------ the detector stage

    def _next_frames(self, pipeline: PreparePipeline) -> list[Frame]:
        frames = []
        for reader in self.readers:
            cap = 1 if self._live.get(reader.camera_id, True) else FILE_FRAMES_IN_STAGE
            if pipeline.in_flight(reader.camera_id) >= cap:
                continue
            frame = reader.poll()
            if frame is not None:
                frames.append(frame)
        return frames

    def _detector_loop(self) -> None:
        # Proposals and windows of the next frames are cut by the helper lanes while this thread
        # runs the model (PreparePipeline).
        lanes = self._stage.detector.prepare_threads
        pipeline = PreparePipeline(lanes - 1)
        try:
            while True:
                self._wakeup.clear()  # before polling: a put after this sets it again
                frames = self._next_frames(pipeline)
                if frames:
                    if self.commands is not None:
                        # the newest frame of each camera, for the snapshot command (without
                        # commands, nothing keeps a frame alive once it is published)
                        for frame in frames:
                            self._latest_frames[frame.camera_id] = frame
                    stage = self._stage  # its detector stays with these frames across a reload
                    pipeline.submit(stage.detector, frames, stage)
                if not len(pipeline):
                    self.heartbeats.beat("detector")
                    if self.stop_event.is_set() or all(r.finished for r in self.readers):
                        self.heartbeats.done("detector")
                        break
                    self._wakeup.wait(0.2)
                    continue
                finished = pipeline.step(timeout=0.002)
                if finished or frames:
                    self.heartbeats.beat("detector")
                for done in finished:
                    self._hand_on(done)
        finally:
            pipeline.close()
            self._put_end()

    def _hand_on(self, done: Finished) -> None:
        """Results of the detector stage to the publisher stage (or a runtime fault counted)."""
        if done.error is not None:
            # A runtime fault (ONNX Runtime error) is logged, counted and survived.
            with self._lock:
                self._stage_errors += 1
            logger.error(
                "detector failed on a batch of %d frame(s)",
                len(done.frames),
                exc_info=(type(done.error), done.error, done.error.__traceback__),
            )
            return
        stage: _Stage = done.tag
        crop_size = done.detector.crop_size
        metrics = self.supervisor.metrics
        for i, (result, frame) in enumerate(zip(done.results, done.frames, strict=True)):
            self._detect_ms.add(result.detect_ms)
            if metrics is not None:
                metrics.observe_detect(result.camera_id, result.detect_ms)
            with self._lock:
                cid = result.camera_id
                self._processed[cid] = self._processed.get(cid, 0) + 1
            last = i == len(done.results) - 1
            self._enqueue(_Work(result, frame, stage.model, crop_size, last))

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
            self.heartbeats.beat("detector")  # waiting for room is progress, not a hang
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
        if not cfg.enabled or not work.result.detections or self._tracks.best_per_track:
            return None
        # Cut and encoded only when the publisher reads them: a dropped result costs none.
        size, image = work.crop_size, work.frame.image
        return [
            LazyCrop(image, d.affine, size, cfg.jpeg_quality, cfg.max_payload_bytes)
            for d in work.result.detections
        ]

    def _publisher_loop(self) -> None:
        while True:
            self.heartbeats.beat("publisher")
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._announce(self._tracks.due(time.time()))
                continue
            if item is _END:
                self._announce(self._tracks.close())
                if self._hard is not None:
                    self._hard.close()
                self.heartbeats.done("publisher")
                return
            assert isinstance(item, _Work)
            item = replace(item, result=self._tracks.assign(item.result))
            # After a stop request, what is queued gets a short wait for room, not the full one.
            timeout = 0.2 if self.stop_event.is_set() else None
            try:
                if item.model != self.publisher.info.model:
                    # The first result of a swapped-in model: 'online' names it first.
                    self.publisher.update_info(model=item.model)
                published = self.publisher.publish_result(
                    item.result, self._crops_of(item), timeout=timeout, flush=item.last
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
            self._after_publish(item, published.id)
            self._publish_ms.add(published.publish_ms)
            if self.supervisor.metrics is not None:
                self.supervisor.metrics.observe_publish(item.result.camera_id, published.publish_ms)
            if self._on_published is not None:
                self._on_published(published)

    def _after_publish(self, item: _Work, result_id: str) -> None:
        """A published result's crop candidates and hard examples (issue 7.6/7.7)."""
        try:
            self._tracks.offer(item.result, result_id, item.frame, item.crop_size)
            self._announce(self._tracks.due())
            if self._hard is not None:
                windows = self._stage.detector.windows
                self._hard.offer(
                    item.result,
                    result_id,
                    item.frame,
                    lambda f, b: windows(f, b).images,
                    item.crop_size,
                )
        except Exception:
            with self._lock:
                self._stage_errors += 1
            logger.exception("camera %s: track crops or hard examples failed", item.frame.camera_id)

    def _announce(self, chosen: list[ChosenCrop]) -> None:
        for c in chosen:
            if not self.publisher.publish_track(
                c, timeout=0.2 if self.stop_event.is_set() else None
            ):
                with self._lock:
                    self._publish_drops += 1

    # ------------------------------------------------------------ stats

    @property
    def queue_drops(self) -> int:
        with self._lock:
            return self._queue_drops

    def drop_counts(self) -> dict[str, int]:
        """Results and frames dropped by the daemon's stages, by stage, and models a reload
        could not swap in, since start (the ``drops`` of stats and the metrics)."""
        with self._lock:
            drops = {
                "result_queue": self._queue_drops,
                "publish": self._publish_drops,
                "stage_errors": self._stage_errors,
                "model_load_failures": self._model_load_failures,
            }
        if self.commands is not None:
            counters = self.commands.counters
            drops["commands_rejected"] = counters.rejected
            drops["commands_failed"] = counters.failed
            drops["commands_busy"] = counters.busy
        drops["detector_frame_errors"] = self.detector.stats.frame_errors
        return drops

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
        drops = self.drop_counts()
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
                "open_errors": s.open_errors,
                "stalls": s.stalls,
                "loops": s.loops,
                "live": reader.is_live,
                "failed": s.state == "failed",
            }
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
                **self.publisher.latency_samples(),  # commit_ms, outbox_ms
            },
            mqtt=self.publisher.counters().to_dict(),
            drops=drops,
            process=self._meter.sample(),
            health=self.supervisor.health_summary(),
            tracking=self._tracks.stats() if self.config.tracking.enabled else None,
            hard_examples=self._hard.stats() if self._hard is not None else None,
        )

    def publish_stats(self) -> bool:
        try:
            return self.publisher.publish_stats(self.stats_document())
        except Exception:
            logger.exception("stats failed")
            return False


def run_daemon(config_path: str | Path) -> int:
    """``edge-stn run --config F``: load, check, run until stopped or every camera ended.

    SIGTERM/SIGINT are handled from the start: a stop while the model loads exits 0 at once.
    """
    cfg = load_config(config_path)
    configure_logging(cfg.log_format, config_secrets(cfg))
    release_frames_to_the_kernel()
    opencv_on_calling_threads()
    stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

    def on_stop() -> None:
        stop.set()
        wake.set()

    def on_reload() -> None:
        reload.set()
        wake.set()

    previous = handle_signals(on_stop, on_reload)
    try:
        try:
            daemon = Daemon(
                cfg, config_path=config_path, stop_event=stop, reload_event=reload, main_wakeup=wake
            )
        except StartupInterrupted as exc:
            logger.info("%s", exc)
            code = 0
        else:
            code = daemon.run(install_signals=False)
    finally:
        restore_signals(previous)
    _exit_if_abandoned(code)
    return code


def _exit_if_abandoned(code: int) -> None:
    """Exit at once when a model load is still running: ONNX Runtime aborts the process if the
    interpreter shuts down while one of its threads is building a session."""
    if not any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
        return
    logger.info("a model load still in progress is abandoned")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
