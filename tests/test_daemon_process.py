"""The daemon as a process (DESIGN §7): start-up checks, signals during model loads, SIGHUP
reloads of cameras, settings and model, and bad input, with a real mosquitto, real ONNX Runtime,
real video files and ``edge-stn run`` in a subprocess where exit codes and signals matter."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until
from test_video import write_video

from edge_stn.cli import main
from edge_stn.config import ModelConfig, config_hash, load_config
from edge_stn.runtime.metadata import file_sha256

pytest.importorskip("onnxruntime")

DEVICE = "gw1"
CLI = [sys.executable, "-m", "edge_stn.cli"]
ASSETS = Path(__file__).resolve().parent.parent / "edge_stn" / "assets"
DEMO_MODEL = ASSETS / "demo-stcnn.onnx"
TC_MODEL = ASSETS / "tc-stcnn.onnx"
SLOW_LINKS = 60_000
"""Nodes added to the demo model so that ONNX Runtime takes seconds to load it (about 5 s on
one core): long enough to send a signal while it loads."""


def write_config(path: Path, broker: Mosquitto | None, **doc: Any) -> Path:
    full: dict[str, Any] = {
        "device_id": DEVICE,
        "cameras": [{"id": "cam0", "source": "synthetic", "fps": 4}],
        "stats_interval_s": 1,
        **doc,
    }
    if broker is not None:
        full["mqtt"] = {"host": broker.host, "port": broker.port, **full.get("mqtt", {})}
    path.write_text(json.dumps(full))  # JSON is YAML
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def results(sub: Subscriber, camera: str | None = None) -> list[dict[str, Any]]:
    end = f"/cam/{camera}/result" if camera else "/result"
    return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith(end))]


def statuses(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/status"))]


@pytest.fixture(scope="module")
def digits_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_stn.video.synth_video import write_synthetic_video

    folder = tmp_path_factory.mktemp("digits")
    return write_synthetic_video(folder / "d.mp4", folder / "d.json", frames=10, seed=5).video


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with a long chain of Add/Sub after its logits (which leaves them as they
    were): a valid model, metadata included, that ONNX Runtime needs seconds to load."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(DEMO_MODEL))
    graph = model.graph
    producer = next(n for n in graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_0"
    graph.initializer.append(numpy_helper.from_array(np.ones((1,), np.float32), "slow_one"))
    for i in range(SLOW_LINKS):
        out = "logits" if i == SLOW_LINKS - 1 else f"logits_{i + 1}"
        op = "Add" if i % 2 == 0 else "Sub"
        graph.node.append(helper.make_node(op, [f"logits_{i}", "slow_one"], [out]))
    path = tmp_path_factory.mktemp("slow") / "slow.onnx"
    onnx.save(model, str(path))
    return path


class Run:
    """``edge-stn run --config F`` in a subprocess, its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*CLI, "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_and_wait(self, signum: int, timeout: float = 15) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signum)
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[Callable[[Path], Run]]:
    runs: list[Run] = []

    def make(config: Path) -> Run:
        runs.append(Run(config, tmp_path / f"run{len(runs)}.log"))
        return runs[-1]

    yield make
    for run in runs:
        run.kill()


# ---------------------------------------------------------------- sources at start-up


def test_unreadable_files_among_cameras_are_counted_and_the_others_go_on(
    mosquitto: Mosquitto, tmp_path: Path, digits_video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_stn.daemon import Daemon

    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video\n")
    data = bytearray(write_video(tmp_path / "v.mp4", 20).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 3000] = bytes(3000)  # a few frames' packets zeroed
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    cameras = [
        {"id": "good", "source": str(digits_video)},
        {"id": "gone", "source": str(tmp_path / "missing.mp4")},
        {"id": "junk", "source": str(junk)},
        {"id": "corrupt", "source": str(corrupt)},
    ]
    cfg = write_config(tmp_path / "c.yaml", mosquitto, cameras=cameras)
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    try:
        with caplog.at_level(logging.INFO, logger="edge_stn"):
            daemon = Daemon(load_config(cfg), config_path=cfg)
            assert daemon.run(install_signals=False) == 0  # ends with its files
        assert wait_until(lambda: statuses(sub) and statuses(sub)[-1]["state"] == "offline", 5)
    finally:
        sub.close()
    assert len(results(sub, "good")) == 10
    assert not results(sub, "gone") and not results(sub, "junk")
    cams = daemon.stats_document()["cameras"]
    for cid in ("gone", "junk"):
        assert cams[cid]["failed"] is True and cams[cid]["open_errors"] == 1, cams[cid]
        assert cams[cid]["frames"] == 0
    assert cams["good"]["failed"] is False and cams["good"]["processed"] == 10
    assert cams["corrupt"]["read_errors"] >= 1 and cams["corrupt"]["failed"] is False
    assert cams["corrupt"]["frames"] + cams["corrupt"]["read_errors"] == 20
    assert len(results(sub, "corrupt")) == cams["corrupt"]["frames"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("missing.mp4: camera gone: no such video file" in e for e in errors), errors
    assert any("junk.mp4: camera junk: OpenCV cannot read this video" in e for e in errors)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        (["missing.mp4"], "missing.mp4: camera cam0: no such video file"),
        (
            ["missing.mp4", "other.mp4"],
            "missing.mp4: camera cam0: no such video file (and 1 more: no camera can be read)",
        ),
        (["junk.mp4"], "junk.mp4: camera cam0: OpenCV cannot read this video"),
    ],
)
def test_no_readable_camera_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: list[str], needle: str
) -> None:
    (tmp_path / "junk.mp4").write_text("not a video\n")
    cameras = [{"id": f"cam{i}", "source": str(tmp_path / f)} for i, f in enumerate(files)]
    cfg = write_config(tmp_path / "c.yaml", None, cameras=cameras)
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_live_camera_keeps_a_config_with_missing_files_running(tmp_path: Path) -> None:
    from edge_stn.daemon import Daemon

    cameras = [
        {"id": "gone", "source": str(tmp_path / "missing.mp4")},
        {"id": "syn", "source": "synthetic"},
    ]
    cfg = write_config(tmp_path / "c.yaml", None, cameras=cameras)
    daemon = Daemon(load_config(cfg))  # no error: the synthetic camera can run
    assert [r.camera_id for r in daemon.readers] == ["gone", "syn"]


# ---------------------------------------------------------------- bad input at start-up


def _no_metadata(tmp_path: Path) -> Path:
    from test_engine import rewrite_metadata

    return rewrite_metadata(TC_MODEL, tmp_path / "bare.onnx", lambda doc: None)


def _junk_model(tmp_path: Path) -> Path:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00not a model" * 100)
    return path


def _sidecar_mismatch(tmp_path: Path) -> Path:
    path = tmp_path / "tc.onnx"
    shutil.copyfile(TC_MODEL, path)
    sidecar = json.loads(TC_MODEL.with_suffix(".json").read_text())
    sidecar["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


@pytest.mark.parametrize(
    ("make_model", "needle"),
    [
        (_junk_model, "junk.onnx: not a readable ONNX model (truncated or corrupt?)"),
        (_no_metadata, "bare.onnx: no 'edge_stn' metadata"),
        (_sidecar_mismatch, "differs from its sidecar"),
    ],
)
def test_bad_model_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_model: Callable[[Path], Path],
    needle: str,
) -> None:
    model = make_model(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", None, model={"path": str(model)})
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"device_id": "gw 1"}, "device_id: 'gw 1' is not a valid id"),
        (
            {"cameras": [{"id": "stats", "source": "synthetic"}]},
            "cameras.0.id: 'stats' is reserved",
        ),
        ({"detection": {"score_treshold": 0.3}}, "did you mean 'score_threshold'?"),
        ({"mqtt": {"host": "h", "prot": 1}}, "mqtt.prot: unknown key (did you mean 'port'?"),
    ],
)
def test_bad_config_values_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], needle: str
) -> None:
    cfg = write_config(tmp_path / "c.yaml", None, **doc)
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_refusing_broker_is_logged_once_counted_and_survived(
    mosquitto_factory: Callable[..., Mosquitto],
    tmp_path: Path,
    run_factory: Callable[[Path], Run],
) -> None:
    broker = mosquitto_factory(users={"gw": "right"}).start()
    cfg = write_config(tmp_path / "c.yaml", broker, mqtt={"username": "gw", "password": "wrong"})
    run = run_factory(cfg)
    assert wait_until(lambda: "refused the connection" in run.log(), 30), run.log()
    time.sleep(2.5)  # retries go on meanwhile (paho's backoff starts at 1 s)
    assert run.proc.poll() is None, run.log()
    rc, took = run.signal_and_wait(signal.SIGTERM)
    log = run.log()
    assert rc == 0, log
    assert took < 5.0, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "mqtt.password" in errors[0], log
    assert "Traceback" not in log


# ---------------------------------------------------------------- signals while a model loads


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_while_the_model_loads_exits_0_at_once(
    mosquitto: Mosquitto,
    tmp_path: Path,
    slow_model: Path,
    run_factory: Callable[[Path], Run],
    signum: int,
) -> None:
    cfg = write_config(tmp_path / "c.yaml", mosquitto, model={"path": str(slow_model)})
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    try:
        run = run_factory(cfg)
        assert wait_until(lambda: "loading the model" in run.log(), 30), run.log()
        rc, took = run.signal_and_wait(signum)
        time.sleep(0.3)
        received = sub.on(lambda m: True)
    finally:
        sub.close()
    log = run.log()
    print(f"{signal.Signals(signum).name} while loading the model: exit {rc} after {took:.2f} s")
    assert rc == 0, log
    assert took < 5.0, log
    assert "stopped while loading the model" in log and "Traceback" not in log
    assert "warm-up took" not in log  # it was still loading
    assert received == []  # never connected: nothing published


def test_sigterm_while_a_reload_loads_a_model_publishes_offline(
    mosquitto: Mosquitto,
    tmp_path: Path,
    slow_model: Path,
    run_factory: Callable[[Path], Run],
) -> None:
    cfg = write_config(tmp_path / "c.yaml", mosquitto)
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    try:
        run = run_factory(cfg)
        assert wait_until(lambda: len(results(sub)) >= 2, 30), run.log()
        write_config(cfg, mosquitto, model={"path": str(slow_model)})
        run.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "SIGHUP: loading the model" in run.log(), 10), run.log()
        n = len(results(sub))
        assert wait_until(lambda: len(results(sub)) >= n + 2, 10)  # the old model goes on
        rc, took = run.signal_and_wait(signal.SIGTERM)
        assert wait_until(lambda: statuses(sub)[-1]["state"] == "offline", 5)
    finally:
        sub.close()
    log = run.log()
    print(f"SIGTERM while a reload loads a model: exit {rc} after {took:.2f} s")
    assert rc == 0, log
    assert took < 5.0, log
    assert statuses(sub)[-1]["reason"] == "stop"
    assert "a model load still in progress is abandoned" in log and "swapped in" not in log
    assert "Traceback" not in log
    sha = file_sha256(ModelConfig().model_path)  # the default: the bundled demo model's build
    assert {r["model"]["sha256"] for r in results(sub)} == {sha}


# ---------------------------------------------------------------- SIGHUP


def test_reload_applies_cameras_settings_and_model_live(
    mosquitto: Mosquitto, tmp_path: Path, digits_video: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cameras added, removed and changed, detection, crops and stats settings, and a model
    swap, from real config files through the daemon's reload, against a real broker; then a
    model that cannot load and a config that does not validate, both refused."""
    from edge_stn.daemon import Daemon

    def cam(cid: str, **kw: Any) -> dict[str, Any]:
        return {"id": cid, "source": str(digits_video), "on_end": "loop", "fps": 4, **kw}

    caplog.set_level(logging.INFO, logger="edge_stn")
    cfg = write_config(tmp_path / "c.yaml", mosquitto, cameras=[cam("a"), cam("b"), cam("c")])
    sub = Subscriber(mosquitto, [f"edge-stn/{DEVICE}/#"])
    daemon = Daemon(load_config(cfg), config_path=cfg)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()
    try:
        assert wait_until(lambda: all(len(results(sub, c)) >= 2 for c in "abc"), 30)
        readers = {r.camera_id: r for r in daemon.readers}
        thread_a = readers["a"]._thread
        frames_a = readers["a"].stats().frames
        demo_sha = daemon.engine.sha256

        models = tmp_path / "models"
        models.mkdir()
        tc = models / "tc.onnx"
        shutil.copyfile(TC_MODEL, tc)
        shutil.copyfile(TC_MODEL.with_suffix(".json"), tc.with_suffix(".json"))
        tc_sha = file_sha256(tc)
        write_config(
            cfg,
            mosquitto,
            cameras=[cam("a"), cam("c", fps=5), cam("d")],
            detection={"score_threshold": 0.3},
            crops={"enabled": False},
            stats_interval_s=2,
            model={"path": str(tc), "providers": ["cpu"]},
            mqtt={"keepalive": 45},
        )
        daemon.request_reload()  # what SIGHUP does
        assert wait_until(lambda: daemon.engine.sha256 == tc_sha, 30), caplog.text
        assert wait_until(lambda: len(results(sub, "d")) >= 2, 20)

        def new_model_results(camera: str) -> list[dict[str, Any]]:
            return [r for r in results(sub, camera) if r["model"]["sha256"] == tc_sha]

        assert wait_until(lambda: len(new_model_results("a")) >= 2, 20)
        assert wait_until(lambda: statuses(sub)[-1]["model"]["sha256"] == tc_sha, 5)

        now = {r.camera_id: r for r in daemon.readers}
        assert list(now) == ["a", "c", "d"]
        assert now["a"] is readers["a"] and now["a"]._thread is thread_a, "a was not disturbed"
        assert thread_a is not None and thread_a.is_alive()
        assert now["a"].stats().frames > frames_a and now["a"].stats().open_errors == 0
        assert readers["b"].join(5) and readers["b"].stats().state == "stopped"
        assert now["c"] is not readers["c"] and now["c"].fps == 5 and not readers["c"].is_alive()
        assert daemon.detector.detection.score_threshold == 0.3
        assert daemon.config.stats_interval_s == 2 and daemon.config.model.path == tc
        assert daemon.config.mqtt.keepalive == 30, "MQTT changes wait for a restart"
        assert "mqtt changed: not applied" in caplog.text
        online = statuses(sub)[-1]
        assert online["state"] == "online" and online["cameras"] == ["a", "c", "d"]
        assert online["config_hash"] == config_hash(daemon.config)
        swapped = [r for cid in "acd" for r in new_model_results(cid)]
        assert all(d["crop_status"] == "off" for r in swapped for d in r["detections"])
        assert all(r["model"]["name"] == "tc-stcnn" for r in swapped)

        # A model that cannot load: the running one stays, and the log says why.
        junk = models / "junk.onnx"
        junk.write_bytes(b"\x00not a model" * 100)
        write_config(
            cfg,
            mosquitto,
            cameras=[cam("a"), cam("c", fps=5), cam("d")],
            model={"path": str(junk), "providers": ["cpu"]},
        )
        daemon.request_reload()
        assert wait_until(lambda: "new model refused, keeping tc-stcnn" in caplog.text, 20)
        assert daemon.engine.sha256 == tc_sha and daemon.config.model.path == tc
        n = len(results(sub, "a"))
        assert wait_until(lambda: len(results(sub, "a")) >= n + 2, 10)

        # A config that does not validate: one line, the running config kept.
        running = daemon.config
        cfg.write_text(json.dumps({"device_id": DEVICE, "cameras": [{"id": "a", "sourze": 1}]}))
        assert not daemon.reload()
        assert daemon.config is running
        refused = [
            r.getMessage() for r in caplog.records if "config not reloaded" in r.getMessage()
        ]
        assert len(refused) == 1 and "cameras.0.sourze: unknown key" in refused[0]
        assert "\n" not in refused[0]
    finally:
        daemon.request_stop()
        runner.join(15)
        sub.close()
    assert not runner.is_alive()
    # One sequence per camera across the reload and the model swap: no gap, the old model's
    # results before the new model's.
    a = sorted(results(sub, "a"), key=lambda r: r["seq"])
    assert [r["seq"] for r in a] == list(range(len(a)))
    shas = [r["model"]["sha256"] for r in a]
    assert shas[0] == demo_sha and shas[-1] == tc_sha
    assert shas == sorted(shas, key=lambda s: s == tc_sha)
