"""The records between the daemon's stages check themselves when made (STYLE §1)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from edge_stn.errors import DTypeError, ShapeError
from edge_stn.records import CropRef, Detection, Frame, FrameResult, Window

QUAD = [[10.0, 20.0], [40.0, 20.0], [40.0, 50.0], [10.0, 50.0]]
AFFINE = [[0.5, 0.0, 10.0], [0.0, 0.5, 20.0]]


def detection(**changes: Any) -> Detection:
    kw: dict[str, Any] = {
        "label": "7",
        "class_id": 7,
        "score": 0.9,
        "box": [12, 22, 38, 48],
        "quad": QUAD,
        "affine": AFFINE,
    }
    kw.update(changes)
    return Detection(**kw)


def window(**changes: Any) -> Window:
    kw: dict[str, Any] = {
        "camera_id": "cam0",
        "frame_index": 3,
        "box": [10, 10, 30, 40],
        "x0": 2.5,
        "y0": 5.0,
        "scale": 0.8,
        "image": np.zeros((1, 48, 48), np.uint8),
    }
    kw.update(changes)
    return Window(**kw)


# ---------------------------------------------------------------- Frame


def test_frame() -> None:
    img = np.zeros((480, 640, 3), np.uint8)
    f = Frame("cam0", 0, 1.7e9, img)
    assert (f.height, f.width) == (480, 640)
    assert np.shares_memory(f.image, img)  # no copy of the pixels
    assert not f.image.flags.writeable and img.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.index = 1  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(480, 640), (480, 640, 1), (480, 640, 4), (0, 640, 3)])
def test_frame_shape_message(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError) as info:
        Frame("cam0", 0, 0.0, np.zeros(shape, np.uint8))
    assert str(shape) in str(info.value) and "(H, W, 3) BGR" in str(info.value)
    assert info.value.actual_shape == shape


def test_frame_dtype_and_values() -> None:
    with pytest.raises(DTypeError, match="float32, expected uint8"):
        Frame("cam0", 0, 0.0, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        Frame("cam0", 0, 0.0, [[0, 0, 0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        Frame("cam0", -1, 0.0, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="capture_ts"):
        Frame("cam0", 0, float("nan"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="camera_id"):
        Frame("", 0, 0.0, np.zeros((4, 4, 3), np.uint8))


# ---------------------------------------------------------------- Window


def test_window() -> None:
    w = window(image=np.zeros((3, 32, 32), np.uint8), x0=1)
    assert w.size == 32 and w.x0 == 1.0 and isinstance(w.x0, float)
    assert w.box.dtype == np.float64 and w.box.tolist() == [10, 10, 30, 40]
    assert not w.box.flags.writeable


@pytest.mark.parametrize("shape", [(48, 48), (2, 48, 48), (1, 48, 40)])
def test_window_image_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"\(C, S, S\)"):
        window(image=np.zeros(shape, np.uint8))


def test_window_values() -> None:
    with pytest.raises(ValueError, match="scale"):
        window(scale=0.0)
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        window(box=[1, 2, 3])
    with pytest.raises(ValueError, match="x1 < x0"):
        window(box=[30, 10, 10, 40])


# ---------------------------------------------------------------- Detection


def test_detection_to_dict_is_json() -> None:
    d = detection(
        crop=CropRef("edge-stn/gw/cam/cam0/crop/r1/0", 64, 64), crop_status="sent", track_id=4
    )
    doc = json.loads(json.dumps(d.to_dict()))
    assert doc["box"] == [12.0, 22.0, 38.0, 48.0]
    assert doc["quad"] == QUAD and doc["affine"] == AFFINE
    assert doc["crop"] == {"topic": "edge-stn/gw/cam/cam0/crop/r1/0", "width": 64, "height": 64}
    assert doc["crop_status"] == "sent" and doc["track_id"] == 4
    assert set(doc) == {
        "label",
        "class_id",
        "score",
        "box",
        "quad",
        "affine",
        "track_id",
        "crop",
        "crop_status",
    }


def test_detection_defaults() -> None:
    d = detection(score=np.float32(0.25))
    assert d.track_id is None and d.crop is None and d.crop_status == "off"
    assert isinstance(d.score, float)
    shed = dataclasses.replace(d, crop_status="shed")
    assert shed.crop_status == "shed" and shed.label == d.label


@pytest.mark.parametrize(
    "changes,error,fragment",
    [
        ({"quad": [[0, 0], [1, 0], [1, 1]]}, ShapeError, "(3, 2), expected (4, 2)"),
        ({"affine": np.eye(3)}, ShapeError, "(3, 3), expected (2, 3)"),
        ({"box": [0, 0, np.inf, 4]}, ValueError, "non-finite"),
        ({"score": 1.5}, ValueError, "[0, 1]"),
        ({"class_id": -1}, ValueError, "class_id"),
        ({"label": ""}, ValueError, "label"),
        ({"crop_status": "lost"}, ValueError, "sent, off, shed, policy"),
        ({"crop_status": "sent"}, ValueError, "exactly when 'sent'"),
        ({"crop": CropRef("t", 8, 8)}, ValueError, "exactly when 'sent'"),
        ({"crop": {"topic": "t"}, "crop_status": "sent"}, TypeError, "CropRef"),
    ],
)
def test_detection_errors(changes: dict[str, Any], error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        detection(**changes)
    assert fragment in str(info.value)


def test_crop_ref() -> None:
    with pytest.raises(ValueError, match="width"):
        CropRef("t", 0, 8)


# ---------------------------------------------------------------- FrameResult


def test_frame_result() -> None:
    r = FrameResult("cam0", 5, 100.0, 100.025, 640, 480, [detection(), detection(label="1")])  # type: ignore[arg-type]
    assert isinstance(r.detections, tuple) and len(r.detections) == 2
    assert r.detect_ms == pytest.approx(25.0)
    empty = FrameResult("cam0", 6, 100.0, 100.01, 640, 480)
    assert empty.detections == ()


def test_frame_result_errors() -> None:
    with pytest.raises(TypeError, match=r"detections\[0\] is a dict"):
        FrameResult("cam0", 0, 0.0, 0.0, 640, 480, ({"label": "7"},))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        FrameResult("cam0", 0, 0.0, 0.0, 0, 480)
    with pytest.raises(ValueError, match="infer_ts"):
        FrameResult("cam0", 0, 0.0, None, 640, 480)  # type: ignore[arg-type]


def test_with_crop_and_with_track_check_what_they_change_and_keep_the_rest() -> None:
    d = detection()
    ref = CropRef(topic="t/crop/r/0", width=64, height=64)
    sent = d.with_crop(ref, "sent").with_track(7)
    assert (sent.crop, sent.crop_status, sent.track_id) == (ref, "sent", 7)
    assert (d.crop, d.crop_status, d.track_id) == (None, "off", None)  # the original is untouched
    assert sent.to_dict() == {**d.to_dict(), "crop": ref.to_dict(), "crop_status": "sent",
                              "track_id": 7}  # fmt: skip
    assert sent.box is d.box  # the checked, read-only arrays are shared, not copied
    with pytest.raises(ValueError, match="exactly when 'sent'"):
        d.with_crop(None, "sent")
    with pytest.raises(ValueError, match="exactly when 'sent'"):
        d.with_crop(ref, "shed")
    with pytest.raises(ValueError, match="crop_status must be one of"):
        d.with_crop(None, "lost")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CropRef"):
        d.with_crop({"topic": "x"}, "sent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="track_id"):
        d.with_track(-1)
    assert d.with_track(3).with_track(None).track_id is None
