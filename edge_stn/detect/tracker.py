"""A small IoU tracker: one track id per object across the frames of a camera (issue 7.6).

No maintained tracking library fits the edge budget without pulling scipy or ``lap`` (SORT and
ByteTrack solve the assignment with the Hungarian algorithm and predict with a Kalman filter;
norfair needs scipy): the scenes are a handful of boxes per frame, so greedy matching on an
IoU matrix (:func:`edge_stn.detect.nms.greedy_pairs`, O(n*m) NumPy) does the same job here.

Per camera (:class:`CameraTracker`), on each processed frame:

1. every open track predicts its box at this frame: its last box moved by its velocity (an
   exponential average of the centre's motion per source frame) times the frames since it was
   last seen, so a live camera that drops frames still overlaps;
2. tracks and detections are paired greedily by IoU >= ``iou`` (best pairs first); labels do
   not have to agree (a digit seen at an angle flickers between classes; the track's label is
   the majority of its detections' labels);
3. an unpaired detection starts a track with a new id; a track unpaired for more than
   ``max_age`` processed frames of its camera, or not seen for ``max_age_s`` seconds of capture
   time, ends.

A track gets its id when it starts, so every detection of it carries the id, the first one
included; it is *confirmed* after ``min_hits`` detections (a one-frame false positive never is).
Ids are small integers, unique per camera and epoch: a camera's first id is given by the caller
(the daemon continues from what its outbox recorded, so a restart never reuses one).

NumPy only; one thread per instance.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_stn.detect.nms import box_iou, greedy_pairs

logger = logging.getLogger(__name__)

VELOCITY_SMOOTHING = 0.5
"""Weight of the newest motion in the velocity average."""


@dataclass(frozen=True)
class TrackerSettings:
    iou: float = 0.3
    """smallest IoU between a track's predicted box and a detection that continues it"""
    max_age: int = 15
    """processed frames of its camera a track survives without a detection"""
    max_age_s: float = 2.0
    """seconds (capture time) a track survives without a detection: for live cameras"""
    min_hits: int = 3
    """detections after which a track is confirmed"""

    def __post_init__(self) -> None:
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"iou must be in (0, 1], got {self.iou}")
        if self.max_age < 0 or self.max_age_s <= 0 or self.min_hits < 1:
            raise ValueError(f"need max_age >= 0, max_age_s > 0, min_hits >= 1: {self}")


@dataclass
class Track:
    """One object followed across frames of a camera."""

    camera_id: str
    track_id: int
    box: npt.NDArray[np.float64]
    first_frame: int
    first_ts: float
    last_frame: int
    last_ts: float
    hits: int = 1
    misses: int = 0
    """processed frames since the last detection"""
    velocity: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(2))
    """centre motion per source frame (x, y)"""
    labels: Counter[str] = field(default_factory=Counter)

    def predicted(self, frame_index: int) -> npt.NDArray[np.float64]:
        dx, dy = self.velocity * max(0, frame_index - self.last_frame)
        return self.box + np.array([dx, dy, dx, dy])

    @property
    def label(self) -> str:
        """The majority of its detections' labels (the first seen wins a tie)."""
        return self.labels.most_common(1)[0][0] if self.labels else ""

    def confirmed(self, min_hits: int) -> bool:
        return self.hits >= min_hits


def _centre(box: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])


class CameraTracker:
    """The tracks of one camera (see the module docstring)."""

    def __init__(self, camera_id: str, settings: TrackerSettings, first_id: int = 0) -> None:
        self.camera_id = camera_id
        self.settings = settings
        self.next_id = int(first_id)
        self.tracks: list[Track] = []
        self.started = 0

    def update(
        self,
        boxes: npt.ArrayLike,
        labels: list[str],
        frame_index: int,
        ts: float,
    ) -> tuple[list[int], list[Track]]:
        """Track one processed frame's detections ``(N, 4)``: the track id of each detection
        and the tracks that ended (unmatched for too long)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = self.settings
        ids = [-1] * b.shape[0]
        live = self.tracks
        if live and b.shape[0]:
            predicted = np.stack([t.predicted(frame_index) for t in live])
            pairs = greedy_pairs(box_iou(predicted, b), s.iou)
        else:
            pairs = []
        matched = set()
        for ti, di in pairs:
            t = live[ti]
            frames = max(1, frame_index - t.last_frame)
            motion = (_centre(b[di]) - _centre(t.box)) / frames
            t.velocity = VELOCITY_SMOOTHING * motion + (1 - VELOCITY_SMOOTHING) * t.velocity
            t.box = b[di].copy()
            t.last_frame, t.last_ts = frame_index, ts
            t.hits += 1
            t.misses = 0
            t.labels[labels[di]] += 1
            ids[di] = t.track_id
            matched.add(ti)
        ended: list[Track] = []
        kept: list[Track] = []
        for ti, t in enumerate(live):
            if ti not in matched:
                t.misses += 1
                if t.misses > s.max_age or ts - t.last_ts > s.max_age_s:
                    ended.append(t)
                    continue
            kept.append(t)
        for di in range(b.shape[0]):
            if ids[di] >= 0:
                continue
            t = Track(
                self.camera_id,
                self.next_id,
                b[di].copy(),
                frame_index,
                ts,
                frame_index,
                ts,
                labels=Counter({labels[di]: 1}),
            )
            self.next_id += 1
            self.started += 1
            kept.append(t)
            ids[di] = t.track_id
        self.tracks = kept
        return ids, ended

    def expire(self, now_ts: float) -> list[Track]:
        """End the tracks not seen for ``max_age_s`` by ``now_ts`` (a camera that went quiet)."""
        ended = [t for t in self.tracks if now_ts - t.last_ts > self.settings.max_age_s]
        if ended:
            self.tracks = [t for t in self.tracks if t not in ended]
        return ended

    def close(self) -> list[Track]:
        """End every open track (the camera ended or was removed)."""
        ended, self.tracks = self.tracks, []
        return ended
