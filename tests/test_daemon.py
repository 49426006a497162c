"""The daemon end to end (DESIGN §7, §8): a real mosquitto, real ONNX Runtime, the bundled
demo model, a video file with ground truth and the synthetic camera."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mqtt_broker import Mosquitto, Received, Subscriber, wait_until

from edge_stn.accuracy import score
from edge_stn.cli import main
from edge_stn.config import load_config
from edge_stn.publish.payloads import load_schema
from edge_stn.publish.topics import parse_topic

pytest.importorskip("onnxruntime")

DEVICE = "gw1"
FRAMES = 30
SEED = 5
# Measured with the bundled demo model on 30-frame 640x480 scenes of 3 digits (default knobs):
# seed 5 (this test): recall 0.967 (87/90), precision 1.000, label accuracy 0.931 (81/87);
# seeds 0-5 together: recall 0.994 (537/540), precision 1.000, label accuracy 0.933 (501/537),
# one digit of seed 3 (a '1' read as '2' in every frame) costing most of it. Errors repeat
# across a scene's frames, so the bars leave a margin of about one object-track.
MIN_RECALL = 0.9
MIN_PRECISION = 0.9
MIN_LABEL_ACCURACY = 0.85
CLI = [sys.executable, "-m", "edge_stn.cli"]


def write_config(folder: Path, broker: Mosquitto, source: str, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "device_id": DEVICE,
        "cameras": [{"id": "cam0", "source": source}],
        "mqtt": {"host": broker.host, "port": broker.port},
        "stats_interval_s": 1,
        **extra,
    }
    path = folder / "daemon.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from edge_stn.video.synth_video import write_synthetic_video

    folder = tmp_path_factory.mktemp("video")
    out = write_synthetic_video(
        folder / "scene.mp4", folder / "scene.json", frames=FRAMES, seed=SEED
    )
    return out.video, json.loads(out.truth.read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def results_of(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/result"))]


def status_docs(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/status"))]


def test_file_source_end_to_end(
    mosquitto: Mosquitto, tmp_path: Path, video: tuple[Path, dict[str, Any]]
) -> None:
    from edge_stn.daemon import Daemon

    path, truth = video
    cfg_path = write_config(tmp_path, mosquitto, str(path))
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    try:
        daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
        t0 = time.monotonic()
        assert daemon.run(install_signals=False) == 0  # returns by itself at the end of file
        assert time.monotonic() - t0 < 30
        assert wait_until(lambda: len(results_of(sub)) >= FRAMES, 10)
        assert wait_until(lambda: any(d["state"] == "offline" for d in status_docs(sub)), 5)
        time.sleep(0.3)  # nothing more may come
        results = results_of(sub)
    finally:
        sub.close()

    assert len(results) == FRAMES, "one result per frame, no more, no less"
    results.sort(key=lambda r: r["seq"])
    assert [r["seq"] for r in results] == list(range(FRAMES))
    assert sorted(r["frame_index"] for r in results) == list(range(FRAMES))
    assert len({r["epoch"] for r in results}) == 1
    validator = jsonschema.Draft202012Validator(load_schema("result"))
    for r in results:
        validator.validate(r)
    states = [d["state"] for d in status_docs(sub)]
    assert states[0] == "online" and states[-1] == "offline"
    assert status_docs(sub)[-1]["reason"] == "stop"

    crops: dict[str, Received] = {m.topic: m for m in sub.on(lambda m: "/crop/" in m.topic)}
    sent = [d for r in results for d in r["detections"] if d["crop_status"] == "sent"]
    n_dets = sum(len(r["detections"]) for r in results)
    assert n_dets > 0 and len(sent) == n_dets, "every detection's crop was sent"
    for d in sent:
        msg = crops[d["crop"]["topic"]]
        assert msg.payload[:2] == b"\xff\xd8", "a JPEG"
        assert msg.user_properties["label"] == d["label"]
        parsed = parse_topic("edge-stn", msg.topic)
        assert parsed is not None and parsed.kind == "crop"

    by_index = {f["frame_index"]: f["objects"] for f in truth["frames"]}
    acc = score(
        (
            [(d["label"], d["box"]) for d in r["detections"]],
            [(str(o["label"]), o["box"]) for o in by_index[r["frame_index"]]],
        )
        for r in results
    )
    print(f"file source: {acc.line()}")
    assert acc.recall is not None and acc.recall >= MIN_RECALL, acc.line()
    assert acc.precision is not None and acc.precision >= MIN_PRECISION, acc.line()
    assert acc.label_accuracy is not None and acc.label_accuracy >= MIN_LABEL_ACCURACY

    stats = [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/stats"))]
    stats_validator = jsonschema.Draft202012Validator(load_schema("stats"))
    for doc in stats:
        stats_validator.validate(doc)


def test_sighup_reload_applies_thresholds_and_names_the_rest(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_stn.daemon import Daemon

    cfg_path = write_config(tmp_path, mosquitto, "synthetic")
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
    assert daemon.detector.detection.score_threshold == 0.5
    write_config(
        tmp_path,
        mosquitto,
        "synthetic",
        detection={"score_threshold": 0.8},
        crops={"size": 96, "jpeg_quality": 70},
        device_id="gw2",
    )
    with caplog.at_level(logging.INFO, logger="edge_stn.daemon"):
        assert daemon.reload()
    assert daemon.detector.detection.score_threshold == 0.8
    assert daemon.detector.crop_size == 96  # crops apply live, their size included
    assert "device_id changed: not applied" in caplog.text
    assert daemon.config.device_id == DEVICE
    cfg_path.write_text("device_id: gw1\ncameras: [{id: cam0, sourze: synthetic}]\n")
    assert not daemon.reload()
    assert daemon.detector.detection.score_threshold == 0.8


def test_sigterm_stops_run_within_5_s_with_offline(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, mosquitto, "synthetic")
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*CLI, "run", "--config", str(cfg_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        assert wait_until(lambda: len(results_of(sub)) >= 5, 30), log_path.read_text()
        # SIGHUP: the new threshold is applied, the process goes on.
        write_config(tmp_path, mosquitto, "synthetic", detection={"score_threshold": 0.7})
        proc.send_signal(signal.SIGHUP)
        n = len(results_of(sub))
        assert wait_until(lambda: len(results_of(sub)) >= n + 5, 10)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
    assert rc == 0
    print(f"SIGTERM to exit: {took:.2f} s")
    assert took < 5.0
    log = log_path.read_text()
    assert "SIGHUP: applied detection (score >= 0.7" in log, log
    retained = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/status"])
    try:
        msgs = retained.wait_for(lambda m: m.retain, timeout=5)
    finally:
        retained.close()
    assert msgs and json.loads(msgs[-1].payload)["state"] == "offline"
    assert json.loads(msgs[-1].payload)["reason"] == "stop"


def test_run_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: gw1\ncameras: [{id: cam0, source: synthetic, fpss: 3}]\n")
    proc = subprocess.run(
        [*CLI, "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cameras.0.fpss" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"model": {"path": "missing.onnx"}}, "no such model file"),
        ({"model": {"sha256": "0" * 64}}, "sha256"),
        ({"cameras": [{"id": "cam0", "source": "nothere.mp4"}]}, "no such video file"),
    ],
)
def test_start_up_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, Any],
    needle: str,
) -> None:
    doc = {"device_id": DEVICE, "cameras": [{"id": "cam0", "source": "synthetic"}], **extra}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(doc))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_demo_runs_and_reports_accuracy(tmp_path: Path) -> None:
    from mqtt_broker import _require_mosquitto

    _require_mosquitto()
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [*CLI, "demo", "--seconds", "6", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        env=_env(),
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "summary:" in proc.stdout
    acc_line = next(line for line in proc.stdout.splitlines() if "accuracy" in line)
    assert "recall" in acc_line and "precision" in acc_line and "label accuracy" in acc_line
    assert "seq gaps 0" in proc.stdout
    assert any(out.glob("*.jpg"))


def test_demo_without_mosquitto_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edge_stn.demo as demo

    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.setattr(demo.os, "access", lambda path, mode: False)
    assert main(["demo", "--seconds", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sudo apt-get install mosquitto" in err[0]
    assert not (tmp_path / "out").exists()
