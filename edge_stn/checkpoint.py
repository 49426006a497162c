"""Checkpoints: weights, model spec, training config and label map, in one file that loads
with ``torch.load(weights_only=True)`` (plain dicts, lists, numbers, strings and tensors)."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from edge_stn.errors import CheckpointError
from edge_stn.nn.models import STCNN, ModelSpec, PlainCNN, build_model

FORMAT = "edge-stn/checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a failed or interrupted save never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(doc, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, *, expect_arch: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint file", path=path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        KeyError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
    ) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(
            f"not a readable PyTorch checkpoint (truncated or corrupt?): {first[:160]}", path=path
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(
            "not an edge-stn checkpoint (no 'format: edge-stn/checkpoint' entry)", path=path
        )
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {doc.get('format_version')} is not supported (expected {FORMAT_VERSION})",
            path=path,
        )
    for key in ("spec", "state_dict", "labels", "config"):
        if key not in doc:
            raise CheckpointError(f"checkpoint lacks '{key}'", path=path)
    if not isinstance(doc["spec"], dict):
        raise CheckpointError("checkpoint's 'spec' is not a mapping", path=path)
    spec = ModelSpec.from_dict(doc["spec"])
    if expect_arch is not None and spec.arch != expect_arch:
        raise CheckpointError(
            f"checkpoint holds a '{spec.arch}' model, expected '{expect_arch}'", path=path
        )
    return doc


def model_from_checkpoint(doc: dict[str, Any], path: Path | None = None) -> STCNN | PlainCNN:
    spec = ModelSpec.from_dict(doc["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(doc["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"weights do not fit a '{spec.arch}' model: {first[:200]}", path=path
        ) from None
    model.eval()
    return model
