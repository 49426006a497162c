"""Synthetic scenes of MNIST digits with ground truth (NumPy + OpenCV, torch-free).

Bright digits at any rotation and scale on a dark, slightly noisy background with clutter
fragments, like pieces of paper under a camera. The same renderer draws the demo model's
training windows and the synthetic camera's frames, so ground truth is known exactly: each
object's label, tight ink box (edge coordinates, as ``cv2.boundingRect``), centre, angle, scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.mnist import DigitPool

INK_THRESHOLD = 64  # uint8 level above which a pixel counts as the digit's ink


@dataclass(frozen=True)
class DigitPlacement:
    """One digit to draw: pool index, rotation (deg, counter-clockwise), scale, centre (pixels)."""

    index: int
    angle: float
    scale: float
    cx: float
    cy: float


@dataclass(frozen=True)
class SceneObject:
    label: int
    box: tuple[float, float, float, float]
    cx: float
    cy: float
    angle: float
    scale: float


@dataclass
class Scene:
    image: npt.NDArray[np.uint8]
    objects: list[SceneObject] = field(default_factory=list)
    clutter_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def digit_matrix(p: DigitPlacement) -> npt.NDArray[np.float64]:
    """2x3: digit pixel (28x28) -> scene pixel, rotated and scaled about the digit's centre."""
    m = cv2.getRotationMatrix2D((13.5, 13.5), p.angle, p.scale)
    m[0, 2] += p.cx - 13.5
    m[1, 2] += p.cy - 13.5
    return np.asarray(m, dtype=np.float64)


def _ink_box(
    mask: npt.NDArray[np.uint8], ox: int = 0, oy: int = 0
) -> tuple[float, float, float, float] | None:
    pts = cv2.findNonZero((mask > INK_THRESHOLD).astype(np.uint8))
    if pts is None:
        return None
    x, y, w, h = cv2.boundingRect(pts)
    return (float(x + ox), float(y + oy), float(x + w + ox), float(y + h + oy))


def _warp_max(
    canvas: npt.NDArray[np.float32], src: npt.NDArray[np.uint8], m: npt.NDArray[np.float64]
) -> tuple[float, float, float, float] | None:
    """Warp ``src`` by ``m`` into ``canvas`` (pixel-wise maximum), touching only its footprint;
    returns the tight ink box of what was drawn, in canvas pixels."""
    h, w = canvas.shape
    sh, sw = src.shape
    corners = np.array(
        [[-0.5, -0.5, 1], [sw - 0.5, -0.5, 1], [sw - 0.5, sh - 0.5, 1], [-0.5, sh - 0.5, 1]]
    )
    pts = corners @ m.T
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1 = min(w, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(h, int(np.ceil(pts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    mm = m.copy()
    mm[0, 2] -= x0
    mm[1, 2] -= y0
    layer = cv2.warpAffine(
        src,
        mm,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    roi = canvas[y0:y1, x0:x1]
    np.maximum(roi, layer.astype(np.float32), out=roi)
    return _ink_box(np.asarray(layer, dtype=np.uint8), x0, y0)


class SceneRenderer:
    """Draws digits and clutter from one split's pool into frames of a given size."""

    def __init__(
        self, pool: DigitPool, *, noise: float = 4.0, background: tuple[int, int] = (0, 30)
    ) -> None:
        self.pool = pool
        self.noise = noise
        self.background = background

    def background_image(
        self, width: int, height: int, rng: np.random.Generator
    ) -> npt.NDArray[np.float32]:
        lo, hi = self.background
        a, b = rng.uniform(lo, hi, size=2)
        ramp = np.linspace(a, b, width, dtype=np.float32)[None, :].repeat(height, 0)
        if self.noise > 0:
            ramp += self.noise * rng.standard_normal((height, width), dtype=np.float32)
        return ramp

    def draw_digit(self, canvas: npt.NDArray[np.float32], p: DigitPlacement) -> SceneObject | None:
        box = _warp_max(canvas, self.pool.images[p.index], digit_matrix(p))
        if box is None:
            return None
        return SceneObject(int(self.pool.labels[p.index]), box, p.cx, p.cy, p.angle, p.scale)

    def draw_clutter(
        self,
        canvas: npt.NDArray[np.float32],
        rng: np.random.Generator,
        size: tuple[int, int] = (5, 9),
        zoom: tuple[float, float] = (1.0, 2.5),
    ) -> tuple[float, float, float, float] | None:
        """A fragment of a random digit (a stroke piece, not a whole digit)."""
        h, w = canvas.shape
        idx = int(rng.integers(len(self.pool)))
        k = int(rng.integers(size[0], size[1] + 1))
        sx, sy = rng.integers(4, 28 - k - 3, size=2)
        patch = self.pool.images[idx, sy : sy + k, sx : sx + k]
        if patch.max() <= INK_THRESHOLD:
            return None
        z = float(rng.uniform(*zoom))
        m = np.asarray(
            cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 360)), z),
            dtype=np.float64,
        )
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        m[0, 2] += cx - (k / 2 - 0.5)
        m[1, 2] += cy - (k / 2 - 0.5)
        return _warp_max(canvas, patch, m)

    def render(
        self,
        width: int,
        height: int,
        placements: list[DigitPlacement],
        rng: np.random.Generator,
        clutter: int = 0,
    ) -> Scene:
        canvas = self.background_image(width, height, rng)
        scene = Scene(np.zeros((height, width), np.uint8))
        for _ in range(clutter):
            b = self.draw_clutter(canvas, rng)
            if b is not None:
                scene.clutter_boxes.append(b)
        for p in placements:
            obj = self.draw_digit(canvas, p)
            if obj is not None:
                scene.objects.append(obj)
        scene.image = np.clip(canvas, 0, 255).astype(np.uint8)
        return scene


def random_placements(
    pool_size: int,
    width: int,
    height: int,
    count: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (1.2, 3.0),
    angle: float = 45.0,
    attempts: int = 50,
) -> list[DigitPlacement]:
    """Up to ``count`` digits at random poses whose footprints do not overlap."""
    out: list[DigitPlacement] = []
    radii: list[float] = []
    for _ in range(count):
        for _ in range(attempts):
            s = float(rng.uniform(*scale))
            r = 14.0 * s * 1.15
            if 2 * r >= min(width, height):
                continue
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(
                (cx - q.cx) ** 2 + (cy - q.cy) ** 2 > (r + rq) ** 2
                for q, rq in zip(out, radii, strict=True)
            ):
                out.append(
                    DigitPlacement(
                        int(rng.integers(pool_size)), float(rng.uniform(-angle, angle)), s, cx, cy
                    )
                )
                radii.append(r)
                break
    return out
