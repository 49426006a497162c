"""Remote commands (DESIGN §6, docs/mqtt.md): ``<prefix>/<device>/cmd/<name>`` in, a reply on
the MQTT v5 response topic (with the correlation data) or ``.../cmd/<name>/reply``.

Three parts:

* :class:`CommandHandler` parses, authorises, validates and carries out one message, and always
  returns a reply document (``ok`` false and an ``error`` for anything wrong); it never raises
  on bad input (a property-based test throws arbitrary bytes and topics at it). It reaches the
  daemon only through :class:`CommandTarget`.
* :class:`CommandRunner` is the command thread (``edge-stn.commands``): paho's network thread
  only puts messages in its bounded queue (full: a ``busy`` reply), and the detector never waits
  for a command. Replies go out through the publisher's sender thread
  (:meth:`~edge_stn.publish.client.MqttPublisher.publish_reply`), QoS 1, not retained.
* The gates: the broker's ACL first (deploy/mosquitto/acl: a gateway reads its own cmd subtree,
  operators write it), then ``commands.enabled``, ``commands.allow`` and the shared
  ``commands.token`` (compared in constant time, never logged).

Commands (payload: one JSON object; ``token`` and ``request_id`` are accepted by all, any
other unknown field is rejected):

* ``reload``: as SIGHUP; the reply names the sections that changed, or the config error (the
  running config is kept).
* ``thresholds``: ``detection`` (score_threshold, nms_iou, max_per_frame) and ``proposals``
  (threshold, min_contrast, background_kernel, min_area, max_area) of ``cameras`` (default:
  all), validated like the config and applied live; the reply has the old and new values.
  They last until the next reload or restart (the config file is the truth then).
* ``snapshot``: the latest frame of a camera as a JPEG (base64 in the reply), shrunk to fit the
  broker's packet limit.
* ``model``: a model in chunks (``transfer``, ``index``, ``count``, ``data`` in base64) or from
  a ``url``, with its ``sha256`` and its ``signature`` (the ``.sig`` document of
  ``edge-stn sign-model``); checked against ``model.trust`` (required: signature or
  allow-list), then loaded and warmed up beside the running model and swapped in without
  stopping a camera. Interim replies ``receiving`` (a chunk stored) and ``loading``; the final
  one ``done`` or ``failed`` (the running model kept).

Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from edge_stn.config import (
    COMMAND_NAMES,
    ID_PATTERN,
    CommandsConfig,
    DaemonConfig,
    DetectionConfig,
    Id,
    ModelConfig,
    ProposalConfig,
)
from edge_stn.errors import EdgeStnError
from edge_stn.ops.transfer import MODEL_NAME, ChunkProgress, ModelInbox, StoredModel
from edge_stn.publish.client import InboundMessage
from edge_stn.publish.payloads import encode
from edge_stn.publish.topics import TopicTree, parse_topic
from edge_stn.records import Frame

logger = logging.getLogger(__name__)

REPLY_SCHEMA_VERSION = 1
QUEUE_SIZE = 16
"""Commands waiting for the command thread; more get a ``busy`` reply."""
MAIN_THREAD_TIMEOUT_S = 30.0
"""How long a command waits for the daemon's main thread to carry it out."""
REJECT_LOG_BURST = 10
REJECT_LOG_WINDOW_S = 60.0
MAX_RESPONSE_TOPIC = 512
SNAPSHOT_QUALITIES = (80, 65, 50, 35)
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

Status = Literal["done", "receiving", "loading", "rejected", "failed"]
FINAL: tuple[Status, ...] = ("done", "rejected", "failed")


class CommandRejected(EdgeStnError):
    """A command that is not carried out: malformed, unauthorised, or invalid values.
    Nothing was applied."""


class CommandFailed(EdgeStnError):
    """A valid command that could not be carried out (a config that does not validate, a
    model that does not load, a full disk). Nothing was applied."""


# ---------------------------------------------------------------- the commands


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Command(_Strict):
    token: SecretStr | None = Field(None, description="commands.token, when one is configured")
    request_id: str | None = Field(
        None,
        pattern=REQUEST_ID.pattern,
        description="echoed in the reply (for MQTT 3.1.1 clients, which have no correlation data)",
    )


class ReloadCommand(_Command):
    pass


class DetectionChange(_Strict):
    score_threshold: float | None = None
    nms_iou: float | None = None
    max_per_frame: int | None = None


class ProposalChange(_Strict):
    threshold: int | Literal["local", "otsu"] | None = None
    min_contrast: float | None = None
    background_kernel: int | None = None
    min_area: int | None = None
    max_area: int | None = None


class ThresholdsCommand(_Command):
    detection: DetectionChange | None = None
    proposals: ProposalChange | None = None
    cameras: list[Id] | None = Field(
        None, min_length=1, description="cameras whose proposals change (default: every one)"
    )

    @model_validator(mode="after")
    def _something(self) -> ThresholdsCommand:
        if not self.detection_changes and not self.proposal_changes:
            raise ValueError("nothing to change: give detection and/or proposals values")
        return self

    @property
    def detection_changes(self) -> dict[str, Any]:
        return self.detection.model_dump(exclude_unset=True) if self.detection else {}

    @property
    def proposal_changes(self) -> dict[str, Any]:
        return self.proposals.model_dump(exclude_unset=True) if self.proposals else {}


class SnapshotCommand(_Command):
    camera: Id | None = Field(None, description="default: the first camera")
    quality: int = Field(80, ge=10, le=100, description="JPEG quality to start from")
    max_width: int | None = Field(None, ge=16, le=7680, description="scale down to this width")


class ModelCommand(_Command):
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="of the whole model file")
    name: str = Field("model.onnx", pattern=MODEL_NAME.pattern, description="file name")
    signature: dict[str, Any] | None = Field(
        None, description="the .sig document of `edge-stn sign-model` (chunk 0 only)"
    )
    url: str | None = Field(None, min_length=8, max_length=2048)
    transfer: str | None = Field(None, pattern=ID_PATTERN.pattern)
    index: int | None = Field(None, ge=0)
    count: int | None = Field(None, ge=1, le=1_000_000)
    data: str | None = Field(None, description="base64 of this chunk's bytes")

    @model_validator(mode="after")
    def _one_way(self) -> ModelCommand:
        chunk = (self.transfer, self.index, self.count, self.data)
        if self.url is not None:
            if any(v is not None for v in chunk):
                raise ValueError("give either url or transfer/index/count/data, not both")
        elif any(v is None for v in chunk):
            raise ValueError("give url, or all of transfer, index, count and data")
        elif self.index is not None and self.count is not None and self.index >= self.count:
            raise ValueError(f"index {self.index} is not below count {self.count}")
        return self


_MODELS: dict[str, type[_Command]] = {
    "reload": ReloadCommand,
    "thresholds": ThresholdsCommand,
    "snapshot": SnapshotCommand,
    "model": ModelCommand,
}
assert tuple(_MODELS) == COMMAND_NAMES


def _validation_text(exc: ValidationError) -> str:
    """The first problems, with their field paths, never the input values (a token or a
    chunk of model could be among them)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- the daemon, as commands see it


class CommandTarget(Protocol):
    """What commands may do to the daemon (:class:`edge_stn.daemon.Daemon` implements it).
    Every method that changes something runs it on the daemon's main thread, the one that
    handles SIGHUP, so a command and a reload never interleave."""

    @property
    def config(self) -> DaemonConfig: ...

    def reload_config(self) -> dict[str, Any]:
        """As SIGHUP; what changed. :class:`CommandFailed` when the file does not validate."""
        ...

    def update_config(self, change: Callable[[DaemonConfig], DaemonConfig]) -> DaemonConfig:
        """Apply ``change(running config)`` live (detection, proposals); the new config.
        What ``change`` raises comes back unchanged (nothing applied)."""
        ...

    def latest_frame(self, camera: str) -> Frame | None:
        """The newest frame the detector took from ``camera``, or None."""
        ...

    def swap_model(self, model: ModelConfig, on_done: Callable[[str | None], None]) -> bool:
        """Load ``model`` beside the running one and swap it in when it warmed up;
        ``on_done(None)`` then, or ``on_done(error)`` (the running model kept). False when
        ``model`` is the running one already (``on_done`` is not called)."""
        ...


# ---------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """A reply document and where it goes (``topic`` None: nowhere valid; it is only logged)."""

    topic: str | None
    document: dict[str, Any]
    correlation: bytes | None = None

    @property
    def status(self) -> Status:
        status: Status = self.document["status"]
        return status

    @property
    def ok(self) -> bool:
        return bool(self.document["ok"])


@dataclass
class CommandCounters:
    """Since start: messages received, and how they ended (interim replies not counted)."""

    received: int = 0
    done: int = 0
    rejected: int = 0
    failed: int = 0
    busy: int = 0
    ignored: int = 0


@dataclass
class _Request:
    """One message being handled: where its reply goes."""

    name: str | None
    topic: str | None
    correlation: bytes | None
    request_id: str | None = None
    started: float = field(default_factory=time.monotonic)


class CommandHandler:
    """Parse, authorise, validate and carry out commands (see the module docstring).

    ``reply_room(topic)``: the largest payload a reply may have (the broker's packet limit);
    ``defer(fn)``: run ``fn`` later on the command thread (the end of a model swap arrives on
    the daemon's main thread; by default it runs at once); ``send(reply)``: publish a reply that
    comes after :meth:`handle` returned (the end of a model swap)."""

    def __init__(
        self,
        target: CommandTarget,
        topics: TopicTree,
        *,
        send: Callable[[Reply], None] = lambda reply: None,
        reply_room: Callable[[str], int] = lambda topic: 1 << 20,
        defer: Callable[[Callable[[], None]], None] = lambda fn: fn(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.topics = topics
        self.send = send
        self.reply_room = reply_room
        self.defer = defer
        self._clock = clock
        self.counters = CommandCounters()
        self._lock = threading.Lock()
        self._inbox: ModelInbox | None = None
        self._inbox_settings: tuple[Any, ...] | None = None
        self._reject_log: list[float] = []
        self._reject_suppressed = 0

    # ------------------------------------------------------------ entry point

    def handle(self, msg: InboundMessage) -> Reply | None:
        """The reply to one message; None only for a reply topic of ours (ignored). Never
        raises: an unexpected fault is a ``failed`` reply and a logged traceback."""
        parsed = parse_topic(self.topics.prefix, msg.topic) if isinstance(msg.topic, str) else None
        if parsed is not None and parsed.kind == "reply":
            self._count("ignored")
            return None
        self._count("received")
        name = (
            parsed.name
            if parsed is not None and parsed.kind == "cmd" and parsed.device == self.topics.device
            else None
        )
        level = name if name is not None and ID_PATTERN.fullmatch(name) else None
        req = _Request(level, None, msg.correlation)
        try:
            try:
                req.topic = self._reply_topic(level, msg.response_topic)
            except CommandRejected:
                req.topic = self._reply_topic(level, None)  # the reply says why, there
                raise
            if name is None:
                raise CommandRejected(
                    f"not a command topic of this device: expected {self.topics.base}/cmd/<name>"
                )
            return self._handle(name, msg.payload, req)
        except CommandRejected as exc:
            return self._final(req, "rejected", error=exc.detail)
        except CommandFailed as exc:
            return self._final(req, "failed", error=exc.detail)
        except Exception as exc:  # a bug: reported, counted and survived
            logger.exception("command %s: unexpected failure", req.name)
            return self._final(req, "failed", error=f"internal error: {type(exc).__name__}")

    def busy(self, msg: InboundMessage) -> Reply | None:
        """The reply to a message the command thread has no room for."""
        parsed = parse_topic(self.topics.prefix, msg.topic)
        if parsed is not None and parsed.kind == "reply":
            return None
        name = parsed.name if parsed is not None and parsed.kind == "cmd" else None
        level = name if name is not None and ID_PATTERN.fullmatch(name) else None
        self._count("busy")
        try:
            topic = self._reply_topic(level, msg.response_topic)
        except CommandRejected:
            topic = self._reply_topic(level, None)
        req = _Request(level, topic, msg.correlation)
        return self._final(
            req, "rejected", error=f"busy: {QUEUE_SIZE} commands are waiting; try again"
        )

    def tick(self) -> None:
        """Periodic work on the command thread: discard a stalled model transfer."""
        if self._inbox is not None:
            self._inbox.expire()

    # ------------------------------------------------------------ gates

    def _reply_topic(self, name: str | None, response: str | None) -> str | None:
        default = self.topics.cmd_reply(name) if name is not None else None
        if response is None:
            return default
        problem = None
        if not response or len(response) > MAX_RESPONSE_TOPIC:
            problem = f"empty or longer than {MAX_RESPONSE_TOPIC} characters"
        elif set(response) & {"+", "#", "\0"} or response.startswith("$"):
            problem = "holds a wildcard or starts with '$'"
        elif response.startswith(self.topics.base + "/"):
            parsed = parse_topic(self.topics.prefix, response)
            if parsed is None or parsed.kind != "reply":
                problem = "is in this device's subtree but not a .../cmd/<name>/reply topic"
        if problem is not None:
            raise CommandRejected(f"the response topic {problem}")
        return response

    def _authorise(self, name: str, doc: dict[str, Any]) -> None:
        """The token first: whoever lacks it learns nothing about what is allowed here."""
        cfg = self.target.config.commands
        if not cfg.enabled:
            raise CommandRejected("commands are disabled here (commands.enabled)")
        if cfg.token is not None:
            given = doc.get("token")
            expected = cfg.token.get_secret_value().encode("utf-8")
            if not isinstance(given, str) or not hmac.compare_digest(
                given.encode("utf-8", "surrogatepass"), expected
            ):
                raise CommandRejected("unauthorised: missing or wrong token")
        if name not in COMMAND_NAMES:
            raise CommandRejected(f"unknown command {name!r}: one of {', '.join(COMMAND_NAMES)}")
        if name not in cfg.allow:
            raise CommandRejected(f"command {name!r} is not allowed here (commands.allow)")

    # ------------------------------------------------------------ dispatch

    def _handle(self, name: str, payload: bytes, req: _Request) -> Reply:
        doc = _decode(payload)
        rid = doc.get("request_id")
        if isinstance(rid, str) and REQUEST_ID.fullmatch(rid):
            req.request_id = rid
        self._authorise(name, doc)
        try:
            command = _MODELS[name].model_validate(doc)
        except ValidationError as exc:
            raise CommandRejected(f"invalid {name} command: {_validation_text(exc)}") from None
        if isinstance(command, ReloadCommand):
            return self._final(req, "done", result=self.target.reload_config())
        if isinstance(command, ThresholdsCommand):
            return self._final(req, "done", result=self._thresholds(command))
        if isinstance(command, SnapshotCommand):
            return self._final(req, "done", result=self._snapshot(command, req))
        assert isinstance(command, ModelCommand)
        return self._model(command, req)

    def _thresholds(self, cmd: ThresholdsCommand) -> dict[str, Any]:
        det, prop = cmd.detection_changes, cmd.proposal_changes
        before: dict[str, Any] = {}

        def change(cfg: DaemonConfig) -> DaemonConfig:
            ids = [c.id for c in cfg.cameras]
            wanted = cmd.cameras if cmd.cameras is not None else ids
            unknown = [c for c in wanted if c not in ids]
            if unknown:
                raise CommandRejected(f"no camera {unknown[0]!r} here (cameras: {', '.join(ids)})")
            before.update(_threshold_values(cfg, det, prop, wanted))
            try:
                detection = DetectionConfig.model_validate({**cfg.detection.model_dump(), **det})
                cameras = [
                    c.model_copy(
                        update={
                            "proposals": ProposalConfig.model_validate(
                                {**c.proposals.model_dump(), **prop}
                            )
                        }
                    )
                    if prop and c.id in wanted
                    else c
                    for c in cfg.cameras
                ]
            except ValidationError as exc:
                raise CommandRejected(f"invalid thresholds: {_validation_text(exc)}") from None
            return cfg.model_copy(update={"detection": detection, "cameras": cameras})

        new = self.target.update_config(change)
        wanted = cmd.cameras if cmd.cameras is not None else [c.id for c in new.cameras]
        after = _threshold_values(new, det, prop, wanted)
        logger.info("command thresholds: %s -> %s", before, after)
        return {"old": before, "new": after, "lasts": "until the next reload or restart"}

    def _snapshot(self, cmd: SnapshotCommand, req: _Request) -> dict[str, Any]:
        cfg = self.target.config
        ids = [c.id for c in cfg.cameras]
        camera = cmd.camera if cmd.camera is not None else ids[0]
        if camera not in ids:
            raise CommandRejected(f"no camera {camera!r} here (cameras: {', '.join(ids)})")
        frame = self.target.latest_frame(camera)
        if frame is None:
            raise CommandFailed(f"camera {camera} has produced no frame yet")
        room = self.reply_room(req.topic) if req.topic is not None else 1 << 20
        jpeg, width, height, quality = _encode_to_fit(frame, cmd, (room - 1024) * 3 // 4)
        return {
            "camera": camera,
            "frame_index": frame.index,
            "capture_ts": frame.capture_ts,
            "frame_width": frame.width,
            "frame_height": frame.height,
            "width": width,
            "height": height,
            "quality": quality,
            "content_type": "image/jpeg",
            "bytes": len(jpeg),
            "jpeg": base64.b64encode(jpeg).decode("ascii"),
        }

    # ------------------------------------------------------------ model

    def _inbox_for(self, cfg: CommandsConfig) -> ModelInbox:
        settings = (cfg.resolved_model_dir(), cfg.max_model_bytes, cfg.transfer_timeout_s)
        if self._inbox is None or self._inbox_settings != settings:
            if self._inbox is not None:
                self._inbox.discard()
            self._inbox = ModelInbox(settings[0], max_bytes=settings[1], timeout_s=settings[2])
            self._inbox_settings = settings
        return self._inbox

    def _model(self, cmd: ModelCommand, req: _Request) -> Reply:
        from edge_stn.ops.transfer import TransferError
        from edge_stn.runtime.engine import verify_model_file

        cfg = self.target.config
        if cfg.model.trust.require == "none":
            raise CommandRejected(
                "a model is replaced remotely only when model.trust asks for a signature or "
                "an allow-listed sha256 (model.trust.require is 'none')"
            )
        inbox = self._inbox_for(cfg.commands)
        try:
            if cmd.url is not None:
                got: ChunkProgress | StoredModel = inbox.fetch(
                    cmd.url,
                    cmd.sha256,
                    name=cmd.name,
                    signature=cmd.signature,
                    timeout_s=cfg.commands.fetch_timeout_s,
                )
            else:
                assert cmd.transfer is not None and cmd.data is not None
                assert cmd.index is not None and cmd.count is not None
                try:
                    data = base64.b64decode(cmd.data, validate=True)
                except (binascii.Error, ValueError):
                    raise CommandRejected("data is not base64") from None
                got = inbox.add_chunk(
                    cmd.transfer,
                    cmd.index,
                    cmd.count,
                    data,
                    cmd.sha256,
                    name=cmd.name,
                    signature=cmd.signature,
                )
        except TransferError as exc:
            raise CommandFailed(exc.detail) from None
        if isinstance(got, ChunkProgress):
            return self._interim(
                req,
                "receiving",
                {"transfer": got.transfer, "received": got.received, "count": got.count},
            )
        stored = got
        wanted = cfg.model.model_copy(update={"path": stored.path, "sha256": stored.sha256})
        try:
            _, trust = verify_model_file(wanted)
        except EdgeStnError as exc:
            inbox.remove(stored)
            raise CommandRejected(f"model refused, the running one is kept: {exc}") from None
        previous = cfg.model.model_path
        info = {"sha256": stored.sha256, "bytes": stored.size, "path": str(stored.path)}

        def on_done(error: str | None) -> None:  # the daemon's main thread
            self.defer(lambda: self._swapped(req, stored, previous, info, error))

        if not self.target.swap_model(wanted, on_done):
            return self._final(req, "done", result={**info, "trust": trust, "swapped": False})
        logger.info(
            "command model: %s (sha256 %s..., %s) loading beside the running model",
            stored.path,
            stored.sha256[:12],
            trust,
        )
        return self._interim(req, "loading", {**info, "trust": trust})

    def _swapped(
        self,
        req: _Request,
        stored: StoredModel,
        previous: Path,
        info: dict[str, Any],
        error: str | None,
    ) -> None:
        """The end of a model swap (on the command thread): the final reply."""
        inbox = self._inbox
        if error is not None:
            if inbox is not None and previous != stored.path:
                inbox.remove(stored)
            reply = self._final(
                req, "failed", error=f"the new model did not load, the running one is kept: {error}"
            )
        else:
            if inbox is not None:
                inbox.prune({stored.path.parent, previous.parent})
            reply = self._final(req, "done", result={**info, "swapped": True})
        self.send(reply)

    # ------------------------------------------------------------ reply documents

    def _document(
        self,
        req: _Request,
        status: Status,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "schema_version": REPLY_SCHEMA_VERSION,
            "device": self.topics.device,
            "command": req.name,
            "request_id": req.request_id,
            "ok": status not in ("rejected", "failed"),
            "status": status,
            "error": error,
            "ts": self._clock(),
            "result": result,
        }

    def _interim(self, req: _Request, status: Status, result: dict[str, Any]) -> Reply:
        return Reply(req.topic, self._document(req, status, result=result), req.correlation)

    def _final(
        self,
        req: _Request,
        status: Status,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Reply:
        self._count(status)
        if status in ("rejected", "failed"):
            self._log_problem(req, status, error or "")
        else:
            logger.info(
                "command %s%s: %s in %.0f ms",
                req.name,
                f" ({req.request_id})" if req.request_id else "",
                status,
                (time.monotonic() - req.started) * 1000.0,
            )
        return Reply(
            req.topic, self._document(req, status, error=error, result=result), req.correlation
        )

    def _count(self, what: str) -> None:
        with self._lock:
            if hasattr(self.counters, what):
                setattr(self.counters, what, getattr(self.counters, what) + 1)

    def _log_problem(self, req: _Request, status: str, error: str) -> None:
        """One line per rejected or failed command, at most :data:`REJECT_LOG_BURST` per
        :data:`REJECT_LOG_WINDOW_S` (a flood of garbage must not flood the log; every one is
        counted)."""
        now = time.monotonic()
        with self._lock:
            self._reject_log = [t for t in self._reject_log if now - t < REJECT_LOG_WINDOW_S]
            if len(self._reject_log) >= REJECT_LOG_BURST:
                self._reject_suppressed += 1
                return
            self._reject_log.append(now)
            suppressed, self._reject_suppressed = self._reject_suppressed, 0
        more = f" ({suppressed} more not logged)" if suppressed else ""
        logger.warning("command %s %s: %s%s", req.name or "?", status, error, more)


def _decode(payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object (empty: ``{}``); :class:`CommandRejected` otherwise."""
    if not payload.strip():
        return {}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRejected("the payload is not UTF-8 text") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise CommandRejected(f"the payload is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise CommandRejected(f"the payload must be a JSON object, not {type(doc).__name__}")
    return doc


def _threshold_values(
    cfg: DaemonConfig, det: dict[str, Any], prop: dict[str, Any], cameras: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if det:
        out["detection"] = {k: getattr(cfg.detection, k) for k in det}
    if prop:
        out["proposals"] = {
            c.id: {k: getattr(c.proposals, k) for k in prop} for c in cfg.cameras if c.id in cameras
        }
    return out


def _encode_to_fit(frame: Frame, cmd: SnapshotCommand, limit: int) -> tuple[bytes, int, int, int]:
    """A JPEG of the frame no larger than ``limit`` bytes: lower quality first, then smaller."""
    import cv2

    image: Any = frame.image
    if cmd.max_width is not None and image.shape[1] > cmd.max_width:
        h = max(1, round(image.shape[0] * cmd.max_width / image.shape[1]))
        image = cv2.resize(image, (cmd.max_width, h), interpolation=cv2.INTER_AREA)
    qualities = [cmd.quality] + [q for q in SNAPSHOT_QUALITIES if q < cmd.quality]
    while True:
        for q in qualities:
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and len(buf) <= limit:
                return buf.tobytes(), int(image.shape[1]), int(image.shape[0]), q
        if image.shape[1] < 64:
            raise CommandFailed(f"no JPEG of camera {frame.camera_id} fits in {limit} bytes")
        w, h = int(image.shape[1] * 0.7), max(1, int(image.shape[0] * 0.7))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------- the command thread


class ReplySink(Protocol):
    def publish_reply(
        self, topic: str, payload: bytes, correlation: bytes | None = None
    ) -> str | None: ...

    def reply_room(self, topic: str) -> int: ...


class CommandRunner:
    """The command thread (see the module docstring): :meth:`offer` is called by paho's
    network thread and only queues; replies go to ``sink`` (the publisher)."""

    def __init__(
        self,
        target: CommandTarget,
        topics: TopicTree,
        sink: ReplySink,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.sink = sink
        self._queue: queue.Queue[InboundMessage] = queue.Queue(maxsize=queue_size)
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.handler = CommandHandler(
            target, topics, send=self.send, reply_room=sink.reply_room, defer=self._tasks.put
        )
        self._thread = threading.Thread(target=self._loop, name="edge-stn.commands", daemon=True)

    @property
    def counters(self) -> CommandCounters:
        return self.handler.counters

    def offer(self, msg: InboundMessage) -> None:
        """Queue a message (paho's network thread); a ``busy`` reply when the queue is full."""
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            reply = self.handler.busy(msg)
            if reply is not None:
                self.send(reply)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run_tasks(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except Exception:
                logger.exception("commands: a deferred task failed")

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self._run_tasks()  # the last replies (a model load ended by the stop)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._run_tasks()
            try:
                msg = self._queue.get(timeout=0.2)
            except queue.Empty:
                self.handler.tick()
                continue
            reply = self.handler.handle(msg)
            if reply is not None:
                self.send(reply)

    def send(self, reply: Reply) -> None:
        if reply.topic is None:
            return  # nowhere valid to send it; logged by the handler
        try:
            payload = encode(reply.document)
        except EdgeStnError as exc:
            logger.error("command %s: reply not encodable: %s", reply.document.get("command"), exc)
            return
        problem = self.sink.publish_reply(reply.topic, payload, reply.correlation)
        if problem is not None:
            logger.warning("command reply on %s not sent: %s", reply.topic, problem)
