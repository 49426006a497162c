"""The training config (YAML, validated by pydantic). Torch-free, so `edge-stn train` can
reject a bad file before it loads anything heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_stn.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderData(Strict):
    root: Path = Field(description="one subfolder per class, like torchvision's ImageFolder")
    size: tuple[int, int] = Field((48, 48), description="model input (height, width)")
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="images held out, per class")
    background: str | None = Field(
        None, description="name of the class folder that means 'no object'"
    )


class DataConfig(Strict):
    val_per_class: int = Field(
        40, ge=0, le=200, description="validation digits per class, carved from the training split"
    )
    passes_per_epoch: int = Field(
        2, ge=1, description="fresh distortions of every training item per epoch"
    )
    eval_passes: int = Field(10, ge=1, description="distortions per test item when scoring")
    workers: int = Field(
        0,
        ge=0,
        description="processes that draw each epoch's training samples (0: in the trainer's own; "
        "a different count draws other, equally random samples)",
    )
    folder: FolderData | None = None
    windows: dict[str, Any] | None = Field(
        None, description="options of the detection-window data set"
    )


class ModelConfig(Strict):
    widths: tuple[int, int, int] = (32, 64, 128)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    stn_out: tuple[int, int] = (28, 28)
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"
    loc_downsample: int = Field(2, ge=1)
    loc_channels: tuple[int, int] = (16, 32)
    loc_hidden: int = Field(64, ge=6)


class OptimConfig(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0, description="peak learning rate of the one-cycle schedule")
    weight_decay: float = Field(1e-4, ge=0.0)
    loc_lr_scale: float = Field(
        0.3, gt=0.0, description="learning-rate multiplier of the localization net"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    consistency_weight: float = Field(
        0.0, ge=0.0, description="transformation-consistency loss weight (ST-CNN only)"
    )
    consistency_angle: float = Field(
        20.0,
        ge=0.0,
        le=180.0,
        description="the consistency loss re-rotates inputs within +/- this many degrees",
    )


class TrainConfig(Strict):
    name: str = "model"
    dataset: Literal["tc", "rts", "folder", "windows"] = "tc"
    arch: Literal["stcnn", "cnn"] = "stcnn"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (default: torch's choice)"
    )
    out: Path = Path("runs/model")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _folder_needs_root(self) -> TrainConfig:
        if self.dataset == "folder" and self.data.folder is None:
            raise ValueError("dataset 'folder' needs data.folder.root")
        return self


def format_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {first['msg']}{more}"


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("no such file", path=path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(
            f"{where}not valid YAML ({getattr(exc, 'problem', exc)})", path=path
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read ({exc})", path=path) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(doc).__name__}", path=path
        )
    return doc


def load_train_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    doc = load_yaml_mapping(path)
    for k, v in (overrides or {}).items():
        if v is not None:
            doc[k] = v
    try:
        cfg = TrainConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), path=path) from None
    return cfg
