"""Distorted-MNIST generators, deterministic by seed (the STN paper, section 4.1).

TC  (translated, cluttered): a 60x60 canvas, one 28x28 digit at a uniformly random integer
    position, and 6 clutter patches of 6x6 pixels cut at random places from random *other*
    digits of the same split, pasted at random positions; digit and clutter combine by
    pixel-wise maximum. (The paper: "6 random 6x6 crops of other digits".)
RTS (rotated, translated, scaled): a 42x42 canvas, the digit rotated by U[-45, 45] degrees,
    scaled by U[0.7, 1.2] about its centre, and translated uniformly as far as keeps its ink
    inside the canvas.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.base import Samples
from edge_stn.data.mnist import DIGIT_NAMES, DigitPool


class TCGenerator:
    def __init__(
        self, pool: DigitPool, *, size: int = 60, clutter_count: int = 6, clutter_size: int = 6
    ) -> None:
        if size < 28:
            raise ValueError(f"TC canvas must be at least 28 pixels, got {size}")
        self.pool = pool
        self.size_px = size
        self.clutter_count = clutter_count
        self.clutter_size = clutter_size
        self.label_names = list(DIGIT_NAMES)
        self.channels = 1
        self.size = (size, size)

    def num_items(self) -> int:
        return len(self.pool)

    def draw(self, items: npt.NDArray[np.int64], rng: np.random.Generator) -> Samples:
        n = int(items.shape[0])
        s, c, k = self.size_px, self.clutter_size, self.clutter_count
        out = np.zeros((n, 1, s, s), dtype=np.uint8)
        pos = rng.integers(0, s - 28 + 1, size=(n, 2))
        # Clutter sources are other digits: shift by 1..N-1 so a digit never clutters itself.
        shift = rng.integers(1, len(self.pool), size=(n, k))
        src = (items[:, None] + shift) % len(self.pool)
        src_xy = rng.integers(0, 28 - c + 1, size=(n, k, 2))
        dst_xy = rng.integers(0, s - c + 1, size=(n, k, 2))
        imgs = self.pool.images
        for i in range(n):
            canvas = out[i, 0]
            for j in range(k):
                sx, sy = src_xy[i, j]
                dx, dy = dst_xy[i, j]
                patch = imgs[src[i, j], sy : sy + c, sx : sx + c]
                np.maximum(
                    canvas[dy : dy + c, dx : dx + c], patch, out=canvas[dy : dy + c, dx : dx + c]
                )
            x, y = pos[i]
            region = canvas[y : y + 28, x : x + 28]
            np.maximum(region, imgs[items[i]], out=region)
        return Samples(out, self.pool.labels[items].astype(np.int64))


def random_similarity(
    rng: np.random.Generator, angle: float, scale: tuple[float, float]
) -> tuple[float, float]:
    return float(rng.uniform(-angle, angle)), float(rng.uniform(*scale))


def place_transformed(
    image: npt.NDArray[np.uint8],
    canvas_size: tuple[int, int],
    angle_deg: float,
    scale: float,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Rotate and scale ``image`` about its centre and put it at a random position in a
    ``(height, width)`` canvas where all its ink stays inside. Returns the canvas and the 2x3
    matrix mapping image pixels to canvas pixels."""
    h, w = image.shape[:2]
    ch, cw = canvas_size
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle_deg, scale)
    ys, xs = np.nonzero(image if image.ndim == 2 else image.max(axis=2))
    if xs.size == 0:
        xs, ys = np.array([0, w - 1]), np.array([0, h - 1])
    x0, x1, y0, y1 = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x1, y1, 1], [x0, y1, 1]], dtype=np.float64)
    pts = corners @ m.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # Shift so the ink box lies in [-0.5, size - 0.5]; draw uniformly within the slack.
    tx_lo, tx_hi = -0.5 - lo[0], cw - 0.5 - hi[0]
    ty_lo, ty_hi = -0.5 - lo[1], ch - 0.5 - hi[1]
    tx = rng.uniform(tx_lo, tx_hi) if tx_hi > tx_lo else (tx_lo + tx_hi) / 2
    ty = rng.uniform(ty_lo, ty_hi) if ty_hi > ty_lo else (ty_lo + ty_hi) / 2
    m = m.copy()
    m[0, 2] += tx
    m[1, 2] += ty
    out = cv2.warpAffine(
        image, m, (cw, ch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return np.asarray(out, dtype=np.uint8), np.asarray(m, dtype=np.float64)


class RTSGenerator:
    def __init__(
        self,
        pool: DigitPool,
        *,
        size: int = 42,
        angle: float = 45.0,
        scale: tuple[float, float] = (0.7, 1.2),
    ) -> None:
        self.pool = pool
        self.size_px = size
        self.angle = angle
        self.scale = scale
        self.label_names = list(DIGIT_NAMES)
        self.channels = 1
        self.size = (size, size)

    def num_items(self) -> int:
        return len(self.pool)

    def draw(self, items: npt.NDArray[np.int64], rng: np.random.Generator) -> Samples:
        n = int(items.shape[0])
        out = np.zeros((n, 1, self.size_px, self.size_px), dtype=np.uint8)
        for i in range(n):
            a, s = random_similarity(rng, self.angle, self.scale)
            out[i, 0], _ = place_transformed(
                self.pool.images[items[i]], (self.size_px, self.size_px), a, s, rng
            )
        return Samples(out, self.pool.labels[items].astype(np.int64))
