"""Issue 7.7: hard-example capture, from operation back to training.

A daemon run on an `edge-stn synth-video` scene with ``score_below: 1.0`` (every detection is a
hard example): the folder is the image-folder layout `edge-stn train` reads (loaded with the
project's own folder dataset), each PNG is exactly the window the extractor cuts for that box
from that frame, the canonical crops and the index sit in dot entries the trainer skips, and the
caps hold. A real full disk (a 64 KiB tmpfs, where the test may mount one) is counted and
survived, with nothing half-saved.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from mqtt_broker import Mosquitto

from edge_stn.config import HardExamplesConfig
from edge_stn.data.folder import FolderSource, scan_folder
from edge_stn.detect.hard_examples import CROPS_DIR, INDEX_FILE, HardExampleWriter
from edge_stn.records import Detection, Frame, FrameResult
from edge_stn.windows import WindowSpec, extract_window, place_window

pytest.importorskip("onnxruntime")

SEED = 7303  # four different digits in its first segment
FRAMES = 45


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_stn.video.synth_video import write_synthetic_video

    folder = tmp_path_factory.mktemp("hard")
    v = write_synthetic_video(folder / "s.mp4", folder / "s.json", frames=FRAMES, seed=SEED)
    return v.video


def run_daemon(
    mosquitto: Mosquitto, tmp_path: Path, video: Path, hard: dict[str, Any]
) -> tuple[dict[str, Any], WindowSpec]:
    from edge_stn.config import load_config
    from edge_stn.daemon import Daemon

    doc = {
        "device_id": "gw-hard",
        "cameras": [{"id": "cam0", "source": str(video)}],
        "hard_examples": hard,
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
    }
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text(json.dumps(doc))
    daemon = Daemon(load_config(cfg), config_path=cfg)
    assert daemon.run(install_signals=False) == 0
    stats = daemon.stats_document()
    return stats, daemon.detector.spec


def video_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(img)
    cap.release()
    return out


def test_hard_examples_form_a_training_folder_of_exact_windows(
    mosquitto: Mosquitto, tmp_path: Path, scene: Path
) -> None:
    root = tmp_path / "hard"
    stats, spec = run_daemon(mosquitto, tmp_path, scene, {"dir": str(root), "score_below": 1.0})
    he = stats["hard_examples"]
    index = [json.loads(line) for line in (root / INDEX_FILE).read_text().splitlines()]
    pngs = sorted(p for p in root.rglob("*.png") if CROPS_DIR not in p.parts)
    print(f"\nhard examples: {he}")
    assert he["saved"] == len(index) == len(pngs) > 30
    assert he["dropped"] == he["errors"] == he["skipped_cap"] == 0
    # the layout: class folders of windows; crops and index in dot entries beside them
    for line in index:
        assert (root / line["window"]).is_file() and (root / line["crop"]).is_file()
        assert line["window"].startswith(f"{line['label']}/")
        assert line["crop"].startswith(f"{CROPS_DIR}/{line['label']}/")
        assert line["score"] < 1.0
    scan = scan_folder(root)
    assert sorted(scan.classes) == sorted({line["label"] for line in index})
    assert len(scan.files) == len(index)
    source = FolderSource(scan, split="train", size=(spec.size, spec.size), channels=1)
    assert source.num_items() > 0
    # and `edge-stn train` runs on it (one short epoch)
    pytest.importorskip("torch")
    from edge_stn import cli

    train = tmp_path / "train.yaml"
    train.write_text(
        f"dataset: folder\nout: {tmp_path / 'run'}\ndata:\n  val_per_class: 0\n"
        f"  passes_per_epoch: 1\n  eval_passes: 1\n  folder:\n    root: {root}\n"
        "optim:\n  epochs: 1\n  batch_size: 32\n"
    )
    assert cli.main(["train", "--config", str(train), "--quiet"]) == 0
    assert any((tmp_path / "run").iterdir())
    # exact: each window is the extractor's window of that box in that frame
    frames = video_frames(scene)
    for line in index:
        gray = cv2.cvtColor(frames[line["frame_index"]], cv2.COLOR_BGR2GRAY)
        expected = extract_window(gray, place_window(line["box"], spec), spec.size)
        saved = cv2.imread(str(root / line["window"]), cv2.IMREAD_UNCHANGED)
        assert saved.shape == (spec.size, spec.size)
        np.testing.assert_array_equal(saved, expected)


def test_hard_examples_stop_at_the_cap(mosquitto: Mosquitto, tmp_path: Path, scene: Path) -> None:
    root = tmp_path / "hard"
    stats, _ = run_daemon(
        mosquitto, tmp_path, scene, {"dir": str(root), "score_below": 1.0, "max_files": 5}
    )
    he = stats["hard_examples"]
    assert len(list(root.glob("*/*.png"))) == he["saved"] == 5
    assert len(list((root / CROPS_DIR).glob("*/*.jpg"))) == 5
    assert he["skipped_cap"] > 0


def frame_with_digit(i: int) -> tuple[FrameResult, Frame]:
    img = np.zeros((120, 160, 3), np.uint8)
    rng = np.random.default_rng(i)
    img[:] = rng.integers(0, 255, img.shape, dtype=np.uint8)  # noise: PNGs of real size
    b = [40.0, 30.0, 80.0, 90.0]
    d = Detection("3", 3, 0.5, b, [[40, 30], [80, 30], [80, 90], [40, 90]], np.eye(2, 3))
    frame = Frame("cam0", i, time.time(), img)
    return FrameResult("cam0", i, frame.capture_ts, frame.capture_ts, 160, 120, (d,)), frame


def test_a_full_disk_is_counted_and_survived(tmp_path: Path) -> None:
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        spec = WindowSpec(size=48)

        def windows(frame: Frame, boxes: np.ndarray) -> np.ndarray:
            gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
            return np.stack([extract_window(gray, place_window(b, spec), 48)[None] for b in boxes])

        writer = HardExampleWriter(HardExamplesConfig(dir=root))
        for i in range(40):
            result, frame = frame_with_digit(i)
            writer.offer(result, f"r{i}", frame, windows, 64)
            time.sleep(0.005)  # the queue holds 32: let the writer keep up
        writer.close(timeout=10)
        s = writer.stats()
        print(f"\nfull disk: {s}")
        assert s["errors"] > 0 and s["saved"] > 0
        assert s["saved"] + s["errors"] + s["dropped"] == 40
        # nothing half-saved: every window has its crop, no temporary files are left
        windows_saved = sorted(p.stem for p in root.glob("3/*.png"))
        crops_saved = sorted(p.stem for p in (root / CROPS_DIR).glob("3/*.jpg"))
        assert windows_saved == crops_saved and len(windows_saved) == s["saved"]
        assert not [p for p in root.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_reload_with_a_folder_that_cannot_be_made_keeps_the_running_one(
    mosquitto: Mosquitto, tmp_path: Path, scene: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from edge_stn.cli import main
    from edge_stn.config import load_config
    from edge_stn.daemon import Daemon

    def write(hard_dir: Path, threshold: float) -> Path:
        doc = {
            "device_id": "gw-hard",
            "cameras": [{"id": "cam0", "source": str(scene)}],
            "detection": {"score_threshold": threshold},
            "hard_examples": {"dir": str(hard_dir)},
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        }
        cfg = tmp_path / "daemon.yaml"
        cfg.write_text(json.dumps(doc))
        return cfg

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # at start: one clear line, exit code 2
    assert main(["run", "--config", str(write(blocker / "hard", 0.5))]) == 2
    cfg = write(tmp_path / "hard", 0.5)
    daemon = Daemon(load_config(cfg), config_path=cfg)
    try:
        write(blocker / "hard", 0.7)
        with caplog.at_level(logging.ERROR, logger="edge_stn.daemon"):
            assert daemon.reload()
        assert "hard_examples not applied, keeping the running one" in caplog.text
        assert daemon.config.hard_examples is not None
        assert daemon.config.hard_examples.dir == tmp_path / "hard"
        assert daemon.detector.detection.score_threshold == 0.7  # the rest applies
    finally:
        daemon.stop()
