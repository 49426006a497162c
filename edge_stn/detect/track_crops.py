"""Track ids on results and the ``best_per_track`` crop policy (issue 7.6), for the daemon's
publisher stage.

:class:`TrackStage` owns one :class:`~edge_stn.detect.tracker.CameraTracker` per camera and,
under ``crops.policy: best_per_track``, the best crop seen so far of each open track:

* :meth:`TrackStage.assign` gives a result's detections their track ids; under
  ``best_per_track`` their ``crop_status`` becomes ``policy`` (the result goes out at once,
  without crops);
* :meth:`TrackStage.offer`, once the result has its id, keeps a detection's crop when it is the
  best of its track so far. *Best* is the highest classification score (the frame the model
  was surest of: sharp, upright, not cut by the frame edge or occluded); near-equal scores
  (within 0.001) prefer the larger box, sampled from more pixels. The crop is cut and JPEG
  encoded at once, so the track holds about one JPEG (a few KiB at 64 px), never a frame;
* :meth:`TrackStage.due` returns the chosen crops to announce: tracks that ended (no detection
  for ``tracking.max_age`` frames or ``max_age_s`` seconds), tracks open for ``crops.hold_s``
  (a long-lived object gets its crop then; the track goes on, without a second crop), and the
  oldest tracks beyond ``crops.max_open_tracks``; :meth:`TrackStage.close` those still open
  when the pipeline stops. A track that never reached ``tracking.min_hits`` detections gets no
  crop (a one-frame false positive is not announced).

Why the publisher stage and not the detector: the stage is one thread that sees each published
result in order, so a chosen crop always names a result that was published (a result dropped
on a full queue never reaches it, and is never named), and the detector thread, the pipeline's
bottleneck, keeps its time for the model. The tracker is a few NumPy calls per frame.

NumPy + OpenCV; one thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from edge_stn.config import CropConfig, TrackingConfig
from edge_stn.detect.crops import LazyCrop
from edge_stn.detect.tracker import CameraTracker, Track, TrackerSettings
from edge_stn.records import ChosenCrop, Detection, Frame, FrameResult, TrackEnd

logger = logging.getLogger(__name__)

SCORE_TIE = 1e-3


def tracker_settings(cfg: TrackingConfig) -> TrackerSettings:
    return TrackerSettings(
        iou=cfg.iou, max_age=cfg.max_age, max_age_s=cfg.max_age_s, min_hits=cfg.min_hits
    )


@dataclass
class _Candidate:
    """The best crop of a track so far."""

    result_id: str
    index: int
    frame_index: int
    detection: Detection
    jpeg: bytes | None
    size: int

    def beaten_by(self, d: Detection) -> bool:
        mine = self.detection
        if d.score > mine.score + SCORE_TIE:
            return True
        if d.score < mine.score - SCORE_TIE:
            return False
        return _area(d) > _area(mine)


def _area(d: Detection) -> float:
    b = d.box
    return float((b[2] - b[0]) * (b[3] - b[1]))


class TrackStage:
    """Tracking and the crop policy of the daemon's publisher stage (module docstring).

    ``first_ids``: each camera's first unused track id (from the outbox, so ids continue across
    restarts within an epoch)."""

    def __init__(
        self,
        tracking: TrackingConfig,
        crops: CropConfig,
        first_ids: dict[str, int] | None = None,
    ) -> None:
        self.tracking = tracking
        self.crops = crops
        self._settings = tracker_settings(tracking)
        self._first_ids = dict(first_ids or {})
        self._cameras: dict[str, CameraTracker] = {}
        self._best: dict[tuple[str, int], _Candidate] = {}
        self._announced: set[tuple[str, int]] = set()
        self._tracks: dict[tuple[str, int], Track] = {}
        self._due: list[ChosenCrop] = []
        self.counts = {
            "tracks_ended": 0,
            "tracks_confirmed": 0,
            "crops_chosen": 0,
            "crops_unconfirmed": 0,
        }

    @property
    def best_per_track(self) -> bool:
        return self.tracking.enabled and self.crops.policy == "best_per_track"

    def configure(self, tracking: TrackingConfig, crops: CropConfig) -> None:
        """Apply a reload from the next frame (open tracks keep their ids)."""
        self.tracking, self.crops = tracking, crops
        self._settings = tracker_settings(tracking)
        for t in self._cameras.values():
            t.settings = self._settings

    def _camera(self, camera_id: str) -> CameraTracker:
        tracker = self._cameras.get(camera_id)
        if tracker is None:
            first = self._first_ids.get(camera_id, 0)
            tracker = self._cameras[camera_id] = CameraTracker(camera_id, self._settings, first)
        return tracker

    # ------------------------------------------------------------ per result

    def assign(self, result: FrameResult) -> FrameResult:
        """The result with its detections' track ids (and ``crop_status: policy`` under
        ``best_per_track``); tracks that ended on this frame are remembered for :meth:`due`."""
        if not self.tracking.enabled:
            return result
        dets = result.detections
        tracker = self._camera(result.camera_id)
        boxes = np.array([d.box for d in dets]) if dets else np.zeros((0, 4))
        ids, ended = tracker.update(
            boxes, [d.label for d in dets], result.frame_index, result.capture_ts
        )
        for t in tracker.tracks:
            self._tracks[(t.camera_id, t.track_id)] = t
        self._end(ended, "ended")
        if self.best_per_track:
            new = tuple(
                d.with_track(i).with_crop(None, "policy") for d, i in zip(dets, ids, strict=True)
            )
        else:
            new = tuple(d.with_track(i) for d, i in zip(dets, ids, strict=True))
        return replace(result, detections=new)

    def offer(self, result: FrameResult, result_id: str, frame: Frame, crop_size: int) -> None:
        """Keep the crops of a published result that are their track's best so far."""
        if not self.best_per_track:
            return
        cfg = self.crops
        for n, d in enumerate(result.detections):
            key = (result.camera_id, d.track_id if d.track_id is not None else -1)
            if d.track_id is None or key in self._announced:
                continue
            held = self._best.get(key)
            if held is not None and not held.beaten_by(d):
                continue
            encoded = LazyCrop(
                frame.image, d.affine, crop_size, cfg.jpeg_quality, cfg.max_payload_bytes
            ).encoded
            self._best[key] = _Candidate(
                result_id, n, result.frame_index, d, encoded.data, crop_size
            )

    def _end(self, tracks: list[Track], reason: TrackEnd) -> None:
        for t in tracks:
            key = (t.camera_id, t.track_id)
            self._tracks.pop(key, None)
            self.counts["tracks_ended"] += 1
            confirmed = t.confirmed(self._settings.min_hits)
            if confirmed:
                self.counts["tracks_confirmed"] += 1
            if key in self._announced:
                self._announced.discard(key)
                continue
            self._choose(t, reason, confirmed)

    def _choose(self, t: Track, reason: TrackEnd, confirmed: bool) -> None:
        best = self._best.pop((t.camera_id, t.track_id), None)
        if best is None:
            return
        if not confirmed:
            self.counts["crops_unconfirmed"] += 1
            return
        d = best.detection
        self._due.append(
            ChosenCrop(
                camera_id=t.camera_id,
                track_id=t.track_id,
                result_id=best.result_id,
                index=best.index,
                frame_index=best.frame_index,
                label=d.label,
                score=d.score,
                box=d.box,
                jpeg=best.jpeg,
                width=best.size,
                height=best.size,
                first_frame=t.first_frame,
                last_frame=t.last_frame,
                first_ts=t.first_ts,
                last_ts=t.last_ts,
                hits=t.hits,
                labels=dict(t.labels),
                reason=reason,
            )
        )
        self.counts["crops_chosen"] += 1

    # ------------------------------------------------------------ what to announce

    def due(self, now_ts: float | None = None) -> list[ChosenCrop]:
        """The chosen crops to announce now. With ``now_ts`` (Unix seconds), tracks of cameras
        that went quiet for ``max_age_s`` end too (called when the stage is idle)."""
        if now_ts is not None:
            for tracker in self._cameras.values():
                self._end(tracker.expire(now_ts), "ended")
        if self.best_per_track:
            self._hold()
        out, self._due = self._due, []
        return out

    def _hold(self) -> None:
        min_hits = self._settings.min_hits
        for key, t in list(self._tracks.items()):
            held = key in self._best and t.last_ts - t.first_ts >= self.crops.hold_s
            if held and t.confirmed(min_hits):
                self._announced.add(key)
                self._choose(t, "held", True)
        over = len(self._best) - self.crops.max_open_tracks
        if over > 0:
            oldest = sorted(
                (k for k in self._best if k in self._tracks),
                key=lambda k: self._tracks[k].first_ts,
            )[:over]
            for key in oldest:
                t = self._tracks[key]
                self._announced.add(key)
                self._choose(t, "evicted", t.confirmed(min_hits))
            for key in [k for k in self._best if k not in self._tracks]:
                del self._best[key]  # a track that is gone (never happens: kept in step)

    def close(self) -> list[ChosenCrop]:
        """End every open track (the pipeline stops): their crops, reason ``stopped``."""
        for tracker in self._cameras.values():
            self._end(tracker.close(), "stopped")
        self._best.clear()
        self._announced.clear()
        out, self._due = self._due, []
        return out

    def stats(self) -> dict[str, int]:
        """Counters since start (the ``tracking`` part of stats)."""
        cameras = list(self._cameras.values())  # read from the stats thread
        return {
            **self.counts,
            "tracks_started": sum(t.started for t in cameras),
            "tracks_open": sum(len(t.tracks) for t in cameras),
            "crops_held": len(self._best),
        }
