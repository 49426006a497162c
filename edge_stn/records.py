"""The typed records passed between the daemon's stages (DESIGN §7), checked when made.

``Frame`` (reader -> detector) -> ``Window`` (the detector's model inputs) -> ``Detection`` ->
``FrameResult`` (detector -> publisher). Each is a small frozen dataclass that validates itself
in ``__post_init__``, so a wrong shape fails where it is made, with the expected and the actual
shape in the message, not three stages later. Arrays are kept as read-only views (no copy of
frame pixels); small geometric arrays are converted to float64.

Coordinates: frame pixels, edge coordinates for boxes (pixel ``i`` spans ``[i, i+1)``), pixel
centres for quads and affines (:mod:`edge_stn.geometry`). NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_stn.errors import DTypeError, ShapeError

CropStatus = Literal["sent", "off", "shed", "policy"]
CROP_STATUSES: tuple[CropStatus, ...] = ("sent", "off", "shed", "policy")
"""``sent``: the crop was published; ``off``: crops are disabled; ``shed``: dropped under load;
``policy``: a crop policy chose not to send it (another frame, or over the size limit)."""

FloatArray = npt.NDArray[np.float64]
ImageArray = npt.NDArray[np.uint8]


def _readonly(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    view = a.view()
    view.flags.writeable = False
    return view


def _image(name: str, value: Any, expected: str, ndim: int) -> ImageArray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != ndim or 0 in value.shape:
        raise ShapeError(name, value.shape, expected)
    if value.dtype != np.uint8:
        raise DTypeError(name, value.dtype, "uint8")
    return _readonly(value)


def _floats(name: str, value: Any, shape: tuple[int, ...], expected: str) -> FloatArray:
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numeric, expected {expected}") from None
    if a.shape != shape:
        raise ShapeError(name, a.shape, expected)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values: {a.tolist()}")
    return _readonly(a)


def _box(name: str, value: Any) -> FloatArray:
    b = _floats(name, value, (4,), "(4,) [x0, y0, x1, y1]")
    if b[2] < b[0] or b[3] < b[1]:
        raise ValueError(f"{name} {b.tolist()} has x1 < x0 or y1 < y0")
    return b


def _camera(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"camera_id must be a non-empty string, got {value!r}")
    return value


def _index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of Unix seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame read from a camera: ``image`` is ``(H, W, 3)`` uint8 BGR (OpenCV's order).

    ``index`` is the frame's 0-based index in its source (DESIGN §6 ``frame_index``);
    ``capture_ts`` the Unix time it was read.
    """

    camera_id: str
    index: int
    capture_ts: float
    image: ImageArray

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_id", _camera(self.camera_id))
        object.__setattr__(self, "index", _index("index", self.index))
        object.__setattr__(self, "capture_ts", _time("capture_ts", self.capture_ts))
        img = _image("image", self.image, "(H, W, 3) BGR", 3)
        if img.shape[2] != 3:
            raise ShapeError("image", img.shape, "(H, W, 3) BGR")
        object.__setattr__(self, "image", img)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True, eq=False)
class Window:
    """One model input cut from a frame by the window extractor (DESIGN §4).

    ``box`` is the proposal [x0, y0, x1, y1] (frame pixels, edge coordinates); ``x0``, ``y0``,
    ``scale`` place the window (:class:`edge_stn.windows.WindowPlacement`: window pixel ``u`` is
    frame pixel ``x0 + (u + 0.5) * scale - 0.5``); ``image`` is ``(C, S, S)`` uint8, the model's
    channels first, ready to stack into a batch.
    """

    camera_id: str
    frame_index: int
    box: FloatArray
    x0: float
    y0: float
    scale: float
    image: ImageArray

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_id", _camera(self.camera_id))
        object.__setattr__(self, "frame_index", _index("frame_index", self.frame_index))
        object.__setattr__(self, "box", _box("box", self.box))
        for name in ("x0", "y0", "scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0 (frame pixels per window pixel), got {self.scale}")
        expected = "(C, S, S) with C in {1, 3}"
        img = _image("image", self.image, expected, 3)
        if img.shape[0] not in (1, 3) or img.shape[1] != img.shape[2]:
            raise ShapeError("image", img.shape, expected)
        object.__setattr__(self, "image", img)

    @property
    def size(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class CropRef:
    """Where a detection's canonical crop was published: its topic and pixel size."""

    topic: str
    width: int
    height: int

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic:
            raise ValueError(f"crop topic must be a non-empty string, got {self.topic!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"crop {name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "width": self.width, "height": self.height}


@dataclass(frozen=True, eq=False)
class Detection:
    """One classified object (DESIGN §6 ``detections[]``).

    ``box``: tight box [x0, y0, x1, y1] in frame pixels; ``quad``: ``(4, 2)``, the canonical
    crop's corners in frame pixels (top-left, top-right, bottom-right, bottom-left); ``affine``:
    ``(2, 3)`` crop pixel -> frame pixel for the published crop size (``frame_from_crop``).
    ``crop`` is set exactly when ``crop_status`` is ``sent``.
    """

    label: str
    class_id: int
    score: float
    box: FloatArray
    quad: FloatArray
    affine: FloatArray
    track_id: int | None = None
    crop: CropRef | None = None
    crop_status: CropStatus = "off"

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"label must be a non-empty string, got {self.label!r}")
        object.__setattr__(self, "class_id", _index("class_id", self.class_id))
        score = self.score
        if isinstance(score, bool) or not isinstance(score, (int, float, np.floating)):
            raise ValueError(f"score must be a number in [0, 1], got {score!r}")
        if not 0.0 <= float(score) <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {score!r}")
        object.__setattr__(self, "score", float(score))
        object.__setattr__(self, "box", _box("box", self.box))
        object.__setattr__(
            self, "quad", _floats("quad", self.quad, (4, 2), "(4, 2) TL, TR, BR, BL corners")
        )
        object.__setattr__(
            self, "affine", _floats("affine", self.affine, (2, 3), "(2, 3) crop -> frame")
        )
        if self.track_id is not None:
            object.__setattr__(self, "track_id", _index("track_id", self.track_id))
        if self.crop_status not in CROP_STATUSES:
            raise ValueError(
                f"crop_status must be one of {', '.join(CROP_STATUSES)}, got {self.crop_status!r}"
            )
        if self.crop is not None and not isinstance(self.crop, CropRef):
            raise TypeError(f"crop must be a CropRef or None, got {type(self.crop).__name__}")
        if (self.crop is not None) != (self.crop_status == "sent"):
            raise ValueError(
                f"crop_status {self.crop_status!r} with crop "
                f"{'set' if self.crop is not None else 'None'}: a crop is set exactly when 'sent'"
            )

    def with_track(self, track_id: int | None) -> Detection:
        """This detection with its track id (the tracker's, once a frame per detection): only
        the id is checked, as in :meth:`with_crop`."""
        out = object.__new__(Detection)
        tid = None if track_id is None else _index("track_id", track_id)
        out.__dict__.update(self.__dict__, track_id=tid)
        return out

    def with_crop(self, crop: CropRef | None, crop_status: CropStatus) -> Detection:
        """This detection with its crop's fate set: what the publisher does five times a frame,
        so only the two new fields are checked (the rest were checked when it was made)."""
        if crop_status not in CROP_STATUSES:
            raise ValueError(
                f"crop_status must be one of {', '.join(CROP_STATUSES)}, got {crop_status!r}"
            )
        if (crop is not None) != (crop_status == "sent"):
            raise ValueError(f"crop_status {crop_status!r}: a crop is set exactly when 'sent'")
        if crop is not None and not isinstance(crop, CropRef):
            raise TypeError(f"crop must be a CropRef or None, got {type(crop).__name__}")
        out = object.__new__(Detection)
        out.__dict__.update(self.__dict__, crop=crop, crop_status=crop_status)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The detection as in the result payload (DESIGN §6), JSON-ready."""
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": self.score,
            "box": self.box.tolist(),
            "quad": self.quad.tolist(),
            "affine": self.affine.tolist(),
            "track_id": self.track_id,
            "crop": self.crop.to_dict() if self.crop is not None else None,
            "crop_status": self.crop_status,
        }


@dataclass(frozen=True, eq=False)
class FrameResult:
    """Everything the detector found in one frame; the publisher adds id, epoch, seq and
    ``publish_ts``. ``detections`` may be empty: every processed frame yields a result."""

    camera_id: str
    frame_index: int
    capture_ts: float
    infer_ts: float
    width: int
    height: int
    detections: tuple[Detection, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_id", _camera(self.camera_id))
        object.__setattr__(self, "frame_index", _index("frame_index", self.frame_index))
        object.__setattr__(self, "capture_ts", _time("capture_ts", self.capture_ts))
        object.__setattr__(self, "infer_ts", _time("infer_ts", self.infer_ts))
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        dets = tuple(self.detections)
        for i, d in enumerate(dets):
            if not isinstance(d, Detection):
                raise TypeError(f"detections[{i}] is a {type(d).__name__}, expected Detection")
        object.__setattr__(self, "detections", dets)

    @property
    def detect_ms(self) -> float:
        """``infer_ts - capture_ts`` in milliseconds (DESIGN §7)."""
        return (self.infer_ts - self.capture_ts) * 1000.0


TrackEnd = Literal["ended", "held", "evicted", "stopped"]
TRACK_ENDS: tuple[TrackEnd, ...] = ("ended", "held", "evicted", "stopped")
"""Why a track's crop went out: the track ``ended`` (no detection for ``tracking.max_age``),
it was ``held`` for ``crops.hold_s`` and goes on, ``evicted`` to respect
``crops.max_open_tracks``, or the camera or daemon ``stopped``."""


@dataclass(frozen=True, eq=False)
class ChosenCrop:
    """The crop a crop policy chose for a track, with what the announcement says about the
    track (DESIGN §6, issue 7.6). ``result_id``/``index``: the result and detection the crop
    belongs to (its crop topic); ``jpeg`` None: the crop was over the size limit."""

    camera_id: str
    track_id: int
    result_id: str
    index: int
    frame_index: int
    label: str
    score: float
    box: FloatArray
    jpeg: bytes | None
    width: int
    height: int
    first_frame: int
    last_frame: int
    first_ts: float
    last_ts: float
    hits: int
    labels: dict[str, int]
    reason: TrackEnd

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_id", _camera(self.camera_id))
        for name in ("track_id", "index", "frame_index", "first_frame", "last_frame", "hits"):
            object.__setattr__(self, name, _index(name, getattr(self, name)))
        for name in ("first_ts", "last_ts"):
            object.__setattr__(self, name, _time(name, getattr(self, name)))
        object.__setattr__(self, "box", _box("box", self.box))
        if self.last_frame < self.first_frame:
            raise ValueError(f"last_frame {self.last_frame} < first_frame {self.first_frame}")
        if self.reason not in TRACK_ENDS:
            raise ValueError(f"reason must be one of {', '.join(TRACK_ENDS)}: {self.reason!r}")
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score!r}")
