"""`edge-stn subscribe` (edge_stn.subscriber): loss and duplicate tracking, filters, crops,
malformed payloads, persistent sessions and shared subscriptions, against a real mosquitto."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import Mosquitto, consumer, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_stn.cli import main
from edge_stn.publish.payloads import ModelInfo, encode, result_document
from edge_stn.records import CropRef, Detection, FrameResult
from edge_stn.subscriber import (
    DeliveryTracker,
    check_result,
    crop_file_name,
)

EPOCH = "00112233aabbccdd"
MODEL = ModelInfo("demo-stcnn", "a" * 64)


def det(label: str, n: int = 0, rid: str | None = None) -> Detection:
    affine = np.array([[0.5, 0.0, 10.0 + 40 * n], [0.0, 0.5, 12.0]])
    corners = np.array([[-0.5, -0.5, 1], [31.5, -0.5, 1], [31.5, 31.5, 1], [-0.5, 31.5, 1]])
    crop = CropRef(f"edge-stn/gw1/cam/cam0/crop/{rid}/{n}", 64, 64) if rid else None
    return Detection(
        label=label,
        class_id=int(label),
        score=0.9,
        box=[10.0 + 40 * n, 12.0, 30.0 + 40 * n, 40.0],
        quad=corners @ affine.T,
        affine=affine,
        crop=crop,
        crop_status="sent" if crop else "off",
    )


def result_payload(
    seq: int, camera: str = "cam0", labels: tuple[str, ...] = ("7",), rid: str | None = None
) -> tuple[str, bytes]:
    rid = rid or f"{camera}x{seq:06d}"
    t = 1_767_225_600.0 + seq / 15
    fr = FrameResult(
        camera, seq, t, t + 0.01, 640, 480, tuple(det(lb, n) for n, lb in enumerate(labels))
    )
    doc = result_document(
        fr, result_id=rid, device="gw1", epoch=EPOCH, seq=seq, publish_ts=t + 0.02, model=MODEL
    )
    return f"edge-stn/gw1/cam/{camera}/result", encode(doc)


class RawPublisher:
    """Publishes exactly the bytes a test wants (QoS 1), and waits for the broker's PUBACKs."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acked: list[int] = []
        self.sent = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.append(mid)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props)
        self.sent += 1

    def wait(self) -> None:
        assert wait_until(lambda: len(self.acked) == self.sent, 10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- units


def test_tracker_reports_gaps_late_arrivals_duplicates_per_stream() -> None:
    t = DeliveryTracker()
    a, b = ("gw1", "cam0", "e1"), ("gw1", "cam0", "e2")
    assert t.add(a, "i5", 5).gap is None  # a stream starts where the consumer joins
    assert t.add(a, "i6", 6).gap is None
    assert t.add(a, "i9", 9).gap == (7, 8)
    assert t.add(a, "i9", 9).duplicate
    assert t.add(a, "i7", 7).late
    assert t.missing == 1 and t.missing_by_stream() == {a: 1}
    assert t.add(b, "j0", 0).gap is None, "a new epoch is a new stream"
    assert t.add(a, "i3", 3).late, "older than the first seen"
    assert t.missing == 2  # seq 4 and 8
    assert t.add(a, "other", 6).reused
    assert (t.unique, t.duplicates, t.gaps) == (7, 1, 1)


def test_result_checks_and_crop_names() -> None:
    _, payload = result_payload(3)
    doc = json.loads(payload)
    assert check_result(doc, "gw1", "cam0") is None
    assert "seq" in (check_result({**doc, "seq": -1}, "gw1", "cam0") or "")
    assert "seq" in (check_result({**doc, "seq": True}, "gw1", "cam0") or "")
    assert "epoch" in (
        check_result({k: v for k, v in doc.items() if k != "epoch"}, "gw1", "cam0") or ""
    )
    assert "differ" in (check_result(doc, "gw2", "cam0") or "")
    assert "JSON object" in (check_result([1], "gw1", "cam0") or "")
    name = crop_file_name(1_767_225_600.25, "7", "abc", 2)
    assert name == "20260101T000000.250Z_7_abc_2.jpg"
    assert crop_file_name(0.0, "a/b c", "x", 0).startswith("19700101T000000.000Z_a-b-c_x_0")


# ---------------------------------------------------------------- with mosquitto


def test_subscribe_cli_filters_saves_crops_and_survives_bad_payloads(
    mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crops = tmp_path / "crops"
    pub = RawPublisher(mosquitto)
    args = [
        "subscribe", "--host", mosquitto.host, "--port", str(mosquitto.port), "--json",
        "--camera", "cam0", "--label", "7", "--crops", str(crops), "--seconds", "20",
        "--count", "6",
    ]  # fmt: skip

    def feed() -> None:  # while the CLI runs in the main thread (it installs signal handlers)
        # the CLI has subscribed when the broker logs it
        assert wait_until(lambda: "edge-stn/+/cam/cam0/result" in mosquitto.log(), 15)
        topic = "edge-stn/gw1/cam/cam0/result"
        pub.publish(topic, b"{not json")
        pub.publish(topic, b'{"id": "x"}')
        for seq in (0, 1):
            pub.publish(*result_payload(seq, labels=("7", "3")))
        pub.publish(*result_payload(2, labels=("3",)))  # shown nowhere: no 7
        pub.publish(*result_payload(5))  # seq 3 and 4 missing
        pub.publish(*result_payload(5))  # a duplicate
        pub.publish(*result_payload(0, camera="cam1"))  # another camera: not subscribed
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("result_id", "cam0x000001"), ("label", "7"), ("score", "0.9")]
        pub.publish("edge-stn/gw1/cam/cam0/crop/cam0x000001/0", b"\xff\xd8jpeg", props)
        pub.publish("edge-stn/gw1/cam/cam0/crop/cam0x000001/1", b"\xff\xd8jpeg")  # label 3
        pub.publish(*result_payload(6))
        pub.publish(*result_payload(7))

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        rc = main(args)
    finally:
        feeder.join(30)
        pub.close()
    assert rc == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["seq"] for d in lines] == [0, 1, 5, 6, 7], "label 7 only, no duplicate"
    assert {d["camera"] for d in lines} == {"cam0"}
    assert re.search(r"malformed result on edge-stn/gw1/cam/cam0/result: not JSON", err)
    assert "'seq' must be an integer" in err or "'device' missing" in err
    assert "gap in gw1/cam0 epoch 00112233aabbccdd: seq 3-4 missing (2 result(s))" in err
    assert "duplicate result cam0x000005" in err
    assert "summary: results 9 received, 6 unique, 1 duplicates, 2 malformed, 5 shown" in err
    assert "summary: seq gaps 1, missing 2 in 1 stream(s)" in err
    saved = sorted(p.name for p in crops.iterdir())
    assert saved == ["20260101T000000.066Z_7_cam0x000001_0.jpg"]


def test_subscribe_cli_table_and_bad_arguments(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["subscribe", "--device", "a/b"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["subscribe", "--share", "g/1"]) == 2
    assert "--share" in capsys.readouterr().err
    assert main(["subscribe", "--port", "0"]) == 2
    assert (
        main(
            [
                "subscribe",
                "--port",
                str(mosquitto.port),
                "--host",
                mosquitto.host,
                "--seconds",
                "0.5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "summary: results 0 received" in out and "seq gaps 0, missing 0" in out


def test_a_persistent_session_gets_what_came_while_it_was_away(mosquitto: Mosquitto) -> None:
    first = consumer(mosquitto, session="ops-1", session_expiry_s=600)
    first.close()
    pub = RawPublisher(mosquitto)
    try:
        for seq in range(10):
            pub.publish(*result_payload(seq))
        pub.wait()
    finally:
        pub.close()
    back = consumer(mosquitto, session="ops-1")
    try:
        assert wait_until(lambda: back.tracker.unique == 10, 10)
        assert sorted(d["seq"] for d in back.docs) == list(range(10))
    finally:
        back.close()
    transient = consumer(mosquitto)  # no session: nothing kept for it
    try:
        time.sleep(0.3)
        assert transient.tracker.unique == 0
    finally:
        transient.close()


def test_a_shared_subscription_splits_the_stream_across_its_members(mosquitto: Mosquitto) -> None:
    members = [consumer(mosquitto, share="workers") for _ in range(2)]
    pub = RawPublisher(mosquitto)
    try:
        for seq in range(40):
            pub.publish(*result_payload(seq))
        pub.wait()
        assert wait_until(lambda: sum(m.tracker.unique for m in members) == 40, 10)
    finally:
        pub.close()
        for m in members:
            m.close()
    seqs = [sorted(d["seq"] for d in m.docs) for m in members]
    assert all(seqs), "each member got a part"
    assert sorted(seqs[0] + seqs[1]) == list(range(40)), "together: all, once"
    assert all("gap" not in m.err.getvalue() for m in members)  # type: ignore[attr-defined]


def test_a_refused_connection_is_one_clear_line_and_exit_2(
    mosquitto_factory: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = mosquitto_factory(users={"ops": "right"}).start()
    monkeypatch.setenv("EDGE_STN_MQTT_PASSWORD", "wrong")
    args = ["subscribe", "--host", broker.host, "--port", str(broker.port), "--username", "ops"]
    assert main([*args, "--seconds", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"edge-stn: error: broker {broker.host}:{broker.port} refused the connection: "
        "Not authorized"
    )
    monkeypatch.setenv("EDGE_STN_MQTT_PASSWORD", "right")
    assert main([*args, "--seconds", "0.5"]) == 0


def test_track_announcements_and_result_schema_versions(mosquitto: Mosquitto) -> None:
    c = consumer(mosquitto)
    pub = RawPublisher(mosquitto)
    try:
        topic, payload = result_payload(0)
        v1 = json.loads(payload)
        v1["schema_version"] = 1  # a daemon before tracking: read as before
        pub.publish(topic, encode(v1))
        pub.publish(*result_payload(1))  # version 2
        v3 = json.loads(result_payload(2)[1])
        v3["schema_version"] = 3
        v3["new_field"] = True  # a later version: read as far as it goes, one warning
        pub.publish(topic, encode(v3))
        track = {
            "schema_version": 1, "device": "gw1", "camera": "cam0", "epoch": EPOCH,
            "track_id": 4, "ts": 1.0, "reason": "ended", "result_id": "cam0x000001", "n": 0,
            "frame_index": 1, "label": "7", "score": 0.9, "box": [0, 0, 1, 1],
            "crop": None, "crop_status": "policy", "first_frame_index": 0,
            "last_frame_index": 2, "first_ts": 1.0, "last_ts": 2.0, "hits": 3,
            "labels": {"7": 3},
        }  # fmt: skip
        pub.publish("edge-stn/gw1/cam/cam0/track", encode(track))
        pub.publish("edge-stn/gw1/cam/cam0/track", b'{"track_id": "x"}')
        pub.wait()
        assert wait_until(lambda: c.summary_now().tracks == 1 and len(c.docs) == 3, 10)
        assert wait_until(lambda: c.summary_now().malformed == 1, 10)
    finally:
        pub.close()
        c.close()
    assert [d["seq"] for d in c.docs] == [0, 1, 2]
    assert c.track_docs == [track]
    err = c.err.getvalue()  # type: ignore[attr-defined]
    assert err.count("schema_version 3 is not one this subscriber knows") == 1
    assert "schema_version 1 " not in err and "schema_version 2 " not in err
    assert "malformed track announcement" in err
    out = c.out.getvalue()  # type: ignore[attr-defined]
    assert "# track gw1/cam0 4 (ended): 7(0.90) 3 hits, frames 0-2" in out
