"""Object proposals: where in a frame the detector cuts windows (NumPy + OpenCV, torch-free).

Methods (``cameras[].proposals.method``):

* ``components`` (default) and ``contours``: the frame (or its region of interest) is reduced
  to a grayscale copy ``reduce_to`` pixels wide (:func:`reduced_gray`: the full-resolution frame
  is read once and never converted to gray as a whole) and binarized, closed with a 3x3 ellipse
  so broken strokes join, and split into 8-connected components (or external contours).
  Binarization (``threshold``):

  - ``local`` (default): the background is a morphological opening of the reduced copy with a
    ``background_kernel`` square (it removes every stroke narrower than the kernel, and keeps
    ramps, vignetting and large flat areas); ink is what stands above it by more than
    ``max(min_contrast, 4 sigma)``, sigma being the frame's noise (robust spread of the top-hat).
    Faint and strong objects in one frame are both found, on any smooth background;
  - ``otsu``: one level per frame (Otsu's); faint objects beside strong ones fall below it;
  - a number: a fixed level.

  Each candidate's box is mapped back to full-resolution frame pixels and refined to the *tight
  ink box* at full resolution, from the pixels inside the candidate's own support (its mask,
  dilated by one reduced pixel), so a neighbour's ink never widens it: with ``local``, the pixels
  (smoothed 3x3) that rise above the background by the level and by a quarter of the candidate's
  own peak, so faint and strong objects get the same edges (the synthetic truth's: ink above a
  quarter of full strength); otherwise the pixels above the level. Only that part of a colour
  frame is converted to gray.
  The demo model was trained on tight ink boxes jittered by ~6%, so a tight box is what it
  expects. Boxes outside ``[min_area, max_area]`` (full-frame pixels) are dropped.
* ``rois``: the configured boxes as they are (clipped to the frame);
* ``full_frame``: the whole frame (or the region of interest) as one box.

Objects are bright on a darker background (as in the synthetic scenes). A frame without real
contrast (black, flat grey, pure sensor noise) yields no proposals: with ``local`` nothing stands
above the noise; with ``otsu`` the two classes must differ by ``MIN_CONTRAST`` grey levels,
otherwise Otsu would split noise into thousands of specks.

Frames are ``(H, W)`` grayscale or ``(H, W, 3)`` BGR, uint8. Boxes are ``[x0, y0, x1, y1]`` in
frame pixels, edge coordinates (pixel ``i`` spans ``[i, i+1)``, as ``cv2.boundingRect``
reports), float64, largest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.config import Box, ProposalConfig
from edge_stn.errors import DTypeError, ShapeError

FloatArray = npt.NDArray[np.float64]
GrayImage = npt.NDArray[np.uint8]

MIN_CONTRAST = 20.0
"""Grey levels between Otsu's class means below which a frame counts as flat (no objects)."""

MAX_PROPOSALS = 256
"""At most this many proposals per frame (largest first): a frame of clutter cannot flood the
batch."""

_CLOSE_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
_DILATE_KERNEL = np.ones((3, 3), np.uint8)


def empty_boxes() -> FloatArray:
    return np.zeros((0, 4), dtype=np.float64)


def to_gray(image: npt.NDArray[np.uint8]) -> GrayImage:
    """A grayscale ``(h, w)`` image as it is; a BGR ``(h, w, 3)`` one in gray (OpenCV's
    weights)."""
    if image.ndim == 2:
        return image
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), np.uint8)


def reduced_gray(image: npt.NDArray[np.uint8], size: tuple[int, int]) -> GrayImage:
    """``image`` (gray or BGR) reduced to ``size`` ``(width, height)``, in gray.

    Box averages, as ``INTER_AREA`` makes them, but cheaper: exact halvings (a linear resize to
    half size averages each 2x2 block) while the image is at least twice the target, then
    ``INTER_AREA`` for what is left, then the conversion to gray on the small copy (averaging
    and the gray weights are both linear, so the order changes only the rounding).
    """
    sw, sh = size
    img = image
    while img.shape[1] >= 2 * sw and img.shape[0] >= 2 * sh:
        half = (img.shape[1] // 2, img.shape[0] // 2)
        img = np.asarray(cv2.resize(img, half, interpolation=cv2.INTER_LINEAR), np.uint8)
    if (img.shape[1], img.shape[0]) != (sw, sh):
        img = np.asarray(cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA), np.uint8)
    return to_gray(img)


@dataclass(frozen=True)
class Region:
    """The part of the frame searched: edge coordinates, non-empty."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def search_region(shape: tuple[int, ...], roi: Box | None) -> Region | None:
    """The frame, or its intersection with the region of interest (None when they miss)."""
    h, w = shape[:2]
    if roi is None:
        return Region(0, 0, w, h)
    x0, y0 = min(roi.x0, w), min(roi.y0, h)
    x1, y1 = min(roi.x1, w), min(roi.y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return Region(x0, y0, x1, y1)


NOISE_SIGMAS = 4.0
"""'local' threshold: ink must stand this many noise standard deviations above the background."""


EDGE_FRACTION = 0.25
"""'local' threshold: a box's edge is where the ink falls below this fraction of its peak."""


def _sorted_value(values: npt.NDArray[np.float64], counts: npt.NDArray[np.int64], k: int) -> float:
    """The ``k``-th (0-based) element of the sorted multiset in which ``values[i]`` (ascending)
    occurs ``counts[i]`` times."""
    return float(values[int(np.searchsorted(np.cumsum(counts), k, side="right"))])


def _median_of_counts(values: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> float:
    """``np.median`` of the multiset ``values`` x ``counts`` (values ascending): the middle
    element, or the mean of the two middle ones for an even count."""
    n = int(counts.sum())
    upper = _sorted_value(values, counts, n // 2)
    if n % 2:
        return upper
    return (_sorted_value(values, counts, n // 2 - 1) + upper) / 2.0


def histogram_median_mad(image: GrayImage) -> tuple[float, float]:
    """``median(image)`` and ``median(|image - median|)`` of a uint8 image, from its histogram:
    the values ``np.median`` gives, without sorting every pixel (twice) in each frame."""
    counts = np.bincount(image.ravel(), minlength=256).astype(np.int64)
    levels = np.arange(256, dtype=np.float64)
    base = _median_of_counts(levels, counts)
    deviation = np.abs(levels - base)
    order = np.argsort(deviation, kind="stable")
    return base, _median_of_counts(deviation[order], counts[order])


def local_background(small: GrayImage, kernel: int, min_contrast: float) -> tuple[GrayImage, float]:
    """The background of a reduced frame (a grey opening with a ``kernel`` square) and the level
    above it at which a pixel counts as ink: ``median(top-hat) + max(min_contrast, 4 sigma)``,
    sigma the robust (MAD) spread of the top-hat, i.e. of the noise where there is no ink."""
    se = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    background = np.asarray(cv2.morphologyEx(small, cv2.MORPH_OPEN, se), np.uint8)
    top = np.asarray(cv2.subtract(small, background), np.uint8)
    base, mad = histogram_median_mad(top)
    sigma = 1.4826 * mad
    return background, base + max(min_contrast, NOISE_SIGMAS * sigma)


def binarization_level(small: GrayImage, threshold: int | str, min_contrast: float) -> float | None:
    """The grey level above which a pixel is foreground, or None for a flat image.

    With ``"otsu"`` the level is Otsu's, and the image counts as flat when the means of the two
    classes differ by less than ``min_contrast``. A fixed level is taken as it is.
    """
    if threshold != "otsu":
        return float(threshold)
    level, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    above = small > level
    n_above = int(np.count_nonzero(above))
    if n_above == 0 or n_above == small.size:
        return None
    contrast = float(small[above].mean()) - float(small[~above].mean())
    return float(level) if contrast >= min_contrast else None


def _reduced_index(start: int, stop: int, factor: float, lo: int, hi: int) -> npt.NDArray[np.intp]:
    """For full-resolution pixels ``start..stop-1``, the reduced pixel their centre falls in,
    counted from ``lo`` and kept inside ``[lo, hi)``."""
    idx = ((np.arange(start, stop) + 0.5) / factor).astype(np.intp)
    idx -= lo
    np.maximum(idx, 0, out=idx)
    np.minimum(idx, hi - lo - 1, out=idx)
    return idx


class ProposalFinder:
    """Proposals for one camera's frames, as its ``proposals`` config and ``roi`` say."""

    def __init__(
        self,
        config: ProposalConfig | None = None,
        roi: Box | None = None,
        *,
        min_contrast: float = MIN_CONTRAST,
        max_proposals: int = MAX_PROPOSALS,
    ) -> None:
        self.config = config if config is not None else ProposalConfig()
        self.roi = roi
        self.min_contrast = float(min_contrast)
        if max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {max_proposals}")
        self.max_proposals = int(max_proposals)

    def __call__(self, image: npt.NDArray[np.uint8]) -> FloatArray:
        """Proposal boxes ``(N, 4)`` of a frame, ``(H, W)`` gray or ``(H, W, 3)`` BGR uint8,
        largest first."""
        if (
            not isinstance(image, np.ndarray)
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] != 3)
        ):
            raise ShapeError("frame", getattr(image, "shape", ()), "(H, W) gray or (H, W, 3) BGR")
        if image.dtype != np.uint8:
            raise DTypeError("frame", image.dtype, "uint8")
        region = search_region(image.shape, self.roi)
        if region is None or 0 in image.shape[:2]:
            return empty_boxes()
        cfg = self.config
        if cfg.method == "full_frame":
            return np.array([[region.x0, region.y0, region.x1, region.y1]], dtype=np.float64)
        if cfg.method == "rois":
            return self._fixed_rois(image.shape)
        part = image[region.y0 : region.y1, region.x0 : region.x1]
        boxes = self._ink_components(part)
        if boxes.shape[0]:
            boxes += [region.x0, region.y0, region.x0, region.y0]
        return boxes

    def _fixed_rois(self, shape: tuple[int, ...]) -> FloatArray:
        out = []
        for box in self.config.rois:
            region = search_region(shape, box)
            if region is not None:
                out.append([region.x0, region.y0, region.x1, region.y1])
        return np.array(out, dtype=np.float64).reshape(-1, 4)

    def _ink_components(self, part: npt.NDArray[np.uint8]) -> FloatArray:
        cfg = self.config
        h, w = part.shape[:2]
        sw = min(w, cfg.reduce_to)
        sh = max(1, round(h * sw / w))
        small = reduced_gray(part, (sw, sh))
        background: GrayImage | None = None
        if cfg.threshold == "local":
            background, level = local_background(small, cfg.background_kernel, cfg.min_contrast)
            binary = (cv2.subtract(small, background) > level).astype(np.uint8)
        else:
            found = binarization_level(small, cfg.threshold, self.min_contrast)
            if found is None:
                return empty_boxes()
            level = found
            binary = (small > level).astype(np.uint8)
        binary = np.asarray(cv2.morphologyEx(binary, cv2.MORPH_CLOSE, _CLOSE_KERNEL), np.uint8)
        labels, stats = self._label(binary)
        fx, fy = w / sw, h / sh
        pad_x, pad_y = math.ceil(fx) + 1, math.ceil(fy) + 1
        max_area = cfg.max_area if cfg.max_area is not None else math.inf
        boxes: list[tuple[float, float, float, float]] = []
        for k, (x, y, bw, bh) in enumerate(stats, start=1):
            # The refined box lies inside the padded mapped box: skip what cannot reach min_area.
            if (bw * fx + 2 * pad_x) * (bh * fy + 2 * pad_y) < cfg.min_area:
                continue
            box = self._tight_box(part, labels, k, (x, y, bw, bh), (fx, fy), level, background)
            area = (box[2] - box[0]) * (box[3] - box[1])
            if cfg.min_area <= area <= max_area:
                boxes.append(box)
        boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
        return np.array(boxes[: self.max_proposals], dtype=np.float64).reshape(-1, 4)

    def _label(
        self, binary: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int32], list[tuple[int, int, int, int]]]:
        """A label image (0 background, k >= 1 candidate k) and each candidate's reduced box
        ``(x, y, w, h)``, from connected components or filled external contours."""
        if self.config.method == "contours":
            contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            labels = np.zeros(binary.shape, np.int32)
            stats = []
            for k, c in enumerate(contours, start=1):
                cv2.drawContours(labels, [c], -1, k, thickness=cv2.FILLED)
                x, y, bw, bh = cv2.boundingRect(c)
                stats.append((int(x), int(y), int(bw), int(bh)))
            return labels, stats
        n, components, st, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        return np.asarray(components, np.int32), [
            (int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in st[1:n]
        ]

    @staticmethod
    def _tight_box(
        part: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.int32],
        k: int,
        rect: tuple[int, int, int, int],
        factor: tuple[float, float],
        level: float,
        background: GrayImage | None = None,
    ) -> tuple[float, float, float, float]:
        """Candidate ``k``'s tight ink box at full resolution (its mapped box if no pixel of the
        full-resolution frame is above ``level`` inside its support). With a ``background`` (the
        reduced copy's), ``level`` is above it, and the full-resolution pixels are smoothed 3x3
        first so that single noisy pixels at the rim do not widen the box."""
        x, y, bw, bh = rect
        fx, fy = factor
        sh, sw = labels.shape
        h, w = part.shape[:2]
        # Support: the candidate's reduced mask, dilated by one reduced pixel.
        lx0, ly0 = max(0, x - 1), max(0, y - 1)
        lx1, ly1 = min(sw, x + bw + 1), min(sh, y + bh + 1)
        support = cv2.dilate((labels[ly0:ly1, lx0:lx1] == k).view(np.uint8), _DILATE_KERNEL)
        # The full-resolution pixels those reduced pixels cover, and for each the reduced pixel
        # it falls in (its centre's).
        X0, Y0 = max(0, math.floor(lx0 * fx)), max(0, math.floor(ly0 * fy))
        X1, Y1 = min(w, math.ceil(lx1 * fx)), min(h, math.ceil(ly1 * fy))
        ix = _reduced_index(X0, X1, fx, lx0, lx1)
        iy = _reduced_index(Y0, Y1, fy, ly0, ly1)
        inside = support.take(iy, axis=0).take(ix, axis=1)  # 0/1 at full resolution
        gray = to_gray(part[Y0:Y1, X0:X1])
        if background is None:
            signal = gray
            edge = level
        else:
            local = background[ly0:ly1, lx0:lx1].take(iy, axis=0).take(ix, axis=1)
            # Saturated at 0: the level is above 0, so a pixel below its background is never
            # ink, and a peak below 0 never raises the edge above the level.
            signal = np.asarray(cv2.subtract(cv2.blur(gray, (3, 3)), local), np.uint8)
            # The object's edge where its ink falls to a quarter of its own peak (as the
            # renderer's truth draws it), never below the noise level.
            peak = float(cv2.minMaxLoc(cv2.multiply(signal, inside))[1])
            edge = max(level, EDGE_FRACTION * peak)
        # uint8 pixels above a fractional edge are those above its floor (OpenCV's threshold).
        _, above = cv2.threshold(signal, edge, 1, cv2.THRESH_BINARY)
        cx, cy, cw, ch = cv2.boundingRect(cv2.multiply(above, inside))
        if cw == 0:
            return (
                float(math.floor(x * fx)),
                float(math.floor(y * fy)),
                float(min(w, math.ceil((x + bw) * fx))),
                float(min(h, math.ceil((y + bh) * fy))),
            )
        return (float(X0 + cx), float(Y0 + cy), float(X0 + cx + cw), float(Y0 + cy + ch))
