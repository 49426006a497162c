"""The window extractor: the one definition of what the model sees (DESIGN §4).

A detector proposal box (``[x0, y0, x1, y1]`` in frame pixels, edge coordinates: pixel ``i``
spans ``[i, i+1)``, as ``cv2.boundingRect`` reports) is squared about its centre, widened by a
context margin on every side, and resampled from the grayscale frame to the model input size.
Training data for detection models is cut with this same function, so the model sees at
training exactly what the daemon gives it. NumPy + OpenCV only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.errors import ShapeError
from edge_stn.geometry import frame_from_window


@dataclass(frozen=True)
class WindowSpec:
    """How windows are cut: ``size`` is the model input side (pixels); ``context_margin`` the
    fraction of the box's longer side added on each side; ``min_side`` the smallest window side
    in frame pixels (tiny boxes are not blown up from a couple of pixels)."""

    size: int = 48
    context_margin: float = 0.25
    min_side: float = 12.0

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"window size must be >= 4, got {self.size}")
        if self.context_margin < 0:
            raise ValueError(f"context_margin must be >= 0, got {self.context_margin}")

    def to_dict(self) -> dict[str, float | int]:
        return {"size": self.size, "context_margin": self.context_margin, "min_side": self.min_side}


@dataclass(frozen=True)
class WindowPlacement:
    """Where a window sits in the frame: outer top-left corner (edge coordinates) and scale
    (frame pixels per window pixel). Window pixel ``u`` is frame pixel ``x0 + (u+0.5)*s - 0.5``."""

    x0: float
    y0: float
    scale: float


def place_window(box: npt.ArrayLike, spec: WindowSpec) -> WindowPlacement:
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise ShapeError("box", b.shape, "(4,) [x0, y0, x1, y1]")
    x0, y0, x1, y1 = b
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * spec.context_margin)
    side = max(side, spec.min_side)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return WindowPlacement(cx - side / 2.0, cy - side / 2.0, side / spec.size)


def sample_through(
    image: npt.NDArray[Any], src_from_out: npt.ArrayLike, size: tuple[int, int]
) -> npt.NDArray[Any]:
    """Resample ``image`` at ``src_from_out @ [u, v, 1]`` for every output pixel ``(u, v)`` of a
    ``(width, height)`` output: bilinear, black outside. Windows, canonical crops and the
    evaluation's theta-based crops all sample through this one call, so they agree exactly."""
    return np.asarray(
        cv2.warpAffine(
            image,
            np.asarray(src_from_out, dtype=np.float64),
            size,
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    )


def window_bounds(
    placement: WindowPlacement, size: int, shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """The part ``(x0, y0, x1, y1)`` of a frame of ``shape`` that :func:`extract_window` reads
    for this window (its footprint plus the low-pass filter's border), or None when the window
    misses the frame. Cutting a window from that part alone (its placement shifted by
    ``(x0, y0)``) gives exactly the window cut from the whole frame."""
    s = placement.scale
    h, w = shape[:2]
    pad = 2 + math.ceil(2 * s)
    fx0 = max(0, math.floor(placement.x0) - pad)
    fy0 = max(0, math.floor(placement.y0) - pad)
    fx1 = min(w, math.ceil(placement.x0 + size * s) + pad)
    fy1 = min(h, math.ceil(placement.y0 + size * s) + pad)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    return fx0, fy0, fx1, fy1


def extract_window(
    gray: npt.NDArray[np.uint8], placement: WindowPlacement, size: int
) -> npt.NDArray[np.uint8]:
    """Resample one window (``size x size``, uint8) from a grayscale frame.

    Outside the frame is black (0), like the model's zero padding. When the window shrinks the
    frame (scale > 1) the source is low-pass filtered first, so small models are not fed aliasing.
    """
    if gray.ndim != 2:
        raise ShapeError("frame", gray.shape, "(H, W) grayscale")
    # Work on the part of the frame the window covers (plus a border for the filter).
    bounds = window_bounds(placement, size, gray.shape)
    if bounds is None:
        return np.zeros((size, size), dtype=np.uint8)
    fx0, fy0, fx1, fy1 = bounds
    return window_from_part(gray[fy0:fy1, fx0:fx1], (fx0, fy0), placement, size)


def window_from_part(
    part: npt.NDArray[np.uint8],
    origin: tuple[int, int],
    placement: WindowPlacement,
    size: int,
) -> npt.NDArray[np.uint8]:
    """The window cut from ``part``, the grayscale region of the frame at ``origin`` (x, y) that
    :func:`window_bounds` names: the same pixels as :func:`extract_window` on the whole frame,
    for a caller that converts only that region to gray."""
    if part.ndim != 2:
        raise ShapeError("part", part.shape, "(h, w) grayscale")
    s = placement.scale
    m = frame_from_window(placement.x0, placement.y0, s)[:2].copy()
    src = part
    if s > 1.0:
        sigma = 0.5 * math.sqrt(s * s - 1.0)
        src = np.asarray(
            cv2.GaussianBlur(
                src, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE
            ),
            dtype=np.uint8,
        )
    m[0, 2] -= origin[0]
    m[1, 2] -= origin[1]
    return np.asarray(sample_through(src, m, (size, size)), dtype=np.uint8)


def extract_windows(
    gray: npt.NDArray[np.uint8], boxes: npt.ArrayLike, spec: WindowSpec
) -> tuple[npt.NDArray[np.uint8], list[WindowPlacement]]:
    """All windows of a frame: ``(N, 1, size, size)`` uint8 and their placements."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((b.shape[0], 1, spec.size, spec.size), dtype=np.uint8)
    places = []
    for i, box in enumerate(b):
        p = place_window(box, spec)
        out[i, 0] = extract_window(gray, p, spec.size)
        places.append(p)
    return out, places
