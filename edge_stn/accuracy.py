"""Scoring received results against ground truth (the synthetic camera's, or a truth JSON of
``edge-stn synth-video``): per frame, detections are matched one-to-one to truth objects of the
same ``frame_index`` by IoU >= 0.5, best pairs first (greedy). Torch-free, NumPy only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_stn.detect.nms import box_iou

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


def match_frame(
    detections: Sequence[tuple[str, Box]], truth: Sequence[tuple[str, Box]]
) -> tuple[int, int]:
    """(matched, correctly labelled) of one frame: ``(label, box)`` pairs on both sides."""
    if not detections or not truth:
        return 0, 0
    iou = box_iou([b for _, b in detections], [b for _, b in truth])
    matched = correct = 0
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < MATCH_IOU:
            break
        if np.isnan(iou[i, j]):
            continue
        matched += 1
        correct += detections[i][0] == truth[j][0]
        iou[i, :] = -1.0
        iou[:, j] = -1.0
    return matched, correct


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
