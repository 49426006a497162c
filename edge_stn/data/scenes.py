"""Synthetic scenes of MNIST digits with ground truth (NumPy + OpenCV, torch-free).

Bright digits at any rotation and scale on a dark, slightly noisy background with clutter
fragments, like pieces of paper under a camera. The same renderer draws the demo model's
training windows and the synthetic camera's frames, so ground truth is known exactly: each
object's label, tight ink box (edge coordinates, as ``cv2.boundingRect``), centre, angle, scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.mnist import DigitPool

INK_THRESHOLD = 64  # uint8 level above which a pixel counts as the digit's ink


@dataclass(frozen=True)
class DigitPlacement:
    """One digit to draw: pool index, rotation (deg, counter-clockwise), scale, centre (pixels),
    and its finer pose and look: ``shear`` (x += shear * y in the digit's own upright frame),
    ``aspect`` (x scale / y scale, about 1) and ``ink`` (peak ink level above the background,
    grey levels: 255 is full contrast on black, 50 is faint)."""

    index: int
    angle: float
    scale: float
    cx: float
    cy: float
    shear: float = 0.0
    aspect: float = 1.0
    ink: float = 255.0


@dataclass(frozen=True)
class SceneObject:
    label: int
    box: tuple[float, float, float, float]
    cx: float
    cy: float
    angle: float
    scale: float
    shear: float = 0.0
    aspect: float = 1.0
    ink: float = 255.0
    object_id: int | None = None
    """the same object in every frame it appears in (moving scenes: ground truth for tracking)"""


@dataclass
class Scene:
    image: npt.NDArray[np.uint8]
    objects: list[SceneObject] = field(default_factory=list)
    clutter_boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def digit_linear(
    angle: float, scale: float, shear: float = 0.0, aspect: float = 1.0
) -> npt.NDArray[np.float64]:
    """2x2 linear part of a digit's placement: rotation (counter-clockwise on screen, as
    ``cv2.getRotationMatrix2D``) after shear after the per-axis scale."""
    a = math.radians(angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    sh = np.array([[1.0, shear], [0.0, 1.0]])
    sc = np.diag([scale * math.sqrt(aspect), scale / math.sqrt(aspect)])
    return np.asarray(rot @ sh @ sc, dtype=np.float64)


def digit_matrix(p: DigitPlacement) -> npt.NDArray[np.float64]:
    """2x3: digit pixel (28x28) -> scene pixel, about the digit's centre (13.5, 13.5)."""
    lin = digit_linear(p.angle, p.scale, p.shear, p.aspect)
    t = np.array([p.cx, p.cy]) - lin @ np.array([13.5, 13.5])
    return np.asarray(np.hstack([lin, t[:, None]]), dtype=np.float64)


def footprint_radius(
    scale: float, shear: float = 0.0, aspect: float = 1.0, half: float = 14.0
) -> float:
    """Distance from a digit's centre to the farthest corner of the square of half-side ``half``
    (digit pixels) around it, at any rotation. MNIST ink lies within about 12 pixels of the
    centre; 14 is the whole 28x28 cell."""
    lin = digit_linear(0.0, scale, shear, aspect)
    corners = np.array([[half, half], [half, -half], [-half, half], [-half, -half]])
    return float(np.max(np.linalg.norm(corners @ lin.T, axis=1)))


def compose(
    background: npt.NDArray[np.float32],
    ink: npt.NDArray[np.float32],
    rng: np.random.Generator,
    *,
    blur: float = 0.0,
    noise: float = 0.0,
) -> npt.NDArray[np.uint8]:
    """The camera's picture: background plus ink, optical blur (Gaussian sigma, pixels), sensor
    noise (Gaussian, grey levels), clipped to uint8."""
    img = background + ink
    if blur > 0:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigmaX=blur, sigmaY=blur), np.float32)
    if noise > 0:
        img += noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _ink_box(
    mask: npt.NDArray[np.uint8], ox: int = 0, oy: int = 0
) -> tuple[float, float, float, float] | None:
    pts = cv2.findNonZero((mask > INK_THRESHOLD).astype(np.uint8))
    if pts is None:
        return None
    x, y, w, h = cv2.boundingRect(pts)
    return (float(x + ox), float(y + oy), float(x + w + ox), float(y + h + oy))


def warp_footprint(
    m: npt.NDArray[np.float64], src_shape: tuple[int, ...], canvas_shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """The part ``(x0, y0, x1, y1)`` of a canvas that warping a ``src_shape`` image by ``m``
    can touch (its corners' bounding box, a pixel wider for the interpolation), or None when it
    misses the canvas."""
    h, w = canvas_shape[:2]
    sh, sw = src_shape[:2]
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
    return x0, y0, x1, y1


def _warp_max(
    canvas: npt.NDArray[np.float32],
    src: npt.NDArray[np.uint8],
    m: npt.NDArray[np.float64],
    gain: float = 1.0,
    touched: list[tuple[int, int, int, int]] | None = None,
) -> tuple[float, float, float, float] | None:
    """Warp ``src`` by ``m`` into ``canvas`` (pixel-wise maximum, ``src`` scaled by ``gain``),
    touching only its footprint (appended to ``touched`` when given); returns the tight ink box
    of the drawn shape (``src`` above ``INK_THRESHOLD`` before the gain), in canvas pixels."""
    footprint = warp_footprint(m, src.shape, canvas.shape)
    if footprint is None:
        return None
    if touched is not None:
        touched.append(footprint)
    x0, y0, x1, y1 = footprint
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
    np.maximum(roi, layer.astype(np.float32) * np.float32(gain), out=roi)
    return _ink_box(np.asarray(layer, dtype=np.uint8), x0, y0)


class SceneRenderer:
    """Draws digits and clutter from one split's pool into frames of a given size.

    A frame is a background ramp (levels within ``background``) plus an ink layer (every digit
    and clutter piece at its own ink level, pixel-wise maximum), then blur, then sensor noise.
    """

    def __init__(
        self, pool: DigitPool, *, noise: float = 4.0, background: tuple[int, int] = (0, 30)
    ) -> None:
        self.pool = pool
        self.noise = noise
        self.background = background

    def background_image(
        self, width: int, height: int, rng: np.random.Generator
    ) -> npt.NDArray[np.float32]:
        """A horizontal ramp between two levels drawn from ``background`` (no noise)."""
        lo, hi = self.background
        a, b = rng.uniform(lo, hi, size=2)
        return np.linspace(a, b, width, dtype=np.float32)[None, :].repeat(height, 0)

    def draw_digit(
        self,
        ink: npt.NDArray[np.float32],
        p: DigitPlacement,
        touched: list[tuple[int, int, int, int]] | None = None,
    ) -> SceneObject | None:
        """Draw placement ``p`` into the ink layer; its truth, or None if it fell outside.
        The part ``(x0, y0, x1, y1)`` of the layer it changed is appended to ``touched``."""
        box = _warp_max(ink, self.pool.images[p.index], digit_matrix(p), p.ink / 255.0, touched)
        if box is None:
            return None
        return SceneObject(
            int(self.pool.labels[p.index]),
            box,
            p.cx,
            p.cy,
            p.angle,
            p.scale,
            p.shear,
            p.aspect,
            p.ink,
        )

    def draw_clutter(
        self,
        ink: npt.NDArray[np.float32],
        rng: np.random.Generator,
        size: tuple[int, int] = (5, 9),
        zoom: tuple[float, float] = (1.0, 2.5),
        level: tuple[float, float] = (255.0, 255.0),
    ) -> tuple[float, float, float, float] | None:
        """A fragment of a random digit (a stroke piece, not a whole digit) at an ink level
        drawn from ``level``."""
        h, w = ink.shape
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
        return _warp_max(ink, patch, m, float(rng.uniform(*level)) / 255.0)

    def render(
        self,
        width: int,
        height: int,
        placements: list[DigitPlacement],
        rng: np.random.Generator,
        clutter: int = 0,
        *,
        blur: float = 0.0,
        noise: float | None = None,
        clutter_zoom: tuple[float, float] = (1.0, 2.5),
        clutter_level: tuple[float, float] = (255.0, 255.0),
    ) -> Scene:
        """A frame of ``placements`` and ``clutter`` fragments; ``noise`` overrides the
        renderer's."""
        background = self.background_image(width, height, rng)
        ink = np.zeros((height, width), np.float32)
        scene = Scene(np.zeros((height, width), np.uint8))
        for _ in range(clutter):
            b = self.draw_clutter(ink, rng, zoom=clutter_zoom, level=clutter_level)
            if b is not None:
                scene.clutter_boxes.append(b)
        for p in placements:
            obj = self.draw_digit(ink, p)
            if obj is not None:
                scene.objects.append(obj)
        sigma = self.noise if noise is None else noise
        scene.image = compose(background, ink, rng, blur=blur, noise=sigma)
        return scene
