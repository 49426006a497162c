"""Users' own data: an image folder with one subfolder per class (like torchvision's ImageFolder).

    root/
      bolt/   img001.png ...
      nut/    ...
      background/ ...      (optional: the class that means "no object"; named in the config)

Images are loaded with OpenCV, resized to the model input and distorted like RTS (rotation,
scale, translation) with fresh draws every epoch. A fixed, seeded fraction of each class is held
out as the test split (and, when asked, a validation split from the rest); the split is by file,
so no test image ever reaches training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn.data.base import Samples
from edge_stn.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass(frozen=True)
class FolderScan:
    root: Path
    classes: list[str]
    files: list[tuple[Path, int]]


def scan_folder(root: Path, labels: list[str] | None = None) -> FolderScan:
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such image folder", path=root)
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    stray = [p for p in entries if p.is_file()]
    if stray:
        raise DataError(
            f"expected only class subfolders, found file '{stray[0].name}' at the top level "
            "(one subfolder per class, images inside)",
            path=root,
        )
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        raise DataError("no class subfolders (expected one subfolder per class)", path=root)
    if labels is not None and classes != list(labels):
        raise DataError(
            f"class folders {classes} differ from the model's labels {list(labels)}", path=root
        )
    if len(classes) < 2:
        raise DataError(
            f"only one class ('{classes[0]}'): a classifier needs at least two", path=root
        )
    files: list[tuple[Path, int]] = []
    for ci, name in enumerate(classes):
        imgs = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(imgs) < 2:
            raise DataError(
                f"class folder has {len(imgs)} image(s); each class needs at least 2 "
                f"(suffixes {sorted(IMAGE_SUFFIXES)})",
                path=root / name,
            )
        files.extend((p, ci) for p in imgs)
    return FolderScan(root, classes, files)


def _load(path: Path, size: tuple[int, int], channels: int) -> npt.NDArray[np.uint8]:
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flag)
    if img is None:
        raise DataError("cannot read this image (corrupt or not an image)", path=path)
    h, w = size
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return np.asarray(img if img.ndim == 3 else img[:, :, None], dtype=np.uint8)


def _split(
    labels: npt.NDArray[np.int64], fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per class, hold out ``fraction`` (at least one image); returns (rest, held_out)."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = min(idx.size - 1, max(1, round(idx.size * fraction)))
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


class FolderSource:
    def __init__(
        self,
        scan: FolderScan,
        *,
        split: str,
        size: tuple[int, int],
        channels: int,
        test_fraction: float = 0.2,
        seed: int = 0,
        val_fraction: float = 0.0,
        angle: float = 45.0,
        scale: tuple[float, float] = (0.7, 1.2),
        translate: float = 0.15,
    ) -> None:
        labels = np.array([c for _, c in scan.files], dtype=np.int64)
        train_idx, test_idx = _split(labels, test_fraction, seed)
        if split == "test":
            chosen = test_idx
        else:
            chosen = train_idx
            if val_fraction > 0:
                fit_rel, val_rel = _split(labels[train_idx], val_fraction, seed + 1)
                chosen = train_idx[val_rel] if split == "val" else train_idx[fit_rel]
        self.label_names = list(scan.classes)
        self.channels = channels
        self.size = size
        self.angle, self.scale, self.translate = angle, scale, translate
        self.images = np.stack([_load(scan.files[i][0], size, channels) for i in chosen])  # N,H,W,C
        self.labels = labels[chosen]

    def num_items(self) -> int:
        return int(self.labels.shape[0])

    def draw(self, items: npt.NDArray[np.int64], rng: np.random.Generator) -> Samples:
        h, w = self.size
        out = np.zeros((items.shape[0], self.channels, h, w), dtype=np.uint8)
        for i, item in enumerate(items):
            a = float(rng.uniform(-self.angle, self.angle))
            s = float(rng.uniform(*self.scale))
            m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), a, s)
            m[0, 2] += rng.uniform(-self.translate, self.translate) * w
            m[1, 2] += rng.uniform(-self.translate, self.translate) * h
            warped = cv2.warpAffine(
                self.images[item], m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0
            )
            out[i] = (warped if warped.ndim == 3 else warped[:, :, None]).transpose(2, 0, 1)
        return Samples(out, self.labels[items].astype(np.int64))


def build_folder_sources(cfg: Any, seed: int, val_per_class: int) -> Any:
    from edge_stn.data.factory import DataSources

    scan = scan_folder(cfg.root)
    if cfg.background is not None and cfg.background not in scan.classes:
        raise DataError(
            f"background class '{cfg.background}' is not one of the class folders {scan.classes}",
            path=cfg.root,
        )
    common = {
        "size": tuple(cfg.size),
        "channels": cfg.channels,
        "test_fraction": cfg.test_fraction,
        "seed": seed,
        "val_fraction": 0.1 if val_per_class > 0 else 0.0,
    }
    train = FolderSource(scan, split="train", **common)
    val = FolderSource(scan, split="val", **common) if val_per_class > 0 else None
    test = FolderSource(scan, split="test", **common)
    logger.info(
        "image folder %s: %d classes, %d train / %d test images",
        cfg.root,
        len(scan.classes),
        train.num_items(),
        test.num_items(),
    )
    return DataSources(
        train,
        val,
        test,
        scan.classes,
        cfg.background,
        f"image folder {cfg.root} ({len(scan.classes)} classes), RTS-style augmentation",
    )
