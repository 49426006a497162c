"""``edge-stn subscribe``: a consumer of the MQTT contract (DESIGN §6, docs/mqtt.md).

It prints results as a live table (one row per result) or as JSON lines, filters by device,
camera and label, saves crops to a folder (``<time>_<label>_<result id>_<n>.jpg``, the time being
the frame's capture time, UTC), and checks delivery: gaps in ``seq`` per (device, camera, epoch)
and duplicates by ``id`` are reported as they happen and summed up at the end. A malformed
payload is reported with a warning and skipped, never fatal.

``--share GROUP`` subscribes as a member of an MQTT v5 shared subscription
(``$share/GROUP/...``): the broker gives each result to one member of the group, so the group
scales out consumers; one member alone sees only part of each stream, so gaps are not tracked
then. ``--session NAME`` makes a persistent session (client id NAME, clean start off, session
expiry ``--session-expiry``): the broker queues results while the consumer is away and delivers
them when it comes back (with the shipped broker config, also across a broker restart).

Torch-free: paho-mqtt and the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_stn.errors import EdgeStnError
from edge_stn.publish.topics import parse_topic, subscription

logger = logging.getLogger(__name__)

StreamKey = tuple[str, str, str]
"""(device, camera, epoch): the scope of ``seq``."""

RESULT_VERSIONS = (1, 2)
"""Result schema versions this consumer knows (docs/mqtt.md: 2 fills track_id)."""
TRACK_VERSIONS = (1,)

_GROUP = re.compile(r"^[^/+#\0]{1,64}$")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


class SubscribeError(EdgeStnError):
    """Bad subscribe options, or a broker that refuses the connection."""


@dataclass(frozen=True)
class SubscribeOptions:
    host: str = "localhost"
    port: int = 1883
    protocol: Literal["v5", "v311"] = "v5"
    prefix: str = "edge-stn"
    devices: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    json_lines: bool = False
    crops_dir: Path | None = None
    share: str | None = None
    session: str | None = None
    session_expiry_s: int = 86_400
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls: bool = False
    keepalive: int = 30
    count: int | None = None
    """stop after this many unique results"""
    seconds: float | None = None
    """stop after this long"""

    def check(self) -> None:
        """Raise :class:`SubscribeError` naming the option that is wrong."""
        from edge_stn.config import check_id

        for name, values in (("--device", self.devices), ("--camera", self.cameras)):
            for v in values:
                try:
                    check_id(v)
                except ValueError as exc:
                    raise SubscribeError(f"{name}: {exc}") from None
        if self.share is not None and not _GROUP.fullmatch(self.share):
            raise SubscribeError(
                f"--share: {self.share!r} is not a group name (1-64 characters, no / + #)"
            )
        if self.session is not None and not 1 <= len(self.session) <= 256:
            raise SubscribeError("--session: give a name of 1-256 characters")
        if self.tls_ca is not None and not self.tls_ca.is_file():
            raise SubscribeError(f"--tls-ca: no such file: {self.tls_ca}")

    @property
    def v5(self) -> bool:
        return self.protocol == "v5"

    def filters(self) -> list[str]:
        """The topic filters: results (and crops with a crops folder; status unless shared),
        one per device x camera given, ``+`` for the rest."""
        devices: list[str | None] = list(self.devices) or [None]
        cameras: list[str | None] = list(self.cameras) or [None]
        out = []
        for d in devices:
            for c in cameras:
                out.append(subscription(self.prefix, "result", device=d, camera=c))
                out.append(subscription(self.prefix, "track", device=d, camera=c))
                if self.crops_dir is not None:
                    out.append(subscription(self.prefix, "crop", device=d, camera=c))
        if self.share is not None:
            out = [f"$share/{self.share}/{f}" for f in out]
        else:
            out += [subscription(self.prefix, "status", device=d) for d in devices]
        return list(dict.fromkeys(out))


# ---------------------------------------------------------------- loss and duplicates


@dataclass
class Observation:
    """What one result tells about delivery."""

    duplicate: bool = False
    gap: tuple[int, int] | None = None
    """first and last ``seq`` missing before this one"""
    late: bool = False
    """it fills (part of) an earlier gap"""
    reused: bool = False
    """its ``seq`` was already seen with another ``id``"""


@dataclass
class _Stream:
    first: int
    high: int
    missing: list[list[int]] = field(default_factory=list)
    """sorted, disjoint ``[start, end]`` ranges of seq not seen between first and high"""

    def count_missing(self) -> int:
        return sum(b - a + 1 for a, b in self.missing)

    def fill(self, seq: int) -> bool:
        for i, (a, b) in enumerate(self.missing):
            if a <= seq <= b:
                parts = [[a, seq - 1]] if a < seq else []
                parts += [[seq + 1, b]] if seq < b else []
                self.missing[i : i + 1] = parts
                return True
        return False


class DeliveryTracker:
    """Gaps in ``seq`` per (device, camera, epoch) and duplicates by ``id`` (the last
    ``max_ids`` ids are remembered). A stream starts at the first ``seq`` seen, so a consumer
    that joins late reports no gap for what came before it."""

    def __init__(self, max_ids: int = 200_000) -> None:
        self.streams: dict[StreamKey, _Stream] = {}
        self._ids: OrderedDict[str, int] = OrderedDict()
        self._max_ids = max_ids
        self.unique = 0
        self.duplicates = 0
        self.gaps = 0

    def add(self, key: StreamKey, result_id: str, seq: int) -> Observation:
        obs = Observation()
        if result_id in self._ids:
            self._ids.move_to_end(result_id)
            self.duplicates += 1
            obs.duplicate = True
            return obs
        self._ids[result_id] = seq
        if len(self._ids) > self._max_ids:
            self._ids.popitem(last=False)
        self.unique += 1
        s = self.streams.get(key)
        if s is None:
            self.streams[key] = _Stream(first=seq, high=seq)
        elif seq > s.high:
            if seq > s.high + 1:
                obs.gap = (s.high + 1, seq - 1)
                s.missing.append([s.high + 1, seq - 1])
                self.gaps += 1
            s.high = seq
        elif seq < s.first:
            if seq < s.first - 1:
                s.missing.insert(0, [seq + 1, s.first - 1])
            s.first = seq
            obs.late = True
        elif s.fill(seq):
            obs.late = True
        else:
            obs.reused = True
        return obs

    @property
    def missing(self) -> int:
        """Results not (yet) seen inside the streams' ranges."""
        return sum(s.count_missing() for s in self.streams.values())

    def missing_by_stream(self) -> dict[StreamKey, int]:
        return {k: s.count_missing() for k, s in self.streams.items() if s.missing}


# ---------------------------------------------------------------- payload checks


def check_result(doc: Any, device: str, camera: str | None) -> str | None:
    """Why a result payload breaks the contract (None: usable)."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    for name, kind in (("id", str), ("device", str), ("camera", str), ("epoch", str)):
        if not isinstance(doc.get(name), kind) or not doc[name]:
            return f"'{name}' missing or not a non-empty string"
    seq = doc.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        return f"'seq' must be an integer >= 0, got {seq!r}"
    if not isinstance(doc.get("detections"), list):
        return "'detections' missing or not a list"
    for i, det in enumerate(doc["detections"]):
        if not isinstance(det, dict) or not isinstance(det.get("label"), str):
            return f"detections[{i}] has no 'label'"
    if doc["device"] != device or (camera is not None and doc["camera"] != camera):
        return f"device/camera {doc['device']}/{doc['camera']} differ from the topic's"
    return None


def check_track(doc: Any, device: str, camera: str | None) -> str | None:
    """Why a track announcement breaks the contract (None: usable)."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    for name in ("device", "camera", "epoch", "result_id", "label"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            return f"'{name}' missing or not a non-empty string"
    for name in ("track_id", "n"):
        v = doc.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return f"'{name}' must be an integer >= 0, got {v!r}"
    if doc["device"] != device or (camera is not None and doc["camera"] != camera):
        return f"device/camera {doc['device']}/{doc['camera']} differ from the topic's"
    return None


def crop_file_name(ts: float, label: str, result_id: str, index: int) -> str:
    """``20260101T120000.123Z_7_<id>_0.jpg``: time (UTC, ms), label, result id, index."""
    t = datetime.fromtimestamp(ts, tz=timezone.utc)
    stamp = t.strftime("%Y%m%dT%H%M%S") + f".{t.microsecond // 1000:03d}Z"
    safe_label = _SAFE.sub("-", label).strip("-") or "unlabelled"
    return f"{stamp}_{safe_label}_{_SAFE.sub('-', result_id)}_{index}.jpg"


# ---------------------------------------------------------------- the consumer


@dataclass
class Summary:
    results: int = 0
    unique: int = 0
    duplicates: int = 0
    malformed: int = 0
    missing: int = 0
    gaps: int = 0
    streams: int = 0
    crops: int = 0
    crops_saved: int = 0
    shown: int = 0
    tracks: int = 0

    def lines(self, shared: bool) -> list[str]:
        out = [
            f"results {self.results} received, {self.unique} unique, {self.duplicates} "
            f"duplicates, {self.malformed} malformed, {self.shown} shown",
        ]
        if shared:
            out.append("seq gaps not tracked: with --share each member gets part of a stream")
        else:
            out.append(
                f"seq gaps {self.gaps}, missing {self.missing} in {self.streams} "
                "stream(s) (device, camera, epoch)"
            )
        out.append(f"crops {self.crops} received, {self.crops_saved} saved")
        if self.tracks:
            out.append(f"track announcements {self.tracks} received")
        return out


class Consumer:
    """A paho client that reads results (and crops, status) and checks their delivery.

    ``out`` gets the table or JSON lines, ``err`` the warnings. ``keep``: remember every unique
    result document (tests)."""

    def __init__(
        self,
        opts: SubscribeOptions,
        *,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        keep: bool = False,
        client_id: str | None = None,
    ) -> None:
        opts.check()
        self.opts = opts
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.keep = keep
        self.docs: list[dict[str, Any]] = []
        self.track_docs: list[dict[str, Any]] = []
        self._unknown_versions: set[tuple[str, Any]] = set()
        self.tracker = DeliveryTracker()
        self.summary = Summary()
        self.done = threading.Event()
        self.fatal: str | None = None
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._header = False
        self._recent: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._saved: OrderedDict[str, None] = OrderedDict()
        self._warned_unreachable = False
        if opts.crops_dir is not None:
            try:
                opts.crops_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SubscribeError(f"--crops: cannot create {opts.crops_dir}: {exc}") from None
        cid = client_id or opts.session or f"edge-stn-sub-{os.getpid()}-{secrets.token_hex(3)}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=MQTTProtocolVersion.MQTTv5 if opts.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if opts.v5 else opts.session is None,
        )
        self.client.suppress_exceptions = True
        self.client.reconnect_delay_set(1, 30)
        if opts.username is not None or opts.password is not None:
            self.client.username_pw_set(opts.username, opts.password)
        if opts.tls or opts.tls_ca is not None:
            self.client.tls_set(ca_certs=str(opts.tls_ca) if opts.tls_ca else None)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        o = self.opts
        props = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if o.v5 and o.session is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = o.session_expiry_s
            clean_start = False
        self.client.connect_async(
            o.host, o.port, o.keepalive, clean_start=clean_start, properties=props
        )
        self.client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        stopper = threading.Thread(target=self.client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(5.0)

    def run(self) -> int:
        """Until ``count`` results, ``seconds``, SIGINT/SIGTERM or a refused connection; the
        summary at the end. Returns the exit code."""
        self.start()
        deadline = None if self.opts.seconds is None else time.monotonic() + self.opts.seconds
        try:
            while not self.done.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.done.wait(0.2 if left is None else min(0.2, left))
        finally:
            self.close()
        if self.fatal is not None:
            raise SubscribeError(self.fatal)
        self.print_summary()
        return 0

    def print_summary(self) -> None:
        s = self.summary_now()
        stream = self.err if self.opts.json_lines else self.out
        for line in s.lines(self.opts.share is not None):
            print(f"summary: {line}", file=stream, flush=True)

    def summary_now(self) -> Summary:
        with self._lock:
            s = self.summary
            s.unique, s.duplicates = self.tracker.unique, self.tracker.duplicates
            s.missing, s.gaps = self.tracker.missing, self.tracker.gaps
            s.streams = len(self.tracker.streams)
            return Summary(**vars(s))

    def _warn(self, message: str) -> None:
        print(f"warning: {message}", file=self.err, flush=True)

    # ------------------------------------------------------------ paho callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        o = self.opts
        if rc.is_failure:
            self.fatal = f"broker {o.host}:{o.port} refused the connection: {rc.getName()}"
            self.done.set()
            return
        if o.session is not None and flags.session_present:
            logger.info("resumed session %s", o.session)
        client.subscribe([(f, 1) for f in o.filters()])

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._warned_unreachable:
            self._warned_unreachable = True
            exc = sys.exc_info()[1]
            self._warn(f"cannot reach {self.opts.host}:{self.opts.port}: {exc}; retrying")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        self._warned_unreachable = False

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        refused = [f for f, rc in zip(self.opts.filters(), rcs, strict=False) if rc.is_failure]
        if refused:
            self._warn(f"the broker refused the subscription to {', '.join(refused)}")
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(msg)
        except Exception as exc:  # a consumer survives whatever arrives
            with self._lock:
                self.summary.malformed += 1
            self._warn(f"could not handle a message on {msg.topic}: {exc}")

    # ------------------------------------------------------------ messages

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(self.opts.prefix, msg.topic)
        if parsed is None:
            return
        if parsed.kind == "result":
            self._on_result(msg, parsed.device, parsed.camera)
        elif parsed.kind == "crop" and parsed.result_id is not None:
            self._on_crop(msg, parsed.result_id, parsed.index or 0)
        elif parsed.kind == "track":
            self._on_track(msg, parsed.device, parsed.camera)
        elif parsed.kind == "status":
            self._on_status(msg, parsed.device)

    def _on_result(self, msg: mqtt.MQTTMessage, device: str, camera: str | None) -> None:
        now = time.time()
        try:
            doc = json.loads(msg.payload)
        except (UnicodeDecodeError, ValueError) as exc:
            problem: str | None = f"not JSON: {exc}"
            doc = None
        else:
            problem = check_result(doc, device, camera)
        if problem is not None:
            with self._lock:
                self.summary.results += 1
                self.summary.malformed += 1
            self._warn(f"malformed result on {msg.topic}: {problem}; skipped")
            return
        self._check_version("result", doc, RESULT_VERSIONS)
        key = (doc["device"], doc["camera"], doc["epoch"])
        labels = [d["label"] for d in doc["detections"]]
        with self._lock:
            self.summary.results += 1
            obs = self.tracker.add(key, doc["id"], doc["seq"])
            capture = doc.get("capture_ts")
            ts = float(capture) if isinstance(capture, (int, float)) else now
            self._recent[doc["id"]] = (ts, labels)
            if len(self._recent) > 10_000:
                self._recent.popitem(last=False)
            if not obs.duplicate and self.keep:
                self.docs.append(doc)
            unique = self.tracker.unique
        where = f"{doc['device']}/{doc['camera']} epoch {doc['epoch']}"
        shared = self.opts.share is not None
        if obs.duplicate:
            self._warn(f"duplicate result {doc['id']} ({where} seq {doc['seq']}): skipped")
            return
        if obs.gap is not None and not shared:
            a, b = obs.gap
            span = f"seq {a}" if a == b else f"seq {a}-{b}"
            self._warn(f"gap in {where}: {span} missing ({b - a + 1} result(s))")
        if obs.late and not shared:
            self._warn(f"late result {where} seq {doc['seq']} (it fills a reported gap)")
        if obs.reused:
            self._warn(f"{where} seq {doc['seq']} seen again with another id {doc['id']}")
        wanted = self.opts.labels
        if not wanted or any(label in wanted for label in labels):
            self._show(doc, now)
        if self.opts.count is not None and unique >= self.opts.count:
            self.done.set()

    def _show(self, doc: dict[str, Any], now: float) -> None:
        with self._lock:
            self.summary.shown += 1
            if self.opts.json_lines:
                print(json.dumps(doc, separators=(",", ":")), file=self.out, flush=True)
                return
            if not self._header:
                self._header = True
                print(
                    f"{'time':<12}  {'device':<12} {'camera':<10} {'seq':>7}  {'det':>3}  "
                    f"{'labels':<28} {'latency':>9}",
                    file=self.out,
                )
            capture = doc.get("capture_ts")
            latency = (
                f"{(now - capture) * 1000:.0f} ms" if isinstance(capture, (int, float)) else "-"
            )
            t = datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")[:12]
            labels = " ".join(
                f"{d['label']}({d.get('score', 0):.2f})" for d in doc["detections"][:6]
            )
            print(
                f"{t:<12}  {doc['device']:<12} {doc['camera']:<10} {doc['seq']:>7}  "
                f"{len(doc['detections']):>3}  {labels:<28} {latency:>9}",
                file=self.out,
                flush=True,
            )

    def _on_crop(self, msg: mqtt.MQTTMessage, result_id: str, index: int) -> None:
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        with self._lock:
            self.summary.crops += 1
            known = self._recent.get(result_id)
            duplicate = msg.topic in self._saved
        label = user.get("label")
        if label is None and known is not None and index < len(known[1]):
            label = known[1][index]
        label = label or "unknown"
        wanted = self.opts.labels
        if duplicate or self.opts.crops_dir is None or (wanted and label not in wanted):
            return
        ts = known[0] if known is not None else time.time()
        path = self.opts.crops_dir / crop_file_name(ts, label, result_id, index)
        try:
            path.write_bytes(bytes(msg.payload))
        except OSError as exc:
            self._warn(f"cannot save crop {path}: {exc}")
            return
        with self._lock:
            self.summary.crops_saved += 1
            self._saved[msg.topic] = None
            if len(self._saved) > 10_000:
                self._saved.popitem(last=False)

    def _check_version(self, kind: str, doc: dict[str, Any], known: tuple[int, ...]) -> None:
        """A version this consumer does not know is read as far as it goes, with one warning
        per version (fields it does not know are ignored)."""
        version = doc.get("schema_version")
        if version in known or (kind, version) in self._unknown_versions:
            return
        self._unknown_versions.add((kind, version))
        self._warn(
            f"{kind} schema_version {version!r} is not one this subscriber knows "
            f"({', '.join(map(str, known))}): reading the fields it knows"
        )

    def _on_track(self, msg: mqtt.MQTTMessage, device: str, camera: str | None) -> None:
        """A track announcement (crops.policy best_per_track): the crop chosen for a track."""
        try:
            doc = json.loads(msg.payload)
            problem = check_track(doc, device, camera)
        except (UnicodeDecodeError, ValueError) as exc:
            problem = f"not JSON: {exc}"
        if problem is not None:
            with self._lock:
                self.summary.malformed += 1
            self._warn(f"malformed track announcement on {msg.topic}: {problem}; skipped")
            return
        self._check_version("track", doc, TRACK_VERSIONS)
        wanted = self.opts.labels
        with self._lock:
            self.summary.tracks += 1
            if self.keep:
                self.track_docs.append(doc)
        if wanted and doc["label"] not in wanted:
            return
        if self.opts.json_lines:
            print(json.dumps(doc, separators=(",", ":")), file=self.out, flush=True)
            return
        crop = doc.get("crop") or {}
        print(
            f"# track {doc['device']}/{doc['camera']} {doc['track_id']} ({doc.get('reason')}): "
            f"{doc['label']}({float(doc.get('score', 0)):.2f}) {doc.get('hits')} hits, frames "
            f"{doc.get('first_frame_index')}-{doc.get('last_frame_index')}, crop "
            f"{crop.get('topic', doc.get('crop_status'))}",
            file=self.out,
            flush=True,
        )

    def _on_status(self, msg: mqtt.MQTTMessage, device: str) -> None:
        try:
            doc = json.loads(msg.payload)
            state = doc["state"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._warn(f"malformed status on {msg.topic}; skipped")
            return
        if not self.opts.json_lines:
            extra = f" ({doc.get('reason')})" if state == "offline" else ""
            retained = " [retained]" if msg.retain else ""
            print(f"# {device} {state}{extra}{retained}", file=self.out, flush=True)


def run_subscribe(opts: SubscribeOptions) -> int:
    """``edge-stn subscribe``: runs until stopped; SIGINT and SIGTERM end it with the summary."""
    consumer = Consumer(opts)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        consumer.done.set()

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        what = "JSON lines" if opts.json_lines else "table"
        shared = f", shared subscription group {opts.share}" if opts.share else ""
        session = f", persistent session {opts.session}" if opts.session else ""
        print(
            f"subscribed to {opts.host}:{opts.port} (MQTT {opts.protocol}{shared}{session}): "
            f"{', '.join(opts.filters())} ({what})",
            file=sys.stderr,
            flush=True,
        )
        return consumer.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def add_broker_arguments(p: Any, *, config_help: str, username_help: str) -> None:
    """The broker connection's arguments, shared by ``edge-stn subscribe`` and ``edge-stn
    command`` (an argparse parser); :func:`broker_arguments` reads them back."""
    p.add_argument("--host", help="broker host (default localhost)")
    p.add_argument("--port", type=int, help="broker port (default 1883)")
    p.add_argument("--protocol", choices=["v5", "v311"], help="MQTT version (default v5)")
    p.add_argument("--prefix", help="topic prefix (default edge-stn)")
    p.add_argument("--config", help=config_help)
    p.add_argument("--username", help=username_help)
    p.add_argument(
        "--password-env",
        default="EDGE_STN_MQTT_PASSWORD",
        metavar="VAR",
        help="environment variable holding the password (default EDGE_STN_MQTT_PASSWORD)",
    )
    p.add_argument("--tls-ca", metavar="FILE", help="CA file: connect with TLS")


def broker_arguments(args: Any) -> dict[str, Any]:
    """What :func:`add_broker_arguments` parsed, as options (None where not given; the
    password read from its environment variable)."""
    return {
        "host": args.host,
        "port": args.port,
        "protocol": args.protocol,
        "prefix": args.prefix,
        "username": args.username,
        "password": os.environ.get(args.password_env) if args.password_env else None,
        "tls_ca": Path(args.tls_ca) if args.tls_ca else None,
    }


def options_from_config(path: Path, **overrides: Any) -> SubscribeOptions:
    """Broker, protocol, prefix, credentials and TLS taken from a daemon config file."""
    from edge_stn.config import load_config

    cfg = load_config(path)
    mq = cfg.mqtt
    base: dict[str, Any] = {
        "host": mq.host,
        "port": mq.port,
        "protocol": mq.protocol,
        "prefix": mq.topic_prefix,
        "username": mq.username,
        "password": mq.password.get_secret_value() if mq.password is not None else None,
        "tls": mq.tls is not None,
        "tls_ca": mq.tls.ca_file if mq.tls is not None else None,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SubscribeOptions(**base)
