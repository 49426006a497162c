"""The affine convention of DESIGN §4, pinned by hand-computed numbers and checked against the
two authorities that must agree with it: PyTorch's affine_grid/grid_sample (training) and
OpenCV's warpAffine (runtime crops)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_stn.errors import ShapeError
from edge_stn.geometry import (
    apply_affine,
    as_3x3,
    base_grid,
    crop_quad,
    frame_from_crop,
    frame_from_window,
    invert_affine,
    norm_from_pixel,
    pixel_centres_normalized,
    pixel_from_norm,
    rotation_scale_theta,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def random_theta(rng: np.random.Generator) -> np.ndarray:
    """A moderate similarity-plus-shear transform: rotation up to 45 deg, scale 0.4-1.2."""
    a = rng.uniform(-np.pi / 4, np.pi / 4)
    s = rng.uniform(0.4, 1.2)
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rot = rot @ np.array([[1.0, rng.uniform(-0.1, 0.1)], [0.0, 1.0]])
    return np.hstack([rot, rng.uniform(-0.4, 0.4, size=(2, 1))])


def affine_grid_np(theta: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(np.asarray(theta, dtype=np.float64))[None]
    return F.affine_grid(t, [1, 1, height, width], align_corners=False)[0].numpy()


# ---------------------------------------------------------------- the pixel-centre formula


def test_pixel_centres_are_2i_plus_1_over_n_minus_1() -> None:
    np.testing.assert_allclose(pixel_centres_normalized(4), [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(pixel_centres_normalized(1), [0.0])
    n = 7
    expected = [(2 * i + 1) / n - 1 for i in range(n)]
    np.testing.assert_allclose(pixel_centres_normalized(n), expected, atol=1e-7)


def test_pixel_centres_reject_empty_side() -> None:
    with pytest.raises(ValueError):
        pixel_centres_normalized(0)


def test_norm_from_pixel_pins_the_formula() -> None:
    w, h = 5, 8
    m = norm_from_pixel(w, h)
    for i in range(w):
        for j in range(h):
            x, y = apply_affine(m[:2], [[i, j]])[0]
            assert x == pytest.approx((2 * i + 1) / w - 1)
            assert y == pytest.approx((2 * j + 1) / h - 1)
    # The image's outer edges (-0.5 and n - 0.5 in pixels) are -1 and +1.
    np.testing.assert_allclose(
        apply_affine(m[:2], [[-0.5, -0.5], [w - 0.5, h - 0.5]]), [[-1, -1], [1, 1]]
    )


def test_pixel_from_norm_inverts_norm_from_pixel() -> None:
    np.testing.assert_allclose(
        pixel_from_norm(13, 6) @ norm_from_pixel(13, 6), np.eye(3), atol=1e-12
    )


def test_frame_from_window_pins_the_formula() -> None:
    # A window at origin (10, 20) with 2 frame pixels per window pixel: window pixel 0 covers
    # frame pixels 10 and 11, whose centres average to 10.5.
    m = frame_from_window(10.0, 20.0, 2.0)
    np.testing.assert_allclose(apply_affine(m[:2], [[0, 0], [3, 1]]), [[10.5, 20.5], [16.5, 22.5]])
    x0, y0, s = 3.25, -7.0, 0.6
    u = np.array([[0.0, 0.0], [4.0, 9.0], [-0.5, 11.5]])
    expected = np.stack([x0 + (u[:, 0] + 0.5) * s - 0.5, y0 + (u[:, 1] + 0.5) * s - 0.5], axis=1)
    np.testing.assert_allclose(apply_affine(frame_from_window(x0, y0, s)[:2], u), expected)


# ---------------------------------------------------------------- base grid vs affine_grid


@pytest.mark.parametrize("height,width", [(1, 1), (5, 7), (16, 9), (28, 28), (3, 40)])
def test_base_grid_times_theta_t_equals_affine_grid(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 100 + width)
    base = base_grid(height, width)
    assert base.shape == (height * width, 3)
    for _ in range(5):
        theta = rng.normal(size=(2, 3))
        ours = (base.astype(np.float64) @ theta.T).reshape(height, width, 2)
        np.testing.assert_allclose(ours, affine_grid_np(theta, height, width), atol=1e-6)


def test_base_grid_is_row_major_with_x_first() -> None:
    g = base_grid(2, 3).reshape(2, 3, 3)
    np.testing.assert_allclose(g[0, :, 0], pixel_centres_normalized(3))  # x varies along a row
    np.testing.assert_allclose(g[:, 0, 1], pixel_centres_normalized(2))  # y varies down a column
    np.testing.assert_allclose(g[..., 2], 1.0)


# ---------------------------------------------------------------- warpAffine == grid_sample


def test_frame_from_crop_warpaffine_matches_grid_sample_on_digits() -> None:
    """DESIGN §4's exact test: a window at scale 1, a crop the size of the STN output."""
    from edge_stn.data.base import draw_passes
    from edge_stn.data.distort import TCGenerator
    from edge_stn.data.mnist import load_mnist_split

    images = draw_passes(TCGenerator(load_mnist_split("test")), 1, seed=3).images[:60, 0]
    rng = np.random.default_rng(0)
    out_h, out_w = 28, 24
    inside_samples = 0
    for img_u8 in images:
        img = img_u8.astype(np.float32) / 255.0
        h, w = img.shape
        theta = random_theta(rng)
        grid = affine_grid_np(theta, out_h, out_w)
        ref = F.grid_sample(
            torch.from_numpy(img)[None, None].double(),
            torch.from_numpy(grid)[None],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )[0, 0].numpy()
        m = frame_from_crop(
            theta,
            window_origin=(0.0, 0.0),
            window_scale=1.0,
            model_size=(w, h),
            crop_size=(out_w, out_h),
        )
        assert m.shape == (2, 3)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        crop_f = cv2.warpAffine(img, m, (out_w, out_h), flags=flags, borderValue=0)
        crop_u8 = cv2.warpAffine(img_u8, m, (out_w, out_h), flags=flags, borderValue=0)
        inside = (np.abs(grid) <= 1.0).all(axis=-1)
        inside_samples += int(inside.sum())
        np.testing.assert_array_less(np.abs(crop_f - ref)[inside], 2 / 255)
        np.testing.assert_array_less(np.abs(crop_u8 / 255.0 - ref)[inside], 2 / 255)
    assert inside_samples > 0.5 * len(images) * out_h * out_w


def test_frame_from_crop_composes_window_and_theta() -> None:
    """Crop pixel -> frame pixel, computed independently through affine_grid: the normalized
    window point affine_grid samples, to window pixels, to frame pixels."""
    rng = np.random.default_rng(1)
    model_w, model_h = 40, 30
    crop_w, crop_h = 17, 11
    for _ in range(10):
        theta = random_theta(rng)
        x0, y0, s = rng.uniform(-50, 300), rng.uniform(-50, 300), rng.uniform(0.3, 4.0)
        m = frame_from_crop(
            theta,
            window_origin=(x0, y0),
            window_scale=s,
            model_size=(model_w, model_h),
            crop_size=(crop_w, crop_h),
        )
        g = affine_grid_np(theta, crop_h, crop_w)  # window-normalized point of each crop pixel
        u = ((g[..., 0] + 1) * model_w - 1) / 2
        v = ((g[..., 1] + 1) * model_h - 1) / 2
        expected = np.stack([x0 + (u + 0.5) * s - 0.5, y0 + (v + 0.5) * s - 0.5], axis=-1)
        ys, xs = np.mgrid[0:crop_h, 0:crop_w]
        pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
        np.testing.assert_allclose(apply_affine(m, pts), expected.reshape(-1, 2), atol=1e-9)
        # The window's placement composes on the left of the scale-1 matrix.
        at_origin = frame_from_crop(
            theta,
            window_origin=(0.0, 0.0),
            window_scale=1.0,
            model_size=(model_w, model_h),
            crop_size=(crop_w, crop_h),
        )
        np.testing.assert_allclose(m, (frame_from_window(x0, y0, s) @ as_3x3(at_origin))[:2])


def test_crop_cut_from_frame_equals_crop_of_resized_window() -> None:
    """On a linear ramp (where bilinear sampling and area resizing are exact), the crop cut
    from the whole frame through a window at scale 2 equals grid_sample of the resized window."""
    frame_h, frame_w = 120, 160
    ys, xs = np.mgrid[0:frame_h, 0:frame_w].astype(np.float32)
    frame = 0.3 * xs + 0.7 * ys + 5.0
    x0, y0, s, size = 30, 20, 2, 40
    window = cv2.resize(
        frame[y0 : y0 + size * s, x0 : x0 + size * s], (size, size), interpolation=cv2.INTER_AREA
    )
    theta = np.array([[0.5, -0.2, 0.1], [0.25, 0.45, -0.15]])
    ref = F.grid_sample(
        torch.from_numpy(window)[None, None].double(),
        torch.from_numpy(affine_grid_np(theta, 28, 28))[None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0, 0].numpy()
    m = frame_from_crop(
        theta, window_origin=(x0, y0), window_scale=s, model_size=(size, size), crop_size=(28, 28)
    )
    crop = cv2.warpAffine(frame, m, (28, 28), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    np.testing.assert_allclose(crop, ref, atol=1e-3)


# ---------------------------------------------------------------- helpers


def test_invert_and_apply_round_trip() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        m = random_theta(rng) * rng.uniform(0.5, 5.0)
        pts = rng.uniform(-100, 100, size=(50, 2))
        back = apply_affine(invert_affine(m), apply_affine(m, pts))
        np.testing.assert_allclose(back, pts, atol=1e-8)
        np.testing.assert_allclose(invert_affine(invert_affine(m)), m, atol=1e-10)
        np.testing.assert_allclose((as_3x3(m) @ as_3x3(invert_affine(m))), np.eye(3), atol=1e-10)


def test_apply_affine_matches_the_matrix_product() -> None:
    m = np.array([[2.0, 0.5, 3.0], [-1.0, 1.5, -4.0]])
    np.testing.assert_allclose(apply_affine(m, [[1.0, 2.0]]), [[2 + 1 + 3, -1 + 3 - 4]])


def test_as_3x3_rejects_other_shapes() -> None:
    with pytest.raises(ShapeError) as info:
        as_3x3(np.zeros((3, 2)))
    assert info.value.actual_shape == (3, 2)
    np.testing.assert_allclose(as_3x3(np.eye(3)), np.eye(3))


def test_crop_quad_of_identity_window_is_the_image_outline() -> None:
    m = frame_from_crop(
        np.array([[1.0, 0, 0], [0, 1.0, 0]]),
        window_origin=(10.0, 20.0),
        window_scale=2.0,
        model_size=(30, 30),
        crop_size=(15, 15),
    )
    # The whole window, whatever the crop size: frame [10, 70) x [20, 80) in edge coordinates.
    np.testing.assert_allclose(
        crop_quad(m, (15, 15)), [[9.5, 19.5], [69.5, 19.5], [69.5, 79.5], [9.5, 79.5]], atol=1e-9
    )


def test_rotation_scale_theta_zooms_and_centres() -> None:
    # scale 2: the output shows half of the input side, centred on (tx, ty).
    theta = rotation_scale_theta(0.0, 2.0, 0.25, -0.5)
    np.testing.assert_allclose(theta, [[0.5, 0, 0.25], [0, 0.5, -0.5]], atol=1e-12)
    # A rotation keeps lengths (up to the zoom) and the determinant positive.
    theta = rotation_scale_theta(30.0, 1.0)
    assert np.linalg.det(theta[:, :2]) == pytest.approx(1.0)


def test_rotation_scale_theta_undoes_an_opencv_rotation() -> None:
    """Content rotated counter-clockwise on screen by OpenCV's positive angle (as the RTS and
    scene generators rotate digits) and shrunk by ``scale`` comes back upright and at its size
    through rotation_scale_theta(angle, 1 / scale)."""
    from edge_stn.data.mnist import load_mnist_split

    digit = load_mnist_split("test").images[0]
    canvas = np.zeros((42, 42), dtype=np.float32)
    canvas[7:35, 7:35] = digit / 255.0
    centre = (20.5, 20.5)

    def unrotate(img: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return F.grid_sample(
            torch.from_numpy(img)[None, None].double(),
            torch.from_numpy(affine_grid_np(theta, 42, 42))[None],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )[0, 0].numpy()

    for angle, scale in [(30.0, 1.0), (-40.0, 1.0), (20.0, 0.8)]:
        m = cv2.getRotationMatrix2D(centre, angle, scale)
        rotated = cv2.warpAffine(canvas, m, (42, 42), flags=cv2.INTER_LINEAR)
        back = unrotate(rotated, rotation_scale_theta(angle, 1 / scale))
        wrong_way = unrotate(rotated, rotation_scale_theta(-angle, 1 / scale))
        err = np.abs(back - canvas).mean()
        assert err < 0.25 * np.abs(wrong_way - canvas).mean()
        assert err < 0.02
