"""Remote commands (issue 7, part 5): the handler alone (validation, authorisation, every
command, a property-based test that throws garbage at it), the model inbox (chunks, URL, size
cap, timeout, a full disk), and a real daemon driven through a real mosquitto by
`edge-stn command`'s client."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_stn.config import DaemonConfig, ModelConfig
from edge_stn.ops.commands import CommandFailed, CommandHandler, Reply
from edge_stn.ops.transfer import ChunkProgress, ModelInbox, StoredModel, TransferError
from edge_stn.publish.client import InboundMessage
from edge_stn.publish.payloads import load_schema
from edge_stn.publish.topics import TopicTree
from edge_stn.records import Frame

ASSETS = Path(__file__).resolve().parents[1] / "edge_stn" / "assets"
DEMO = ASSETS / "demo-stcnn.onnx"
TOKEN = "s3cret-token-0123456789"
VALIDATOR = jsonschema.Draft202012Validator(load_schema("reply"))
TOPICS = TopicTree("edge-stn", "gw1")


def daemon_config(**commands: Any) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {
            "device_id": "gw1",
            "cameras": [
                {"id": "cam0", "source": "synthetic"},
                {"id": "cam1", "source": "synthetic"},
            ],
            "commands": {"enabled": True, **commands},
        }
    )


class FakeDaemon:
    """A CommandTarget without threads: it applies what the handler asks at once."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.frames: dict[str, Frame] = {}
        self.reloads = 0
        self.reload_error: str | None = None
        self.swaps: list[tuple[ModelConfig, Callable[[str | None], None]]] = []

    def reload_config(self) -> dict[str, Any]:
        if self.reload_error is not None:
            raise CommandFailed(self.reload_error)
        self.reloads += 1
        return {"changed": [], "needs_restart": [], "model_loading": False, "config_hash": "x"}

    def update_config(self, change: Callable[[DaemonConfig], DaemonConfig]) -> DaemonConfig:
        self.config = change(self.config)
        return self.config

    def latest_frame(self, camera: str) -> Frame | None:
        return self.frames.get(camera)

    def swap_model(self, model: ModelConfig, on_done: Callable[[str | None], None]) -> bool:
        self.swaps.append((model, on_done))
        return True


def message(name: str, doc: Any = None, *, raw: bytes | None = None, **kw: Any) -> InboundMessage:
    payload = raw if raw is not None else json.dumps(doc if doc is not None else {}).encode()
    return InboundMessage(f"edge-stn/gw1/cmd/{name}", payload, **kw)


def handled(handler: CommandHandler, msg: InboundMessage) -> Reply:
    reply = handler.handle(msg)
    assert reply is not None
    VALIDATOR.validate(reply.document)
    return reply


@pytest.fixture
def target() -> FakeDaemon:
    return FakeDaemon(daemon_config(token=TOKEN))


@pytest.fixture
def handler(target: FakeDaemon) -> CommandHandler:
    return CommandHandler(target, TOPICS)


# ---------------------------------------------------------------- garbage in, a reply out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    topic=st.one_of(
        st.text(max_size=80),
        st.builds(lambda n: f"edge-stn/gw1/cmd/{n}", st.text(max_size=20)),
        st.sampled_from(
            [f"edge-stn/gw1/cmd/{n}" for n in ("reload", "thresholds", "snapshot", "model")]
        ),
    ),
    payload=st.binary(max_size=300),
    response=st.one_of(st.none(), st.text(max_size=40)),
    correlation=st.one_of(st.none(), st.binary(max_size=16)),
)
def test_garbage_bytes_and_topics_always_get_a_valid_reply(
    topic: str, payload: bytes, response: str | None, correlation: bytes | None
) -> None:
    target = FakeDaemon(daemon_config(token=TOKEN))
    handler = CommandHandler(target, TOPICS)
    reply = handler.handle(InboundMessage(topic, payload, response, correlation))
    if reply is None:  # only our own reply topics are ignored
        assert topic.endswith("/reply") and handler.counters.ignored == 1
        return
    VALIDATOR.validate(reply.document)
    assert not reply.ok, "no garbage carries the token"
    assert handler.counters.rejected + handler.counters.failed == 1
    assert target.reloads == 0 and not target.swaps
    assert reply.correlation == correlation
    assert TOKEN not in json.dumps(reply.document)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "detection",
        "proposals",
        "cameras",
        "camera",
        "quality",
        "max_width",
        "sha256",
        "url",
        "transfer",
        "index",
        "count",
        "data",
        "signature",
        "name",
        "request_id",
        "score_threshold",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["reload", "thresholds", "snapshot", "model", "nope"]),
    doc=st.dictionaries(st.one_of(fields, st.text(max_size=8)), json_values, max_size=5),
    with_token=st.booleans(),
)
def test_arbitrary_json_commands_are_validated_never_crash(
    name: str, doc: dict[str, Any], with_token: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    target = FakeDaemon(daemon_config(token=TOKEN, model_dir=str(tmp_path_factory.mktemp("m"))))
    target.frames["cam0"] = synthetic_frame()
    before = target.config
    handler = CommandHandler(target, TOPICS)
    if with_token:
        doc = {**doc, "token": TOKEN}
    reply = handled(handler, message(name, doc))
    if not with_token:
        assert reply.status == "rejected" and "unauthorised" in (reply.document["error"] or "")
    if not reply.ok:
        assert target.config == before, "nothing half-applied"
        assert reply.document["error"]
    assert TOKEN not in json.dumps(reply.document)


# ---------------------------------------------------------------- gates


def test_unknown_fields_bad_token_and_disabled_commands_are_rejected(
    target: FakeDaemon, handler: CommandHandler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_stn")
    r = handled(handler, message("reload", {"token": TOKEN, "force": True}))
    assert r.status == "rejected" and "force" in r.document["error"]
    assert "Extra inputs" in r.document["error"]
    r = handled(handler, message("reload", {"token": "wrong-token-wrong-token"}))
    assert r.status == "rejected" and r.document["error"] == "unauthorised: missing or wrong token"
    r = handled(handler, message("reload", {}))
    assert r.status == "rejected" and "unauthorised" in r.document["error"]
    r = handled(handler, message("reboot", {"token": TOKEN}))
    assert r.status == "rejected" and "unknown command 'reboot'" in r.document["error"]
    r = handled(handler, message("reload", raw=b"\xff\xfe"))
    assert r.status == "rejected" and "UTF-8" in r.document["error"]
    r = handled(handler, message("reload", raw=b"[1, 2]"))
    assert "JSON object" in r.document["error"]
    r = handled(handler, message("reload", raw=b'{"token": NaN}'))
    assert "not JSON" in r.document["error"]
    assert target.reloads == 0
    assert handler.counters.rejected == 7
    # every rejection has its log line; the token never appears in the log
    assert (
        sum(
            "command" in rec.getMessage() and "rejected" in rec.getMessage()
            for rec in caplog.records
        )
        == 7
    )
    assert TOKEN not in caplog.text
    # allowed, then not allowed, then disabled
    r = handled(handler, message("reload", {"token": TOKEN, "request_id": "r-1"}))
    assert r.ok and r.status == "done" and r.document["request_id"] == "r-1" and target.reloads == 1
    assert r.topic == "edge-stn/gw1/cmd/reload/reply"
    target.config = daemon_config(token=TOKEN, allow=["snapshot"])
    r = handled(handler, message("reload", {"token": TOKEN}))
    assert r.status == "rejected" and "commands.allow" in r.document["error"]
    target.config = daemon_config(enabled=False)
    r = handled(handler, message("reload", {}))
    assert r.status == "rejected" and "commands.enabled" in r.document["error"]


def test_reply_topics_response_topic_and_correlation(handler: CommandHandler) -> None:
    r = handled(
        handler,
        message("reload", {"token": TOKEN}, response_topic="ops/alice/replies", correlation=b"c1"),
    )
    assert r.topic == "ops/alice/replies" and r.correlation == b"c1" and r.ok
    # a response topic must not be one of our data topics, nor hold wildcards
    for bad in ("edge-stn/gw1/status", "edge-stn/gw1/cam/cam0/result", "ops/#", "$SYS/x", ""):
        r = handled(handler, message("reload", {"token": TOKEN}, response_topic=bad))
        assert r.status == "rejected" and "response topic" in r.document["error"], bad
        assert r.topic == "edge-stn/gw1/cmd/reload/reply"
    # our own replies (on .../reply) are ignored; another device's commands are not ours
    assert handler.handle(InboundMessage("edge-stn/gw1/cmd/reload/reply", b"{}")) is None
    r = handled(handler, InboundMessage("edge-stn/gw2/cmd/reload", b"{}"))
    assert r.status == "rejected" and r.topic is None


def test_a_failed_reload_keeps_the_running_config(
    target: FakeDaemon, handler: CommandHandler
) -> None:
    target.reload_error = "config not reloaded, the running one is kept: cameras: at least one"
    before = target.config
    r = handled(handler, message("reload", {"token": TOKEN}))
    assert r.status == "failed" and "running one is kept" in r.document["error"]
    assert target.config is before and handler.counters.failed == 1


# ---------------------------------------------------------------- thresholds


def test_thresholds_are_validated_and_applied_with_old_and_new(
    target: FakeDaemon, handler: CommandHandler
) -> None:
    before = target.config
    for bad, where in (
        ({"detection": {"score_threshold": 1.5}}, "score_threshold"),
        ({"detection": {"nms_iou": 0}}, "nms_iou"),
        ({"proposals": {"min_contrast": 0.5}}, "min_contrast"),
        ({"proposals": {"threshold": "median"}}, "threshold"),
        ({"proposals": {"min_area": 500, "max_area": 100}}, "max_area"),
        ({"detection": {"score": 0.5}}, "detection.score"),
        ({"proposals": {"min_contrast": 20}, "cameras": ["cam9"]}, "cam9"),
        ({}, "nothing to change"),
    ):
        r = handled(handler, message("thresholds", {"token": TOKEN, **bad}))
        assert r.status == "rejected" and where in r.document["error"], (bad, r.document)
        assert target.config == before, "nothing half-applied"
    r = handled(
        handler,
        message(
            "thresholds",
            {
                "token": TOKEN,
                "detection": {"score_threshold": 0.8, "nms_iou": 0.3},
                "proposals": {"min_contrast": 24},
                "cameras": ["cam1"],
            },
        ),
    )
    assert r.ok, r.document
    res = r.document["result"]
    assert res["old"]["detection"] == {"score_threshold": 0.5, "nms_iou": 0.45}
    assert res["new"]["detection"] == {"score_threshold": 0.8, "nms_iou": 0.3}
    assert res["old"]["proposals"] == {"cam1": {"min_contrast": 16.0}}
    assert res["new"]["proposals"] == {"cam1": {"min_contrast": 24.0}}
    cfg = target.config
    assert cfg.detection.score_threshold == 0.8 and cfg.detection.max_per_frame == 32
    assert cfg.camera("cam1").proposals.min_contrast == 24
    assert cfg.camera("cam0").proposals.min_contrast == 16, "only the cameras named"


# ---------------------------------------------------------------- snapshot


def synthetic_frame(width: int = 320, height: int = 240) -> Frame:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Frame("cam0", 7, 1_700_000_000.0, image)


def test_snapshot_is_a_jpeg_of_the_frame_shrunk_to_fit_the_packet_limit(
    target: FakeDaemon,
) -> None:
    room = {"value": 1 << 20}
    handler = CommandHandler(target, TOPICS, reply_room=lambda topic: room["value"])
    r = handled(handler, message("snapshot", {"token": TOKEN, "camera": "cam0"}))
    assert r.status == "failed" and "no frame yet" in r.document["error"]
    target.frames["cam0"] = synthetic_frame()
    r = handled(handler, message("snapshot", {"token": TOKEN}))
    res = r.document["result"]
    image = cv2.imdecode(np.frombuffer(base64.b64decode(res["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3) and (res["width"], res["height"]) == (320, 240)
    assert res["frame_index"] == 7 and res["bytes"] == len(base64.b64decode(res["jpeg"]))
    # noise compresses badly: a 20 kB packet limit forces a smaller, lower-quality JPEG
    room["value"] = 20_000
    r = handled(handler, message("snapshot", {"token": TOKEN, "camera": "cam0"}))
    res = r.document["result"]
    assert len(json.dumps(r.document)) <= 20_000
    assert res["width"] < 320 and res["frame_width"] == 320
    image = cv2.imdecode(np.frombuffer(base64.b64decode(res["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (res["height"], res["width"], 3)
    r = handled(handler, message("snapshot", {"token": TOKEN, "camera": "cam7"}))
    assert r.status == "rejected" and "cam7" in r.document["error"]


# ---------------------------------------------------------------- the model inbox


def chunks(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i * size : (i + 1) * size] for i in range(n)]


def test_inbox_assembles_chunks_in_order_and_accepts_a_resent_chunk(tmp_path: Path) -> None:
    data = DEMO.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    inbox = ModelInbox(tmp_path, max_bytes=10 << 20, timeout_s=60)
    parts = chunks(data, 3)
    sig = {"format": "edge-stn-signature"}
    got = inbox.add_chunk("t1", 0, 3, parts[0], sha, name="m.onnx", signature=sig)
    assert got == ChunkProgress("t1", 1, 3, len(parts[0]))
    # QoS 1 may deliver a chunk twice: acknowledged, not written twice
    assert inbox.add_chunk("t1", 0, 3, parts[0], sha, name="m.onnx", signature=sig) == got
    with pytest.raises(TransferError, match="out of order: expected chunk 1"):
        inbox.add_chunk("t1", 2, 3, parts[2], sha, name="m.onnx", signature=None)
    with pytest.raises(TransferError, match="disagrees"):
        inbox.add_chunk("t1", 1, 4, parts[1], sha, name="m.onnx", signature=None)
    inbox.add_chunk("t1", 1, 3, parts[1], sha, name="m.onnx", signature=None)
    stored = inbox.add_chunk("t1", 2, 3, parts[2], sha, name="m.onnx", signature=None)
    assert isinstance(stored, StoredModel)
    assert stored.path == tmp_path / sha / "m.onnx" and stored.path.read_bytes() == data
    assert json.loads((tmp_path / sha / "m.onnx.sig").read_text()) == sig
    assert not list((tmp_path / "incoming").iterdir()), "no partial file left"
    with pytest.raises(TransferError, match="no transfer 't1' in progress"):
        inbox.add_chunk("t1", 1, 3, parts[1], sha, name="m.onnx", signature=None)


def test_inbox_refuses_a_wrong_sha256_too_large_and_stale_transfers(tmp_path: Path) -> None:
    data = DEMO.read_bytes()
    now = {"t": 0.0}
    inbox = ModelInbox(tmp_path, max_bytes=len(data) - 1, timeout_s=10, clock=lambda: now["t"])
    parts = chunks(data, 2)
    wrong = "0" * 64
    inbox.add_chunk("a", 0, 2, parts[0], wrong, name="m.onnx", signature=None)
    with pytest.raises(TransferError, match=r"larger than commands\.max_model_bytes"):
        inbox.add_chunk("a", 1, 2, parts[1], wrong, name="m.onnx", signature=None)
    assert not list((tmp_path / "incoming").iterdir())
    inbox.max_bytes = 10 << 20
    inbox.add_chunk("b", 0, 2, parts[0], wrong, name="m.onnx", signature=None)
    with pytest.raises(TransferError, match=r"sha256 .* announced 000000000000"):
        inbox.add_chunk("b", 1, 2, parts[1], wrong, name="m.onnx", signature=None)
    assert not list((tmp_path / "incoming").iterdir()) and not (tmp_path / wrong).exists()
    inbox.add_chunk("c", 0, 2, parts[0], wrong, name="m.onnx", signature=None)
    now["t"] = 11.0
    assert inbox.expire() == "c"
    assert not list((tmp_path / "incoming").iterdir())


def test_inbox_on_a_full_disk_says_so_and_keeps_nothing(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    data = DEMO.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    inbox = ModelInbox(tmp_path, max_bytes=10 << 20, timeout_s=60)
    inbox.add_chunk("t", 0, 2, data[:100], sha, name="m.onnx", signature=None)
    part = tmp_path / "incoming" / "t.part"
    part.unlink()
    part.symlink_to("/dev/full")  # every write there fails with ENOSPC, like a full disk
    with pytest.raises(TransferError, match="No space left on device: the disk is full"):
        inbox.add_chunk("t", 1, 2, data[100:], sha, name="m.onnx", signature=None)
    assert not part.exists() and not part.is_symlink()
    assert not (tmp_path / sha).exists()


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving a folder."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


def test_inbox_fetches_a_url_with_a_size_cap(tmp_path: Path, http_folder: tuple[str, Path]) -> None:
    base, www = http_folder
    shutil.copy(DEMO, www / "m.onnx")
    data = DEMO.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    inbox = ModelInbox(tmp_path / "models", max_bytes=10 << 20, timeout_s=60)
    stored = inbox.fetch(f"{base}/m.onnx", sha, name="m.onnx", signature=None, timeout_s=10)
    assert stored.path.read_bytes() == data and stored.size == len(data)
    with pytest.raises(TransferError, match="HTTP 404"):
        inbox.fetch(f"{base}/none.onnx", sha, name="m.onnx", signature=None, timeout_s=10)
    small = ModelInbox(tmp_path / "small", max_bytes=1024, timeout_s=60)
    with pytest.raises(TransferError, match=r"over commands\.max_model_bytes"):
        small.fetch(f"{base}/m.onnx", sha, name="m.onnx", signature=None, timeout_s=10)
    with pytest.raises(TransferError, match="only http"):
        inbox.fetch("file:///etc/passwd", sha, name="m.onnx", signature=None, timeout_s=10)
    assert not list((tmp_path / "models" / "incoming").iterdir())


def test_model_command_needs_model_trust(target: FakeDaemon, handler: CommandHandler) -> None:
    data = DEMO.read_bytes()
    r = handled(
        handler,
        message(
            "model",
            {
                "token": TOKEN,
                "sha256": hashlib.sha256(data).hexdigest(),
                "transfer": "t",
                "index": 0,
                "count": 1,
                "data": base64.b64encode(data).decode(),
            },
        ),
    )
    assert r.status == "rejected" and "model.trust" in r.document["error"]
    assert not target.swaps


# ---------------------------------------------------------------- a real daemon, a real broker


def test_remote_commands_on_a_running_daemon(
    mosquitto: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """thresholds visible in results, snapshot, reload (bad file: kept; good file: thresholds
    back), a wrong token, garbage, a mis-signed model refused, a signed model sent in chunks
    swapped in with no camera stopped and no seq gap."""
    pytest.importorskip("onnxruntime")
    import paho.mqtt.client as mqtt
    from mqtt_broker import Subscriber, wait_until
    from paho.mqtt.enums import CallbackAPIVersion
    from test_model_trust import new_key, sign

    from edge_stn.cli import main
    from edge_stn.config import load_config
    from edge_stn.daemon import Daemon
    from edge_stn.remote import CommandClient, CommandOptions
    from edge_stn.runtime.metadata import file_sha256

    models = tmp_path / "models"
    models.mkdir()
    first = models / DEMO.name
    shutil.copy(DEMO, first)
    shutil.copy(DEMO.with_suffix(".json"), models / "demo-stcnn.json")
    second = tmp_path / "send" / "rts-stcnn.onnx"
    second.parent.mkdir()
    shutil.copy(ASSETS / "rts-stcnn.onnx", second)
    key, public = new_key(tmp_path, "release", capsys)
    sign(first, key, capsys)
    monkeypatch.setenv("CMD_TOKEN", TOKEN)
    doc = {
        "device_id": "gw1",
        "model": {
            "path": str(first),
            "providers": ["cpu"],
            "trust": {"require": "signature", "public_keys": [public]},
        },
        "cameras": [
            {
                "id": "cam0",
                "source": "synthetic",
                "fps": 8,
                "synthetic": {"width": 320, "height": 240, "objects": 3, "seed": 3},
            }
        ],
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port},
        "stats_interval_s": 1,
        "commands": {"enabled": True, "token": "${CMD_TOKEN}", "model_dir": str(tmp_path / "recv")},
    }
    cfg_path = tmp_path / "gw1.yaml"
    cfg_path.write_text(json.dumps(doc))
    caplog.set_level(logging.INFO, logger="edge_stn")
    sub = Subscriber(mosquitto, ["edge-stn/gw1/#"])
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()
    opts = CommandOptions(device="gw1", host="127.0.0.1", port=mosquitto.port, token=TOKEN)

    def results() -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/result"))]

    def online_shas() -> list[str]:
        docs = [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/status"))]
        return [d["model"]["sha256"] for d in docs if d["state"] == "online"]

    try:
        assert wait_until(lambda: len(results()) >= 5, 30), "the daemon publishes"
        assert any(len(r["detections"]) > 1 for r in results()) or wait_until(
            lambda: any(len(r["detections"]) > 1 for r in results()), 20
        ), "frames with several detections before the change"
        with CommandClient(opts) as client:
            # 1. thresholds, visible in the results of frames captured after the reply
            reply = client.request(
                "thresholds", {"detection": {"score_threshold": 0.97, "max_per_frame": 1}}
            )
            assert reply["status"] == "done", reply
            VALIDATOR.validate(reply)
            assert reply["result"]["old"]["detection"] == {
                "score_threshold": 0.5,
                "max_per_frame": 32,
            }
            after = lambda: [r for r in results() if r["capture_ts"] > reply["ts"]]  # noqa: E731
            assert wait_until(lambda: len(after()) >= 8, 30)
            dets = [d for r in after() for d in r["detections"]]
            assert all(len(r["detections"]) <= 1 for r in after())
            assert all(d["score"] >= 0.97 for d in dets)
            # 2. snapshot: a JPEG of the camera's frame, by `edge-stn command`
            shot = tmp_path / "shot.jpg"
            monkeypatch.setenv("EDGE_STN_COMMAND_TOKEN", TOKEN)
            capsys.readouterr()
            argv = ["command", "--device", "gw1", "--host", "127.0.0.1", "--port"]
            argv += [str(mosquitto.port), "snapshot", '{"camera": "cam0"}', "--out", str(shot)]
            assert main(argv) == 0
            printed = json.loads(capsys.readouterr().out)
            assert printed["status"] == "done" and printed["result"]["written"] == str(shot)
            image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
            assert image is not None and image.shape == (240, 320, 3)
            # 3. reload: a broken file is refused and the running config kept ...
            cfg_path.write_text(json.dumps({**doc, "cameras": []}))
            reply = client.request("reload")
            VALIDATOR.validate(reply)
            assert reply["status"] == "failed" and "cameras" in reply["error"]
            assert daemon.config.detection.score_threshold == 0.97
            # ... a good one is applied: the thresholds go back to the file's
            cfg_path.write_text(json.dumps(doc))
            reply = client.request("reload")
            assert reply["status"] == "done" and reply["result"]["changed"] == ["detection"]
            assert daemon.config.detection.score_threshold == 0.5
            # 4. a mis-signed model (another key) is refused, the running model kept
            other_key, _ = new_key(tmp_path, "other", capsys)
            sign(second, other_key, capsys)
            reply = client.send_model(second, chunk_bytes=64_000)
            VALIDATOR.validate(reply)
            assert reply["status"] == "rejected" and "mis-signed" in reply["error"], reply
            assert daemon.engine.sha256 == file_sha256(first)
            assert not any((tmp_path / "recv").glob("*/rts-stcnn.onnx")), "nothing kept"
        # 5. a wrong token
        with CommandClient(
            CommandOptions(**{**opts.__dict__, "token": "not-the-token-at-all"})
        ) as bad:
            reply = bad.request("snapshot")
            assert reply["status"] == "rejected" and "unauthorised" in reply["error"]
        # 6. garbage, fast: every message answered or counted, the daemon goes on
        raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="garbage")
        raw.connect("127.0.0.1", mosquitto.port)
        raw.loop_start()
        rng = np.random.default_rng(1)
        for i in range(200):
            name = ["reload", "model", "thresholds", "x y", "snapshot"][i % 5]
            raw.publish(f"edge-stn/gw1/cmd/{name}", rng.bytes(int(rng.integers(0, 200))), qos=1)
        raw.publish("edge-stn/gw1/cmd/model", b'{"sha256": 5, "data": []}', qos=1).wait_for_publish(
            10
        )
        raw.disconnect()
        raw.loop_stop()
        counters = daemon.commands.counters if daemon.commands is not None else None
        assert counters is not None
        assert wait_until(lambda: counters.rejected + counters.busy >= 201, 20), counters
        n = len(results())
        assert wait_until(lambda: len(results()) >= n + 5, 20), "still publishing after garbage"
        # 7. the signed model, in chunks: swapped in without stopping the camera
        sign(second, key, capsys)
        with CommandClient(opts) as client:
            reply = client.send_model(second, chunk_bytes=48_000)
        VALIDATOR.validate(reply)
        second_sha = file_sha256(second)
        assert reply["status"] == "done" and reply["result"]["swapped"], reply
        assert reply["result"]["sha256"] == second_sha
        assert daemon.engine.sha256 == second_sha
        assert wait_until(lambda: second_sha in online_shas(), 10)
        n = len(results())
        assert wait_until(lambda: len(results()) >= n + 5, 20)
    finally:
        daemon.request_stop()
        runner.join(15)
        sub.close()
    docs = sorted(results(), key=lambda r: r["seq"])
    assert [r["seq"] for r in docs] == list(range(len(docs))), "no gap across commands and swap"
    shas = [r["model"]["sha256"] for r in docs]
    assert shas[-1] == second_sha and shas[0] == file_sha256(first)
    interim = [
        json.loads(m.payload) for m in sub.on(lambda m: m.topic == "edge-stn/gw1/cmd/model/reply")
    ]
    assert any(r["status"] == "receiving" for r in interim) and any(
        r["status"] == "loading" for r in interim
    )
    for r in interim:
        VALIDATOR.validate(r)
    assert TOKEN not in caplog.text


def test_command_cli_bad_input_and_no_gateway(
    mosquitto: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_stn.cli import main

    base = ["command", "--device", "gw1", "--host", "127.0.0.1", "--port", str(mosquitto.port)]
    assert main([*base, "thresholds", "{not json"]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main([*base, "reload", "--model-file", "m.onnx"]) == 2
    assert "--model-file goes with the model command" in capsys.readouterr().err
    # nobody listens: no reply, one line, exit 1
    assert main([*base, "--timeout", "1", "reload"]) == 1
    err = capsys.readouterr().err
    assert "no reply from gw1 to reload within 1 s" in err and "Traceback" not in err


def test_config_check_warns_about_commands() -> None:
    from edge_stn.config import check_config

    warnings = check_config(daemon_config())
    assert any(w.startswith("commands.token: not set") for w in warnings)
    assert any(w.startswith("commands.allow: 'model' is refused") for w in warnings)
    assert not any(w.startswith("commands.") for w in check_config(daemon_config(enabled=False)))


def test_the_token_is_masked_like_the_mqtt_password() -> None:
    from edge_stn.ops.logs import config_secrets

    assert TOKEN in config_secrets(daemon_config(token=TOKEN))
    assert daemon_config(token="   ").commands.token is None, "empty: no token"
    with pytest.raises(ValueError, match="at least 16 characters"):
        daemon_config(token="short")
    assert TOKEN not in repr(daemon_config(token=TOKEN))


def test_model_from_a_url_allow_listed_swap_reported_when_done(
    tmp_path: Path, http_folder: tuple[str, Path]
) -> None:
    base, www = http_folder
    shutil.copy(DEMO, www / "next.onnx")
    sha = hashlib.sha256(DEMO.read_bytes()).hexdigest()
    cfg = DaemonConfig.model_validate(
        {
            "device_id": "gw1",
            "cameras": [{"id": "cam0", "source": "synthetic"}],
            "model": {"trust": {"require": "allowlist", "allowed_sha256": [sha]}},
            "commands": {"enabled": True, "model_dir": str(tmp_path / "recv")},
        }
    )
    target = FakeDaemon(cfg)
    sent: list[Reply] = []
    handler = CommandHandler(target, TOPICS, send=sent.append)
    r = handled(
        handler, message("model", {"url": f"{base}/next.onnx", "sha256": sha, "name": "next.onnx"})
    )
    assert r.status == "loading" and r.ok and r.document["result"]["trust"] == "allow-listed"
    ((model, on_done),) = target.swaps
    assert model.path == tmp_path / "recv" / sha / "next.onnx" and model.sha256 == sha
    assert not sent, "the final reply waits for the swap"
    on_done("warm-up failed: boom")
    assert sent[-1].status == "failed" and "warm-up failed: boom" in sent[-1].document["error"]
    assert not (tmp_path / "recv" / sha).exists(), "a model that did not load is not kept"
    # a file whose sha256 is not allow-listed is refused before any load
    other = www / "other.onnx"
    other.write_bytes(DEMO.read_bytes() + b"\0")
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    r = handled(handler, message("model", {"url": f"{base}/other.onnx", "sha256": other_sha}))
    assert r.status == "rejected" and "not in model.trust.allowed_sha256" in r.document["error"]
    assert len(target.swaps) == 1 and not (tmp_path / "recv" / other_sha).exists()
    # the allow-listed one again, and this time it loads
    r = handled(
        handler, message("model", {"url": f"{base}/next.onnx", "sha256": sha, "name": "next.onnx"})
    )
    assert r.status == "loading"
    target.swaps[-1][1](None)
    assert sent[-1].status == "done" and sent[-1].document["result"]["swapped"] is True
    for reply in sent:
        VALIDATOR.validate(reply.document)
    assert (tmp_path / "recv" / sha / "next.onnx").is_file()


def test_the_shipped_acl_lets_operators_command_and_nobody_else(
    mosquitto_factory: Any, tmp_path: Path
) -> None:
    """The broker's ACL is the first gate: with deploy/mosquitto/acl a consumer's command never
    reaches the gateway; an operator's does."""
    pytest.importorskip("onnxruntime")
    from mqtt_broker import wait_until

    from edge_stn.daemon import Daemon
    from edge_stn.remote import CommandClient, CommandError, CommandOptions

    acl = (Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl").read_text()
    users = {"gw1": "gw1-password", "operator": "op-password", "consumer": "co-password"}
    broker = mosquitto_factory(users=users, acl=acl).start()
    cfg = DaemonConfig.model_validate(
        {
            "device_id": "gw1",
            "model": {"providers": ["cpu"]},
            "cameras": [{"id": "cam0", "source": "synthetic", "fps": 5}],
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "username": "gw1",
                "password": "gw1-password",
            },
            "commands": {"enabled": True, "allow": ["snapshot"]},
        }
    )
    daemon = Daemon(cfg)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()
    base = {"device": "gw1", "host": broker.host, "port": broker.port, "timeout_s": 10.0}
    try:
        assert daemon.commands is not None
        assert wait_until(lambda: daemon.latest_frame("cam0") is not None, 30)
        with CommandClient(
            CommandOptions(**base, username="operator", password="op-password")
        ) as op:
            reply = op.request("snapshot")
            assert reply["status"] == "done", reply
            reply = op.request("reload")
            assert reply["status"] == "rejected" and "commands.allow" in reply["error"]
        received = daemon.commands.counters.received
        consumer = CommandOptions(
            **{**base, "timeout_s": 2.0}, username="consumer", password="co-password"
        )
        with CommandClient(consumer) as co, pytest.raises(CommandError, match="no reply"):
            co.request("snapshot")
        assert daemon.commands.counters.received == received, "refused by the broker"
    finally:
        daemon.request_stop()
        runner.join(15)


def test_received_models_never_share_the_fallback_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"commands\.model_dir is model\.fallback_dir"):
        DaemonConfig.model_validate(
            {
                "cameras": [{}],
                "model": {"fallback_dir": str(tmp_path / "m")},
                "commands": {"model_dir": str(tmp_path / "m")},
            }
        )
