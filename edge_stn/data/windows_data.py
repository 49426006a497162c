"""Training windows for detection models (the bundled demo model), cut from synthetic scenes with
the daemon's own window extractor (:mod:`edge_stn.windows`).

Each digit item renders a small scene with the look of the synthetic camera's frames
(:mod:`edge_stn.video.synthetic`): the target digit at a random pose (rotation U[-45, 45], scale
U[1.5, 6.5], i.e. 30-130 px tall, shear and width jitter), at a random contrast (ink 40-230 grey
levels above a background ramp), up to two neighbouring digits around it (often cut by the
window's edge), clutter fragments, blur and sensor noise. Its tight ink box is jittered like an imprecise proposal and cut into a window.
Background items ("no whole digit") are windows a proposal stage would also produce: a clutter
fragment (half of them), one half of a digit, or an empty patch of background. Digits, neighbours and clutter
all come from the same split, so test windows share nothing with training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edge_stn.data.base import Samples
from edge_stn.data.mnist import DIGIT_NAMES, DigitPool
from edge_stn.data.scenes import DigitPlacement, SceneRenderer
from edge_stn.windows import WindowSpec, extract_window, place_window

BACKGROUND = "background"


class WindowSource:
    def __init__(
        self,
        pool: DigitPool,
        *,
        spec: WindowSpec | None = None,
        jitter: float = 0.06,
        background_fraction: float = 0.2,
        scale: tuple[float, float] = (1.5, 6.5),
        angle: float = 45.0,
        shear: float = 0.25,
        aspect: float = 0.2,
        contrast: tuple[float, float] = (40.0, 230.0),
        noise: tuple[float, float] = (0.0, 10.0),
        blur: tuple[float, float] = (0.0, 2.0),
        background: tuple[int, int] = (0, 70),
        neighbours: int = 2,
        clutter: int = 4,
    ) -> None:
        self.pool = pool
        self.spec = spec or WindowSpec()
        self.jitter = jitter
        self.scale = scale
        self.angle = angle
        self.shear = shear
        self.aspect = aspect
        self.contrast = contrast
        self.noise = noise
        self.blur = blur
        self.neighbours = neighbours
        self.clutter = clutter
        self.renderer = SceneRenderer(pool, background=background)
        self.label_names = [*DIGIT_NAMES, BACKGROUND]
        self.background_id = len(DIGIT_NAMES)
        self.channels = 1
        self.size = (self.spec.size, self.spec.size)
        self.n_background = round(len(pool) * background_fraction / (1.0 - background_fraction))
        self.window_info: dict[str, Any] = {
            **self.spec.to_dict(),
            "box": "tight ink box of the object, [x0, y0, x1, y1] edge coordinates",
            "proposal_jitter": jitter,
            "background_label": BACKGROUND,
            "digit_scale": list(scale),
            "digit_angle": angle,
            "digit_shear": shear,
            "digit_aspect": aspect,
            "contrast": list(contrast),
            "noise": list(noise),
            "blur": list(blur),
            "background": list(background),
        }

    def num_items(self) -> int:
        return len(self.pool) + self.n_background

    def _jittered(
        self, box: tuple[float, float, float, float], rng: np.random.Generator
    ) -> npt.NDArray[np.float64]:
        b = np.array(box, dtype=np.float64)
        side = max(b[2] - b[0], b[3] - b[1])
        return b + rng.normal(0.0, self.jitter * side, size=4)

    def _placement(
        self, index: int, scale: float, cx: float, cy: float, rng: np.random.Generator
    ) -> DigitPlacement:
        return DigitPlacement(
            index,
            float(rng.uniform(-self.angle, self.angle)),
            scale,
            cx,
            cy,
            float(rng.uniform(-self.shear, self.shear)),
            float(np.exp(rng.uniform(-self.aspect, self.aspect))),
            float(rng.uniform(*self.contrast)),
        )

    def _scene(self, target: int | None, rng: np.random.Generator) -> tuple[Any, int]:
        s = float(rng.uniform(*self.scale))
        size = int(np.ceil(28 * s * 2.4))
        c = size / 2.0
        places = []
        if target is not None:
            jx, jy = rng.uniform(-2, 2, size=2) * s
            places.append(self._placement(target, s, c + jx, c + jy, rng))
        for _ in range(int(rng.integers(0, self.neighbours + 1))):
            a = rng.uniform(0, 2 * np.pi)
            d = 28 * s * rng.uniform(1.05, 1.4)
            places.append(
                self._placement(
                    int(rng.integers(len(self.pool))),
                    s * float(rng.uniform(0.8, 1.25)),
                    c + d * np.cos(a),
                    c + d * np.sin(a),
                    rng,
                )
            )
        return self.renderer.render(
            size,
            size,
            places,
            rng,
            clutter=int(rng.integers(0, self.clutter + 1)),
            blur=float(rng.uniform(*self.blur)),
            noise=float(rng.uniform(*self.noise)),
            clutter_zoom=(0.5 * s, 1.5 * s),
            clutter_level=self.contrast,
        ), size

    def _background_box(self, rng: np.random.Generator) -> tuple[Any, npt.NDArray[np.float64]]:
        scene, size = self._scene(
            int(rng.integers(len(self.pool))) if rng.random() < 0.5 else None, rng
        )
        # Clutter strokes are what a proposal stage finds most often besides digits.
        kind = rng.choice(3, p=[0.5, 0.25, 0.25])
        if kind == 0 and scene.clutter_boxes:
            return scene, self._jittered(
                scene.clutter_boxes[int(rng.integers(len(scene.clutter_boxes)))], rng
            )
        if kind == 1 and scene.objects:
            x0, y0, x1, y1 = scene.objects[int(rng.integers(len(scene.objects)))].box
            half = rng.integers(4)
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            part = [(x0, y0, mx, y1), (mx, y0, x1, y1), (x0, y0, x1, my), (x0, my, x1, y1)][half]
            return scene, self._jittered(part, rng)
        side = float(rng.uniform(0.1, 0.3)) * size
        x0, y0 = rng.uniform(0, size - side, size=2)
        return scene, np.array([x0, y0, x0 + side, y0 + side])

    def draw(self, items: npt.NDArray[np.int64], rng: np.random.Generator) -> Samples:
        n = int(items.shape[0])
        out = np.zeros((n, 1, self.spec.size, self.spec.size), dtype=np.uint8)
        labels = np.zeros(n, dtype=np.int64)
        for i, item in enumerate(items):
            box = None
            if item < len(self.pool):
                scene, _ = self._scene(int(item), rng)
                if scene.objects and scene.objects[0].label == int(self.pool.labels[item]):
                    box = self._jittered(scene.objects[0].box, rng)
                    labels[i] = int(self.pool.labels[item])
            if box is None:
                scene, box = self._background_box(rng)
                labels[i] = self.background_id
            out[i, 0] = extract_window(scene.image, place_window(box, self.spec), self.spec.size)
        return Samples(out, labels)


def build_window_sources(options: dict[str, Any], val_per_class: int) -> Any:
    from edge_stn.data.factory import DataSources
    from edge_stn.data.mnist import load_mnist_split

    opts = dict(options)
    spec = WindowSpec(
        **{k: opts.pop(k) for k in ("size", "context_margin", "min_side") if k in opts}
    )
    for k in ("box", "background_label"):
        opts.pop(k, None)
    if "proposal_jitter" in opts:
        opts["jitter"] = opts.pop("proposal_jitter")
    if "digit_scale" in opts:
        opts["scale"] = tuple(opts.pop("digit_scale"))
    for key in ("angle", "shear", "aspect"):
        if f"digit_{key}" in opts:
            opts[key] = opts.pop(f"digit_{key}")
    for key in ("contrast", "noise", "blur", "background"):
        if key in opts:
            opts[key] = tuple(opts[key])

    def make(pool: DigitPool) -> WindowSource:
        return WindowSource(pool, spec=spec, **opts)

    train = make(load_mnist_split("train", val_per_class=val_per_class))
    val = make(load_mnist_split("val", val_per_class=val_per_class)) if val_per_class > 0 else None
    test = make(load_mnist_split("test"))
    return DataSources(
        train,
        val,
        test,
        list(train.label_names),
        BACKGROUND,
        "detection windows cut from synthetic digit scenes (edge_stn.windows), with a background class",
    )
