"""`edge-stn evaluate`: error rate with a 95% confidence interval, on TC, RTS or a folder, for a
checkpoint (PyTorch) or an exported ONNX file (ONNX Runtime); a PNG of inputs beside their
canonical (STN) outputs, like figure 3 of the STN paper.

Scoring uses a fixed seed and every test item ``passes`` times (10 by default), so 1,000 test
digits give 10,000 samples and a confidence interval about a third as wide as 1,000 alone. The
interval is Wilson's score interval; distortions of the same digit are not independent, so it
is, if anything, slightly optimistic; the per-digit spread is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_stn.data.base import Samples, SampleSource, draw_passes
from edge_stn.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EVAL_SEED = 2_024


@dataclass
class Scores:
    samples: int
    errors: int
    error: float
    ci_low: float
    ci_high: float
    per_class_error: dict[str, float]


@dataclass
class Predictions:
    logits: npt.NDArray[np.float32]
    theta: npt.NDArray[np.float32] | None
    canonical: npt.NDArray[np.float32] | None


def wilson_interval(errors: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = errors / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def scores_from_logits(
    logits: npt.NDArray[Any], labels: npt.NDArray[np.int64], label_names: list[str] | None = None
) -> Scores:
    pred = logits.argmax(axis=1)
    wrong = pred != labels
    k, n = int(wrong.sum()), int(labels.shape[0])
    lo, hi = wilson_interval(k, n)
    per: dict[str, float] = {}
    for c in np.unique(labels):
        name = label_names[int(c)] if label_names else str(int(c))
        per[name] = float(wrong[labels == c].mean())
    return Scores(n, k, k / n if n else math.nan, lo, hi, per)


def to_input(images: npt.NDArray[np.uint8], device: torch.device | None = None) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1] (pixel_scale 1/255, mean 0, std 1)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().mul_(1.0 / 255.0)
    return x.to(device) if device is not None else x


def predict_torch(
    model: torch.nn.Module,
    images: npt.NDArray[np.uint8],
    device: torch.device | None = None,
    batch: int = 500,
) -> Predictions:
    import torch

    was = model.training
    model.eval()
    logits, thetas, canon = [], [], []
    try:
        with torch.inference_mode():
            for i in range(0, images.shape[0], batch):
                out = model(to_input(images[i : i + batch], device))
                logits.append(out.logits.float().cpu().numpy())
                if out.theta is not None:
                    thetas.append(out.theta.float().cpu().numpy())
                    canon.append(out.canonical.float().cpu().numpy())
    finally:
        model.train(was)
    return Predictions(
        np.concatenate(logits),
        np.concatenate(thetas) if thetas else None,
        np.concatenate(canon) if canon else None,
    )


def score_torch(
    model: torch.nn.Module, samples: Samples, device: torch.device | None = None
) -> Scores:
    return scores_from_logits(predict_torch(model, samples.images, device).logits, samples.labels)


def predict_onnx(path: Path, images: npt.NDArray[np.uint8], batch: int = 500) -> Predictions:
    try:
        import onnxruntime as ort
    except ImportError:
        from edge_stn.errors import MissingExtraError

        raise MissingExtraError("onnxruntime", "cpu", "scoring an ONNX model") from None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelError(
            f"ONNX Runtime cannot load it: {str(exc).splitlines()[0][:200]}", path=path
        ) from None
    names = [o.name for o in sess.get_outputs()]
    if "logits" not in names:
        raise ModelError(f"model has no 'logits' output (outputs: {names})", path=path)
    inp = sess.get_inputs()[0].name
    want = [n for n in ("logits", "theta", "canonical") if n in names]
    parts: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in want}
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].astype(np.float32) / 255.0
        for n, v in zip(want, sess.run(want, {inp: x}), strict=True):
            parts[n].append(v)
    cat = {n: np.concatenate(v) for n, v in parts.items()}
    return Predictions(cat["logits"], cat.get("theta"), cat.get("canonical"))


def canonical_from_theta(
    images: npt.NDArray[np.uint8], theta: npt.NDArray[np.float32], out_size: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """The STN output recomputed from theta with OpenCV (the runtime's crop path)."""

    from edge_stn.geometry import frame_from_crop
    from edge_stn.windows import sample_through

    n, _, h, w = images.shape
    oh, ow = out_size
    out = np.zeros((n, 1, oh, ow), dtype=np.float32)
    for i in range(n):
        m = frame_from_crop(
            theta[i],
            window_origin=(0.0, 0.0),
            window_scale=1.0,
            model_size=(w, h),
            crop_size=(ow, oh),
        )
        out[i, 0] = sample_through(images[i, 0].astype(np.float32) / 255.0, m, (ow, oh))
    return out


def stn_pose(theta: npt.NDArray[np.float32]) -> dict[str, float]:
    """What the transformer does, summarized: zoom (output magnification against the identity
    view, 1/sqrt|det A|), rotation and shift of theta = [A | t]."""
    a = theta[:, :, :2].astype(np.float64)
    det = np.abs(np.linalg.det(a))
    zoom = 1.0 / np.sqrt(np.maximum(det, 1e-12))
    rot = np.degrees(np.arctan2(a[:, 1, 0], a[:, 0, 0]))
    shift = np.abs(theta[:, :, 2]).mean(axis=1)
    return {
        "median_zoom": float(np.median(zoom)),
        "mean_abs_rotation_deg": float(np.abs(rot).mean()),
        "mean_abs_shift": float(shift.mean()),
    }


def save_figure(
    path: Path,
    images: npt.NDArray[np.uint8],
    canonical: npt.NDArray[np.float32] | None,
    labels: npt.NDArray[np.int64],
    logits: npt.NDArray[np.float32],
    label_names: list[str],
    title: str,
    count: int = 24,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, images.shape[0])
    cols = 6
    rows = math.ceil(count / cols)
    pairs = 2 if canonical is not None else 1
    fig, axes = plt.subplots(rows, cols * pairs, figsize=(cols * pairs * 1.3, rows * 1.5))
    axes = np.atleast_2d(axes)
    pred = logits.argmax(1)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        for j in range(pairs):
            ax = axes[r, c * pairs + j]
            ax.axis("off")
            if i >= count:
                continue
            if j == 0:
                ax.imshow(
                    images[i, 0]
                    if images.shape[1] == 1
                    else images[i].transpose(1, 2, 0)[..., ::-1],
                    cmap="gray",
                    vmin=0,
                    vmax=255,
                )
                ok = pred[i] == labels[i]
                ax.set_title(
                    f"{label_names[labels[i]]}->{label_names[pred[i]]}",
                    fontsize=7,
                    color="black" if ok else "red",
                )
            else:
                assert canonical is not None
                ax.imshow(canonical[i, 0], cmap="gray", vmin=0, vmax=1)
                ax.set_title("STN", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Evaluation:
    model: str
    kind: str
    dataset: str
    passes: int
    seed: int
    samples: int
    errors: int
    error: float
    ci95: tuple[float, float]
    per_class_error: dict[str, float]
    seconds: float
    figure: str | None
    stn_pose: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d

    def table(self) -> str:
        lines = [
            f"model     {self.model} ({self.kind})",
            f"dataset   {self.dataset}: {self.samples} samples ({self.passes} distortions per test item, seed {self.seed})",
            f"error     {100 * self.error:.2f}%  (95% CI {100 * self.ci95[0]:.2f}-{100 * self.ci95[1]:.2f}%, {self.errors} wrong)",
            "per class "
            + "  ".join(f"{k}:{100 * v:.1f}%" for k, v in self.per_class_error.items()),
        ]
        if self.stn_pose:
            p = self.stn_pose
            lines.append(
                f"STN pose  median zoom {p['median_zoom']:.2f}x, "
                f"mean |rotation| {p['mean_abs_rotation_deg']:.1f} deg, "
                f"mean |shift| {p['mean_abs_shift']:.2f} (normalized)"
            )
        if self.figure:
            lines.append(f"figure    {self.figure}")
        return "\n".join(lines)


def _test_source(dataset: str, meta: dict[str, Any]) -> SampleSource:
    if dataset in ("tc", "rts"):
        from edge_stn.data.distort import RTSGenerator, TCGenerator
        from edge_stn.data.mnist import load_mnist_split

        pool = load_mnist_split("test")
        return TCGenerator(pool) if dataset == "tc" else RTSGenerator(pool)
    if dataset.startswith("folder:"):
        from edge_stn.data.folder import FolderSource, scan_folder

        root = Path(dataset.split(":", 1)[1])
        h, w = meta["in_size"]
        scan = scan_folder(root, labels=meta["labels"])
        return FolderSource(
            scan,
            split="test",
            size=(h, w),
            channels=meta["in_channels"],
            test_fraction=meta.get("test_fraction", 0.2),
            seed=meta.get("seed", 0),
        )
    if dataset == "windows":
        from edge_stn.data.windows_data import build_window_sources

        return build_window_sources(meta.get("windows") or {}, 0).test
    raise DataError(f"unknown dataset {dataset!r}: expected tc, rts, windows or folder:DIR")


def evaluate(
    model_path: Path,
    dataset: str,
    *,
    passes: int = 10,
    seed: int = EVAL_SEED,
    figure: Path | None = None,
) -> Evaluation:
    if passes < 1:
        raise DataError(f"passes must be at least 1, got {passes}")
    t0 = time.time()
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        from edge_stn.runtime.metadata import read_model_metadata

        doc = read_model_metadata(model_path)
        inp = doc["input"]
        meta = {
            "in_size": (inp["height"], inp["width"]),
            "in_channels": inp["channels"],
            "labels": doc["labels"],
            "stn_out": (doc["stn"]["output_height"], doc["stn"]["output_width"])
            if doc.get("stn")
            else (28, 28),
            "windows": doc.get("window"),
            **(doc.get("training", {}).get("folder") or {}),
        }
        kind = "onnx"
    else:
        from edge_stn.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model_path)
        spec = ckpt["spec"]
        folder_cfg = ckpt["config"]["data"].get("folder") or {}
        meta = {
            "in_size": tuple(spec["in_size"]),
            "in_channels": spec["in_channels"],
            "labels": ckpt["labels"],
            "stn_out": tuple(spec["stn_out"]),
            "windows": ckpt["config"]["data"].get("windows"),
            "test_fraction": folder_cfg.get("test_fraction", 0.2),
            "seed": ckpt["config"]["seed"],
        }
        kind = f"checkpoint, {spec['arch']}"
    source = _test_source(dataset, meta)
    if tuple(source.size) != tuple(meta["in_size"]):
        raise DataError(
            f"the model takes {meta['in_size'][0]}x{meta['in_size'][1]} inputs but "
            f"data set '{dataset}' is {source.size[0]}x{source.size[1]}"
        )
    if len(source.label_names) != len(meta["labels"]):
        raise DataError(
            f"the model has {len(meta['labels'])} classes, data set '{dataset}' has {len(source.label_names)}"
        )
    samples = draw_passes(source, passes, seed=seed, shuffle=False)
    if kind == "onnx":
        preds = predict_onnx(model_path, samples.images)
    else:
        from edge_stn.checkpoint import model_from_checkpoint

        preds = predict_torch(model_from_checkpoint(ckpt, model_path), samples.images)
    sc = scores_from_logits(preds.logits, samples.labels, list(meta["labels"]))
    # The figure shows samples spread over the whole (digit-ordered) set, so every class appears.
    pick = np.unique(np.linspace(0, samples.labels.shape[0] - 1, 24).astype(np.int64))
    canonical = None if preds.canonical is None else preds.canonical[pick]
    if canonical is None and preds.theta is not None and samples.images.shape[1] == 1:
        canonical = canonical_from_theta(
            samples.images[pick], preds.theta[pick], tuple(meta["stn_out"])
        )
    if figure is not None:
        save_figure(
            figure,
            samples.images[pick],
            canonical,
            samples.labels[pick],
            preds.logits[pick],
            list(meta["labels"]),
            f"{model_path.name} on {dataset}: error {100 * sc.error:.2f}%",
        )
    return Evaluation(
        str(model_path),
        kind,
        dataset,
        passes,
        seed,
        sc.samples,
        sc.errors,
        sc.error,
        (sc.ci_low, sc.ci_high),
        sc.per_class_error,
        round(time.time() - t0, 2),
        str(figure) if figure else None,
        None if preds.theta is None else stn_pose(preds.theta),
    )


def evaluation_json(ev: Evaluation) -> str:
    return json.dumps(ev.to_json(), indent=1)
