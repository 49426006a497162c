"""The shipped broker config (deploy/mosquitto/mosquitto.conf) on a real mosquitto: it starts,
and a consumer's persistent session with its queued messages, and the retained status, survive
the broker being killed with SIGKILL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from mqtt_broker import SHIPPED_CONFIG, Mosquitto, Subscriber, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class SessionClient:
    """A v5 client with a persistent session (clean_start false, one hour of expiry)."""

    def __init__(self, broker: Mosquitto, client_id: str, topic: str | None = None) -> None:
        self.received: list[bytes] = []
        self.session_present: bool | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._ready.set()
        self._topic = topic
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(
            broker.host, broker.port, keepalive=30, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self._ready.wait(10), broker.log()

    def _on_connect(self, client: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        if self._topic is not None:
            client.subscribe(self._topic, qos=1)
        else:
            self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append(bytes(msg.payload))

    def messages(self) -> list[bytes]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_shipped_config_keeps_sessions_queues_and_retained_across_sigkill(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    text = SHIPPED_CONFIG.read_text()
    for needed in ("persistence true", "autosave_on_changes true", "max_queued_messages"):
        assert needed in text
    broker = mosquitto_factory(shipped=True).start()
    consumer = SessionClient(broker, "consumer-1", "edge-stn/+/cam/+/result")
    consumer.close()  # away: the broker queues for its session

    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    acked: list[int] = []
    publisher.on_publish = lambda c, u, mid, rc, p: acked.append(mid)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    try:
        publisher.publish("edge-stn/gw1/status", b"online", qos=1, retain=True)
        for i in range(20):
            publisher.publish("edge-stn/gw1/cam/cam0/result", f"r{i}".encode(), qos=1)
        assert wait_until(lambda: len(acked) == 21, 10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    # saved on changes: the database holds the last queued message (no timer to wait for)
    assert wait_until(lambda: broker.db_path.exists() and b"r19" in broker.db_path.read_bytes(), 5)
    broker.stop(kill=True)
    broker.start()

    back = SessionClient(broker, "consumer-1")
    try:
        assert back.session_present, "the session survived the kill"
        assert wait_until(lambda: len(back.messages()) == 20, 10)
        assert back.messages() == [f"r{i}".encode() for i in range(20)]
    finally:
        back.close()
    late = Subscriber(broker, ["edge-stn/+/status"])
    try:
        retained = late.wait_for(lambda m: m.retain)
        assert [m.payload for m in retained] == [b"online"]
    finally:
        late.close()
