"""Records shared by every data source."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_stn.errors import ShapeError


@dataclass(frozen=True)
class Samples:
    """A batch of images (uint8, N x C x H x W) with integer labels (N,)."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ShapeError("images", self.images.shape, "(N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ShapeError("labels", self.labels.shape, f"({self.images.shape[0]},)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class SampleSource(Protocol):
    """Anything that draws distorted samples: TC, RTS, image folders, detection windows."""

    label_names: list[str]
    channels: int
    size: tuple[int, int]

    def num_items(self) -> int:
        """How many source items (digits, images) one pass covers."""
        ...

    def draw(self, items: npt.NDArray[np.int64], rng: np.random.Generator) -> Samples:
        """One fresh distortion of each listed source item."""
        ...


def draw_passes(
    source: SampleSource, passes: int, seed: int, *, shuffle: bool = True, workers: int = 0
) -> Samples:
    """Every source item ``passes`` times, each with its own distortion, deterministic by seed
    (and by ``workers``: with ``workers > 1`` the items are drawn in that many forked processes,
    chunk ``k`` with the random stream ``(seed, k)``)."""
    rng = np.random.default_rng(seed)
    items = np.tile(np.arange(source.num_items(), dtype=np.int64), passes)
    if shuffle:
        rng.shuffle(items)
    if workers <= 1:
        return source.draw(items, rng)
    chunks = np.array_split(items, workers)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_set_worker_source, initargs=(source,)) as pool:
        parts = pool.starmap(_draw_chunk, [(c, seed, k) for k, c in enumerate(chunks)])
    return Samples(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )


_worker_source: SampleSource | None = None


def _set_worker_source(source: SampleSource) -> None:
    global _worker_source
    _worker_source = source


def _draw_chunk(items: npt.NDArray[np.int64], seed: int, k: int) -> Samples:
    assert _worker_source is not None
    return _worker_source.draw(items, np.random.default_rng([seed, k]))
