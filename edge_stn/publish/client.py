"""The MQTT publisher: a durable outbox in front of paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``).

How a result travels:

1. :meth:`MqttPublisher.publish_result` (the daemon's publisher stage) gives it its ``id`` and
   ``seq``, decides about its crops (sent, ``shed`` when the outbox is above its crops' share,
   ``policy`` when too large), encodes it and hands it to the sender thread; it never waits on
   the network.
2. The sender thread (``edge-stn.outbox``) commits what it was handed to the
   :class:`~edge_stn.publish.outbox.Outbox` (SQLite, WAL) in one transaction per detector batch
   (``flush``) or at most ``commit_group_s`` after the first result of a group; only then it
   hands rows to paho, oldest first, at most ``max_inflight`` at a time (paho's window). The
   rows a commit stored come back from :meth:`~edge_stn.publish.outbox.Outbox.write` as
   committed, and the sender hands them from memory (the newest :data:`HELD_ROWS`); rows it
   does not hold (left by a previous run, a backlog beyond that, everything after a fresh
   client) are read back from the outbox. It is the only thread that calls ``publish()``
   (results, crops, status and stats) and the only thread that touches the outbox.
3. paho's network thread reports each PUBACK in ``on_publish``: a reason code below 0x80 deletes
   the row, 0x80 and above moves it to the dead letters with its code (an ACL denial, quota,
   size), in the sender's next write: with the next results, or :data:`SETTLE_GROUP_S` after
   the PUBACK at the latest. On a plain reconnect paho resends what it holds in flight itself,
   so the sender does not send it again; rows that never reached paho stay in the outbox, on
   disk, until the connection is back. At start-up the rows left by the previous process are
   replayed into the fresh client.

Message ids map to rows in ``_inflight`` under one lock that ``on_publish`` shares. paho calls
``on_publish`` while holding its own message lock, and can do so before ``publish()`` returns;
so the sender never holds our lock while calling into paho (no lock-order inversion), and an
acknowledgement that arrives before its message is registered waits in a small map of early
acks, stamped so that a stale entry can never settle a later message that reuses the id.

Refusals we can see before sending: a payload over ``mqtt.max_payload_bytes``, or a packet over
the broker's Maximum Packet Size (MQTT v5 CONNACK), is dead-lettered with 0x95 instead of being
queued. A row that was the oldest in flight each time the connection dropped,
``outbox.max_disconnects`` times in a row, is dead-lettered too (a message the broker closes the
connection for would otherwise be resent forever); paho's copy is then discarded with a fresh
client. ``wait_for_publish`` is never called.

Presence: on every accepted connect the retained ``online`` status; the Last Will is the retained
``offline`` document (reason ``lost``); :meth:`MqttPublisher.stop` publishes ``offline`` (reason
``stop``) itself, waits a bounded time for its PUBACK, disconnects (which discards the will) and
closes the outbox: what was not acknowledged stays there for the next start.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import socket
import ssl
import sys
import threading
import time
from collections import deque
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
from edge_stn.publish.outbox import (
    CODE_DISCONNECTS,
    CODE_PACKET_TOO_LARGE,
    NewCrop,
    NewResult,
    Outbox,
    OutboxState,
    Refusal,
    Settlement,
    StoredMessage,
    WriteReport,
)
from edge_stn.publish.payloads import (
    DeviceInfo,
    ModelInfo,
    encode,
    new_result_id,
    result_document,
    status_offline,
    status_online,
    track_document,
)
from edge_stn.publish.stats import LatencyWindow
from edge_stn.publish.topics import TopicTree
from edge_stn.records import ChosenCrop, CropRef, Detection, FrameResult

logger = logging.getLogger(__name__)

MessageKind = Literal["result", "crop", "track", "status", "stats", "reply"]
MESSAGE_KINDS: tuple[MessageKind, ...] = ("result", "crop", "track", "status", "stats", "reply")
MAX_REPLIES_WAITING = 32
"""Command replies waiting for the sender; more are dropped (counted)."""

EARLY_ACK_TTL_S = 30.0
MAINTENANCE_S = 1.0
"""The sender applies the age policy and refreshes the outbox's state this often."""
SHED_LOG_S = 10.0

SETTLE_GROUP_S = 0.1
"""Acknowledged rows are deleted with the next write of new results, or at most this long after
the first acknowledgement: a transaction (and a wake-up of the sender) per PUBACK otherwise.
A row deleted late is at worst sent again after a crash, which QoS 1 allows."""

STATE_REFRESH_S = 0.25
"""How often the sender refreshes the outbox state that stats and health read."""

HELD_ROWS = 256
"""The sender keeps the rows it committed and has not handed to paho yet in memory, the newest
at most this many (and :data:`HELD_BYTES`), and hands them from there; older rows are read back
from the outbox."""
HELD_BYTES = 4 * 1024 * 1024

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

# PUBACK reason codes >= 0x80 -> what to check (issue 7: a refusal is a clear error).
_REFUSAL_HINTS = {
    0x87: "not authorized by the broker's ACL: with deploy/mosquitto/acl a gateway may only "
    "publish under <prefix>/<its user name>/#, so mqtt.username must equal device_id",
    0x90: "the broker refused the topic name",
    0x95: "the message exceeds the broker's maximum packet size",
    0x97: "the broker's quota is exceeded",
}
REFUSAL_LOG_EVERY_S = 60.0
"""A refused publish is logged at most this often per reason code; each one is counted."""


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
class InboundMessage:
    """A message received on the command filter (:meth:`MqttPublisher.listen_commands`)."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    """MQTT v5 Response Topic, as sent (may be anything: the receiver checks it)"""
    correlation: bytes | None = None
    """MQTT v5 Correlation Data, echoed in the reply"""


@dataclass(frozen=True)
class PublisherLimits:
    """Bounds of the publisher (DESIGN §7 wants every queue bounded); the outbox has its own."""

    max_inflight: int = 20
    """paho's window: stored messages handed to paho and not yet acknowledged."""
    max_waiting: int = 256
    """results handed to :meth:`MqttPublisher.publish_result` and not yet committed."""
    publish_timeout_s: float = 1.0
    """how long :meth:`MqttPublisher.publish_result` waits for room before dropping."""
    commit_group_s: float = 0.010
    """a result handed without ``flush`` is committed at most this long after it arrived."""
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_inflight < 1 or self.max_waiting < 1:
            raise ValueError(f"publisher limits too small: {self}")
        if not 0.0 <= self.commit_group_s <= 1.0:
            raise ValueError(f"commit_group_s must be within 0-1 s, got {self.commit_group_s}")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                f"need 1 <= reconnect_min_s <= reconnect_max_s, got "
                f"{self.reconnect_min_s}, {self.reconnect_max_s}"
            )


@dataclass
class DeliveryCounts:
    """Per kind, since the publisher started. ``queued``: committed to the outbox;
    ``published``: handed to MQTT; ``acked``: PUBACK below 0x80; ``refused``: dead-lettered
    (PUBACK >= 0x80, too large, or lost connections); ``shed``: removed by the outbox's budget
    policy (crops also when shed on entry); ``dropped``: never queued (no ``seq`` used)."""

    queued: int = 0
    published: int = 0
    acked: int = 0
    refused: int = 0
    shed: int = 0
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
    inflight: int
    last_error: str | None
    results: DeliveryCounts
    crops: DeliveryCounts
    status: DeliveryCounts
    stats: DeliveryCounts
    outbox: dict[str, Any]
    tracks: DeliveryCounts = field(default_factory=DeliveryCounts)
    """track announcements (crops.policy best_per_track)"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedResult:
    """A result handed to the outbox: its identity, topic and the crops stored with it."""

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
class _Waiting:
    result: NewResult
    flush: bool


@dataclass
class _InFlight:
    kind: MessageKind
    row: int | None
    topic: str
    key: str
    handed_at: float = field(default_factory=time.monotonic)


def _reason_text(rc: ReasonCode) -> str:
    return f"{rc.getName()} (0x{rc.value:02x})"


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def packet_size(topic: str, payload_len: int, props: Properties | None) -> int:
    """Bytes of a QoS 1 PUBLISH packet: what the broker's Maximum Packet Size limits."""
    body = 2 + len(topic.encode("utf-8")) + 2 + payload_len
    if props is not None:
        body += len(props.pack())
    return 1 + _varint_len(body) + body


def _varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    """An MQTT UTF-8 Encoded String: two bytes of length, then the bytes."""
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


class PackedProperties(Properties):
    """MQTT v5 properties that are packed once. paho packs a message's properties each time it
    sends it, walking every property name it knows (tens of microseconds, for every result and
    crop); ours are made once (JSON, JPEG) or once per crop. Setting a property drops the
    packed form, so a copy may be changed (a reply's correlation data)."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__.pop("_packed", None)

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = self.__dict__["_packed"] = bytes(super().pack())
        return packed

    def with_user(self, user: Sequence[tuple[str, str]]) -> PackedProperties:
        """A copy with these user properties added, packed from this one's packed form:
        User Property (0x26) comes last among PUBLISH properties in paho's order, so the bytes
        are paho's; without paho's checks of the name on every assignment."""
        pairs = [(str(k), str(v)) for k, v in user]
        packed = self.pack()
        start = 1  # past the Variable Byte Integer length
        while packed[start - 1] & 0x80:
            start += 1
        body = packed[start:] + b"".join([b"\x26" + _utf8(k) + _utf8(v) for k, v in pairs])
        out = object.__new__(type(self))  # copy.copy, at a tenth of the cost
        out.__dict__.update(self.__dict__)
        out.__dict__["UserProperty"] = [*self.__dict__.get("UserProperty", []), *pairs]
        out.__dict__["_packed"] = _varint(len(body)) + body
        return out


def _props(packet: int, content_type: str, *, json: bool) -> PackedProperties:
    props = PackedProperties(packet)
    if json:
        props.PayloadFormatIndicator = 1
    props.ContentType = content_type
    return props


class _PahoLog(logging.Logger):
    """What paho logs, formatted only when it is written: paho formats each line itself for an
    ``on_log`` callback (a PUBLISH's properties included, on every send and PUBACK), but hands
    a logger the format and its arguments. An exception in one of our callbacks is an error;
    the rest (every failed retry included: our callbacks say what matters, once) is debug."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        text = str(msg)
        if level >= logging.ERROR and text.startswith("Caught exception"):
            logger.error("MQTT: " + text, *args)  # a bug in a callback of ours
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("paho: " + text, *args)


_PAHO_LOG = _PahoLog(f"{__name__}.paho")


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
    per interval, from one thread; ``stop()`` at the end. ``outbox`` None keeps the outbox in
    memory (no durability; the epoch is ``info.epoch``); otherwise the outbox's epoch wins.
    """

    def __init__(
        self,
        mqtt_config: MqttConfig,
        info: DeviceInfo,
        *,
        client_id: str | None = None,
        limits: PublisherLimits | None = None,
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = mqtt_config
        self.limits = limits or PublisherLimits()
        self.outbox = outbox if outbox is not None else Outbox(None, epoch=info.epoch)
        self.info = replace(info, epoch=self.outbox.epoch)
        self.topics = TopicTree(mqtt_config.topic_prefix, info.device)
        self.client_id = client_id or mqtt_config.client_id or f"edge-stn-{info.device}"
        self._clock = clock
        self._v5 = mqtt_config.protocol == "v5"
        json_type = "application/json"
        self._props_json = _props(PacketTypes.PUBLISH, json_type, json=True) if self._v5 else None
        self._props_json_will = (
            _props(PacketTypes.WILLMESSAGE, json_type, json=True) if self._v5 else None
        )
        self._props_jpeg = (
            _props(PacketTypes.PUBLISH, "image/jpeg", json=False) if self._v5 else None
        )
        self.commit_ms = LatencyWindow()
        """wall time of each commit of new results (fsync included), ms."""
        self.outbox_ms = LatencyWindow()
        """from ``publish_ts`` to the result's hand-over to paho, ms (commit and queueing)."""

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # handed over by publish_result, not yet committed
        self._waiting: list[_Waiting] = []
        self._waiting_bytes = 0
        self._reserved = 0
        self._flush_due: float | None = None
        # what the network thread reports to the sender
        self._settled: list[Settlement] = []
        self._settle_due: float | None = None  # when the settlements are written at the latest
        self._strikes: list[int] = []
        self._refusals: list[tuple[int, int, str]] = []
        self._stats_out: list[bytes] = []
        self._replies_out: list[tuple[str, bytes, bytes | None]] = []
        self._command_filter: str | None = None
        self._command_sink: Callable[[InboundMessage], None] | None = None
        self._need_online = False
        self._renew = False
        # messages in paho's hands
        self._inflight: dict[int, _InFlight] = {}
        self._rows_inflight = 0
        self._early: dict[int, tuple[float, ReasonCode]] = {}
        self._next_row = 0
        """the next row to hand to paho: rows below it are in paho's hands or gone."""
        self._last_row = 0
        # rows committed and not handed yet, oldest first (sender thread only): handed from here
        # without reading them back; every stored row from _held_from on is in _held
        self._held: deque[StoredMessage] = deque()
        self._held_bytes = 0
        self._held_from = 0
        self._hand_paused_until = 0.0
        self._broker_max_packet: int | None = None
        # the outbox as the sender last saw it
        self._outbox_rows = self.outbox.rows
        self._outbox_payload = self.outbox.payload_bytes
        self._outbox_live = self.outbox.live_bytes
        self._outbox_state: OutboxState = self.outbox.state()
        self._state_due = 0.0  # when the sender refreshes it next (monotonic)
        self._seq: dict[str, int] = self.outbox.next_seq()
        self._counts = {kind: DeliveryCounts() for kind in MESSAGE_KINDS}
        self._connects = 0
        self._refusals_connect = 0
        self._failures = 0
        self._failure_streak = 0
        self._refused_attempt = False
        self._last_error: str | None = None
        self._write_error: str | None = None
        # refusals logged per reason code: (last logged, refused since); own lock, never held
        # while logging
        self._refusal_log: dict[int, tuple[float | None, int]] = {}
        self._refusal_lock = threading.Lock()
        self._connected = threading.Event()
        self._started = False
        self._stopping = False
        self._stopped = False
        self._stop_deadline = 0.0
        self._shed_unlogged = {"result": 0, "crop": 0}
        self._shed_logged_at = -SHED_LOG_S

        self._client = self._make_client()
        self._sender = threading.Thread(
            target=self._sender_main, name="edge-stn.outbox", daemon=True
        )

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        cfg: DaemonConfig,
        model: ModelInfo,
        *,
        started_at: float | None = None,
        limits: PublisherLimits | None = None,
    ) -> MqttPublisher:
        """The daemon's publisher: device, client id, prefix, broker and outbox from the
        config. Opening the outbox may raise :class:`~edge_stn.publish.outbox.OutboxError`
        (locked by another daemon, folder not writable)."""
        ob = cfg.outbox
        outbox = Outbox(
            ob.resolved_path(cfg.device_id),
            max_bytes=ob.max_bytes,
            max_age_s=ob.max_age_s,
            synchronous=ob.synchronous,
            max_disconnects=ob.max_disconnects,
        )
        info = DeviceInfo(
            device=cfg.device_id,
            version=__version__,
            model=model,
            config_hash=config_hash(cfg),
            epoch=outbox.epoch,
            started_at=time.time() if started_at is None else started_at,
            cameras=tuple(c.id for c in cfg.cameras),
        )
        try:
            return cls(cfg.mqtt, info, client_id=cfg.client_id, limits=limits, outbox=outbox)
        except BaseException:
            outbox.close()
            raise

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        # paho logs every failed retry as an error; our callbacks say what matters, once.
        client.enable_logger(_PAHO_LOG)
        # An exception in a callback is logged, never allowed to end the network thread.
        client.suppress_exceptions = True
        client.max_inflight_messages_set(self.limits.max_inflight)
        # The sender keeps at most max_inflight rows in paho; status messages come on top.
        client.max_queued_messages_set(self.limits.max_inflight + 16)
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
        client.on_message = self._on_message
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
        """The properties of a JSON message: made once (paho's ``Properties()`` costs about
        40 us, a dozen times a frame otherwise) and shared, so never changed: copy them to add
        to them."""
        return self._props_json_will if will else self._props_json

    def _crop_props(self, user: Sequence[tuple[str, str]]) -> Properties | None:
        if self._props_jpeg is None or not user:
            return self._props_jpeg
        return self._props_jpeg.with_user(user)  # the template is shared, never changed

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
        """Start the sender and connect in the background; returns at once (the broker may be
        down: paho retries, the outbox holds what comes meanwhile)."""
        if self._started:
            raise RuntimeError("the publisher was already started")
        if self._stopped:
            raise RuntimeError("the publisher was stopped")
        self._started = True
        logger.info(
            "MQTT: connecting to %s as %s (MQTT %s%s)",
            self.config.broker,
            self.client_id,
            "5" if self._v5 else "3.1.1",
            ", TLS" if self.config.tls is not None else "",
        )
        self._next_row = self.outbox.first_row()
        self._last_row = self.outbox.last_row()
        self._held_from = self._last_row + 1  # what the previous run left is read back
        if self._outbox_rows:
            logger.info(
                "outbox: replaying %d messages left by the previous run (epoch %s)",
                self._outbox_rows,
                self.epoch,
            )
        self._sender.start()
        self._client.connect_async(self.config.host, self.config.port, self.config.keepalive)
        self._client.loop_start()

    def listen_commands(self, topic_filter: str, sink: Callable[[InboundMessage], None]) -> None:
        """Subscribe to ``topic_filter`` (QoS 1) on every accepted connect and hand each
        message to ``sink``, on paho's network thread: the sink must only queue it. Call
        before :meth:`start`."""
        if self._started:
            raise RuntimeError("listen_commands() must come before start()")
        self._command_filter, self._command_sink = topic_filter, sink

    def reply_room(self, topic: str) -> int:
        """The largest reply payload that can go out on ``topic`` (``mqtt.max_payload_bytes``
        and the broker's Maximum Packet Size, with room for the properties)."""
        room = self.config.max_payload_bytes
        limit = self._broker_max_packet
        if limit is not None:
            room = min(room, limit - packet_size(topic, 0, None) - 64)
        return max(0, room)

    def publish_reply(
        self, topic: str, payload: bytes, correlation: bytes | None = None
    ) -> str | None:
        """Queue a command reply (QoS 1, not retained, MQTT v5 correlation data) for the sender
        thread; not through the outbox: a reply is for a requester waiting now, and worthless
        after a restart. Returns why it cannot be sent (None: queued). Thread-safe."""
        props = self._reply_props(correlation)
        problem = self._payload_limit(topic, len(payload), props)
        with self._wake:
            if problem is None and (self._stopping or self._stopped):
                problem = "the publisher is stopping"
            if problem is None and len(self._replies_out) >= MAX_REPLIES_WAITING:
                problem = f"{MAX_REPLIES_WAITING} replies are waiting already"
            if problem is not None:
                self._counts["reply"].dropped += 1
                return problem
            self._replies_out.append((topic, payload, correlation))
            self._wake.notify_all()
        return None

    def _reply_props(self, correlation: bytes | None) -> Properties | None:
        props = self._json_props()
        if props is not None and correlation:
            props = copy.copy(props)  # the shared JSON properties stay as they are
            props.CorrelationData = correlation
        return props

    def update_info(self, **changes: Any) -> None:
        """Change what the ``online`` document says (``model`` after a model swap,
        ``config_hash`` and ``cameras`` after a reload); results published from now on name
        the new ``model``. Published again (retained) by the sender thread, the only one that
        publishes, at once when connected, else at the next connect. Thread-safe."""
        with self._wake:
            self.info = replace(self.info, **changes)
            if not self._stopping and not self._stopped:
                self._need_online = True
                self._wake.notify_all()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an accepted connection."""
        return self._connected.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until everything handed over so far has been settled
        (acknowledged, dead-lettered or shed): nothing waits, nothing is in the outbox."""
        until = time.monotonic() + timeout
        with self._wake:
            while self._waiting or self._reserved or self._outbox_rows or self._settled:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.1))
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Publish ``offline`` (retained), disconnect, close the outbox: within ``timeout``.

        While connected, the outbox gets up to half the time to drain first; whatever is left
        stays in the outbox for the next start (in memory only: lost, and logged).
        """
        if self._stopped:
            return
        self._stopped = True
        timeout = self.limits.stop_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._started:
            self.outbox.close()
            return
        if self.connected:
            self.wait_drained(max(0.0, timeout / 2))
        with self._wake:
            self._stopping = True
            self._stop_deadline = deadline - 0.3
            self._wake.notify_all()
        self._sender.join(max(0.1, deadline - 0.2 - time.monotonic()))
        if self._sender.is_alive():
            logger.warning("outbox: the sender did not stop within %.1f s; abandoned", timeout)
            self._client.disconnect()
        stopper = threading.Thread(
            target=self._client.loop_stop, name="edge-stn.mqtt-stop", daemon=True
        )
        stopper.start()
        stopper.join(max(0.1, deadline - time.monotonic()))
        if stopper.is_alive():
            logger.warning("MQTT: the network thread did not end within %.1f s; abandoned", timeout)
        self._connected.clear()
        state = self._outbox_state
        if state.rows:
            where = (
                f"kept in the outbox {state.path} for the next start"
                if state.path is not None
                else "lost (the outbox is in memory)"
            )
            logger.warning(
                "MQTT: stopped with %d results and %d crops not acknowledged by the broker: %s",
                state.results,
                state.rows - state.results,
                where,
            )
        logger.info("MQTT: stopped")

    # ------------------------------------------------------------ publishing (caller's thread)

    def publish_result(
        self,
        result: FrameResult,
        crops: Sequence[JpegCrop | None] | None = None,
        *,
        timeout: float | None = None,
        flush: bool = True,
    ) -> PublishedResult | None:
        """Hand one frame's result (QoS 1) and its crops (QoS 1, MQTT v5 user properties) to
        the outbox.

        ``crops`` (one per detection, or None for none at all): a crop with ``data`` is stored
        when the outbox is below its crops' share of the budget (``crop_status: sent``) and shed
        otherwise (``shed``); a crop whose ``data`` is None was over the size limit, and one
        over ``mqtt.max_payload_bytes`` or the broker's Maximum Packet Size is refused
        (``policy``); a None entry keeps the detection's own ``crop_status`` (``off``).
        ``flush``: the last result of a detector batch, commit now (else within
        ``commit_group_s``). Waits at most ``timeout`` seconds (default
        ``limits.publish_timeout_s``) for room; returns None when the result was dropped
        (counted; no ``seq`` is used).
        """
        if crops is not None and len(crops) != len(result.detections):
            raise ValueError(
                f"{len(crops)} crops given for {len(result.detections)} detections "
                f"(camera {result.camera_id}, frame {result.frame_index})"
            )
        timeout = self.limits.publish_timeout_s if timeout is None else timeout
        if self._stopped or self._stopping or not self._reserve(timeout):
            with self._lock:
                self._counts["result"].dropped += 1
            return None
        try:
            return self._hand_over(result, crops, flush)
        finally:
            with self._wake:
                self._reserved -= 1

    def _reserve(self, timeout: float) -> bool:
        until = time.monotonic() + max(0.0, timeout)
        with self._wake:
            while len(self._waiting) + self._reserved >= self.limits.max_waiting:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
            self._reserved += 1
        return True

    def _payload_limit(
        self,
        topic: str,
        size: int,
        props: Properties | Callable[[], Properties | None] | None,
    ) -> str | None:
        """Why a message cannot be sent because of its size (None: it can). ``props`` may be a
        function that makes them: they are needed only when the broker limits packets."""
        if size > self.config.max_payload_bytes:
            return f"payload of {size} bytes over mqtt.max_payload_bytes ({self.config.max_payload_bytes})"
        limit = self._broker_max_packet
        if limit is not None:
            packet = packet_size(topic, size, props() if callable(props) else props)
            if packet > limit:
                return f"packet of {packet} bytes over the broker's Maximum Packet Size ({limit})"
        return None

    def _crop_limit(self, topic: str, size: int, user: Sequence[tuple[str, str]]) -> str | None:
        """:meth:`_payload_limit` for a crop with these user properties (built only when the
        broker limits packets)."""
        return self._payload_limit(topic, size, functools.partial(self._crop_props, user))

    def _hand_over(
        self, result: FrameResult, crops: Sequence[JpegCrop | None] | None, flush: bool
    ) -> PublishedResult:
        rid = new_result_id()
        cam = result.camera_id
        dets = list(result.detections)
        stored: list[NewCrop] = []
        refusals: list[Refusal] = []
        shed = planned = 0
        with self._lock:
            room = self.outbox.crop_share * self.outbox.data_budget - (
                self._outbox_live + self._waiting_bytes
            )
        for n, crop in enumerate(crops or ()):
            if crop is None:
                continue
            if crop.data is None:
                dets[n] = dets[n].with_crop(None, "policy")
                continue
            topic = self.topics.crop(cam, rid, n)
            det = dets[n]
            user = (("result_id", rid), ("label", det.label), ("score", f"{det.score:.4f}"))
            problem = self._crop_limit(topic, len(crop.data), user)
            if problem is not None:
                dets[n] = det.with_crop(None, "policy")
                refusals.append(
                    Refusal(
                        "crop",
                        cam,
                        None,
                        rid,
                        topic,
                        len(crop.data),
                        CODE_PACKET_TOO_LARGE,
                        problem,
                    )
                )
                continue
            if planned + len(crop.data) <= room:
                planned += len(crop.data)
                ref = CropRef(topic=topic, width=crop.width, height=crop.height)
                dets[n] = det.with_crop(ref, "sent")
                stored.append(NewCrop(topic, crop.data, user if self._v5 else ()))
            else:
                dets[n] = det.with_crop(None, "shed")
                shed += 1
        with self._lock:
            seq = self._seq.get(cam, 0)
            self._seq[cam] = seq + 1
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
        problem = self._payload_limit(topic, len(payload), self._json_props())
        stored_payload: bytes | None = payload
        if problem is not None:
            logger.error("MQTT: result %s (%s seq %d) refused: %s", rid, cam, seq, problem)
            refusals.append(
                Refusal(
                    "result",
                    cam,
                    seq,
                    rid,
                    topic,
                    len(payload),
                    CODE_PACKET_TOO_LARGE,
                    problem,
                    payload,
                )
            )
            refusals += [
                Refusal(
                    "crop",
                    cam,
                    None,
                    rid,
                    c.topic,
                    len(c.payload),
                    CODE_PACKET_TOO_LARGE,
                    "its result was refused",
                )
                for c in stored
            ]
            stored_payload, stored = None, []
        track_ids = [d.track_id for d in dets if d.track_id is not None]
        new = NewResult(
            camera=cam,
            seq=seq,
            result_id=rid,
            topic=topic,
            payload=stored_payload,
            created=publish_ts,
            crops=tuple(stored),
            shed_crops=shed,
            refusals=tuple(refusals),
            next_track_id=max(track_ids) + 1 if track_ids else None,
        )
        self._enqueue(new, flush)
        return PublishedResult(
            id=rid,
            epoch=self.info.epoch,
            seq=seq,
            topic=topic,
            capture_ts=result.capture_ts,
            publish_ts=publish_ts,
            detections=tuple(dets),
            crop_topics=tuple(c.topic for c in stored),
            payload=payload,
        )

    def _enqueue(self, new: NewResult, flush: bool) -> None:
        """Hand a result (or track announcement) to the sender, to commit now (``flush``) or
        within ``commit_group_s``."""
        with self._wake:
            self._waiting.append(_Waiting(new, flush))
            self._waiting_bytes += new.size
            now = time.monotonic()
            due = now if flush else now + self.limits.commit_group_s
            self._flush_due = due if self._flush_due is None else min(self._flush_due, due)
            self._wake.notify_all()

    def publish_track(self, chosen: ChosenCrop, *, timeout: float | None = None) -> bool:
        """Hand a track announcement (QoS 1, ``cam/<camera>/track``) and the crop chosen for
        the track (QoS 1, on the crop topic of the result it belongs to) to the outbox, as one
        unit: the crop is stored under the announcement, which says ``crop_status: shed`` if
        the crop has to go. False (counted as dropped) when the hand-over stayed full."""
        timeout = self.limits.publish_timeout_s if timeout is None else timeout
        if self._stopped or self._stopping or not self._reserve(timeout):
            with self._lock:
                self._counts["track"].dropped += 1
            return False
        try:
            cam = chosen.camera_id
            topic = self.topics.track(cam)
            crop_topic = self.topics.crop(cam, chosen.result_id, chosen.index)
            user = (
                ("result_id", chosen.result_id),
                ("label", chosen.label),
                ("score", f"{chosen.score:.4f}"),
                ("track_id", str(chosen.track_id)),
            )
            crops: tuple[NewCrop, ...] = ()
            crop_ref: CropRef | None = None
            status = "policy"  # too large for the crop limit: no crop for this track
            if chosen.jpeg is not None:
                problem = self._crop_limit(crop_topic, len(chosen.jpeg), user)
                if problem is None:
                    crop_ref = CropRef(crop_topic, chosen.width, chosen.height)
                    crops = (NewCrop(crop_topic, chosen.jpeg, user if self._v5 else ()),)
                    status = "sent"
                else:
                    logger.warning("MQTT: track %d crop not sent: %s", chosen.track_id, problem)
            doc = track_document(
                chosen,
                device=self.info.device,
                epoch=self.info.epoch,
                ts=self._clock(),
                crop=crop_ref,
                crop_status=status,
            )
            payload = encode(doc)
            new = NewResult(
                camera=cam,
                seq=0,
                result_id=chosen.result_id,
                topic=topic,
                payload=payload,
                created=self._clock(),
                crops=crops,
                kind="track",
            )
            self._enqueue(new, True)
            return True
        finally:
            with self._wake:
                self._reserved -= 1

    def publish_stats(self, doc: dict[str, Any]) -> bool:
        """Queue a stats document (QoS 0, not retained) for the sender; False (counted as
        dropped) when not connected."""
        payload = encode(doc)
        with self._wake:
            if not self._connected.is_set() or self._stopping or self._stopped:
                self._counts["stats"].dropped += 1
                return False
            if len(self._stats_out) >= 2:  # the sender is behind: the newest counts
                self._stats_out.pop(0)
                self._counts["stats"].dropped += 1
            self._stats_out.append(payload)
            self._wake.notify_all()
        return True

    # ------------------------------------------------------------ the sender thread

    def _sender_main(self) -> None:
        try:
            self._sender_loop()
        except Exception:
            logger.exception("outbox: the sender failed; nothing more is published")
        finally:
            self._sender_finish()

    def _work_ready(self, now: float, next_maintenance: float) -> bool:
        """(lock held) whether the sender has something to do."""
        return bool(
            self._stopping
            or (self._settled and self._settle_due is not None and self._settle_due <= now)
            or self._strikes
            or self._refusals
            or self._stats_out
            or self._replies_out
            or self._renew
            or (self._need_online and self._connected.is_set())
            or (self._waiting and self._flush_due is not None and self._flush_due <= now)
            or (
                self._connected.is_set()
                and self._rows_inflight < self.limits.max_inflight
                and self._next_row <= self._last_row
                and now >= self._hand_paused_until
            )
            or now >= next_maintenance
        )

    def _sender_loop(self) -> None:
        next_maintenance = time.monotonic() + MAINTENANCE_S
        backoff_until = 0.0
        while True:
            with self._wake:
                while True:
                    now = time.monotonic()
                    if now >= backoff_until and self._work_ready(now, next_maintenance):
                        break
                    wake_at = next_maintenance
                    if self._flush_due is not None:
                        wake_at = min(wake_at, self._flush_due)
                    if self._settle_due is not None:
                        wake_at = min(wake_at, self._settle_due)
                    elif self._rows_inflight and self._connected.is_set():
                        # a PUBACK may come meanwhile, and it does not wake us
                        wake_at = min(wake_at, now + SETTLE_GROUP_S)
                    if self._hand_paused_until > now:
                        wake_at = min(wake_at, self._hand_paused_until)
                    if backoff_until > now:
                        wake_at = max(backoff_until, min(wake_at, next_maintenance))
                    self._wake.wait(max(0.001, wake_at - now))
                stopping = self._stopping
                take = stopping or (self._flush_due is not None and self._flush_due <= now)
                waiting = self._waiting if take else []
                if take:
                    self._waiting, self._flush_due = [], None
                strikes, self._strikes = self._strikes, []
                refusals, self._refusals = self._refusals, []
                settled: list[Settlement] = []
                # settlements go with any write, or on their own when due (SETTLE_GROUP_S)
                due = self._settle_due is not None and self._settle_due <= now
                if take or strikes or refusals or due or now >= next_maintenance:
                    settled, self._settled, self._settle_due = self._settled, [], None
                stats, self._stats_out = self._stats_out, []
                replies, self._replies_out = self._replies_out, []
                online = self._need_online and self._connected.is_set() and not stopping
                if online:
                    self._need_online = False
                renew, self._renew = self._renew, False
            if online:
                self._publish_status(encode(status_online(self.info, self._clock())), "online")
            maintenance = time.monotonic() >= next_maintenance
            busy = waiting or settled or strikes or refusals or maintenance
            if busy and not self._write(waiting, settled, strikes, refusals):
                backoff_until = time.monotonic() + 1.0
                continue
            if maintenance:  # the write above applied the age policy and took the state
                next_maintenance = time.monotonic() + MAINTENANCE_S
            if renew:
                self._renew_client()
            if not stopping:
                self._hand_rows()
            for payload in stats:
                self._publish_stats_now(payload)
            for topic, payload, correlation in replies:
                props = self._reply_props(correlation)
                self._hand("reply", topic, payload, False, props, "reply", None)
            if stopping:
                return

    def _write(
        self,
        waiting: list[_Waiting],
        settled: list[Settlement],
        strikes: list[int],
        refusals: list[tuple[int, int, str]],
    ) -> bool:
        """One outbox transaction; on an error everything is kept for the next try."""
        try:
            report = self.outbox.write(
                [w.result for w in waiting],
                settled,
                strikes=strikes,
                refusals=refusals,
                sheddable_from=self._next_row,
            )
        except Exception as exc:
            message = f"cannot write the outbox: {exc}"
            with self._wake:
                self._waiting[:0] = waiting
                self._settled[:0] = settled
                if self._settled:
                    self._settle_due = time.monotonic()
                self._strikes[:0] = strikes
                self._refusals[:0] = refusals
                if waiting:
                    self._flush_due = time.monotonic()
                first = self._write_error != message
                self._write_error = message
            (logger.error if first else logger.debug)("outbox: %s; retrying", message)
            return False
        if report.commit_ms is not None:
            self.commit_ms.add(report.commit_ms)
        last_row = self._hold(report)
        # The state (a query and two stat calls) feeds stats and health: refreshed a few times a
        # second, and at once when the budget or a refusal changed the outbox.
        now = time.monotonic()
        state = None
        if report.dead or any(report.shed.values()) or now >= self._state_due:
            state = self.outbox.state()
            self._state_due = now + STATE_REFRESH_S
        with self._wake:
            if state is not None:
                self._outbox_state = state
            self._write_error = None
            for w in waiting:
                self._waiting_bytes -= w.result.size
            self._account(report)
            self._last_row = last_row
            self._outbox_rows = self.outbox.rows
            self._outbox_payload = self.outbox.payload_bytes
            self._outbox_live = self.outbox.live_bytes
            self._wake.notify_all()
        # A broker's refusal was logged when it came (rate-limited, _log_refusal): its dead
        # letters are details, or an ACL that refuses everything would flood the log.
        refused = {(s.code, s.reason) for s in settled if s.code >= 0x80}
        for d in report.dead:
            (logger.debug if (d.code, d.reason) in refused else logger.warning)(
                "MQTT: %s %s%s on %s dead-lettered: %s (0x%02x)",
                d.kind,
                d.result_id,
                f" (seq {d.seq})" if d.seq is not None else "",
                d.topic,
                d.reason,
                d.code,
            )
        if any(d.code == CODE_DISCONNECTS for d in report.dead):
            with self._wake:
                self._renew = True
        self._log_shed(report)
        return True

    def _hold(self, report: WriteReport) -> int:
        """Keep the rows a write stored for the hand-over, the newest :data:`HELD_ROWS` and
        :data:`HELD_BYTES`; returns the newest row. The outbox lists them only once committed,
        so what paho gets is on disk first (DESIGN §7) either way."""
        held = self._held
        if report.reshaped:  # the policy deleted or rewrote rows: what is held may be stale
            held.clear()
            self._held_bytes = 0
            last_row = self.outbox.last_row()
            self._held_from = last_row + 1
            return last_row
        for msg in report.stored:
            held.append(msg)
            self._held_bytes += len(msg.payload)
        trimmed = False
        while held and (len(held) > HELD_ROWS or self._held_bytes > HELD_BYTES):
            self._held_bytes -= len(held.popleft().payload)
            trimmed = True
        last_row = max(self._last_row, report.stored[-1].row) if report.stored else self._last_row
        if trimmed:
            self._held_from = held[0].row if held else last_row + 1
        return last_row

    def _rows_from(self, start: int, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` stored rows from ``start`` on, oldest first: read back from the
        outbox below what is held (rows left by a previous run, a backlog beyond what is held,
        every row after a fresh client), from memory from there on."""
        if start < self._held_from:
            rows = self.outbox.read(start, limit, before=self._held_from)
            if rows:
                return rows
            start = self._held_from  # nothing is stored below what is held
        held = self._held
        while held and held[0].row < start:
            self._held_bytes -= len(held.popleft().payload)
        return list(itertools.islice(held, limit))

    def _log_shed(self, report: WriteReport) -> None:
        """Shedding is logged at most every ``SHED_LOG_S`` seconds, with the sums since."""
        for kind in ("result", "crop"):
            self._shed_unlogged[kind] += report.shed[kind]
        now = time.monotonic()
        if any(self._shed_unlogged.values()) and now >= self._shed_logged_at + SHED_LOG_S:
            logger.warning(
                "outbox: over its budget (or max_age_s): shed %d results and %d crops, oldest "
                "first, since the last report",
                self._shed_unlogged["result"],
                self._shed_unlogged["crop"],
            )
            self._shed_unlogged = {"result": 0, "crop": 0}
            self._shed_logged_at = now

    def _account(self, report: WriteReport) -> None:
        """(lock held) the session's counters from a write."""
        for kind in ("result", "crop", "track"):
            c = self._counts[kind]
            c.queued += report.committed[kind]
            c.shed += report.shed[kind]
        for d in report.dead:
            self._counts[d.kind].refused += 1

    def _refresh_state(self) -> None:
        state = self.outbox.state()
        with self._lock:
            self._outbox_state = state
            self._outbox_payload = state.payload_bytes

    def _hand_rows(self) -> None:
        """Give paho the next stored rows, oldest first, up to the window."""
        while self._connected.is_set():
            with self._lock:
                room = self.limits.max_inflight - self._rows_inflight
                start = self._next_row
            if room <= 0:
                return
            rows = self._rows_from(start, room)
            if not rows:
                with self._lock:
                    self._next_row = max(self._next_row, self._last_row + 1)
                return
            for msg in rows:
                props = (
                    self._crop_props(msg.user_properties)
                    if msg.kind == "crop"
                    else self._json_props()
                )
                problem = self._payload_limit(msg.topic, len(msg.payload), props)
                if problem is not None:
                    with self._wake:
                        self._refusals.append((msg.row, CODE_PACKET_TOO_LARGE, problem))
                        self._next_row = msg.row + 1
                    continue
                if not self._hand_row(msg, props):
                    # paho would not take it now (its queue, a message id still in use): try
                    # again shortly rather than spin
                    with self._lock:
                        self._hand_paused_until = time.monotonic() + 0.2
                    return
                if msg.kind == "result":
                    self.outbox_ms.add(max(0.0, (self._clock() - msg.created) * 1000.0))

    def _hand_row(self, msg: StoredMessage, props: Properties | None) -> bool:
        mid = self._hand(msg.kind, msg.topic, msg.payload, False, props, msg.result_id, msg.row)
        if mid is None:
            return False
        with self._lock:
            self._next_row = msg.row + 1
        return True

    def _publish_status(self, payload: bytes, key: str) -> int | None:
        return self._hand(
            "status", self.topics.status, payload, True, self._json_props(), key, None
        )

    def _publish_stats_now(self, payload: bytes) -> None:
        sent = False
        if self._connected.is_set():
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

    def _hand(
        self,
        kind: MessageKind,
        topic: str,
        payload: bytes,
        retain: bool,
        props: Properties | None,
        key: str,
        row: int | None,
    ) -> int | None:
        """Give one QoS 1 message to paho and track it until its PUBACK; the message id, or
        None when paho would not take it now. Never holds our lock while calling paho (see the
        module docstring)."""
        handed_at = time.monotonic()
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        except ValueError as exc:  # an invalid topic, a payload over 256 MiB: a bug upstream
            logger.error("MQTT: cannot publish %s on %s: %s", kind, topic, exc)
            with self._wake:
                if row is not None:
                    self._refusals.append((row, 0x80, f"paho refused it: {exc}"))
                    self._next_row = row + 1
                else:
                    self._counts[kind].dropped += 1
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            if row is None:
                with self._lock:
                    self._counts[kind].dropped += 1
                logger.warning("MQTT: paho's queue is full; %s on %s dropped", kind, topic)
            return None
        refused: tuple[_InFlight, ReasonCode] | None = None
        with self._wake:
            # Any other return code (NO_CONN included): paho holds the message and sends it
            # after the next connect.
            self._counts[kind].published += 1
            item = _InFlight(kind, row, topic, key, handed_at)
            early = self._early.pop(info.mid, None)
            if early is not None and early[0] >= handed_at:
                # acknowledged before publish() returned
                if self._settle(item, early[1]):
                    refused = (item, early[1])
            else:
                self._inflight[info.mid] = item
                if row is not None:
                    self._rows_inflight += 1
            if self._early:  # QoS 0 sends (stats) also report here; forget old entries
                stale = handed_at - EARLY_ACK_TTL_S
                for mid in [m for m, (t, _) in self._early.items() if t < stale]:
                    del self._early[mid]
        if refused is not None:
            self._log_refusal(*refused)
        return info.mid

    def _settle(self, item: _InFlight, reason: ReasonCode) -> bool:
        """(lock held) A message's fate is known: stored rows go to the outbox (deleted, or
        dead-lettered on a refusal) at the sender's next write. Returns whether the broker
        refused it: the caller logs that (:meth:`_log_refusal`) after releasing the lock."""
        counts = self._counts[item.kind]
        if reason.is_failure:
            if item.row is None:  # stored rows are counted when dead-lettered
                counts.refused += 1
        else:
            counts.acked += 1
        if item.row is None or self._next_row <= self._last_row:
            # someone waits for this message, or the sender for room in paho's window
            self._wake.notify_all()
        if item.row is not None:
            text = _reason_text(reason) if reason.is_failure else ""  # kept for dead letters
            self._settled.append(Settlement(item.row, reason.value, text))
            if self._settle_due is None:
                self._settle_due = time.monotonic() + SETTLE_GROUP_S
        return bool(reason.is_failure)

    def _renew_client(self) -> None:
        """Replace paho's client, so that a dead-lettered message it still holds is not resent;
        every row not acknowledged is handed to the new client (QoS 1 allows the duplicates)."""
        old = self._client
        logger.warning(
            "MQTT: reconnecting with a fresh client (a dead-lettered message was in flight)"
        )
        with self._wake:
            self._inflight.clear()
            self._early.clear()
            self._rows_inflight = 0
            self._next_row = 0
            # every row is read back: what is held may have been handed and settled since
            self._held.clear()
            self._held_bytes = 0
            self._held_from = self._last_row + 1
            self._connected.clear()
            self._client = self._make_client()
            new = self._client
        for name in ("on_connect", "on_connect_fail", "on_disconnect", "on_publish"):
            setattr(old, name, None)
        old.disconnect()
        stopper = threading.Thread(target=old.loop_stop, name="edge-stn.mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(2.0)
        new.connect_async(self.config.host, self.config.port, self.config.keepalive)
        new.loop_start()

    def _sender_finish(self) -> None:
        """At stop: commit what is left, publish ``offline`` and wait (bounded) for its
        acknowledgement, write the last acknowledgements, disconnect, close the outbox."""
        deadline = self._stop_deadline or time.monotonic() + 1.0
        with self._wake:
            waiting, self._waiting = self._waiting, []
            settled, self._settled = self._settled, []
            refusals, self._refusals = self._refusals, []
        if waiting or settled or refusals:
            self._write(waiting, settled, [], refusals)
        if self._connected.is_set():
            doc = encode(status_offline(self.info, "stop", self._clock()))
            mid = self._publish_status(doc, "offline")
            with self._wake:
                while mid is not None and mid in self._inflight:
                    left = deadline - 0.3 - time.monotonic()
                    if left <= 0 or not self._connected.is_set():
                        break
                    self._wake.wait(min(left, 0.05))
        self._client.disconnect()
        with self._wake:
            settled, self._settled = self._settled, []
        try:
            if settled:
                self._write([], settled, [], [])
            self._refresh_state()
        finally:
            self.outbox.close()

    def _log_refusal(self, item: _InFlight, reason: ReasonCode) -> None:
        """A refused publish, logged at most once per :data:`REFUSAL_LOG_EVERY_S` per reason
        code with the count in between (an ACL that refuses everything must not flood the
        log); every refusal is counted (:meth:`_settle`, the outbox's dead letters). Called
        without the publisher's lock (paho's network thread, or the sender's early PUBACK)."""
        now = time.monotonic()
        with self._refusal_lock:
            last, suppressed = self._refusal_log.get(reason.value, (None, 0))
            if last is not None and now - last < REFUSAL_LOG_EVERY_S:
                self._refusal_log[reason.value] = (last, suppressed + 1)
                return
            self._refusal_log[reason.value] = (now, 0)
        hint = _REFUSAL_HINTS.get(reason.value, "")
        more = f" ({suppressed} more refused like this since the last report)" if suppressed else ""
        logger.error(
            "MQTT: the broker refused %s %s on %s: %s%s%s",
            item.kind,
            item.key,
            item.topic,
            _reason_text(reason),
            f": {hint}" if hint else "",
            more,
        )

    # ------------------------------------------------------------ paho callbacks (network thread)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._wake:
            if client is not self._client:
                return
            item = self._inflight.pop(mid, None)
            if item is None:
                self._early[mid] = (time.monotonic(), reason_code)
                return
            if item.row is not None:
                self._rows_inflight -= 1
            refused = self._settle(item, reason_code)
        if refused:  # logged outside the lock: a slow log must not stall the sender
            self._log_refusal(item, reason_code)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            # A refused CONNACK is not a connection (Frigate's _on_connect got this wrong).
            hint = _CONNACK_HINTS.get(reason_code.value, "see the broker's log")
            message = (
                f"broker {self.config.broker} refused the connection: "
                f"{_reason_text(reason_code)}: {hint}"
            )
            with self._lock:
                self._refusals_connect += 1
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
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        with self._wake:
            self._connects += 1
            connects, streak = self._connects, self._failure_streak
            self._failure_streak = 0
            self._refused_attempt = False
            self._last_error = None
            self._broker_max_packet = int(max_packet) if max_packet else None
            self._need_online = True
            self._connected.set()
            self._wake.notify_all()
        if self._command_filter is not None:
            # every connect: the session (and its subscription) ends with the connection
            client.subscribe(self._command_filter, qos=1)
        logger.info(
            "MQTT: connected to %s%s%s%s",
            self.config.broker,
            f" (reconnect {connects - 1})" if connects > 1 else "",
            f" after {streak} failed attempts" if streak else "",
            f", maximum packet size {max_packet}" if max_packet else "",
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        sink = self._command_sink
        if sink is None or client is not self._client:
            return
        try:
            props = getattr(msg, "properties", None)
            response = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            inbound = InboundMessage(
                msg.topic,
                bytes(msg.payload),
                str(response) if response else None,
                bytes(correlation) if correlation else None,
            )
        except (UnicodeDecodeError, TypeError, ValueError) as exc:  # a broker that let it by
            logger.warning("MQTT: unreadable message on the command filter ignored: %s", exc)
            return
        sink(inbound)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:`, so the cause (refused, timeout, a TLS
        # certificate that does not verify) is the exception being handled.
        if client is not self._client:
            return
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
        if client is not self._client:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._wake:
            stopping = self._stopping
            refused, self._refused_attempt = self._refused_attempt, False
            if was_connected and not stopping:
                # The oldest row in flight gets a strike: a message the broker drops the
                # connection for is the oldest one each time.
                rows = [i.row for i in self._inflight.values() if i.row is not None]
                if rows:
                    self._strikes.append(min(rows))
            self._wake.notify_all()
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

    # ------------------------------------------------------------ counters

    def counters(self) -> PublisherCounters:
        with self._lock:
            state = self._outbox_state
            outbox = {
                "epoch": state.epoch,
                **state.to_dict(),
                "waiting": len(self._waiting),
                "write_error": self._write_error,
            }
            return PublisherCounters(
                connected=self._connected.is_set(),
                connects=self._connects,
                reconnects=max(0, self._connects - 1),
                connect_refusals=self._refusals_connect,
                connect_failures=self._failures,
                pending=self._outbox_rows + len(self._waiting),
                pending_bytes=self._outbox_payload + self._waiting_bytes,
                inflight=self._rows_inflight,
                last_error=self._last_error,
                results=replace(self._counts["result"]),
                crops=replace(self._counts["crop"]),
                status=replace(self._counts["status"]),
                stats=replace(self._counts["stats"]),
                outbox=outbox,
                tracks=replace(self._counts["track"]),
            )

    def next_seq(self, camera: str) -> int:
        """The ``seq`` the next result of ``camera`` will carry."""
        with self._lock:
            return self._seq.get(camera, 0)

    def latency_samples(self) -> dict[str, list[float]]:
        """The outbox's latency samples since the last call (``commit_ms``, ``outbox_ms``)."""
        return {"commit_ms": self.commit_ms.drain(), "outbox_ms": self.outbox_ms.drain()}
