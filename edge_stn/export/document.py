"""The ``edge_stn`` metadata document (DESIGN §5), built from a checkpoint, and its sidecar.

The document embedded in the model is the authority; the sidecar ``<model>.json`` repeats it
with the model file's sha256 and the export's verification report. The runtime reads and checks
both with :mod:`edge_stn.runtime.metadata`, whose validator also checks what is built here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from edge_stn.runtime.metadata import SCHEMA_VERSION, validate_document


def created_now() -> str:
    # SOURCE_DATE_EPOCH makes re-exports byte-identical (reproducible builds).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
        if epoch and epoch.isdigit()
        else dt.datetime.now(dt.timezone.utc)
    )
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _test_error(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The held-out test score that training stored in the selected checkpoint ("test")."""
    test = ckpt.get("test")
    if not isinstance(test, dict) or "error" not in test:
        return {"error": None, "error_source": None}
    return {
        "error": test.get("error"),
        "error_ci95": test.get("ci95"),
        "error_samples": test.get("samples"),
        "error_source": f"test split, {test.get('passes')} distortions per test item, seed {test.get('seed')}",
    }


def build_document(
    ckpt: dict[str, Any],
    ckpt_path: Path,
    *,
    opset: int,
    outputs: dict[str, list[Any]],
    precision: str,
    producer: dict[str, Any],
    tensorrt: dict[str, Any],
    ckpt_sha256: str,
) -> dict[str, Any]:
    spec = ckpt["spec"]
    inp = ckpt.get("input") or {
        "pixel_scale": 1.0 / 255.0,
        "mean": 0.0,
        "std": 1.0,
        "color": "gray" if spec["in_channels"] == 1 else "bgr",
    }
    config = ckpt.get("config") or {}
    dataset = ckpt.get("dataset") or {}
    h, w = spec["in_size"]
    stn = None
    if spec["arch"] == "stcnn":
        oh, ow = spec["stn_out"]
        stn = {
            "output_height": int(oh),
            "output_width": int(ow),
            "align_corners": False,
            "padding_mode": spec["padding_mode"],
            "theta": "maps canonical-grid normalized coordinates to input normalized coordinates "
            "(align_corners=False); see edge_stn.geometry",
        }
    training: dict[str, Any] = {
        "dataset": dataset.get("name", config.get("dataset")),
        "dataset_description": dataset.get("description"),
        "arch": spec["arch"],
        "name": config.get("name"),
        **_test_error(ckpt),
        "val_error": _finite(ckpt.get("best_val_error")),
        "epochs": int(ckpt["epoch"]) + 1 if isinstance(ckpt.get("epoch"), int) else None,
        "flops_per_image": ckpt.get("flops"),
        "checkpoint": ckpt_path.name,
        "checkpoint_sha256": ckpt_sha256,
    }
    folder = (config.get("data") or {}).get("folder")
    if training["dataset"] == "folder" and folder:
        training["folder"] = {
            "test_fraction": folder.get("test_fraction"),
            "seed": config.get("seed"),
        }
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": config.get("name"),
        "labels": [str(x) for x in ckpt["labels"]],
        "background_label": ckpt.get("background_label"),
        "input": {
            "name": "images",
            "channels": int(spec["in_channels"]),
            "height": int(h),
            "width": int(w),
            "pixel_scale": float(inp["pixel_scale"]),
            "mean": _floats(inp["mean"]),
            "std": _floats(inp["std"]),
            "color": inp["color"],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "outputs": [{"name": k, "shape": v, "dtype": "float32"} for k, v in outputs.items()],
        "stn": stn,
        "window": ckpt.get("window"),
        "opset": opset,
        "precision": precision,
        "tensorrt": tensorrt,
        "training": training,
        "created": created_now(),
        "producer": producer,
    }
    return validate_document(json.loads(json.dumps(doc)))


def _floats(v: Any) -> float | list[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and v == v and abs(v) != float("inf") else None


def sidecar_document(
    doc: dict[str, Any], *, model_name: str, sha256: str, size: int, verification: dict[str, Any]
) -> dict[str, Any]:
    return {
        **doc,
        "model_file": model_name,
        "sha256": sha256,
        "size_bytes": size,
        "verification": verification,
    }
