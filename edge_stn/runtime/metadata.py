"""The model file contract (DESIGN §5), runtime side: read and check the embedded document.

An exported model carries one JSON document under the ONNX ``metadata_props`` key ``edge_stn``:
it is the authority on labels, input scaling, outputs and the STN's sampling. Beside the model,
``<model>.json`` (the *sidecar*) repeats it with the model file's sha256 and the export's
verification report. The runtime refuses a model without the embedded document, and a model
whose sha256 differs from a sidecar that is present.

Torch-free, and free of the ``onnx`` package: the document is read straight from the file's
protobuf encoding (only the top level of the ``ModelProto``; the graph is skipped by its length).
Importing ``onnx`` for this cost the daemon 13 MB of resident memory, and the fallback on
gateways without it, an extra ONNX Runtime session, a second copy of the model's weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from edge_stn.errors import ModelError, ModelIntegrityError

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


_MODEL_METADATA_PROPS = 14
"""``ModelProto.metadata_props``: repeated ``StringStringEntryProto {key = 1, value = 2}``."""
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("the file ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def protobuf_fields(buf: bytes | memoryview) -> list[tuple[int, int, Any]]:
    """The top-level fields of a protobuf message: ``(number, wire type, value)``, where a
    length-delimited value is a memoryview (nothing is copied or decoded). Raises ValueError on
    anything that is not a well-formed message (a truncated file, a group, field number 0)."""
    view = memoryview(buf)
    fields: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(view):
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        value: int | bytes | memoryview
        if wire == _VARINT:
            value, pos = _varint(view, pos)
        elif wire == _LENGTH:
            size, pos = _varint(view, pos)
            if pos + size > len(view):
                raise ValueError(f"field {number} runs {pos + size - len(view)} bytes past the end")
            value, pos = view[pos : pos + size], pos + size
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            if pos + width > len(view):
                raise ValueError(f"field {number} runs past the end")
            value, pos = bytes(view[pos : pos + width]), pos + width
        else:
            raise ValueError(f"wire type {wire} (field {number}) is not used by ONNX")
        fields.append((number, wire, value))
    return fields


def _metadata_props(path: Path) -> dict[str, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read it: {exc.strerror or exc}", path=path) from None
    try:
        props: dict[str, str] = {}
        for number, wire, value in protobuf_fields(data):
            if number != _MODEL_METADATA_PROPS:
                continue
            if wire != _LENGTH:
                raise ValueError("metadata_props is not a message")
            entry = {n: v for n, w, v in protobuf_fields(value) if w == _LENGTH}
            key = bytes(entry.get(1, b"")).decode("utf-8")
            props[key] = bytes(entry.get(2, b"")).decode("utf-8")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"not a readable ONNX model (truncated or corrupt?): {_first_line(exc)}", path=path
        ) from None
    return props


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
