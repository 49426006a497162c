"""``edge-stn command``: send a remote command to a gateway and wait for its reply (docs/mqtt.md,
docs/operations.md). A model file is sent in chunks, each acknowledged before the next.

The client subscribes to ``<prefix>/<device>/cmd/+/reply`` first, then publishes the command
(QoS 1) with a fresh ``request_id``, and with MQTT v5 also a Response Topic (that same reply
topic) and Correlation Data; it takes the reply that carries its request id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_stn.errors import EdgeStnError
from edge_stn.publish.topics import TopicTree, subscription

logger = logging.getLogger(__name__)

TOKEN_ENV = "EDGE_STN_COMMAND_TOKEN"
DEFAULT_CHUNK_BYTES = 48_000
"""Raw bytes per model chunk: with base64 and the JSON around it a message stays under 64 KiB,
a common broker limit (mosquitto's message_size_limit)."""
FINAL = ("done", "rejected", "failed")


class CommandError(EdgeStnError):
    """The broker could not be reached, or no reply came in time (exit code 1)."""

    exit_code = 1


class CommandUsageError(EdgeStnError):
    """Bad arguments or files given to ``edge-stn command`` (exit code 2)."""


@dataclass(frozen=True)
class CommandOptions:
    device: str
    host: str = "localhost"
    port: int = 1883
    protocol: Literal["v5", "v311"] = "v5"
    prefix: str = "edge-stn"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls: bool = False
    token: str | None = None
    timeout_s: float = 30.0
    """for each reply (a model swap: for the final one, after the last chunk)"""


class CommandClient:
    """One MQTT connection to send commands to one device and read their replies."""

    def __init__(self, opts: CommandOptions) -> None:
        self.opts = opts
        self.topics = TopicTree(opts.prefix, opts.device)
        self._v5 = opts.protocol == "v5"
        self._lock = threading.Condition()
        self._replies: dict[str, list[dict[str, Any]]] = {}
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-stn-cmd-{os.getpid()}-{secrets.token_hex(3)}",
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.suppress_exceptions = True
        if opts.username is not None or opts.password is not None:
            self.client.username_pw_set(opts.username, opts.password)
        if opts.tls or opts.tls_ca is not None:
            self.client.tls_set(ca_certs=str(opts.tls_ca) if opts.tls_ca else None)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def __enter__(self) -> CommandClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        o = self.opts
        try:
            self.client.connect(o.host, o.port, keepalive=30)
        except OSError as exc:
            raise CommandError(f"cannot reach broker {o.host}:{o.port}: {exc}") from None
        self.client.loop_start()
        if not self._subscribed.wait(o.timeout_s):
            self.close()
            raise CommandError(
                self._refused
                or f"broker {o.host}:{o.port}: no subscription within {o.timeout_s:g} s"
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            self._refused = f"broker {self.opts.host}:{self.opts.port} refused the connection: {rc}"
            self._subscribed.set()
            return
        client.subscribe(subscription(self.opts.prefix, "reply", device=self.opts.device), qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, p: Any
    ) -> None:
        if any(getattr(c, "is_failure", False) for c in codes):
            self._refused = "the broker refused the subscription to the replies (its ACL)"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        rid = doc.get("request_id") if isinstance(doc, dict) else None
        if isinstance(rid, str):
            with self._lock:
                self._replies.setdefault(rid, []).append(doc)
                self._lock.notify_all()

    def request(
        self, name: str, args: dict[str, Any] | None = None, *, final: bool = True
    ) -> dict[str, Any]:
        """Send command ``name`` and return its reply: the first one, or with ``final`` the
        first final one (``done``, ``rejected``, ``failed``). :class:`CommandError` when none
        comes within ``timeout_s``."""
        if self._refused is not None:
            raise CommandError(self._refused)
        rid = secrets.token_hex(8)
        doc = dict(args or {})
        doc["request_id"] = rid
        if self.opts.token is not None:
            doc["token"] = self.opts.token
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.topics.cmd_reply(name)
            props.CorrelationData = rid.encode("ascii")
            props.ContentType = "application/json"
        info = self.client.publish(
            self.topics.cmd(name), json.dumps(doc).encode("utf-8"), qos=1, properties=props
        )
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CommandError(f"cannot publish the command: {mqtt.error_string(info.rc)}")
        until = time.monotonic() + self.opts.timeout_s
        with self._lock:
            while True:
                got = self._replies.get(rid, [])
                wanted = [r for r in got if not final or r.get("status") in FINAL]
                if wanted:
                    self._replies.pop(rid, None)
                    return wanted[-1]
                left = until - time.monotonic()
                if left <= 0:
                    raise CommandError(
                        f"no reply from {self.opts.device} to {name} within "
                        f"{self.opts.timeout_s:g} s (is it online, with commands.enabled, and "
                        "may you write its cmd topics?)"
                    )
                self._lock.wait(min(left, 0.2))

    def send_model(
        self,
        model: Path,
        signature: Path | None = None,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Send a model file in chunks with its signature (default ``<model>.sig`` when it
        exists); the final reply (the swap done, or why not)."""
        try:
            data = model.read_bytes()
            sig_path = signature or model.with_name(model.name + ".sig")
            sig = json.loads(sig_path.read_text("utf-8")) if sig_path.is_file() else None
        except (OSError, ValueError) as exc:
            raise CommandUsageError(f"cannot read {model} or its signature: {exc}") from None
        if signature is not None and sig is None:
            raise CommandUsageError(f"no such signature file: {signature}")
        sha = hashlib.sha256(data).hexdigest()
        count = max(1, -(-len(data) // chunk_bytes))
        transfer = secrets.token_hex(8)
        reply: dict[str, Any] = {}
        for i in range(count):
            args: dict[str, Any] = {
                "sha256": sha,
                "name": model.name if model.suffix == ".onnx" else "model.onnx",
                "transfer": transfer,
                "index": i,
                "count": count,
                "data": base64.b64encode(data[i * chunk_bytes : (i + 1) * chunk_bytes]).decode(),
            }
            if i == 0 and sig is not None:
                args["signature"] = sig
            last = i == count - 1
            reply = self.request("model", args, final=last)
            if reply.get("status") in ("rejected", "failed"):
                return reply
            if progress is not None:
                progress(i + 1, count)
        return reply


def exit_code(reply: dict[str, Any]) -> int:
    """0 done (or an interim reply), 2 rejected (bad input, unauthorised), 1 failed."""
    status = reply.get("status")
    return 2 if status == "rejected" else 1 if status == "failed" else 0


# ---------------------------------------------------------------- the CLI


def add_command_arguments(p: Any) -> None:
    """The arguments of ``edge-stn command`` (an argparse parser)."""
    from edge_stn.subscriber import add_broker_arguments

    p.add_argument("name", choices=["reload", "thresholds", "snapshot", "model"])
    p.add_argument(
        "args",
        nargs="?",
        default="{}",
        help="the command's JSON object, e.g. "
        '\'{"detection": {"score_threshold": 0.7}}\' (default {})',
    )
    p.add_argument("--device", required=True, help="the gateway's device_id")
    add_broker_arguments(
        p,
        config_help="take broker, credentials and TLS from a daemon config",
        username_help="broker user name (an operator account)",
    )
    p.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding commands.token (default {TOKEN_ENV})",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    p.add_argument("--model-file", metavar="F", help="model: the .onnx to send in chunks")
    p.add_argument("--signature", metavar="F", help="model: its signature (default F.sig)")
    p.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="model: bytes per chunk"
    )
    p.add_argument("--out", metavar="F.jpg", help="snapshot: write the JPEG here")


def run_command_cli(args: Any) -> int:
    """``edge-stn command``: print the reply as JSON; exit 0 done, 2 rejected, 1 failed."""
    from edge_stn.subscriber import broker_arguments, options_from_config

    try:
        doc = json.loads(args.args)
    except ValueError as exc:
        raise CommandUsageError(f"the command's arguments are not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandUsageError("the command's arguments must be a JSON object")
    if args.model_file is not None and args.name != "model":
        raise CommandUsageError("--model-file goes with the model command")
    if not 1024 <= args.chunk_bytes <= 100_000_000:
        raise CommandUsageError(f"--chunk-bytes: expected 1024-100000000, got {args.chunk_bytes}")
    given = broker_arguments(args)
    if args.config:
        sub = options_from_config(Path(args.config), **given)
        given = {k: getattr(sub, k) for k in ("host", "port", "protocol", "prefix", "username")}
        given.update(password=sub.password, tls_ca=sub.tls_ca, tls=sub.tls)
    opts = CommandOptions(
        device=args.device,
        token=os.environ.get(args.token_env) if args.token_env else None,
        timeout_s=args.timeout,
        **{k: v for k, v in given.items() if v is not None},
    )
    with CommandClient(opts) as client:
        if args.model_file is not None:
            reply = client.send_model(
                Path(args.model_file),
                Path(args.signature) if args.signature else None,
                chunk_bytes=args.chunk_bytes,
            )
        else:
            reply = client.request(args.name, doc)
    result = reply.get("result")
    if args.out and isinstance(result, dict) and "jpeg" in result:
        Path(args.out).write_bytes(base64.b64decode(result.pop("jpeg")))
        result["written"] = args.out
    print(json.dumps(reply, indent=2))
    return exit_code(reply)
