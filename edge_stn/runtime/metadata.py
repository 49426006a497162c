"""The model file contract (DESIGN §5), runtime side: read and check the embedded document.

An exported model carries one JSON document under the ONNX ``metadata_props`` key ``edge_stn``:
it is the authority on labels, input scaling, outputs and the STN's sampling. Beside the model,
``<model>.json`` (the *sidecar*) repeats it with the model file's sha256 and the export's
verification report. The runtime refuses a model without the embedded document, and a model
whose sha256 differs from a sidecar that is present.

Torch-free. The ``onnx`` package is used when installed (workstations); otherwise ONNX Runtime
reads the metadata (gateways install ``onnxruntime`` but not ``onnx``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from edge_stn.errors import MissingExtraError, ModelError, ModelIntegrityError

logger = logging.getLogger(__name__)

METADATA_KEY = "edge_stn"
SCHEMA_VERSION = 1
SIDECAR_SUFFIX = ".json"

_REQUIRED = (
    "schema_version",
    "labels",
    "background_label",
    "input",
    "outputs",
    "stn",
    "window",
    "opset",
    "training",
    "created",
    "producer",
)
_INPUT_REQUIRED = ("name", "channels", "height", "width", "pixel_scale", "mean", "std", "color")
_STN_REQUIRED = ("output_height", "output_width", "align_corners", "padding_mode")


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return Path(model_path).with_suffix(SIDECAR_SUFFIX)


def int8_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model-int8.onnx``: where ``edge-stn quantize`` (and ``edge-stn export
    --int8``) write a model's INT8 build."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}-int8.onnx")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def validate_document(doc: Any, *, path: str | Path | None = None) -> dict[str, Any]:
    """Check the shape of an ``edge_stn`` document; raise :class:`ModelError` naming the problem."""

    def bad(message: str) -> ModelError:
        return ModelError(f"embedded '{METADATA_KEY}' metadata: {message}", path=path)

    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise bad(f"missing fields {missing}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise bad(
            f"schema_version {doc['schema_version']!r} is not supported (expected {SCHEMA_VERSION})"
        )
    labels = doc["labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
        raise bad("'labels' must be a non-empty list of strings")
    bg = doc["background_label"]
    if bg is not None and bg not in labels:
        raise bad(f"background_label {bg!r} is not one of the labels")
    inp = doc["input"]
    if not isinstance(inp, dict) or any(k not in inp for k in _INPUT_REQUIRED):
        raise bad(f"'input' must hold {list(_INPUT_REQUIRED)}")
    for k in ("channels", "height", "width"):
        if not isinstance(inp[k], int) or inp[k] <= 0:
            raise bad(f"input.{k} must be a positive integer, got {inp[k]!r}")
    if not isinstance(inp["std"], (int, float)) or inp["std"] <= 0:
        raise bad(f"input.std must be a positive number, got {inp['std']!r}")
    outputs = doc["outputs"]
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and "name" in o for o in outputs
    ):
        raise bad("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in outputs]
    if "logits" not in names:
        raise bad(f"'outputs' lacks 'logits' (has {names})")
    stn = doc["stn"]
    if stn is not None and (not isinstance(stn, dict) or any(k not in stn for k in _STN_REQUIRED)):
        raise bad(f"'stn' must be null or hold {list(_STN_REQUIRED)}")
    window = doc["window"]
    if window is not None and (not isinstance(window, dict) or "context_margin" not in window):
        raise bad("'window' must be null or an object with 'context_margin'")
    return doc


def _metadata_props(path: Path) -> dict[str, str]:
    try:
        import onnx
    except ImportError:  # a gateway: ONNX Runtime reads it
        return _metadata_props_ort(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not ONNX
        raise ModelError(
            f"not a readable ONNX model (truncated or corrupt?): {_first_line(exc)}", path=path
        ) from None
    return {p.key: p.value for p in model.metadata_props}


def _metadata_props_ort(path: Path) -> dict[str, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingExtraError("onnxruntime", "cpu", "reading an ONNX model") from None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelError(f"ONNX Runtime cannot load it: {_first_line(exc)}", path=path) from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def check_sidecar(path: str | Path, sha256: str | None = None) -> dict[str, Any] | None:
    """Compare the model with its sidecar, when there is one; return the sidecar (or None)."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"sidecar {side.name} is not valid JSON: {_first_line(exc)}", path=path
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sha256"), str):
        raise ModelError(f"sidecar {side.name} has no 'sha256' entry", path=path)
    actual = sha256 or file_sha256(path)
    if doc["sha256"].lower() != actual:
        raise ModelIntegrityError(
            f"sha256 {actual[:12]}... differs from its sidecar {side.name} "
            f"({doc['sha256'][:12]}...): the model was changed or replaced after export; "
            "re-export it or remove the stale sidecar",
            path=path,
        )
    return doc


def read_model_metadata(path: str | Path) -> dict[str, Any]:
    """The embedded ``edge_stn`` document of an exported model, checked.

    Raises :class:`ModelError` when the file is missing or unreadable, has no (valid) embedded
    document, or differs from the sha256 in a sidecar ``<model>.json`` that is present.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError("no such model file", path=path)
    props = _metadata_props(path)
    if METADATA_KEY not in props:
        raise ModelError(
            f"no '{METADATA_KEY}' metadata in the model: not exported by `edge-stn export` "
            f"(keys present: {sorted(props) or 'none'})",
            path=path,
        )
    try:
        doc = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"embedded '{METADATA_KEY}' metadata is not valid JSON: {exc}", path=path
        ) from None
    validate_document(doc, path=path)
    check_sidecar(path)
    logger.debug("model %s: schema %s, %d labels", path, doc["schema_version"], len(doc["labels"]))
    return doc
