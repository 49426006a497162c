"""The window extractor (DESIGN §4) and the detection-window data set cut with it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_stn.data.base import draw_passes
from edge_stn.data.mnist import DigitPool
from edge_stn.data.scenes import DigitPlacement, SceneRenderer
from edge_stn.data.windows_data import WindowSource
from edge_stn.windows import WindowSpec, extract_window, extract_windows, place_window


def test_window_is_the_squared_box_widened_by_the_margin() -> None:
    spec = WindowSpec(size=48, context_margin=0.25, min_side=12)
    p = place_window([10, 20, 30, 60], spec)  # 20 wide, 40 tall, centre (20, 40)
    side = 40 * 1.5
    assert p.scale == pytest.approx(side / 48)
    assert p.x0 == pytest.approx(20 - side / 2)
    assert p.y0 == pytest.approx(40 - side / 2)


def test_tiny_boxes_get_the_minimum_side() -> None:
    p = place_window([5, 5, 7, 6], WindowSpec(size=24, context_margin=0.25, min_side=12))
    assert p.scale * 24 == pytest.approx(12)


def test_window_pixel_centres_follow_the_convention() -> None:
    """A single bright frame pixel lands where frame = x0 + (u + 0.5) * s - 0.5 puts it."""
    frame = np.zeros((100, 120), np.uint8)
    fx, fy = 57, 33
    frame[fy, fx] = 255
    spec = WindowSpec(size=20, context_margin=0.0, min_side=1)
    p = place_window([47, 23, 67, 43], spec)  # scale exactly 1, origin (47, 23)
    assert p.scale == pytest.approx(1.0)
    win = extract_window(frame, p, spec.size)
    v, u = np.unravel_index(int(win.argmax()), win.shape)
    assert (u, v) == (fx - 47, fy - 23)
    assert win[v, u] == 255


def test_scale_one_window_is_a_plain_crop_with_black_outside() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(40, 50), dtype=np.uint8)
    spec = WindowSpec(size=16, context_margin=0.0, min_side=1)
    p = place_window([-4, 30, 12, 46], spec)  # sticks out left and bottom
    win = extract_window(frame, p, 16)
    expect = np.zeros((16, 16), np.uint8)
    expect[:10, 4:] = frame[30:40, 0:12]
    np.testing.assert_array_equal(win, expect)


def test_shrinking_windows_are_low_pass_filtered() -> None:
    """A 1-pixel checkerboard shrunk 4x must come out flat grey, not aliased stripes."""
    yy, xx = np.mgrid[0:200, 0:200]
    frame = (((xx + yy) % 2) * 255).astype(np.uint8)
    spec = WindowSpec(size=25, context_margin=0.0, min_side=1)
    win = extract_window(frame, place_window([50, 50, 150, 150], spec), 25)
    assert abs(float(win.mean()) - 127.5) < 10
    assert float(win.std()) < 12


def test_extract_windows_batches() -> None:
    frame = np.full((60, 80), 200, np.uint8)
    out, places = extract_windows(frame, [[10, 10, 20, 20], [30, 5, 70, 45]], WindowSpec(size=24))
    assert out.shape == (2, 1, 24, 24) and len(places) == 2
    assert out[1, 0, 12, 12] == 200


def _pool(n: int = 20) -> DigitPool:
    rng = np.random.default_rng(1)
    imgs = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        imgs[i, 6:22, 12:16] = 255  # a vertical bar: a "1"
        imgs[i, 6:9, 9:16] = 200 + rng.integers(0, 50)
    return DigitPool(imgs, np.arange(n, dtype=np.int64) % 10, "unit")


def test_scene_ground_truth_box_is_tight() -> None:
    pool = _pool()
    r = SceneRenderer(pool, noise=0.0, background=(0, 0))
    scene = r.render(200, 150, [DigitPlacement(0, 0.0, 2.0, 100.0, 75.0)], np.random.default_rng(0))
    (obj,) = scene.objects
    x0, y0, x1, y1 = (int(v) for v in obj.box)
    ink = scene.image > 64
    ys, xs = np.nonzero(ink)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_window_data_set_is_deterministic_and_has_background() -> None:
    src = WindowSource(_pool(), background_fraction=0.2)
    a = draw_passes(src, 2, seed=5)
    b = draw_passes(src, 2, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape[1:] == (1, 48, 48)
    assert set(np.unique(a.labels)) <= set(range(11))
    assert (a.labels == src.background_id).mean() == pytest.approx(0.2, abs=0.06)
    assert src.window_info["context_margin"] == 0.25
