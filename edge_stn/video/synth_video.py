"""``edge-stn synth-video``: a test video of moving digits and its ground truth as JSON.

The frames are those of the synthetic camera (:class:`~edge_stn.video.synthetic.MovingDigits`,
test-split digits only), written with OpenCV's ``mp4v`` encoder (pip's OpenCV cannot write
H.264). The truth file lists, per frame (``frame_index`` 0-based, as a file source numbers
them), every object's label, tight ink box ``[x0, y0, x1, y1]`` (frame pixels, edge
coordinates), centre, rotation (degrees, counter-clockwise) and scale. Both files are written
under temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from edge_stn import __version__
from edge_stn.errors import EdgeStnError
from edge_stn.video.synthetic import MotionSettings, MovingDigits, truth_dict

TRUTH_SCHEMA = "edge-stn/synthetic-truth"
TRUTH_VERSION = 1


@dataclass(frozen=True)
class SynthVideo:
    video: Path
    truth: Path
    frames: int
    objects: int


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_synthetic_video(
    out: str | Path,
    truth: str | Path,
    *,
    frames: int = 300,
    width: int = 640,
    height: int = 480,
    fps: float = 15.0,
    seed: int = 0,
    count: int = 3,
) -> SynthVideo:
    out, truth = Path(out), Path(truth)
    if frames < 1:
        raise EdgeStnError(f"frames must be >= 1, got {frames}")
    try:
        gen = MovingDigits(width, height, fps, seed, MotionSettings(count=count))
    except ValueError as exc:
        raise EdgeStnError(str(exc)) from None
    for p in (out, truth):
        if not p.parent.is_dir():
            raise EdgeStnError("no such folder", path=p.parent)
    tmp_video, tmp_truth = _temp(out), _temp(truth)
    writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise EdgeStnError(
            "OpenCV cannot write this video (use an .mp4 or .avi name in a writable folder)",
            path=out,
        )
    per_frame: list[dict[str, Any]] = []
    try:
        for i in range(frames):
            image, objects = gen.frame_bgr(i)
            writer.write(image)
            per_frame.append({"frame_index": i, "objects": [truth_dict(o) for o in objects]})
    except BaseException:
        writer.release()
        tmp_video.unlink(missing_ok=True)
        raise
    writer.release()
    doc = {
        "schema": TRUTH_SCHEMA,
        "version": TRUTH_VERSION,
        "producer": f"edge-stn {__version__}",
        "video": out.name,
        "codec": "mp4v",
        "width": width,
        "height": height,
        "fps": fps,
        "frame_count": frames,
        "digits": "MNIST test split (edge_stn/assets/digits.npz)",
        "box": "tight box of the digit's ink, [x0, y0, x1, y1] in frame pixels, edge coordinates",
        "angle": "degrees, counter-clockwise, of the digit drawn upright",
        "generator": gen.describe(),
        "frames": per_frame,
    }
    tmp_truth.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp_video, out)
    os.replace(tmp_truth, truth)
    return SynthVideo(out, truth, frames, sum(len(f["objects"]) for f in per_frame))
