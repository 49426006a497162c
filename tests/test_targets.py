"""Issue 4's targets, end to end through a real broker: `edge-stn synth-video` scenes with their
default knobs (640x480, 1-4 digits 40-120 px tall, +/-45 degrees, shear, contrast 50-220, blur,
noise, clutter; H.264 where Debian's ffmpeg is installed), the daemon with the default config and
the bundled demo model, and a subscriber that scores what arrived against the ground truth:
recall and precision >= 0.90 at IoU >= 0.5, label accuracy >= 0.95 on matched objects, and median
residual rotation of the canonical crops <= 10 degrees (after removing the model's mean
canonical angle). The scenes use the shipped test-split digits and seeds no training run uses
(training windows come from the training split, drawn by the trainer's own generator)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until
from synth_scenes import write_scenes

from edge_stn.accuracy import (
    crop_rotation,
    match_pairs,
    rotation_error,
    score,
    score_with_pose,
)

pytest.importorskip("onnxruntime")

SEEDS = (7101, 7102, 7103)
FRAMES = 300  # 20 s at 15 fps: three segments of new digits per video
MIN_RECALL = MIN_PRECISION = 0.90
MIN_LABEL_ACCURACY = 0.95
MAX_MEDIAN_ROTATION = 10.0


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, Any]]]:
    return write_scenes(tmp_path_factory.mktemp("targets"), SEEDS, FRAMES)


def test_unit_rotation_error_removes_the_mean_angle() -> None:
    # A crop rotated by a about the frame's y-down axes: x axis (cos a, -sin a).
    a = math.radians(30.0)
    assert crop_rotation([[math.cos(a), math.sin(a), 5], [-math.sin(a), math.cos(a), 7]]) == (
        pytest.approx(30.0)
    )
    err = rotation_error([40, 50, 60, 200], [30, 30, 30, 190])  # offsets 10, 20, 30, 10
    assert err.n == 4 and err.offset == pytest.approx(17.4, abs=0.2)
    assert err.median == pytest.approx(7.4, abs=0.3)
    wrapped = rotation_error([179.0, -179.0], [0.0, 0.0])  # 179 and 181 degrees: 1 apart
    assert wrapped.median == pytest.approx(1.0, abs=1e-6)
    assert match_pairs([[0, 0, 10, 10], [50, 50, 60, 60]], [[51, 50, 61, 60]]) == [(1, 0)]
    up = [[1, 0, 0], [0, 1, 0]]
    frames = [
        ([("3", [0, 0, 10, 10], up), ("7", [50, 50, 60, 60], up)], [("7", [51, 50, 61, 60], 4.0)]),
        ([("1", [0, 0, 10, 10], up)], [("2", [0, 0, 10, 10], -6.0), ("5", [80, 80, 90, 90], 0.0)]),
    ]
    acc, rot = score_with_pose(frames)
    assert acc == score(
        [([(lb, b) for lb, b, _ in d], [(lb, b) for lb, b, _ in t]) for d, t in frames]
    )
    assert (acc.matched, acc.correct, rot.n) == (2, 1, 2) and rot.median == pytest.approx(5.0)


def test_targets_on_default_synth_video_through_a_real_broker(
    mosquitto: Mosquitto,
    tmp_path: Path,
    scenes: list[tuple[Path, dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's default model: on a CPU-only machine the demo model's INT8 build."""
    from edge_stn.config import load_config
    from edge_stn.daemon import Daemon

    cameras = [{"id": f"cam{i}", "source": str(p)} for i, (p, _) in enumerate(scenes)]
    doc = {
        "device_id": "gw-targets",
        "cameras": cameras,
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
    }
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text(json.dumps(doc))
    sub = Subscriber(mosquitto, ["edge-stn/gw-targets/cam/+/result"])
    expected = FRAMES * len(scenes)
    try:
        config = load_config(cfg)
        with caplog.at_level(logging.INFO, logger="edge_stn.daemon"):
            daemon = Daemon(config, config_path=cfg)
        assert f"model: bundled demo ({config.model.bundled_build})" in caplog.text
        print(f"\nmodel {daemon.engine.path.name} ({config.model.bundled_build})")
        assert daemon.run(install_signals=False) == 0
        wait_until(lambda: len(sub.on(lambda m: True)) >= expected, 30)
        results = [json.loads(m.payload) for m in sub.on(lambda m: True)]
    finally:
        sub.close()
    assert len(results) == expected, f"{len(results)} of {expected} results arrived"

    truth = {
        f"cam{i}": {f["frame_index"]: f["objects"] for f in t["frames"]}
        for i, (_, t) in enumerate(scenes)
    }
    acc, rot = score_with_pose(
        (
            [(d["label"], d["box"], d["affine"]) for d in r["detections"]],
            [(o["label"], o["box"], o["angle"]) for o in truth[r["camera"]][r["frame_index"]]],
        )
        for r in results
    )
    heights = [o["scale"] * 20 for t in truth.values() for f in t.values() for o in f]
    print(f"\ntargets over {len(results)} frames: {acc.line()}; {rot.line()}")
    print(f"digit heights {min(heights):.0f}-{max(heights):.0f} px")
    assert acc.recall is not None and acc.recall >= MIN_RECALL, acc.line()
    assert acc.precision is not None and acc.precision >= MIN_PRECISION, acc.line()
    assert acc.label_accuracy is not None and acc.label_accuracy >= MIN_LABEL_ACCURACY, acc.line()
    assert rot.median <= MAX_MEDIAN_ROTATION, rot.line()
    assert np.isfinite(rot.offset)
