"""The JSON payloads of the MQTT contract (DESIGN §6): status, result, stats.

Each builder returns a plain dict in the documented field order; :func:`encode` turns it into
compact UTF-8 JSON. The same input always gives the same bytes: fields in a fixed order,
numbers rounded to a stated precision (times to the microsecond, pixels to 1/100 or finer),
no NaN or infinity (a :class:`~edge_stn.errors.PayloadError` names the field instead).

Precision: Unix times 6 decimals; scores 5; box and quad corners 2 (1/100 pixel); affine 6;
latencies (ms) 3; fps 2. The JSON Schemas in ``schemas/`` (draft 2020-12, shipped in the
package) describe every payload: :func:`load_schema`. Torch-free, no I/O besides reading the
schemas.
"""

from __future__ import annotations

import json
import math
import numbers
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from edge_stn.errors import PayloadError
from edge_stn.records import ChosenCrop, CropRef, Detection, FrameResult

SCHEMA_VERSION = 1
"""Version of the status and stats documents; bumped when a field changes meaning or
disappears (consumers should ignore fields they do not know)."""
RESULT_SCHEMA_VERSION = 2
"""Version of the result document. 2: ``track_id`` is filled (tracking), and ``crop_status``
``policy`` also means that a crop policy (``best_per_track``) sends the track's crop later,
announced on ``cam/<camera>/track``. Version 1 had ``track_id`` always null."""
TRACK_SCHEMA_VERSION = 1
"""Version of the track announcement (new with result version 2)."""

PayloadKind = Literal["status", "result", "stats", "track", "reply"]
PAYLOAD_KINDS: tuple[PayloadKind, ...] = ("status", "result", "stats", "track", "reply")

OfflineReason = Literal["stop", "lost"]

TS_DIGITS = 6
SCORE_DIGITS = 5
PIXEL_DIGITS = 2
AFFINE_DIGITS = 6
MS_DIGITS = 3


def new_epoch() -> str:
    """A random epoch: 16 hex digits (64 bits), chosen once per outbox (for now per process)."""
    return secrets.token_hex(8)


def new_result_id() -> str:
    """A unique result id: 32 hex digits (uuid4), safe as a topic level."""
    return uuid.uuid4().hex


def _num(name: str, value: Any, digits: int) -> float:
    if isinstance(value, bool):
        raise PayloadError(f"{name} must be a number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PayloadError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise PayloadError(f"{name} must be finite, got {f}")
    r = round(f, digits)
    return 0.0 if r == 0 else r  # no "-0.0"


def _nums(name: str, values: Iterable[Any], digits: int) -> list[Any]:
    out: list[Any] = []
    for i, v in enumerate(values):
        try:
            out.append(
                _nums(name, v, digits) if isinstance(v, (list, tuple)) else _num(name, v, digits)
            )
            continue
        except PayloadError:
            pass
        # the element is named only when it is wrong (this raises): naming each one cost more
        # than rounding it, and a result has some 20 numbers per detection
        sub = f"{name}[{i}]"
        out.append(_nums(sub, v, digits) if isinstance(v, (list, tuple)) else _num(sub, v, digits))
    return out


def encode(doc: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: no spaces, fields in the builder's order, NaN refused."""
    try:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"cannot encode payload as JSON: {exc}") from None
    return text.encode("utf-8")


@dataclass(frozen=True)
class ModelInfo:
    """The model a gateway runs: its name and the sha256 of its file."""

    name: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass(frozen=True)
class DeviceInfo:
    """What the ``online`` status document says about the running daemon."""

    device: str
    version: str
    model: ModelInfo
    config_hash: str
    epoch: str
    started_at: float
    cameras: tuple[str, ...] = ()


# ---------------------------------------------------------------- status


def status_online(info: DeviceInfo, ts: float) -> dict[str, Any]:
    """The retained ``online`` document, published on every successful connect."""
    return {
        "schema_version": SCHEMA_VERSION,
        "state": "online",
        "device": info.device,
        "ts": _num("ts", ts, TS_DIGITS),
        "version": info.version,
        "model": info.model.to_dict(),
        "config_hash": info.config_hash,
        "epoch": info.epoch,
        "started_at": _num("started_at", info.started_at, TS_DIGITS),
        "cameras": list(info.cameras),
    }


def status_offline(info: DeviceInfo, reason: OfflineReason, ts: float | None) -> dict[str, Any]:
    """The retained ``offline`` document: ``reason`` ``stop`` (clean stop, ``ts`` the time of
    stopping) or ``lost`` (the Last Will, sent by the broker later: ``ts`` null)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "state": "offline",
        "device": info.device,
        "ts": None if ts is None else _num("ts", ts, TS_DIGITS),
        "reason": reason,
        "epoch": info.epoch,
        "started_at": _num("started_at", info.started_at, TS_DIGITS),
    }


# ---------------------------------------------------------------- result


def detection_document(d: Detection, where: str = "detection") -> dict[str, Any]:
    """One entry of ``detections`` (DESIGN §6), rounded."""
    return {
        "label": d.label,
        "class_id": d.class_id,
        "score": _num(f"{where}.score", d.score, SCORE_DIGITS),
        "box": _nums(f"{where}.box", d.box.tolist(), PIXEL_DIGITS),
        "quad": _nums(f"{where}.quad", d.quad.tolist(), PIXEL_DIGITS),
        "affine": _nums(f"{where}.affine", d.affine.tolist(), AFFINE_DIGITS),
        "track_id": d.track_id,
        "crop": d.crop.to_dict() if d.crop is not None else None,
        "crop_status": d.crop_status,
    }


def result_document(
    result: FrameResult,
    *,
    result_id: str,
    device: str,
    epoch: str,
    seq: int,
    publish_ts: float,
    model: ModelInfo,
    detections: Sequence[Detection] | None = None,
) -> dict[str, Any]:
    """The result of one processed frame. ``detections`` replaces ``result.detections`` when
    the publisher has filled in their crops."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise PayloadError(f"seq must be an integer >= 0, got {seq!r}")
    dets = result.detections if detections is None else tuple(detections)
    if len(dets) != len(result.detections):
        raise PayloadError(
            f"{len(dets)} detections given for a result with {len(result.detections)}"
        )
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "id": result_id,
        "device": device,
        "camera": result.camera_id,
        "epoch": epoch,
        "seq": seq,
        "frame_index": result.frame_index,
        "capture_ts": _num("capture_ts", result.capture_ts, TS_DIGITS),
        "infer_ts": _num("infer_ts", result.infer_ts, TS_DIGITS),
        "publish_ts": _num("publish_ts", publish_ts, TS_DIGITS),
        "width": result.width,
        "height": result.height,
        "model": model.to_dict(),
        "detections": [detection_document(d, f"detections[{i}]") for i, d in enumerate(dets)],
    }


# ---------------------------------------------------------------- track


def track_document(
    chosen: ChosenCrop,
    *,
    device: str,
    epoch: str,
    ts: float,
    crop: CropRef | None,
    crop_status: str,
) -> dict[str, Any]:
    """The announcement of a track's chosen crop (crops.policy ``best_per_track``):
    ``result_id`` and ``n`` name the result and detection the crop belongs to."""
    return {
        "schema_version": TRACK_SCHEMA_VERSION,
        "device": device,
        "camera": chosen.camera_id,
        "epoch": epoch,
        "track_id": chosen.track_id,
        "ts": _num("ts", ts, TS_DIGITS),
        "reason": chosen.reason,
        "result_id": chosen.result_id,
        "n": chosen.index,
        "frame_index": chosen.frame_index,
        "label": chosen.label,
        "score": _num("score", chosen.score, SCORE_DIGITS),
        "box": _nums("box", chosen.box.tolist(), PIXEL_DIGITS),
        "crop": crop.to_dict() if crop is not None else None,
        "crop_status": crop_status,
        "first_frame_index": chosen.first_frame,
        "last_frame_index": chosen.last_frame,
        "first_ts": _num("first_ts", chosen.first_ts, TS_DIGITS),
        "last_ts": _num("last_ts", chosen.last_ts, TS_DIGITS),
        "hits": chosen.hits,
        "labels": {k: int(v) for k, v in sorted(chosen.labels.items())},
    }


# ---------------------------------------------------------------- stats


def percentile_summary(samples: Sequence[float]) -> dict[str, Any]:
    """``{count, p50, p90, p99, max}`` of latency samples in ms (nearest-rank percentiles);
    null percentiles when there are no samples."""
    xs = sorted(_num("latency sample", s, 9) for s in samples)
    n = len(xs)

    def rank(p: float) -> float | None:
        if n == 0:
            return None
        return round(xs[min(n - 1, max(0, math.ceil(p * n) - 1))], MS_DIGITS)

    return {
        "count": n,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(xs[-1], MS_DIGITS) if n else None,
    }


def _flat_numbers(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A caller's counter dict, keys sorted, values numbers (rounded), booleans or null."""
    out: dict[str, Any] = {}
    for key in sorted(values):
        v = values[key]
        if v is None or isinstance(v, bool):
            out[key] = v
        elif isinstance(v, numbers.Integral):  # numpy integers too
            out[key] = int(v)
        else:
            out[key] = _num(f"{name}.{key}", v, MS_DIGITS)
    return out


def stats_document(
    *,
    device: str,
    epoch: str,
    ts: float,
    started_at: float,
    interval_s: float,
    cameras: Mapping[str, Mapping[str, Any]],
    latency_ms: Mapping[str, Sequence[float]],
    mqtt: Mapping[str, Any],
    drops: Mapping[str, int] | None = None,
    process: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    tracking: Mapping[str, Any] | None = None,
    hard_examples: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The periodic health document.

    ``cameras``: per camera id a flat dict of counters that includes at least ``fps`` and
    ``drops`` (frames read but never processed); ``latency_ms``: samples in ms of the
    interval, by name (``detect_ms``, ``publish_ms``), summarized by
    :func:`percentile_summary`; ``mqtt``: the publisher's counters
    (:meth:`edge_stn.publish.client.PublisherCounters.to_dict`); ``drops``: drops of the
    daemon's stages by name; ``process``: ``cpu_percent``, ``rss_bytes``, ... of this process
    (:class:`edge_stn.publish.stats.ProcessMeter`); ``health``: ``healthy``, the names of
    the ``failing`` checks and the ``warnings`` (disk, clock) of :mod:`edge_stn.ops.health`,
    left out when None.
    """
    cams: dict[str, Any] = {}
    for cam_id in sorted(cameras):
        counters = cameras[cam_id]
        missing = [k for k in ("fps", "drops") if k not in counters]
        if missing:
            raise PayloadError(f"stats for camera {cam_id!r} lack {', '.join(missing)}")
        cams[cam_id] = _flat_numbers(f"cameras.{cam_id}", counters)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "device": device,
        "epoch": epoch,
        "ts": _num("ts", ts, TS_DIGITS),
        "started_at": _num("started_at", started_at, TS_DIGITS),
        "uptime_s": _num("uptime_s", max(0.0, ts - started_at), MS_DIGITS),
        "interval_s": _num("interval_s", interval_s, MS_DIGITS),
        "cameras": cams,
        "latency_ms": {name: percentile_summary(latency_ms[name]) for name in sorted(latency_ms)},
        "drops": _flat_numbers("drops", drops or {}),
        "mqtt": dict(mqtt),
        "process": _flat_numbers("process", process or {}),
    }
    if tracking is not None:
        doc["tracking"] = _flat_numbers("tracking", tracking)
    if hard_examples is not None:
        doc["hard_examples"] = _flat_numbers("hard_examples", hard_examples)
    if health is not None:
        doc["health"] = {
            "healthy": bool(health["healthy"]),
            "failing": sorted(str(n) for n in health.get("failing", ())),
            "warnings": [str(w) for w in health.get("warnings", ())],
        }
    return doc


# ---------------------------------------------------------------- schemas


@cache
def _schema_text(kind: str) -> str:
    return (resources.files("edge_stn.publish") / "schemas" / f"{kind}.json").read_text("utf-8")


def load_schema(kind: PayloadKind) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a payload kind, as shipped in the package."""
    if kind not in PAYLOAD_KINDS:
        raise ValueError(f"unknown payload kind {kind!r}: one of {', '.join(PAYLOAD_KINDS)}")
    doc: dict[str, Any] = json.loads(_schema_text(kind))
    return doc
