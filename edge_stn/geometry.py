"""Affine conventions shared by training and the runtime (NumPy only).

Convention
----------
* Pixel coordinates: pixel ``i`` of a side of ``n`` pixels has its *centre* at ``i``;
  the image spans ``[-0.5, n - 0.5]``.
* Normalized coordinates (``align_corners=False``): the same pixel centre sits at
  ``(2 i + 1) / n - 1``; the image spans ``[-1, 1]`` edge to edge.
* ``theta`` (2x3) maps a point ``(x, y)`` of the *canonical output grid* (normalized) to the
  point of the *input* it samples (normalized): ``input = theta @ [x, y, 1]``. This is exactly
  ``torch.nn.functional.affine_grid(theta, size, align_corners=False)``.
* A *window* is the square the model sees, cut from a frame: window pixel ``u`` (of a model
  input of ``W`` pixels) is frame pixel ``x0 + (u + 0.5) * s - 0.5`` for a window of origin
  ``x0`` (the frame coordinate of the window's outer left edge) and scale ``s`` (frame pixels
  per window pixel).
* Matrices are named by the frames they connect, destination first:
  ``frame_from_crop`` maps crop pixels to frame pixels. Composition reads right to left:
  ``frame_from_crop = frame_from_window @ window_from_norm @ theta3 @ norm_from_crop``.
  ``cv2.warpAffine(frame, frame_from_crop, (S, S), flags=INTER_LINEAR | WARP_INVERSE_MAP)``
  then cuts a canonical crop of any size ``S`` from the original pixels.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edge_stn.errors import ShapeError

FloatArray = npt.NDArray[np.float64]

IDENTITY_THETA: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def pixel_centres_normalized(n: int) -> npt.NDArray[np.float32]:
    """Normalized coordinates of the ``n`` pixel centres of one side: ``(2i+1)/n - 1``."""
    if n <= 0:
        raise ValueError(f"side length must be positive, got {n}")
    return ((2.0 * np.arange(n, dtype=np.float64) + 1.0) / n - 1.0).astype(np.float32)


def base_grid(height: int, width: int) -> npt.NDArray[np.float32]:
    """The stored base grid: ``(height*width, 3)`` rows ``[x, y, 1]``, row-major (y outer).

    ``base_grid(h, w) @ theta.T`` reshaped to ``(h, w, 2)`` equals
    ``affine_grid(theta, (1, C, h, w), align_corners=False)[0]``.
    """
    xs = pixel_centres_normalized(width)
    ys = pixel_centres_normalized(height)
    gx, gy = np.meshgrid(xs, ys)  # (h, w) each
    ones = np.ones_like(gx)
    return np.stack([gx, gy, ones], axis=-1).reshape(height * width, 3).astype(np.float32)


def as_3x3(matrix: npt.ArrayLike) -> FloatArray:
    """Lift a 2x3 affine to its 3x3 homogeneous form (a 3x3 is returned as a copy)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        return m.copy()
    if m.shape != (2, 3):
        raise ShapeError("affine matrix", m.shape, "(2, 3) or (3, 3)")
    return np.vstack([m, [0.0, 0.0, 1.0]])


def norm_from_pixel(width: int, height: int) -> FloatArray:
    """3x3: pixel coordinates of a ``width x height`` image -> normalized coordinates."""
    return np.array(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0, 0, 1]],
        dtype=np.float64,
    )


def pixel_from_norm(width: int, height: int) -> FloatArray:
    """3x3: normalized coordinates -> pixel coordinates of a ``width x height`` image."""
    return np.array(
        [[width / 2.0, 0.0, width / 2.0 - 0.5], [0.0, height / 2.0, height / 2.0 - 0.5], [0, 0, 1]],
        dtype=np.float64,
    )


def frame_from_window(x0: float, y0: float, scale: float) -> FloatArray:
    """3x3: window pixel -> frame pixel, ``frame = x0 + (u + 0.5) * scale - 0.5``."""
    return np.array(
        [[scale, 0.0, x0 + 0.5 * scale - 0.5], [0.0, scale, y0 + 0.5 * scale - 0.5], [0, 0, 1]],
        dtype=np.float64,
    )


def frame_from_crop(
    theta: npt.ArrayLike,
    *,
    window_origin: tuple[float, float],
    window_scale: float,
    model_size: tuple[int, int],
    crop_size: tuple[int, int],
) -> FloatArray:
    """2x3 pixel affine mapping canonical-crop pixels to frame pixels.

    ``theta`` is the model's 2x3 output for the window; ``model_size`` is the model input
    ``(width, height)``; ``crop_size`` the ``(width, height)`` of the crop to cut.
    """
    t = as_3x3(theta)
    mw, mh = model_size
    cw, ch = crop_size
    m = (
        frame_from_window(window_origin[0], window_origin[1], window_scale)
        @ pixel_from_norm(mw, mh)
        @ t
        @ norm_from_pixel(cw, ch)
    )
    return m[:2]


def invert_affine(matrix: npt.ArrayLike) -> FloatArray:
    """Inverse of a 2x3 (or 3x3) affine, returned as 2x3."""
    return np.asarray(np.linalg.inv(as_3x3(matrix))[:2], dtype=np.float64)


def apply_affine(matrix: npt.ArrayLike, points: npt.ArrayLike) -> FloatArray:
    """Apply a 2x3 affine to ``(N, 2)`` points."""
    m = as_3x3(matrix)[:2]
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return p @ m[:, :2].T + m[:, 2]


def crop_quad(frame_from_crop_2x3: npt.ArrayLike, crop_size: tuple[int, int]) -> FloatArray:
    """Outer corners of a crop in frame pixels: top-left, top-right, bottom-right, bottom-left."""
    w, h = crop_size
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    return apply_affine(frame_from_crop_2x3, corners)


def rotation_scale_theta(
    angle_deg: float, scale: float, tx: float = 0.0, ty: float = 0.0
) -> FloatArray:
    """theta (2x3, normalized) of a canonical grid that sees the input rotated by ``angle_deg``
    (counter-clockwise on screen), zoomed so the content looks ``scale`` times larger in the
    output, and centred on the normalized input point ``(tx, ty)``.
    """
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    # y points down in images, so a counter-clockwise rotation on screen is R(-a) in (x, y).
    rot = np.array([[c, s], [-s, c]]) / scale
    return np.hstack([rot, [[tx], [ty]]])
