"""Scoring received results against ground truth (the synthetic camera's, or a truth JSON of
``edge-stn synth-video``): per frame, detections are matched one-to-one to truth objects of the
same ``frame_index`` by IoU >= 0.5, best pairs first (greedy). Torch-free, NumPy only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_stn.detect.nms import box_iou, greedy_pairs

MATCH_IOU = 0.5

Box = Sequence[float]


@dataclass(frozen=True)
class Accuracy:
    """Counts and rates: ``recall`` = matched / truth objects, ``precision`` = matched /
    detections, ``label_accuracy`` = matched with the right label / matched (None when there
    is nothing to divide)."""

    frames: int
    truth: int
    detections: int
    matched: int
    correct: int

    @property
    def recall(self) -> float | None:
        return self.matched / self.truth if self.truth else None

    @property
    def precision(self) -> float | None:
        return self.matched / self.detections if self.detections else None

    @property
    def label_accuracy(self) -> float | None:
        return self.correct / self.matched if self.matched else None

    def line(self) -> str:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}%"

        return (
            f"recall {pct(self.recall)} ({self.matched}/{self.truth}), "
            f"precision {pct(self.precision)} ({self.matched}/{self.detections}), "
            f"label accuracy {pct(self.label_accuracy)} ({self.correct}/{self.matched}) "
            f"over {self.frames} frames at IoU >= {MATCH_IOU:g}"
        )


def match_pairs(detections: Sequence[Box], truth: Sequence[Box]) -> list[tuple[int, int]]:
    """One-to-one ``(detection, truth)`` index pairs at IoU >= 0.5, best pairs first (greedy)."""
    if not detections or not truth:
        return []
    return greedy_pairs(box_iou(list(detections), list(truth)), MATCH_IOU)


def match_frame(
    detections: Sequence[tuple[str, Box]], truth: Sequence[tuple[str, Box]]
) -> tuple[int, int]:
    """(matched, correctly labelled) of one frame: ``(label, box)`` pairs on both sides."""
    pairs = match_pairs([b for _, b in detections], [b for _, b in truth])
    return len(pairs), sum(detections[i][0] == truth[j][0] for i, j in pairs)


def crop_rotation(affine: npt.ArrayLike) -> float:
    """Rotation (degrees, counter-clockwise on screen) of a canonical crop in its frame: the
    direction of the crop's x axis under ``affine`` (crop pixel -> frame pixel, DESIGN §4). A
    digit drawn at angle ``a`` looks upright in a crop whose rotation is ``a``."""
    a = np.asarray(affine, dtype=np.float64)
    return float(np.degrees(np.arctan2(-a[1, 0], a[0, 0])))


@dataclass(frozen=True)
class RotationError:
    """How far canonical crops are from upright: ``offset`` is the model's mean canonical angle
    (crop rotation minus the object's), ``median``/``p90`` the absolute residuals after removing
    it, over ``n`` matched objects."""

    n: int
    offset: float
    median: float
    p90: float

    def line(self) -> str:
        return (
            f"rotation residual median {self.median:.1f} deg, p90 {self.p90:.1f} deg "
            f"(mean canonical angle {self.offset:+.1f} deg removed) over {self.n} objects"
        )


def rotation_error(crop_angles: Sequence[float], truth_angles: Sequence[float]) -> RotationError:
    """Residual rotation of matched canonical crops against the truth (angles in degrees)."""
    d = np.asarray(crop_angles, dtype=np.float64) - np.asarray(truth_angles, dtype=np.float64)
    if d.size == 0:
        return RotationError(0, 0.0, float("nan"), float("nan"))
    d = (d + 180.0) % 360.0 - 180.0
    offset = float(np.degrees(np.angle(np.mean(np.exp(1j * np.radians(d))))))
    r = np.abs((d - offset + 180.0) % 360.0 - 180.0)
    return RotationError(int(d.size), offset, float(np.median(r)), float(np.percentile(r, 90)))


def score(
    frames: Iterable[tuple[Sequence[tuple[str, Box]], Sequence[tuple[str, Box]]]],
) -> Accuracy:
    """Score ``(detections, truth)`` per frame (each a list of ``(label, box)``)."""
    n = t = d = m = c = 0
    for dets, truth in frames:
        mm, cc = match_frame(dets, truth)
        n += 1
        t += len(truth)
        d += len(dets)
        m += mm
        c += cc
    return Accuracy(frames=n, truth=t, detections=d, matched=m, correct=c)


PosedDetection = tuple[str, Box, npt.ArrayLike]
"""``(label, box, affine)``: a detection with its crop -> frame affine."""
PosedTruth = tuple[str, Box, float]
"""``(label, box, angle)``: a truth object with its rotation in degrees."""


def score_with_pose(
    frames: Iterable[tuple[Sequence[PosedDetection], Sequence[PosedTruth]]],
) -> tuple[Accuracy, RotationError]:
    """:func:`score` and :func:`rotation_error` of the same matches, matched once per frame."""
    n = t = d = m = c = 0
    crop_angles: list[float] = []
    truth_angles: list[float] = []
    for dets, truth in frames:
        pairs = match_pairs([b for _, b, _ in dets], [b for _, b, _ in truth])
        n += 1
        t += len(truth)
        d += len(dets)
        m += len(pairs)
        for i, j in pairs:
            c += dets[i][0] == truth[j][0]
            crop_angles.append(crop_rotation(dets[i][2]))
            truth_angles.append(truth[j][2])
    acc = Accuracy(frames=n, truth=t, detections=d, matched=m, correct=c)
    return acc, rotation_error(crop_angles, truth_angles)
