"""A real mosquitto for tests (DESIGN §8), and a subscriber that records what arrives.

Registered as a pytest plugin in ``conftest.py``: the fixtures ``mosquitto`` (anonymous,
started) and ``mosquitto_factory`` (users, ACLs, not started) run ``/usr/sbin/mosquitto`` on a
free loopback port (never 1883) with a config generated in ``tmp_path``, persistence off, and
kill it after the test. Loops here are bounded in time.
"""

from __future__ import annotations

import getpass
import io
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_stn.demo import free_port, stop_process
from edge_stn.subscriber import Consumer, SubscribeOptions

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, name: str = "ca") -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC P-256, openssl CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / f"{name}.pem", folder / f"{name}.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "authorityKeyIdentifier=keyid\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sign = ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
    for args in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name}"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [*sign, "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
    return TlsFiles(ca, cert, key)


def shipped_config(port: int, workdir: Path) -> list[str]:
    """The shipped ``deploy/mosquitto/mosquitto.conf``, verbatim but for where it listens,
    saves and logs: a loopback port and the test's folder."""
    lines = []
    for raw in SHIPPED_CONFIG.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key = line.split()[0]
        if key == "listener":
            line = f"listener {port} {HOST}"
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        elif key in ("log_dest", "log_type"):
            continue
        lines.append(line)
    return lines


class Mosquitto:
    """One mosquitto process on a fixed loopback port, restartable on the same port.

    ``shipped``: run the shipped broker config (persistence on, saved in ``workdir``) instead of
    the default test config (persistence off); ``extra``: more config lines."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        port: int | None = None,
        shipped: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = HOST
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self.db_path = workdir / "mosquitto.db"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = (
            shipped_config(self.port, workdir)
            if shipped
            else [
                f"listener {self.port} {HOST}",
                "persistence false",
            ]
        )
        lines += [
            f"user {getpass.getuser()}",  # as root, mosquitto would drop to 'mosquitto'
            "log_type all",
            *extra,
        ]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        if users:
            pw = workdir / "passwords"
            for i, (name, password) in enumerate(users.items()):
                args = [MOSQUITTO_PASSWD, "-b", str(pw), name, password]
                if i == 0:
                    args.insert(1, "-c")
                subprocess.run(args, check=True, capture_output=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        elif not shipped:
            lines.append("allow_anonymous true")
        if acl is not None:
            acl_path = workdir / "acl"
            acl_path.write_text(acl)
            lines.append(f"acl_file {acl_path}")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        if not wait_until(accepting, timeout, 0.05):
            self.stop(kill=True)
            raise RuntimeError(f"mosquitto did not accept connections:\n{self.log()}")
        return self

    def stop(self, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, kill=kill)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    user_properties: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None


class Subscriber:
    """A paho client that records every message on its filters (thread-safe reads)."""

    def __init__(
        self,
        broker: Mosquitto,
        filters: list[str],
        *,
        username: str | None = None,
        password: str | None = None,
        v5: bool = True,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe([(f, 1) for f in filters])
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"test subscriber could not subscribe:\n{broker.log()}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        ctype = getattr(props, "ContentType", None)
        with self._lock:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, user, ctype)
            )

    def on(self, predicate: Callable[[Received], bool]) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait_for(
        self, predicate: Callable[[Received], bool], count: int = 1, timeout: float = 10.0
    ) -> list[Received]:
        wait_until(lambda: len(self.on(predicate)) >= count, timeout)
        return self.on(predicate)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _require_mosquitto() -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Make brokers (``users={name: password}``, ``acl=...``, ``tls=make_tls_files(...)``);
    started ones are killed after."""
    _require_mosquitto()
    made: list[Mosquitto] = []

    def make(**kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto{len(made)}", **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop(kill=True)


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """An anonymous mosquitto on a free loopback port, started."""
    return mosquitto_factory().start()


def consumer(broker: Mosquitto, **kw: Any) -> Consumer:
    """A started ``edge-stn subscribe`` consumer on ``broker`` (output kept in memory),
    subscribed before it is returned; ``kw`` are its :class:`SubscribeOptions`."""
    opts = SubscribeOptions(host=broker.host, port=broker.port, **kw)
    c = Consumer(opts, out=io.StringIO(), err=io.StringIO(), keep=True)
    c.start()
    assert c.wait_subscribed(10), broker.log()
    return c
