"""The MQTT publisher: paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) on its own network thread.

What it guarantees, and how:

* **Connected means accepted.** ``on_connect`` checks the CONNACK reason code: a refusal (bad
  user name or password, not authorized, ...) is logged as an error naming the likely fix and
  counted, the publisher stays *not connected*, and paho keeps retrying with capped exponential
  backoff (``reconnect_delay_set``). Only an accepted connect publishes the retained ``online``
  status (again after every reconnect, so a broker restarted without persistence learns it).
* **Presence.** The Last Will is the retained ``offline`` document (reason ``lost``) at QoS 1;
  :meth:`MqttPublisher.stop` publishes ``offline`` (reason ``stop``) itself, waits for its
  PUBACK, disconnects (which discards the will) and gives the network thread a bounded time to
  end.
* **Bounded memory, never blocking forever.** Every QoS 1 message handed to paho is *pending*
  until its PUBACK. Pending messages are bounded in count and bytes; a result waits at most
  ``timeout`` seconds for room and is then dropped (counted, no ``seq`` consumed); crops are
  admitted only below 75 % of the bounds, so they are shed (``crop_status: shed``) before any
  result is dropped. paho's in-flight window is bounded too (``max_inflight_messages_set``).
* **Every loss counted.** Per kind (result, crop, status, stats): published (handed to paho),
  acked, refused (MQTT v5 PUBACK reason code >= 0x80: ACL denial, quota, size) and dropped.

The pending map is keyed by paho's message id under one lock that ``on_publish`` shares. paho
calls ``on_publish`` while holding its own message lock, and can do so before ``publish()``
returns; so the publishing thread never holds our lock while calling into paho (no lock-order
inversion), and an acknowledgement that arrives before its message is registered waits in a
small map of early acks, stamped so that a stale entry can never settle a later message that
reuses the id. This map is where the durable outbox (SQLite) of the delivery issue slots in: a
row id per pending message, deleted on PUBACK, dead-lettered on a refusal (:meth:`_settle`).

Until then ``epoch`` is chosen per process and ``seq`` counts in memory: a restart starts a new
epoch, and messages still pending at exit are lost (counted and logged by :meth:`stop`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_stn import __version__
from edge_stn.config import DaemonConfig, MqttConfig, config_hash
from edge_stn.errors import ConfigError
from edge_stn.publish.payloads import (
    DeviceInfo,
    ModelInfo,
    encode,
    new_epoch,
    new_result_id,
    result_document,
    status_offline,
    status_online,
)
from edge_stn.publish.topics import TopicTree
from edge_stn.records import CropRef, Detection, FrameResult

logger = logging.getLogger(__name__)

MessageKind = Literal["result", "crop", "status", "stats"]
MESSAGE_KINDS: tuple[MessageKind, ...] = ("result", "crop", "status", "stats")

CROP_SHARE = 0.75
"""Crops are admitted only while the pending messages stay below this share of the bounds."""

EARLY_ACK_TTL_S = 30.0

# CONNACK reason codes (paho maps 3.1.1 return codes onto these v5 values) -> what to check.
_CONNACK_HINTS = {
    0x84: "the broker does not speak this MQTT version: set mqtt.protocol",
    0x85: "the broker rejected the client id: check mqtt.client_id",
    0x86: "check mqtt.username and mqtt.password",
    0x87: "check mqtt.username and mqtt.password (mosquitto answers a wrong password so) "
    "and the broker's ACL",
    0x88: "the broker is unavailable",
    0x8A: "this client is banned by the broker",
    0x8C: "check the authentication method the broker expects",
}


class JpegCrop(Protocol):
    """A detection's encoded crop: :class:`edge_stn.detect.crops.EncodedCrop` fits.
    ``data`` None means the crop was over the size limit (``crop_status: policy``)."""

    @property
    def data(self) -> bytes | None: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


@dataclass(frozen=True)
class PublisherLimits:
    """Bounds of the publisher (DESIGN §7 wants every queue bounded)."""

    max_inflight: int = 20
    """QoS 1 messages on the wire awaiting PUBACK (paho's window); the rest wait in paho."""
    max_pending: int = 1000
    """messages handed to paho and not yet acknowledged (results, crops, status)."""
    max_pending_bytes: int = 32 * 1024 * 1024
    publish_timeout_s: float = 1.0
    """how long :meth:`MqttPublisher.publish_result` waits for room before dropping."""
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_pending < 2 or self.max_pending_bytes < 1024:
            raise ValueError(f"publisher limits too small: {self}")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                f"need 1 <= reconnect_min_s <= reconnect_max_s, got "
                f"{self.reconnect_min_s}, {self.reconnect_max_s}"
            )


@dataclass
class DeliveryCounts:
    published: int = 0
    acked: int = 0
    refused: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class PublisherCounters:
    """A snapshot of the publisher's state and counters (the ``mqtt`` part of stats)."""

    connected: bool
    connects: int
    reconnects: int
    connect_refusals: int
    connect_failures: int
    pending: int
    pending_bytes: int
    last_error: str | None
    results: DeliveryCounts
    crops: DeliveryCounts
    status: DeliveryCounts
    stats: DeliveryCounts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedResult:
    """A result handed to MQTT: its identity, topic and the crops sent with it."""

    id: str
    epoch: str
    seq: int
    topic: str
    capture_ts: float
    publish_ts: float
    detections: tuple[Detection, ...]
    crop_topics: tuple[str, ...]
    payload: bytes

    @property
    def publish_ms(self) -> float:
        """``publish_ts - capture_ts`` in milliseconds (DESIGN §7)."""
        return (self.publish_ts - self.capture_ts) * 1000.0


@dataclass
class _Pending:
    kind: MessageKind
    topic: str
    size: int
    key: str
    handed_at: float = field(default_factory=time.monotonic)


def _reason_text(rc: ReasonCode) -> str:
    return f"{rc.getName()} (0x{rc.value:02x})"


def disable_nagle(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off on the broker connection (paho leaves it on): with it, a
    small message sent while an earlier one still awaits the broker's delayed TCP ACK (up to
    40 ms) is held back, and a QoS 0 ``stats`` message, which gets no PUBACK, delayed the results
    after it by up to 40 ms (docs/benchmarks.md)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a proxy or websocket wrapper)
        logger.debug("MQTT: could not set TCP_NODELAY on %r", sock)


class MqttPublisher:
    """Publishes a device's status, results, crops and stats to one broker (DESIGN §6).

    Use: ``start()``, then ``publish_result()`` per processed frame and ``publish_stats()``
    per interval, from one thread; ``stop()`` at the end. The network runs on paho's thread.
    """

    def __init__(
        self,
        mqtt_config: MqttConfig,
        info: DeviceInfo,
        *,
        client_id: str | None = None,
        limits: PublisherLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = mqtt_config
        self.info = info
        self.limits = limits or PublisherLimits()
        self.topics = TopicTree(mqtt_config.topic_prefix, info.device)
        self.client_id = client_id or mqtt_config.client_id or f"edge-stn-{info.device}"
        self._clock = clock
        self._v5 = mqtt_config.protocol == "v5"

        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._pending: dict[int, _Pending] = {}
        self._pending_bytes = 0
        self._early: dict[int, tuple[float, ReasonCode]] = {}
        self._reserved = 0
        self._counts = {kind: DeliveryCounts() for kind in MESSAGE_KINDS}
        self._seq: dict[str, int] = {}
        self._connects = 0
        self._refusals = 0
        self._failures = 0
        self._failure_streak = 0
        self._refused_attempt = False
        self._last_error: str | None = None
        self._connected = threading.Event()
        self._started = False
        self._stopping = False
        self._stopped = False

        self._client = self._make_client()

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        cfg: DaemonConfig,
        model: ModelInfo,
        *,
        epoch: str | None = None,
        started_at: float | None = None,
        limits: PublisherLimits | None = None,
    ) -> MqttPublisher:
        """The daemon's publisher: device, client id, prefix and broker from the config."""
        info = DeviceInfo(
            device=cfg.device_id,
            version=__version__,
            model=model,
            config_hash=config_hash(cfg),
            epoch=epoch or new_epoch(),
            started_at=time.time() if started_at is None else started_at,
            cameras=tuple(c.id for c in cfg.cameras),
        )
        return cls(cfg.mqtt, info, client_id=cfg.client_id, limits=limits)

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        # paho logs every failed retry as an error; our callbacks say what matters, once.
        client.on_log = self._on_log
        # An exception in a callback is logged, never allowed to end the network thread.
        client.suppress_exceptions = True
        client.max_inflight_messages_set(self.limits.max_inflight)
        # A safety net: our own bound (max_pending) is reached first; status messages bypass it.
        client.max_queued_messages_set(self.limits.max_pending + 64)
        client.reconnect_delay_set(self.limits.reconnect_min_s, self.limits.reconnect_max_s)
        client.connect_timeout = self.limits.connect_timeout_s
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, password)
        elif cfg.password is not None:  # v5 allows a password alone
            client.username_pw_set(None, cfg.password.get_secret_value())
        if cfg.tls is not None:
            self._set_tls(client)
        will = encode(status_offline(self.info, "lost", None))
        client.will_set(
            self.topics.status, will, qos=1, retain=True, properties=self._json_props(will=True)
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = disable_nagle
        return client

    def _set_tls(self, client: mqtt.Client) -> None:
        tls = self.config.tls
        assert tls is not None
        for name in ("ca_file", "cert_file", "key_file"):
            f = getattr(tls, name)
            if f is not None and not f.is_file():
                raise ConfigError(f"no such file: {f}", key=f"mqtt.tls.{name}")
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot set up TLS: {exc}", key="mqtt.tls") from None
        client.tls_insecure_set(tls.insecure)

    def _json_props(self, *, will: bool = False) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
        props.PayloadFormatIndicator = 1
        props.ContentType = "application/json"
        return props

    def _crop_props(self, result_id: str, det: Detection) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "image/jpeg"
        props.UserProperty = [
            ("result_id", result_id),
            ("label", det.label),
            ("score", f"{det.score:.4f}"),
        ]
        return props

    # ------------------------------------------------------------ life cycle

    @property
    def epoch(self) -> str:
        return self.info.epoch

    @property
    def connected(self) -> bool:
        """True between an *accepted* CONNACK and the next disconnect."""
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    def start(self) -> None:
        """Connect in the background; returns at once (the broker may be down: paho retries)."""
        if self._started:
            raise RuntimeError("the publisher was already started")
        self._started = True
        logger.info(
            "MQTT: connecting to %s as %s (MQTT %s%s)",
            self.config.broker,
            self.client_id,
            "5" if self._v5 else "3.1.1",
            ", TLS" if self.config.tls is not None else "",
        )
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an accepted connection."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Publish ``offline`` (retained), disconnect, end the network thread: within ``timeout``.

        Pending results get up to half the time to be acknowledged first; whatever is still
        pending at the end is lost (in memory only) and logged with its count.
        """
        if self._stopped:
            return
        self._stopped = True
        timeout = self.limits.stop_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._started:
            return
        if self.connected:
            self._wait_pending(lambda: not self._pending, deadline - timeout / 2)
        with self._lock:
            self._stopping = True
        if self.connected:
            doc = encode(status_offline(self.info, "stop", self._clock()))
            mid = self._hand("status", self.topics.status, doc, True, self._json_props(), "offline")
            if mid is not None:
                self._wait_pending(lambda: mid not in self._pending, deadline - 0.5)
        self._client.disconnect()
        stopper = threading.Thread(
            target=self._client.loop_stop, name="edge-stn.mqtt-stop", daemon=True
        )
        stopper.start()
        stopper.join(max(0.1, deadline - time.monotonic()))
        if stopper.is_alive():
            logger.warning("MQTT: the network thread did not end within %.1f s; abandoned", timeout)
        self._connected.clear()
        with self._lock:
            lost = dict.fromkeys(MESSAGE_KINDS, 0)
            for p in self._pending.values():
                lost[p.kind] += 1
        if lost["result"] or lost["crop"]:
            logger.warning(
                "MQTT: stopped with %d results and %d crops not acknowledged by the broker",
                lost["result"],
                lost["crop"],
            )
        logger.info("MQTT: stopped")

    def _wait_pending(self, done: Callable[[], bool], until: float) -> bool:
        with self._room:
            while not done():
                left = until - time.monotonic()
                if left <= 0 or not self.connected:
                    return False
                self._room.wait(min(left, 0.1))
        return True

    # ------------------------------------------------------------ publishing

    def publish_result(
        self,
        result: FrameResult,
        crops: Sequence[JpegCrop | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> PublishedResult | None:
        """Publish one frame's result (QoS 1) and its crops (QoS 1, MQTT v5 user properties).

        ``crops`` (one per detection, or None for none at all): a crop with ``data`` is sent
        when there is room (``crop_status: sent`` and ``crop`` names its topic), else shed
        (``shed``); a crop whose ``data`` is None was over the size limit (``policy``); a None
        entry keeps the detection's own ``crop_status`` (``off`` when crops are disabled).
        Waits at most ``timeout`` seconds (default ``limits.publish_timeout_s``) for room;
        returns None when the result was dropped (counted; no ``seq`` is used).
        """
        if crops is not None and len(crops) != len(result.detections):
            raise ValueError(
                f"{len(crops)} crops given for {len(result.detections)} detections "
                f"(camera {result.camera_id}, frame {result.frame_index})"
            )
        timeout = self.limits.publish_timeout_s if timeout is None else timeout
        if self._stopped or not self._reserve_result(timeout):
            with self._lock:
                self._counts["result"].dropped += 1
            return None
        try:
            return self._publish_reserved(result, crops)
        finally:
            with self._room:
                self._reserved -= 1

    def _reserve_result(self, timeout: float) -> bool:
        until = time.monotonic() + max(0.0, timeout)
        lim = self.limits
        with self._room:
            while (
                len(self._pending) + self._reserved >= lim.max_pending
                or self._pending_bytes >= lim.max_pending_bytes
            ):
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._room.wait(left)
            self._reserved += 1
        return True

    def _crop_room(self, planned: int, planned_bytes: int) -> bool:
        """Room for ``planned`` crops of ``planned_bytes`` (this result's so far, this one
        included) below the crops' share of the bounds."""
        lim = self.limits
        with self._lock:
            return (
                len(self._pending) + self._reserved + planned <= CROP_SHARE * lim.max_pending
                and self._pending_bytes + planned_bytes <= CROP_SHARE * lim.max_pending_bytes
            )

    def _publish_reserved(
        self, result: FrameResult, crops: Sequence[JpegCrop | None] | None
    ) -> PublishedResult | None:
        rid = new_result_id()
        cam = result.camera_id
        dets = list(result.detections)
        to_send: list[tuple[int, str, bytes]] = []
        shed = planned_bytes = 0
        for n, crop in enumerate(crops or ()):
            if crop is None:
                continue
            if crop.data is None:
                dets[n] = replace(dets[n], crop=None, crop_status="policy")
            elif self._crop_room(len(to_send) + 1, planned_bytes + len(crop.data)):
                planned_bytes += len(crop.data)
                topic = self.topics.crop(cam, rid, n)
                ref = CropRef(topic=topic, width=crop.width, height=crop.height)
                dets[n] = replace(dets[n], crop=ref, crop_status="sent")
                to_send.append((n, topic, crop.data))
            else:
                dets[n] = replace(dets[n], crop=None, crop_status="shed")
                shed += 1
        with self._lock:
            seq = self._seq.get(cam, 0)
            self._seq[cam] = seq + 1
            self._counts["crop"].dropped += shed
        publish_ts = self._clock()
        doc = result_document(
            result,
            result_id=rid,
            device=self.info.device,
            epoch=self.info.epoch,
            seq=seq,
            publish_ts=publish_ts,
            model=self.info.model,
            detections=dets,
        )
        payload = encode(doc)
        topic = self.topics.result(cam)
        if self._hand("result", topic, payload, False, self._json_props(), rid) is None:
            with self._lock:  # counted: the result as dropped (its seq is a gap), crops too
                self._counts["crop"].dropped += len(to_send)
            return None
        for n, crop_topic, data in to_send:
            props = self._crop_props(rid, dets[n])
            self._hand("crop", crop_topic, data, False, props, f"{rid}/{n}")
        return PublishedResult(
            id=rid,
            epoch=self.info.epoch,
            seq=seq,
            topic=topic,
            capture_ts=result.capture_ts,
            publish_ts=publish_ts,
            detections=tuple(dets),
            crop_topics=tuple(t for _, t, _ in to_send),
            payload=payload,
        )

    def publish_stats(self, doc: dict[str, Any]) -> bool:
        """Publish a stats document (QoS 0, not retained); False (counted as dropped) when not
        connected."""
        payload = encode(doc)
        sent = False
        if self.connected and not self._stopped:
            try:
                info = self._client.publish(
                    self.topics.stats, payload, qos=0, properties=self._json_props()
                )
                sent = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            except ValueError as exc:
                logger.error("MQTT: cannot publish stats: %s", exc)
        with self._lock:
            if sent:
                self._counts["stats"].published += 1
            else:
                self._counts["stats"].dropped += 1
        return sent

    def _hand(
        self,
        kind: MessageKind,
        topic: str,
        payload: bytes,
        retain: bool,
        props: Properties | None,
        key: str,
    ) -> int | None:
        """Give one QoS 1 message to paho and track it until its PUBACK; the message id, or
        None when paho would not take it (counted as dropped). Never holds our lock while
        calling paho (see the module docstring)."""
        handed_at = time.monotonic()
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        except ValueError as exc:  # an invalid topic, a payload over 256 MiB: a bug upstream
            logger.error("MQTT: cannot publish %s on %s: %s", kind, topic, exc)
            with self._lock:
                self._counts[kind].dropped += 1
            return None
        with self._room:
            counts = self._counts[kind]
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                counts.dropped += 1
                logger.warning("MQTT: paho's queue is full; %s on %s dropped", kind, topic)
                return None
            # Any other return code (NO_CONN included): paho holds the message and sends it
            # after the next connect.
            counts.published += 1
            item = _Pending(kind, topic, len(payload), key, handed_at)
            early = self._early.pop(info.mid, None)
            if early is not None and early[0] >= handed_at:
                self._settle(item, early[1])  # acknowledged before publish() returned
            else:
                self._pending[info.mid] = item
                self._pending_bytes += item.size
            if self._early:  # QoS 0 sends (stats) also report here; forget old entries
                stale = handed_at - EARLY_ACK_TTL_S
                for mid in [m for m, (t, _) in self._early.items() if t < stale]:
                    del self._early[mid]
            return info.mid

    def _settle(self, item: _Pending, reason: ReasonCode) -> None:
        """A message's fate is known (called with the lock held). The outbox of the delivery
        issue deletes its row here on success and dead-letters it on a refusal."""
        counts = self._counts[item.kind]
        if reason.is_failure:
            counts.refused += 1
            logger.warning(
                "MQTT: the broker refused %s %s on %s: %s",
                item.kind,
                item.key,
                item.topic,
                _reason_text(reason),
            )
        else:
            counts.acked += 1
        self._room.notify_all()

    # ------------------------------------------------------------ paho callbacks (network thread)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._room:
            item = self._pending.pop(mid, None)
            if item is None:
                self._early[mid] = (time.monotonic(), reason_code)
                return
            self._pending_bytes -= item.size
            self._settle(item, reason_code)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # A refused CONNACK is not a connection (Frigate's _on_connect got this wrong).
            hint = _CONNACK_HINTS.get(reason_code.value, "see the broker's log")
            message = (
                f"broker {self.config.broker} refused the connection: "
                f"{_reason_text(reason_code)}: {hint}"
            )
            with self._lock:
                self._refusals += 1
                self._refused_attempt = True
                first = self._last_error != message
                self._last_error = message
                self._failure_streak += 1
                streak = self._failure_streak
            if first:
                logger.error(
                    "MQTT: %s; retrying with backoff (at most every %d s)",
                    message,
                    self.limits.reconnect_max_s,
                )
            else:
                logger.warning("MQTT: %s (attempt %d)", message, streak)
            return
        with self._lock:
            self._connects += 1
            connects, streak = self._connects, self._failure_streak
            self._failure_streak = 0
            self._refused_attempt = False
            self._last_error = None
            stopping = self._stopping
        logger.info(
            "MQTT: connected to %s%s%s",
            self.config.broker,
            f" (reconnect {connects - 1})" if connects > 1 else "",
            f" after {streak} failed attempts" if streak else "",
        )
        if not stopping:  # 'online' before the flag: no new result precedes it
            doc = encode(status_online(self.info, self._clock()))
            self._hand("status", self.topics.status, doc, True, self._json_props(), "online")
            self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:`, so the cause (refused, timeout, a TLS
        # certificate that does not verify) is the exception being handled.
        exc = sys.exc_info()[1]
        cause = f": {exc}" if exc is not None else ""
        with self._lock:
            self._failures += 1
            self._failure_streak += 1
            streak = self._failure_streak
            message = f"cannot reach broker {self.config.broker}{cause}"
            first = self._last_error != message
            self._last_error = message
        log = logger.warning if first else logger.debug
        log("MQTT: %s (attempt %d); retrying with backoff", message, streak)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._room:
            stopping = self._stopping
            refused, self._refused_attempt = self._refused_attempt, False
            self._room.notify_all()
        if stopping or refused:  # a refusal was reported by _on_connect
            return
        if was_connected:
            with self._lock:
                self._last_error = f"connection to {self.config.broker} lost: {reason_code}"
            logger.warning(
                "MQTT: lost the connection to %s (%s); reconnecting with backoff",
                self.config.broker,
                reason_code,
            )
            return
        # The TCP connection opened but closed before any CONNACK: often a TLS port spoken to
        # in plain text, or something else than an MQTT broker listening there.
        message = (
            f"broker {self.config.broker} closed the connection before answering CONNECT "
            f"({reason_code}): is it a TLS port (set mqtt.tls), or not an MQTT broker?"
            if self.config.tls is None
            else f"broker {self.config.broker} closed the connection before answering CONNECT "
            f"({reason_code})"
        )
        with self._lock:
            self._failures += 1
            self._failure_streak += 1
            streak = self._failure_streak
            first = self._last_error != message
            self._last_error = message
        (logger.warning if first else logger.debug)("MQTT: %s (attempt %d)", message, streak)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith("Caught exception"):
            logger.error("MQTT: %s", buf)  # a bug in a callback of ours
        else:
            logger.debug("paho: %s", buf)

    # ------------------------------------------------------------ counters

    def counters(self) -> PublisherCounters:
        with self._lock:
            return PublisherCounters(
                connected=self._connected.is_set(),
                connects=self._connects,
                reconnects=max(0, self._connects - 1),
                connect_refusals=self._refusals,
                connect_failures=self._failures,
                pending=len(self._pending),
                pending_bytes=self._pending_bytes,
                last_error=self._last_error,
                results=replace(self._counts["result"]),
                crops=replace(self._counts["crop"]),
                status=replace(self._counts["status"]),
                stats=replace(self._counts["stats"]),
            )

    def next_seq(self, camera: str) -> int:
        """The ``seq`` the next result of ``camera`` will carry."""
        with self._lock:
            return self._seq.get(camera, 0)
