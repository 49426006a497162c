"""The sender's hand-over of committed rows to paho (issue 6), with a real mosquitto on loopback:
the rows a commit stored go to paho from memory, exactly as committed, in order, and never before
they are on disk; rows the sender does not hold (a backlog beyond what it keeps, rows left by a
process that died between commit and hand-over) are read back from the outbox. Also the
properties packed once and paho's log formatted only when it is written."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import Mosquitto, Received, Subscriber, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tcp_proxy import FaultProxy
from test_publish import FAST, device_info, frame_result, jpeg, mqtt_config, noise_crop

from edge_stn.config import MqttConfig
from edge_stn.publish import client as client_module
from edge_stn.publish.client import MqttPublisher, PackedProperties, PublishedResult
from edge_stn.publish.outbox import Outbox, StoredMessage, WriteReport

ROOT = Path(__file__).resolve().parents[1]
ROWS = "edge-stn/gw1/cam/#"


def expected_topics(published: list[PublishedResult | None]) -> list[str]:
    """The rows of these results in the order they were stored: each result, then its crops."""
    return [t for p in published if p is not None for t in (p.topic, *p.crop_topics)]


def rows_of(sub: Subscriber, n: int) -> list[Received]:
    got = sub.wait_for(lambda m: "/cam/" in m.topic, n, timeout=20)
    assert len(got) == n, f"{len(got)} of {n} rows arrived"
    return got


class OutboxSpy:
    """Records what the publisher's outbox committed (``write``) and read back (``read``)."""

    def __init__(self, outbox: Outbox) -> None:
        self.committed: list[StoredMessage] = []
        self.read_back: list[StoredMessage] = []
        self.reshaped = 0
        write, read = outbox.write, outbox.read

        def spy_write(*args: Any, **kw: Any) -> WriteReport:
            report = write(*args, **kw)
            self.committed += report.stored
            self.reshaped += report.reshaped
            return report

        def spy_read(*args: Any, **kw: Any) -> list[StoredMessage]:
            rows = read(*args, **kw)
            self.read_back += rows
            return rows

        outbox.write = spy_write  # type: ignore[method-assign]
        outbox.read = spy_read  # type: ignore[method-assign]


def test_committed_rows_go_to_paho_from_memory_in_order_and_on_disk_first(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = tmp_path / "ob.sqlite"
    outbox = Outbox(path)
    spy = OutboxSpy(outbox)
    pub = MqttPublisher(mqtt_config(mosquitto), device_info(), limits=FAST, outbox=outbox)
    # what paho is given must already be in the database: looked up there, by another
    # connection, at the moment the sender calls publish()
    disk = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    not_on_disk: list[str] = []
    paho_publish = pub._client.publish

    def publish(topic: str, payload: Any = None, *args: Any, **kw: Any) -> Any:
        if "/cam/" in topic:
            found = disk.execute(
                "SELECT count(*) FROM message WHERE topic = ? AND payload = ?", (topic, payload)
            ).fetchone()[0]
            if found != 1:
                not_on_disk.append(topic)
        return paho_publish(topic, payload, *args, **kw)

    pub._client.publish = publish  # type: ignore[method-assign]
    sub = Subscriber(mosquitto, [ROWS])
    try:
        pub.start()
        assert pub.wait_connected(10)
        published = [
            # batches of three, as a detector's: one commit each
            pub.publish_result(frame_result(index=i, n=3), [jpeg()] * 3, flush=i % 3 == 2)
            for i in range(30)
        ]
        got = rows_of(sub, 30 * 4)
        assert [m.topic for m in got] == expected_topics(published), "in the order stored"
        assert [m.topic for m in got] == [m.topic for m in spy.committed]
        assert [m.payload for m in got] == [m.payload for m in spy.committed]
        results = [m.payload for m in got if m.topic.endswith("/result")]
        assert results == [p.payload for p in published if p is not None]
        assert {m.payload for m in got if "/crop/" in m.topic} == {jpeg().data}
        assert not_on_disk == [], "handed to paho before it was committed"
        assert spy.read_back == [], "every row went from memory"
        assert wait_until(lambda: pub.counters().pending == 0, 10)
    finally:
        pub.stop(timeout=2.0)
        sub.close()
        disk.close()


def test_rows_beyond_what_is_held_are_read_back_after_a_reconnect(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "HELD_ROWS", 5)
    proxy = FaultProxy(mosquitto.port).start()
    proxy.cut()  # the broker is out of reach: everything waits in the outbox
    outbox = Outbox(tmp_path / "ob.sqlite")
    spy = OutboxSpy(outbox)
    cfg = MqttConfig(host="127.0.0.1", port=proxy.port)
    pub = MqttPublisher(cfg, device_info(), limits=FAST, outbox=outbox)
    sub = Subscriber(mosquitto, [ROWS])
    try:
        pub.start()
        published = [pub.publish_result(frame_result(index=i), [jpeg()] * 2) for i in range(8)]
        assert wait_until(lambda: pub.counters().results.queued == 8, 10)
        assert len(spy.committed) == 24 and not pub.connected
        proxy.restore()
        assert pub.wait_connected(15)
        got = rows_of(sub, 24)
        assert [m.topic for m in got] == expected_topics(published)
        assert [m.payload for m in got] == [m.payload for m in spy.committed]
        # the newest five were held; the others came from the database, oldest first
        assert [m.row for m in spy.read_back] == [m.row for m in spy.committed[:-5]]
        assert spy.read_back == spy.committed[:-5], "read back as they were committed"
        assert wait_until(lambda: pub.counters().pending == 0, 10)
    finally:
        pub.stop(timeout=2.0)
        sub.close()
        proxy.close()


def test_rows_the_budget_rewrote_are_read_back_not_sent_as_held(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # a shed crop rewrites its result (crop: null, crop_status: shed): the copy held since the
    # commit says "sent", so only the database's may go out
    proxy = FaultProxy(mosquitto.port).start()
    proxy.cut()
    outbox = Outbox(tmp_path / "ob.sqlite", max_bytes=512 * 1024)
    spy = OutboxSpy(outbox)
    pub = MqttPublisher(
        MqttConfig(host="127.0.0.1", port=proxy.port), device_info(), limits=FAST, outbox=outbox
    )
    sub = Subscriber(mosquitto, [ROWS])
    try:
        pub.start()
        for i in range(1000):  # crops to their share of the budget, then results past it
            pub.publish_result(frame_result(index=i), [noise_crop(6000, i)] * 2)
            assert wait_until(lambda i=i: pub.counters().results.queued == i + 1, 10)
            if spy.reshaped:
                break
        assert spy.reshaped, "the budget never shed a stored crop"
        held = {
            json.loads(m.payload)["id"]: json.loads(m.payload)
            for m in spy.committed
            if m.kind == "result"
        }
        proxy.restore()
        assert pub.wait_connected(15)
        assert wait_until(lambda: pub.counters().pending == 0, 20)
        got = sub.on(lambda m: "/cam/" in m.topic)
        docs = [json.loads(m.payload) for m in got if m.topic.endswith("/result")]
        crops = {m.topic for m in got if "/crop/" in m.topic}
        for d in docs:
            for det in d["detections"]:
                assert (det["crop_status"] == "sent") == (det["crop"] is not None)
                if det["crop"] is not None:
                    assert det["crop"]["topic"] in crops, "a result names a crop that was shed"
        rewritten = [d for d in docs if d != held.get(d["id"], d)]  # the last write: none
        assert rewritten, "no result rewritten by the budget was sent"
        for d in rewritten:  # only crops changed: from sent to shed
            for det, was in zip(d["detections"], held[d["id"]]["detections"], strict=True):
                if det != was:
                    assert (was["crop_status"], det["crop_status"], det["crop"]) == (
                        "sent",
                        "shed",
                        None,
                    )
                    assert {**det, "crop": 0, "crop_status": 0} == {
                        **was,
                        "crop": 0,
                        "crop_status": 0,
                    }
    finally:
        pub.stop(timeout=2.0)
        sub.close()
        proxy.close()


CRASH = textwrap.dedent(
    """
    import os, signal, sys, time
    from edge_stn.config import MqttConfig
    from edge_stn.publish import client
    from edge_stn.publish.outbox import Outbox
    from test_publish import FAST, device_info, frame_result, jpeg

    hold = client.MqttPublisher._hold

    def die_after_commit(self, report):
        rows = hold(self, report)
        if report.stored:  # committed and in memory, not handed to paho yet
            print(len(report.stored), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return rows

    client.MqttPublisher._hold = die_after_commit
    cfg = MqttConfig(host="127.0.0.1", port=int(sys.argv[2]))
    pub = client.MqttPublisher(cfg, device_info(), limits=FAST, outbox=Outbox(sys.argv[1]))
    pub.start()
    assert pub.wait_connected(10)
    for i in range(3):
        pub.publish_result(frame_result(index=i), [jpeg(), jpeg()], flush=i == 2)
    time.sleep(30)
    """
)


def test_a_crash_between_commit_and_hand_over_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = tmp_path / "ob.sqlite"
    sub = Subscriber(mosquitto, [ROWS])
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        proc = subprocess.run(
            [sys.executable, "-c", CRASH, str(path), str(mosquitto.port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert proc.stdout.strip() == "9", "one commit of 3 results with 2 crops each"
        assert sub.on(lambda m: "/cam/" in m.topic) == [], "it died before the hand-over"
        report = Outbox.inspect(path)
        assert report.produced == 3 and report.rows == {"result": 3, "crop": 6, "track": 0}
        pub = MqttPublisher(mqtt_config(mosquitto), device_info(), limits=FAST, outbox=Outbox(path))
        try:
            pub.start()
            got = rows_of(sub, 9)
        finally:
            pub.stop(timeout=2.0)
        docs = [json.loads(m.payload) for m in got if m.topic.endswith("/result")]
        assert [d["seq"] for d in docs] == [0, 1, 2]
        assert {d["epoch"] for d in docs} == {report.epoch}
        dets = [det for d in docs for det in d["detections"]]
        assert [m.topic for m in got if "/crop/" in m.topic] == [d["crop"]["topic"] for d in dets]
        assert Outbox.inspect(path).rows == {"result": 0, "crop": 0, "track": 0}
    finally:
        sub.close()


def test_packed_properties_are_paho_s_bytes() -> None:
    props = client_module._props(PacketTypes.PUBLISH, "image/jpeg", json=False)
    user = (("result_id", "ab" * 16), ("label", "7"), ("score", "0.9123"), ("n", "é"))
    crop = props.with_user(user)
    assert crop.UserProperty == list(user) and not hasattr(props, "UserProperty")
    assert crop.pack() == Properties.pack(crop), "what paho would pack from the attributes"
    decoded, _ = Properties(PacketTypes.PUBLISH).unpack(crop.pack())
    assert decoded.UserProperty == list(user) and decoded.ContentType == "image/jpeg"
    more = crop.with_user((("track_id", "3"),))
    assert more.pack() == Properties.pack(more) and len(more.UserProperty) == 5
    json_props = client_module._props(PacketTypes.PUBLISH, "application/json", json=True)
    assert json_props.pack() is json_props.pack(), "packed once"
    assert json_props.pack() == Properties.pack(json_props)
    reply = PackedProperties(PacketTypes.PUBLISH)
    reply.ContentType = "application/json"
    reply.pack()
    reply.CorrelationData = b"ticket"  # a change drops the packed form
    assert reply.pack() == Properties.pack(reply) and b"ticket" in reply.pack()


def test_paho_lines_are_formatted_only_when_written_and_callback_bugs_are_errors(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    formatted: list[int] = []
    to_text = Properties.__str__
    monkeypatch.setattr(Properties, "__str__", lambda p: formatted.append(1) or to_text(p))

    def broken_sink(msg: Any) -> None:
        raise RuntimeError("a bug in the command sink")

    pub = MqttPublisher(mqtt_config(mosquitto), device_info(), limits=FAST)
    pub.listen_commands("edge-stn/gw1/cmd/#", broken_sink)
    sub = Subscriber(mosquitto, [ROWS])
    with caplog.at_level(logging.INFO, logger="edge_stn.publish.client"):
        try:
            pub.start()
            assert pub.wait_connected(10)
            assert wait_until(lambda: pub.counters().status.acked >= 1, 10)
            pub.publish_result(frame_result(index=0), [jpeg(), jpeg()])
            rows_of(sub, 3)
            sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
            sender.connect(mosquitto.host, mosquitto.port)
            sender.loop_start()
            sender.publish("edge-stn/gw1/cmd/ping", b"{}", qos=1).wait_for_publish(5)
            sender.loop_stop()
            sender.disconnect()
            assert wait_until(
                lambda: any("a bug in the command sink" in r.getMessage() for r in caplog.records),
                10,
            )
        finally:
            pub.stop(timeout=2.0)
            sub.close()
    errors = [r for r in caplog.records if "Caught exception" in r.getMessage()]
    assert errors and all(r.levelno == logging.ERROR for r in errors)
    assert errors[0].getMessage().startswith("MQTT: Caught exception in on_message")
    assert not [r for r in caplog.records if r.getMessage().startswith("paho:")]
    assert formatted == [], "paho formatted properties for a line nobody reads"
