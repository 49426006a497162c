"""The publisher (DESIGN §6): topics, payloads against their shipped JSON Schemas, and the MQTT
client against a real mosquitto on loopback (status and Last Will, results and crops, MQTT
3.1.1, refused credentials, ACL refusals, a broker restart, a full queue)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from mqtt_broker import (
    Mosquitto,
    Received,
    Subscriber,
    free_port,
    make_tls_files,
    wait_until,
)

from edge_stn.config import MqttConfig, TlsConfig, parse_config
from edge_stn.detect.crops import EncodedCrop, encode_jpeg
from edge_stn.errors import PayloadError
from edge_stn.publish import payloads
from edge_stn.publish.client import MqttPublisher, PublisherLimits
from edge_stn.publish.outbox import Outbox
from edge_stn.publish.payloads import DeviceInfo, ModelInfo
from edge_stn.publish.stats import LatencyWindow, ProcessMeter
from edge_stn.publish.topics import TopicTree, parse_topic, subscription
from edge_stn.records import CropRef, Detection, FrameResult

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "gw1"
MODEL = ModelInfo("demo-stcnn", "a" * 64)
FAST = PublisherLimits(reconnect_min_s=1, reconnect_max_s=2, stop_timeout_s=3.0)


def validate(kind: payloads.PayloadKind, doc: Any) -> None:
    schema = payloads.load_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


def device_info(epoch: str = "0123456789abcdef") -> DeviceInfo:
    return DeviceInfo(
        device=DEVICE,
        version="0.1.0",
        model=MODEL,
        config_hash="b" * 64,
        epoch=epoch,
        started_at=1_700_000_000.25,
        cameras=("cam0", "cam1"),
    )


def detection(i: int = 0, **kw: Any) -> Detection:
    x, y = 10.0 + 50 * i, 12.0
    affine = np.array([[0.5, 0.0, x - 0.25], [0.0, 0.5, y - 0.25]])
    corners = np.array([[-0.5, -0.5, 1], [63.5, -0.5, 1], [63.5, 63.5, 1], [-0.5, 63.5, 1]])
    args: dict[str, Any] = {
        "label": str(i % 10),
        "class_id": i % 10,
        "score": 0.91234567,
        "box": [x, y, x + 30, y + 32],
        "quad": corners @ affine.T,
        "affine": affine,
    }
    return Detection(**{**args, **kw})


def frame_result(camera: str = "cam0", index: int = 0, n: int = 2) -> FrameResult:
    t = 1_700_000_100.0 + index / 30
    return FrameResult(camera, index, t, t + 0.012, 640, 480, tuple(detection(i) for i in range(n)))


def jpeg() -> EncodedCrop:
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 20:44] = 255
    return encode_jpeg(img, 90)


def mqtt_config(broker: Mosquitto, **kw: Any) -> MqttConfig:
    return MqttConfig(host=broker.host, port=broker.port, **kw)


@pytest.fixture
def publisher_factory() -> Any:
    made: list[MqttPublisher] = []

    def make(cfg: MqttConfig, **kw: Any) -> MqttPublisher:
        kw.setdefault("limits", FAST)
        pub = MqttPublisher(cfg, device_info(), **kw)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.stop(timeout=2.0)


def documents(messages: list[Received]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages]


def is_status(m: Received) -> bool:
    return m.topic == f"edge-stn/{DEVICE}/status"


def state_is(state: str) -> Callable[[Received], bool]:
    return lambda m: is_status(m) and json.loads(m.payload)["state"] == state


# ---------------------------------------------------------------- topics


def test_topic_tree() -> None:
    t = TopicTree("edge-stn", DEVICE)
    assert t.status == "edge-stn/gw1/status"
    assert t.stats == "edge-stn/gw1/stats"
    assert t.result("cam0") == "edge-stn/gw1/cam/cam0/result"
    assert t.crop("cam0", "ab12", 3) == "edge-stn/gw1/cam/cam0/crop/ab12/3"
    assert t.cmd("reload") == "edge-stn/gw1/cmd/reload"
    assert t.cmd_reply("reload") == "edge-stn/gw1/cmd/reload/reply"
    assert TopicTree("site/a", DEVICE).status == "site/a/gw1/status"
    assert subscription("edge-stn", "result") == "edge-stn/+/cam/+/result"
    assert subscription("edge-stn", "crop", device="gw1") == "edge-stn/gw1/cam/+/crop/#"
    for topic in (t.status, t.stats, t.result("c"), t.crop("c", "r", 0), t.cmd_reply("x")):
        parsed = parse_topic("edge-stn", topic)
        assert parsed is not None and parsed.device == DEVICE
    crop = parse_topic("edge-stn", t.crop("cam0", "ab12", 3))
    assert crop is not None
    assert (crop.kind, crop.camera, crop.result_id, crop.index) == ("crop", "cam0", "ab12", 3)
    assert parse_topic("edge-stn", "edge-stn/gw1/cam/cam0/other") is None
    assert parse_topic("other", t.status) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopicTree("edge-stn", "stats"),
        lambda: TopicTree("edge-stn", "a/b"),
        lambda: TopicTree("edge/+", "gw"),
        lambda: TopicTree("edge-stn", "gw").result("cam 0"),
        lambda: TopicTree("edge-stn", "gw").result("cam"),
        lambda: TopicTree("edge-stn", "gw").crop("c0", "#", 0),
        lambda: TopicTree("edge-stn", "gw").crop("c0", "r", -1),
    ],
)
def test_topic_tree_refuses_bad_levels(make: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- payloads


def test_every_payload_kind_validates_against_its_schema() -> None:
    info = device_info()
    validate("status", payloads.status_online(info, 1_700_000_001.0))
    validate("status", payloads.status_offline(info, "stop", 1_700_000_002.0))
    validate("status", payloads.status_offline(info, "lost", None))
    dets = [
        detection(0, crop=CropRef("edge-stn/gw1/cam/cam0/crop/ab/0", 64, 64), crop_status="sent"),
        detection(1),
        detection(2, crop_status="policy"),
        detection(3, crop_status="shed", track_id=7),
    ]
    result = FrameResult("cam0", 5, 1_700_000_100.0, 1_700_000_100.02, 640, 480, tuple(dets))
    doc = payloads.result_document(
        result,
        result_id="ab",
        device=DEVICE,
        epoch=info.epoch,
        seq=0,
        publish_ts=1_700_000_100.03,
        model=MODEL,
    )
    validate("result", doc)
    assert [d["crop_status"] for d in doc["detections"]] == ["sent", "off", "policy", "shed"]
    validate("result", {**doc, "detections": []})
    counters = MqttPublisher(MqttConfig(), info).counters().to_dict()
    stats = payloads.stats_document(
        device=DEVICE,
        epoch=info.epoch,
        ts=info.started_at + 10,
        started_at=info.started_at,
        interval_s=10.0,
        cameras={"cam0": {"fps": 14.93, "drops": 2, "frames": np.int64(150), "live": True}},
        latency_ms={"detect_ms": [12.0, 15.5, 30.1], "publish_ms": []},
        mqtt=counters,
        drops={"detector_queue": 1},
        process=ProcessMeter().sample(),
    )
    validate("stats", stats)
    assert stats["latency_ms"]["detect_ms"] == {
        "count": 3,
        "p50": 15.5,
        "p90": 30.1,
        "p99": 30.1,
        "max": 30.1,
    }
    assert stats["latency_ms"]["publish_ms"]["p50"] is None
    assert stats["cameras"]["cam0"]["frames"] == 150


def test_schemas_reject_what_breaks_the_contract() -> None:
    info = device_info()
    doc = payloads.result_document(
        frame_result(n=1),
        result_id="ab",
        device=DEVICE,
        epoch=info.epoch,
        seq=0,
        publish_ts=1.0,
        model=MODEL,
    )
    sent_without_crop = json.loads(json.dumps(doc))
    sent_without_crop["detections"][0]["crop_status"] = "sent"
    for bad in (
        sent_without_crop,
        {**doc, "seq": -1},
        {**doc, "extra": 1},
        {k: v for k, v in doc.items() if k != "epoch"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate("result", bad)
    with pytest.raises(jsonschema.ValidationError):
        validate("status", {**payloads.status_offline(info, "stop", 1.0), "version": "x"})


def test_encoding_is_compact_deterministic_and_refuses_nan() -> None:
    info = device_info()
    kw: dict[str, Any] = {
        "result_id": "ab",
        "device": DEVICE,
        "epoch": info.epoch,
        "seq": 3,
        "publish_ts": 1_700_000_100.123456789,
        "model": MODEL,
    }
    a = payloads.encode(payloads.result_document(frame_result(), **kw))
    b = payloads.encode(payloads.result_document(frame_result(), **kw))
    assert a == b
    assert b" " not in a
    doc = json.loads(a)
    assert list(doc) == list(payloads.load_schema("result")["required"])
    assert doc["publish_ts"] == 1_700_000_100.123457
    assert doc["detections"][0]["score"] == 0.91235
    with pytest.raises(PayloadError, match="ts"):
        payloads.status_online(info, math.nan)
    with pytest.raises(PayloadError):
        payloads.encode({"x": math.inf})
    # numbers are named only when one is wrong, and then down to the element
    assert payloads._nums("q", [[1.23456, -0.0001], [2, 3.5]], 3) == [[1.235, 0.0], [2.0, 3.5]]
    with pytest.raises(PayloadError, match=r"^det\.quad\[1\]\[0\] must be finite, got inf$"):
        payloads._nums("det.quad", [[1.0, 2.0], [math.inf, 0.0]], 2)
    with pytest.raises(PayloadError, match=r"^box\[2\] must be a number, got True$"):
        payloads._nums("box", [1.0, 2.0, True], 2)
    assert len(payloads.new_epoch()) == 16
    assert payloads.new_result_id() != payloads.new_result_id()


def test_latency_window_drains() -> None:
    w = LatencyWindow(maxlen=3)
    for ms in (1.0, 2.0, 3.0, 4.0):
        w.add(ms)
    assert w.drain() == [2.0, 3.0, 4.0]
    assert w.drain() == []


def test_docs_examples_are_valid_payloads() -> None:
    text = (ROOT / "docs" / "mqtt.md").read_text()
    blocks = re.findall(r"<!-- schema: (\w+) -->\s*```json\n(.*?)```", text, re.DOTALL)
    assert {kind for kind, _ in blocks} == set(payloads.PAYLOAD_KINDS)
    for kind, body in blocks:
        validate(kind, json.loads(body))


# ---------------------------------------------------------------- with mosquitto


def test_online_retained_on_connect_offline_on_clean_stop(
    mosquitto: Mosquitto, publisher_factory: Any
) -> None:
    pub = publisher_factory(mqtt_config(mosquitto))
    pub.start()
    assert pub.wait_connected(10)
    assert wait_until(lambda: pub.counters().status.acked == 1, 5)
    # A client that connects later gets the retained 'online' document.
    late = Subscriber(mosquitto, ["edge-stn/+/status"])
    try:
        online = late.wait_for(state_is("online"))
        assert online and online[0].retain and online[0].content_type == "application/json"
        doc = json.loads(online[0].payload)
        validate("status", doc)
        assert (doc["epoch"], doc["model"], doc["cameras"]) == (
            pub.epoch,
            MODEL.to_dict(),
            ["cam0", "cam1"],
        )
        t0 = time.monotonic()
        pub.stop(timeout=3.0)
        assert time.monotonic() - t0 < 3.5
        assert not pub.connected
        offline = late.wait_for(state_is("offline"))
        assert json.loads(offline[0].payload)["reason"] == "stop"
    finally:
        late.close()
    again = Subscriber(mosquitto, ["edge-stn/+/status"])
    try:
        retained = again.wait_for(is_status)
        assert [json.loads(m.payload)["state"] for m in retained] == ["offline"]
        assert retained[0].retain
        validate("status", json.loads(retained[0].payload))
    finally:
        again.close()


PUBLISHER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from edge_stn.config import MqttConfig
    from edge_stn.publish import DeviceInfo, ModelInfo, MqttPublisher
    info = DeviceInfo("gw1", "0.1.0", ModelInfo("m", "a" * 64), "b" * 64, "0123456789abcdef",
                      time.time(), ("cam0",))
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=int(sys.argv[1])), info)
    pub.start()
    if not pub.wait_connected(20):
        sys.exit(3)
    while pub.counters().status.acked < 1:
        time.sleep(0.01)
    print("online", flush=True)
    time.sleep(120)
    """
)


def test_last_will_offline_when_the_publisher_is_killed(mosquitto: Mosquitto) -> None:
    sub = Subscriber(mosquitto, ["edge-stn/+/status"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER_PROCESS, str(mosquitto.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child exits 3 after 20 s without a broker
        assert line.strip() == "online", proc.stderr.read() if proc.stderr else ""
        assert sub.wait_for(state_is("online"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        will = sub.wait_for(state_is("offline"), timeout=10)
        assert will, mosquitto.log()
        doc = json.loads(will[0].payload)
        validate("status", doc)
        assert (doc["reason"], doc["ts"], doc["epoch"]) == ("lost", None, "0123456789abcdef")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sub.close()
    late = Subscriber(mosquitto, ["edge-stn/+/status"])
    try:
        retained = late.wait_for(is_status)
        assert retained[0].retain and json.loads(retained[0].payload)["state"] == "offline"
    finally:
        late.close()


def check_results_and_crops(
    sub: Subscriber, pub: MqttPublisher, published: list[Any], *, v5: bool
) -> None:
    n_results = len(published)
    n_crops = sum(len(p.crop_topics) for p in published)
    results = sub.wait_for(lambda m: m.topic.endswith("/result"), n_results)
    crops = sub.wait_for(lambda m: "/crop/" in m.topic, n_crops)
    assert len(results) == n_results and len(crops) == n_crops
    docs = documents(results)
    for doc in docs:
        validate("result", doc)
    assert len({d["id"] for d in docs}) == n_results
    for cam in {d["camera"] for d in docs}:
        seqs = sorted(d["seq"] for d in docs if d["camera"] == cam)
        assert seqs == list(range(len(seqs))), f"gap in seq of {cam}: {seqs}"
        assert {d["epoch"] for d in docs if d["camera"] == cam} == {pub.epoch}
    by_topic = {m.topic: m for m in crops}
    for doc in docs:
        for det in doc["detections"]:
            assert det["crop_status"] == "sent"
            msg = by_topic[det["crop"]["topic"]]
            assert msg.payload[:2] == b"\xff\xd8"  # a JPEG
            assert parse_topic("edge-stn", msg.topic).result_id == doc["id"]  # type: ignore[union-attr]
            if v5:
                assert msg.user_properties == {
                    "result_id": doc["id"],
                    "label": det["label"],
                    "score": f"{det['score']:.4f}",
                }
                assert msg.content_type == "image/jpeg"
            else:
                assert msg.user_properties == {} and msg.content_type is None
    assert wait_until(lambda: pub.counters().pending == 0, 5)
    c = pub.counters()
    assert (c.results.published, c.results.acked, c.results.refused) == (n_results,) * 2 + (0,)
    assert (c.crops.published, c.crops.acked) == (n_crops, n_crops)


@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_results_and_crops_arrive(
    mosquitto: Mosquitto, publisher_factory: Any, protocol: str
) -> None:
    v5 = protocol == "v5"
    sub = Subscriber(mosquitto, ["edge-stn/+/cam/#"], v5=True)
    try:
        pub = publisher_factory(mqtt_config(mosquitto, protocol=protocol))
        pub.start()
        assert pub.wait_connected(10)
        published = []
        for i in range(12):
            cam = "cam0" if i % 3 else "cam1"
            res = frame_result(cam, i, n=2)
            p = pub.publish_result(res, [jpeg(), jpeg()])
            assert p is not None
            published.append(p)
        assert [p.seq for p in published if p.topic.endswith("cam0/result")] == list(range(8))
        check_results_and_crops(sub, pub, published, v5=v5)
        assert pub.publish_stats(
            payloads.stats_document(
                device=DEVICE,
                epoch=pub.epoch,
                ts=time.time(),
                started_at=pub.info.started_at,
                interval_s=10.0,
                cameras={"cam0": {"fps": 1.0, "drops": 0}},
                latency_ms={"publish_ms": [p.publish_ms for p in published]},
                mqtt=pub.counters().to_dict(),
            )
        )
    finally:
        sub.close()


def test_wrong_password_is_a_clear_error_not_a_connection(
    mosquitto_factory: Callable[..., Mosquitto],
    publisher_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = mosquitto_factory(users={"gw": "right"}).start()
    caplog.set_level(logging.INFO, logger="edge_stn.publish")
    bad = publisher_factory(mqtt_config(broker, username="gw", password="wrong"))
    bad.start()
    assert wait_until(lambda: bad.counters().connect_refusals >= 2, 10)  # it keeps retrying
    assert not bad.connected
    c = bad.counters()
    assert c.connects == 0 and c.status.published == 0
    assert c.last_error is not None and "refused the connection" in c.last_error
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    message = errors[0].getMessage()
    assert "Not authorized" in message or "Bad user name or password" in message
    assert "mqtt.password" in message
    assert not [r for r in caplog.records if "before answering" in r.getMessage()]
    assert bad.publish_result(frame_result(), timeout=0.0) is not None  # queued, not lost
    t0 = time.monotonic()
    bad.stop(timeout=2.0)
    assert time.monotonic() - t0 < 2.5
    good = publisher_factory(mqtt_config(broker, username="gw", password="right"))
    good.start()
    assert good.wait_connected(10)


def test_broker_refusal_v5_is_counted(
    mosquitto_factory: Callable[..., Mosquitto], publisher_factory: Any
) -> None:
    acl = "user gw\ntopic write edge-stn/gw1/status\ntopic write edge-stn/gw1/cam/cam0/#\n"
    broker = mosquitto_factory(users={"gw": "pw"}, acl=acl).start()
    pub = publisher_factory(mqtt_config(broker, username="gw", password="pw"))
    pub.start()
    assert pub.wait_connected(10)
    assert pub.publish_result(frame_result("cam0", 0, n=0)) is not None
    assert pub.publish_result(frame_result("cam1", 0, n=0)) is not None  # ACL: denied
    assert wait_until(lambda: pub.counters().pending == 0, 5)
    c = pub.counters()
    assert (c.results.published, c.results.acked, c.results.refused) == (2, 1, 1)


def test_tls_connects_with_the_right_ca_only(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], publisher_factory: Any
) -> None:
    files = make_tls_files(tmp_path / "tls")
    broker = mosquitto_factory(tls=files).start()
    pub = publisher_factory(mqtt_config(broker, tls=TlsConfig(ca_file=files.ca)))
    pub.start()
    assert pub.wait_connected(10), broker.log()
    assert pub.publish_result(frame_result(n=0)) is not None
    assert wait_until(lambda: pub.counters().results.acked == 1, 5)
    other = make_tls_files(tmp_path / "other", name="other-ca")
    stranger = publisher_factory(mqtt_config(broker, tls=TlsConfig(ca_file=other.ca)))
    stranger.start()
    assert wait_until(lambda: stranger.counters().connect_failures >= 1, 10)
    assert not stranger.connected
    assert "CERTIFICATE_VERIFY_FAILED" in (stranger.last_error or "")
    plain = publisher_factory(mqtt_config(broker))
    plain.start()
    assert wait_until(lambda: plain.counters().connect_failures >= 1, 10)
    assert not plain.connected and "set mqtt.tls" in (plain.last_error or "")


def test_reconnects_after_a_broker_restart(mosquitto: Mosquitto, publisher_factory: Any) -> None:
    pub = publisher_factory(mqtt_config(mosquitto))
    pub.start()
    assert pub.wait_connected(10)
    first = pub.publish_result(frame_result(index=0))
    mosquitto.stop(kill=True)
    assert wait_until(lambda: not pub.connected, 10)
    during = [pub.publish_result(frame_result(index=i), timeout=0.0) for i in (1, 2)]
    assert all(p is not None for p in during)
    assert pub.counters().pending >= 2  # held by paho until the broker is back
    mosquitto.start()
    assert wait_until(lambda: pub.connected, 15), mosquitto.log()
    sub = Subscriber(mosquitto, ["edge-stn/+/status"])
    try:
        # A broker without persistence forgot the retained status: the reconnect re-published it.
        online = sub.wait_for(state_is("online"))
        assert online and online[0].retain
    finally:
        sub.close()
    assert wait_until(lambda: pub.counters().pending == 0, 10)
    c = pub.counters()
    assert (c.connects, c.reconnects) == (2, 1)
    assert c.results.published == c.results.acked == 3
    assert first is not None
    assert [first.seq] + [p.seq for p in during if p] == [0, 1, 2]


def noise_crop(size: int, seed: int = 0) -> EncodedCrop:
    """Bytes that stand for a JPEG of ``size`` bytes (the publisher does not decode crops)."""
    return EncodedCrop(np.random.default_rng(seed).bytes(size), 90, size, 64, 64)


def test_full_outbox_sheds_crops_first_then_the_oldest_results(
    publisher_factory: Any, tmp_path: Path
) -> None:
    nobody = MqttConfig(host="127.0.0.1", port=free_port())  # nothing listens: all stays queued
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_bytes=512 * 1024)
    pub = publisher_factory(nobody, outbox=outbox)
    pub.start()
    n = 400
    out = []
    for i in range(n):
        crops = [noise_crop(3000, i)] * 2
        # batches of 20, as a detector's would be: one commit each
        out.append(pub.publish_result(frame_result(index=i, n=2), crops, flush=i % 20 == 19))
        if i % 20 == 19:
            assert wait_until(lambda: pub.counters().results.queued == len(out), 10)
    published = [p for p in out if p is not None]
    assert [p.seq for p in published] == list(range(n)), "every result got its seq"
    statuses = [d.crop_status for p in published for d in p.detections]
    first_shed = statuses.index("shed")
    assert set(statuses[:first_shed]) == {"sent"} and first_shed > 4
    c = pub.counters()
    assert (c.results.queued, c.results.dropped, c.results.published) == (n, 0, 0)
    assert c.crops.queued == statuses.count("sent")
    assert c.results.shed > 0, "after the crops, the oldest results"
    assert c.outbox["live_bytes"] <= outbox.data_budget
    pub.stop()
    assert outbox.disk_bytes() <= 512 * 1024
    with Outbox(path, max_bytes=512 * 1024) as again:
        left = again.read(0, 1_000_000)
        totals = again.state().totals
    kept = [json.loads(m.payload) for m in left if m.kind == "result"]
    assert [d["seq"] for d in kept] == list(range(n - len(kept), n)), "the oldest went first"
    assert c.results.shed == totals["results_shed"] == n - len(kept)
    stored_crops = {m.topic for m in left if m.kind == "crop"}
    assert c.crops.shed == statuses.count("shed") + c.crops.queued - len(stored_crops)
    validator = jsonschema.Draft202012Validator(payloads.load_schema("result"))
    for doc in kept:  # a crop that was shed left crop: null in its result
        validator.validate(doc)
        for det in doc["detections"]:
            sent = det["crop_status"] == "sent"
            assert sent == (det["crop"] is not None)
            if sent:
                assert det["crop"]["topic"] in stored_crops


def test_a_stuck_hand_over_drops_results_in_bounded_time_without_a_seq() -> None:
    limits = PublisherLimits(max_waiting=2)
    pub = MqttPublisher(MqttConfig(), device_info(), limits=limits)  # not started: nothing commits
    t0 = time.monotonic()
    out = [pub.publish_result(frame_result(index=i, n=0), timeout=0.2) for i in range(3)]
    assert time.monotonic() - t0 < 2.0
    assert [p.seq if p else None for p in out] == [0, 1, None]
    assert pub.counters().results.dropped == 1
    assert pub.next_seq("cam0") == 2
    pub.stop()


def test_crop_statuses_within_one_result(publisher_factory: Any, tmp_path: Path) -> None:
    nobody = MqttConfig(host="127.0.0.1", port=free_port(), max_payload_bytes=40_000)
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=512 * 1024)
    pub = publisher_factory(nobody, outbox=outbox)
    room = int(0.75 * outbox.data_budget - outbox.live_bytes)
    too_big = EncodedCrop(None, 20, 70_000, 64, 64)
    over_limit = noise_crop(45_000)
    crops: list[EncodedCrop | None] = [noise_crop(room // 5)] * 7 + [too_big, None, over_limit]
    p = pub.publish_result(frame_result(n=10), crops, timeout=0.0)
    assert p is not None
    statuses = [d.crop_status for d in p.detections]
    # five crops fit the crops' share of the outbox; the rest of the noise is shed
    assert statuses == ["sent"] * 5 + ["shed"] * 2 + ["policy", "off", "policy"]
    assert len(p.crop_topics) == 5
    doc = json.loads(p.payload)
    validate("result", doc)
    assert [d["crop"]["topic"] for d in doc["detections"][:5]] == list(p.crop_topics)
    pub.start()
    assert wait_until(lambda: pub.counters().results.queued == 1, 5)
    c = pub.counters()
    assert (c.crops.queued, c.crops.shed, c.crops.refused) == (5, 2, 1)
    pub.stop()
    dead = Outbox.inspect(tmp_path / "outbox.sqlite").dead_letters
    assert [(d.kind, d.code, d.result_id) for d in dead] == [("crop", 0x95, p.id)]
    assert dead[0].topic.endswith(f"/crop/{p.id}/9") and "max_payload_bytes" in dead[0].reason


def test_publisher_from_daemon_config() -> None:
    cfg = parse_config(
        {
            "device_id": "gw7",
            "cameras": [{"id": "door", "source": "synthetic"}],
            "mqtt": {"host": "127.0.0.1", "port": 18830, "topic_prefix": "site/edge"},
        }
    )
    pub = MqttPublisher.from_config(cfg, MODEL)
    assert pub.client_id == "edge-stn-gw7"
    assert pub.topics.result("door") == "site/edge/gw7/cam/door/result"
    assert pub.info.cameras == ("door",) and len(pub.info.config_hash) == 64
    pub.stop()  # never started: nothing to do


def test_nagle_is_off_on_the_broker_connection(
    mosquitto: Mosquitto, publisher_factory: Any
) -> None:
    """paho leaves Nagle's algorithm on; with it, a message sent while an earlier one (a QoS 0
    stats message, which gets no PUBACK) awaits the broker's delayed ACK waits up to 40 ms."""
    import socket

    pub = publisher_factory(mqtt_config(mosquitto))
    pub.start()
    assert pub.wait_connected(10)
    sock = pub._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_shared_json_properties_are_never_changed_by_a_reply() -> None:
    # the JSON properties are made once and shared by every result, status and stats message:
    # a reply's correlation data must go on a copy, or every later message would carry it
    pub = MqttPublisher(MqttConfig(), device_info())
    shared = pub._json_props()
    assert shared is not None and pub._json_props() is shared
    reply = pub._reply_props(b"ticket-7")
    assert reply is not None and reply is not shared
    assert reply.CorrelationData == b"ticket-7"
    assert not hasattr(shared, "CorrelationData")
    assert shared.pack() == pub._json_props().pack()
    crop = pub._crop_props((("result_id", "r1"), ("label", "3")))
    again = pub._crop_props(())
    assert crop is not None and again is not None
    assert crop.UserProperty == [("result_id", "r1"), ("label", "3")]
    assert not hasattr(again, "UserProperty")  # the template was not changed either
