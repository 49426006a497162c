"""Box overlap and greedy non-maximum suppression (NumPy only).

Boxes are ``[x0, y0, x1, y1]`` in edge coordinates (pixel ``i`` spans ``[i, i+1)``), so a box's
area is ``(x1 - x0) * (y1 - y0)`` with no ``+1``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edge_stn.errors import ShapeError


def _boxes(name: str, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ShapeError(name, b.shape, "(N, 4) [x0, y0, x1, y1]")
    return b


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Intersection over union of every box of ``a`` ``(N, 4)`` with every box of ``b``
    ``(M, 4)``: ``(N, M)``; 0 where both boxes are empty."""
    ba, bb = _boxes("a", a), _boxes("b", b)
    ix0 = np.maximum(ba[:, None, 0], bb[None, :, 0])
    iy0 = np.maximum(ba[:, None, 1], bb[None, :, 1])
    ix1 = np.minimum(ba[:, None, 2], bb[None, :, 2])
    iy1 = np.minimum(ba[:, None, 3], bb[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (ba[:, 2] - ba[:, 0]) * (ba[:, 3] - ba[:, 1])
    area_b = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def greedy_pairs(iou: npt.ArrayLike, threshold: float) -> list[tuple[int, int]]:
    """One-to-one ``(row, column)`` pairs of an overlap matrix with overlap >= ``threshold``,
    best pairs first (greedy; NaN never pairs). Detections to truth (scoring), tracks to
    detections (the tracker)."""
    m = np.array(iou, dtype=np.float64)
    if m.ndim != 2:
        raise ShapeError("iou", m.shape, "(N, M)")
    pairs: list[tuple[int, int]] = []
    if 0 in m.shape:
        return pairs
    m[np.isnan(m)] = -1.0
    rows: set[int] = set()
    cols: set[int] = set()
    for flat in np.argsort(-m, axis=None, kind="stable"):
        i, j = (int(k) for k in np.unravel_index(flat, m.shape))
        if m[i, j] < threshold:
            break  # sorted: every later pair is below too
        if i in rows or j in cols:
            continue
        pairs.append((i, j))
        rows.add(i)
        cols.add(j)
        if len(pairs) == min(m.shape):
            break
    return pairs


def nms(
    boxes: npt.ArrayLike, scores: npt.ArrayLike, iou_threshold: float, max_keep: int | None = None
) -> npt.NDArray[np.int64]:
    """Indices of the boxes kept by greedy, class-agnostic NMS, best score first.

    A box is suppressed when its IoU with a better-scoring kept box is *above* ``iou_threshold``.
    Ties in score keep the earlier box. At most ``max_keep`` indices are returned.
    """
    b = _boxes("boxes", boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != b.shape[0]:
        raise ShapeError("scores", s.shape, f"({b.shape[0]},) one per box")
    order = np.argsort(-s, kind="stable")
    iou = box_iou(b, b)
    keep: list[int] = []
    suppressed = np.zeros(b.shape[0], dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= iou[i] > iou_threshold
    return np.array(keep, dtype=np.int64)
