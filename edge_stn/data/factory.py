"""Builds the train / validation / test sample sources a training config names."""

from __future__ import annotations

from dataclasses import dataclass

from edge_stn.data.base import SampleSource
from edge_stn.training_config import TrainConfig


@dataclass
class DataSources:
    train: SampleSource
    val: SampleSource | None
    test: SampleSource
    label_names: list[str]
    background_label: str | None
    description: str


def build_sources(cfg: TrainConfig) -> DataSources:
    if cfg.dataset in ("tc", "rts"):
        from edge_stn.data.distort import RTSGenerator, TCGenerator
        from edge_stn.data.mnist import load_mnist_split

        vpc = cfg.data.val_per_class
        make = TCGenerator if cfg.dataset == "tc" else RTSGenerator
        train = make(load_mnist_split("train", val_per_class=vpc))
        val = make(load_mnist_split("val", val_per_class=vpc)) if vpc > 0 else None
        test = make(load_mnist_split("test"))
        desc = {
            "tc": "translated cluttered MNIST, 60x60, 6 clutter patches of 6x6",
            "rts": "rotated (+/-45 deg), scaled (0.7-1.2), translated MNIST, 42x42",
        }[cfg.dataset]
        return DataSources(train, val, test, list(train.label_names), None, desc)
    if cfg.dataset == "folder":
        from edge_stn.data.folder import build_folder_sources

        assert cfg.data.folder is not None
        return build_folder_sources(cfg.data.folder, cfg.seed, cfg.data.val_per_class)
    if cfg.dataset == "windows":
        from edge_stn.data.windows_data import build_window_sources

        return build_window_sources(cfg.data.windows or {}, cfg.data.val_per_class)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")
