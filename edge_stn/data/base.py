"""Records shared by every data source."""

from __future__ import annotations

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


def draw_passes(source: SampleSource, passes: int, seed: int, *, shuffle: bool = True) -> Samples:
    """Every source item ``passes`` times, each with its own distortion, deterministic by seed."""
    rng = np.random.default_rng(seed)
    items = np.tile(np.arange(source.num_items(), dtype=np.int64), passes)
    if shuffle:
        rng.shuffle(items)
    return source.draw(items, rng)
