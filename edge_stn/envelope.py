"""The operating envelope of a detection model under the default daemon config: recall,
precision, label accuracy and residual rotation on synthetic scenes where one knob at a time
leaves the defaults (digit height, rotation, contrast, noise, blur). Torch-free.

    python -m edge_stn.envelope [--model M.onnx] [--scenes 40] [--out docs/envelope.md]

Frames go through the daemon's own detector (proposals, windows, ONNX Runtime on the CPU,
background rejection, NMS) with the default config, not through MQTT: the end-to-end path is
tested in tests/test_targets.py. Each row scores ``--scenes`` scenes x 3 frames (one per
segment of new digits).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from edge_stn.accuracy import Accuracy, RotationError, score_with_pose
from edge_stn.config import ModelConfig
from edge_stn.detect.detector import Detector
from edge_stn.records import Frame
from edge_stn.runtime.engine import Engine
from edge_stn.video.synthetic import MotionSettings, MovingDigits

logger = logging.getLogger(__name__)

SEED0 = 880_000  # scene seeds of the envelope: no test or training run uses them

DEFAULT = MotionSettings()
ROWS: list[tuple[str, str, MotionSettings]] = [
    ("defaults", "all knobs at their defaults (the targets' scene)", DEFAULT),
    ("height", "20-30 px", replace(DEFAULT, height=(20.0, 30.0))),
    ("height", "30-40 px", replace(DEFAULT, height=(30.0, 40.0))),
    ("height", "40-60 px", replace(DEFAULT, height=(40.0, 60.0))),
    ("height", "100-120 px", replace(DEFAULT, height=(100.0, 120.0))),
    ("height", "140-200 px", replace(DEFAULT, height=(140.0, 200.0))),
    ("rotation", "0 deg", replace(DEFAULT, angle=0.0)),
    ("rotation", "+/-60 deg", replace(DEFAULT, angle=60.0)),
    ("rotation", "+/-90 deg", replace(DEFAULT, angle=90.0)),
    ("rotation", "+/-180 deg", replace(DEFAULT, angle=180.0)),
    ("contrast", "20-30 levels", replace(DEFAULT, contrast=(20.0, 30.0))),
    ("contrast", "30-50 levels", replace(DEFAULT, contrast=(30.0, 50.0))),
    ("contrast", "50-80 levels", replace(DEFAULT, contrast=(50.0, 80.0))),
    ("contrast", "180-220 levels", replace(DEFAULT, contrast=(180.0, 220.0))),
    ("noise", "sigma 10-15", replace(DEFAULT, noise=(10.0, 15.0))),
    ("noise", "sigma 15-25", replace(DEFAULT, noise=(15.0, 25.0))),
    ("blur", "sigma 2-3 px", replace(DEFAULT, blur=(2.0, 3.0))),
    ("clutter", "none", replace(DEFAULT, clutter=0)),
    ("clutter", "20 strokes", replace(DEFAULT, clutter=20)),
]


@dataclass(frozen=True)
class Row:
    knob: str
    setting: str
    accuracy: Accuracy
    rotation: RotationError


def measure(detector: Detector, settings: MotionSettings, scenes: int, seed0: int) -> Row:
    frames = []
    for k in range(scenes):
        # phase 0: frame 5 of segments 0-2 (a scene's phase only matters between cameras)
        gen = MovingDigits(seed=seed0 + k, settings=settings, phase_frames=0)
        for seg in range(3):
            index = seg * gen.segment_frames + 5
            image, objects = gen.frame_bgr(index)
            (res,) = detector.detect([Frame("env", index, 0.0, image)])
            dets = [(d.label, [float(v) for v in d.box], d.affine) for d in res.detections]
            truth = [(str(o.label), list(o.box), o.angle) for o in objects]
            frames.append((dets, truth))
    acc, rot = score_with_pose(frames)
    return Row("", "", acc, rot)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def markdown(rows: list[Row], model: str, scenes: int) -> str:
    out = [
        f"Model `{model}`, default daemon config, {scenes} scenes x 3 frames per row "
        f"(`python -m edge_stn.envelope --scenes {scenes}`).",
        "",
        "| knob | setting | objects | recall | precision | label accuracy | rotation residual "
        "(median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r.accuracy
        rot = "n/a" if r.rotation.n == 0 else f"{r.rotation.median:.1f} deg"
        out.append(
            f"| {r.knob} | {r.setting} | {a.truth} | {_pct(a.recall)} | {_pct(a.precision)} | "
            f"{_pct(a.label_accuracy)} | {rot} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_stn.envelope", description=__doc__)
    ap.add_argument("--model", help="ONNX model (default: the bundled demo model)")
    ap.add_argument("--scenes", type=int, default=40, help="scenes per row (default 40)")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    engine = Engine(ModelConfig(path=Path(args.model) if args.model else None, providers=["cpu"]))
    detector = Detector(engine)
    rows = []
    for knob, setting, settings in ROWS:
        row = measure(detector, settings, args.scenes, SEED0)
        rows.append(Row(knob, setting, row.accuracy, row.rotation))
        print(f"{knob:9s} {setting:48s} {row.accuracy.line()}; {row.rotation.line()}", flush=True)
    text = markdown(rows, args.model or "edge_stn/assets/demo-stcnn.onnx", args.scenes)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
