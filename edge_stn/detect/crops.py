"""Canonical crops: the object in the ST-CNN's canonical pose, cut from the original pixels
(DESIGN §4), and their JPEG encoding under a payload limit (NumPy + OpenCV, torch-free).

A detection's ``affine`` maps crop pixels to frame pixels for the configured crop size ``S``;
``cv2.warpAffine(frame, affine, (S, S), flags=INTER_LINEAR | WARP_INVERSE_MAP)`` samples the
full-resolution frame (BGR or grayscale) at those points, black outside the frame. At ``S``
equal to the STN's output size and a window at scale 1 this is the model's own ``canonical``
output (the exact test in ``tests/test_detect.py``); at any other ``S`` it is the same pose at
another resolution, from the frame rather than from the downsampled window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.errors import DTypeError, ShapeError
from edge_stn.windows import sample_through

ImageArray = npt.NDArray[np.uint8]

MIN_JPEG_QUALITY = 20
"""The lowest quality tried before a crop is reported too large."""
QUALITY_STEP = 15


def canonical_crop(image: ImageArray, affine: npt.ArrayLike, size: int) -> ImageArray:
    """The ``size x size`` canonical crop of a frame (``(H, W, 3)`` BGR or ``(H, W)`` gray,
    uint8) through a crop-pixel -> frame-pixel ``affine`` (2x3) made for that size."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or 0 in image.shape:
        raise ShapeError("frame", getattr(image, "shape", ()), "(H, W) gray or (H, W, 3) BGR")
    if image.ndim == 3 and image.shape[2] != 3:
        raise ShapeError("frame", image.shape, "(H, W) gray or (H, W, 3) BGR")
    if image.dtype != np.uint8:
        raise DTypeError("frame", image.dtype, "uint8")
    m = np.asarray(affine, dtype=np.float64)
    if m.shape != (2, 3):
        raise ShapeError("affine", m.shape, "(2, 3) crop pixel -> frame pixel")
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    return np.asarray(sample_through(image, m, (size, size)), dtype=np.uint8)


@dataclass(frozen=True)
class EncodedCrop:
    """A crop's JPEG. ``data`` is None when even the lowest quality tried exceeded the limit
    (``too_large``); ``quality`` is the quality of ``data`` (or of the last try);
    ``size_bytes`` the length of ``data`` (or of the smallest encoding tried)."""

    data: bytes | None
    quality: int
    size_bytes: int
    width: int
    height: int

    @property
    def too_large(self) -> bool:
        return self.data is None


def quality_steps(quality: int, lowest: int = MIN_JPEG_QUALITY) -> list[int]:
    """The qualities tried in turn: the configured one, then lower by ``QUALITY_STEP`` down to
    ``lowest`` (never below it, never above the configured one)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1-100, got {quality}")
    lowest = min(lowest, quality)
    steps = list(range(quality, lowest, -QUALITY_STEP))
    return [*steps, lowest] if not steps or steps[-1] != lowest else steps


def encode_jpeg(
    crop: ImageArray,
    quality: int = 90,
    max_bytes: int | None = None,
    *,
    qualities: Iterable[int] | None = None,
) -> EncodedCrop:
    """JPEG of a crop at ``quality``; over ``max_bytes`` it retries at lower qualities
    (:func:`quality_steps`) and reports ``too_large`` if none fits."""
    if not isinstance(crop, np.ndarray) or crop.ndim not in (2, 3) or 0 in crop.shape:
        raise ShapeError("crop", getattr(crop, "shape", ()), "(S, S) gray or (S, S, 3) BGR")
    if crop.dtype != np.uint8:
        raise DTypeError("crop", crop.dtype, "uint8")
    h, w = crop.shape[:2]
    tries = list(qualities) if qualities is not None else quality_steps(quality)
    best: tuple[int, int] | None = None
    q = tries[0]
    for q in tries:
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
        if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
            raise ValueError(f"OpenCV could not encode a {crop.shape} crop as JPEG")
        data = buf.tobytes()
        if max_bytes is None or len(data) <= max_bytes:
            return EncodedCrop(data, int(q), len(data), w, h)
        if best is None or len(data) < best[1]:
            best = (int(q), len(data))
    assert best is not None
    return EncodedCrop(None, int(q), best[1], w, h)


class LazyCrop:
    """A detection's canonical crop, cut and JPEG-encoded the first time its bytes are asked
    for (it fits :class:`edge_stn.publish.client.JpegCrop`): the publisher takes a result's
    slot first and only then reads its crops, so a result it drops costs no crops."""

    def __init__(
        self,
        image: ImageArray,
        affine: npt.ArrayLike,
        size: int,
        quality: int = 90,
        max_bytes: int | None = None,
    ) -> None:
        self._image = image
        self._affine = affine
        self.width = self.height = int(size)
        self._quality = quality
        self._max_bytes = max_bytes

    @cached_property
    def encoded(self) -> EncodedCrop:
        crop = canonical_crop(self._image, self._affine, self.width)
        return encode_jpeg(crop, self._quality, self._max_bytes)

    @property
    def data(self) -> bytes | None:
        return self.encoded.data
