"""Security against a real mosquitto started with the *shipped* configuration (issue 7, part 2):
deploy/mosquitto/conf.d/secure.conf and deploy/mosquitto/acl, certificates from
deploy/tls/make-test-certs.sh, a password file from mosquitto_passwd.

* TLS with CA verification carries results to a consumer; the ACL confines a gateway to
  ``edge-stn/<its user>/#`` and keeps consumers read-only; mutual TLS with the script's client
  certificate works and its CN is the ACL's user name.
* A wrong CA, a wrong password and an ACL refusal each give one clear error line, a daemon that
  stays up and retries with back-off (no crash loop), counters instead of silent drops, and
  logs (JSON, debug level) in which the password never appears.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MOSQUITTO_PASSWD, Mosquitto, wait_until
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_stn.config import MqttConfig, TlsConfig, load_config
from edge_stn.demo import free_port

ROOT = Path(__file__).resolve().parents[1]
SECURE_CONF = ROOT / "deploy" / "mosquitto" / "conf.d" / "secure.conf"
ACL = ROOT / "deploy" / "mosquitto" / "acl"
MAKE_CERTS = ROOT / "deploy" / "tls" / "make-test-certs.sh"

pytest.importorskip("onnxruntime")


@dataclass
class SecureBroker:
    broker: Mosquitto
    certs: Path
    passwords: dict[str, str]


def make_certs(out: Path, *clients: str) -> Path:
    args = ["bash", str(MAKE_CERTS), str(out), "--server-name", "127.0.0.1", "--days", "2"]
    for c in clients:
        args += ["--client", c]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


def start_secure_broker(folder: Path, *, mutual_tls: bool = False) -> SecureBroker:
    """mosquitto with the shipped secure.conf and acl, rewritten only in its file locations
    (/etc/mosquitto/ -> this test's folder) and its port (a free loopback one)."""
    etc = folder / "etc"
    (etc / "conf.d").mkdir(parents=True)
    certs = make_certs(etc / "certs", "gw1")
    (etc / "acl").write_text(ACL.read_text())
    passwords = {"gw1": "gw1-" + secrets.token_urlsafe(12), "consumer": secrets.token_urlsafe(12)}
    for i, (user, pw) in enumerate(passwords.items()):
        args = [MOSQUITTO_PASSWD, "-b", str(etc / "passwd"), user, pw]
        subprocess.run(args[:1] + (["-c"] if i == 0 else []) + args[1:], check=True, timeout=10)
    broker = Mosquitto(folder / "run")
    text = SECURE_CONF.read_text().replace("/etc/mosquitto/", f"{etc}/")
    assert "listener 8883\n" in text
    text = text.replace("listener 8883\n", f"listener {broker.port} 127.0.0.1\n")
    if mutual_tls:
        text = text.replace("#require_certificate true", "require_certificate true")
        text = text.replace("#use_identity_as_username true", "use_identity_as_username true")
    (etc / "conf.d" / "secure.conf").write_text(text)
    broker.conf_path.write_text(
        "persistence false\n"
        f"user {os.environ.get('USER') or 'root'}\n"
        "log_type all\n"
        f"include_dir {etc / 'conf.d'}\n"
    )
    return SecureBroker(broker.start(), certs, passwords)


@pytest.fixture
def secure(tmp_path: Path) -> Any:
    made: list[SecureBroker] = []

    def make(**kw: Any) -> SecureBroker:
        sb = start_secure_broker(tmp_path / f"broker{len(made)}", **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.broker.stop(kill=True)


def tls_client(sb: SecureBroker, user: str, **tls: Any) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-{user}-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.tls_set(ca_certs=str(sb.certs / "ca.crt"), **tls)
    if user in sb.passwords:
        client.username_pw_set(user, sb.passwords[user])
    return client


class Recorder:
    def __init__(self, sb: SecureBroker, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.ready = threading.Event()
        self.client = tls_client(sb, "consumer")
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, 1)
        self.client.connect("127.0.0.1", sb.broker.port)
        self.client.loop_start()
        assert self.ready.wait(10), sb.broker.log()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def daemon_doc(
    sb: SecureBroker, device: str, user: str, password: str | None, ca: Path, **kw: Any
) -> dict[str, Any]:
    mqtt_doc: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": sb.broker.port,
        "username": user,
        "tls": {"ca_file": str(ca)},
    }
    if password is not None:
        mqtt_doc["password"] = "${GW_PASSWORD}"
    doc = {
        "device_id": device,
        "model": {"providers": ["cpu"], "intra_op_threads": 1},
        "cameras": [{"id": "cam0", "source": "synthetic", "fps": 8}],
        "mqtt": mqtt_doc,
        "stats_interval_s": 1,
    }
    doc.update(kw)
    return doc


def test_tls_password_and_acl_with_the_shipped_config(
    secure: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_stn.daemon import Daemon

    sb: SecureBroker = secure()
    cfg_path = tmp_path / "gw1.yaml"
    cfg_path.write_text(json.dumps(daemon_doc(sb, "gw1", "gw1", "x", sb.certs / "ca.crt")))
    monkeypatch.setenv("GW_PASSWORD", sb.passwords["gw1"])
    rec = Recorder(sb, "edge-stn/#")
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()
    try:
        assert wait_until(
            lambda: len([m for m in rec.messages if m.topic.endswith("/result")]) >= 3, 20
        ), sb.broker.log()
        # The consumer may read but not write, not even a command.
        info = rec.client.publish("edge-stn/gw1/cmd/reload", b"{}", qos=1)
        info.wait_for_publish(5)
        gw = tls_client(sb, "gw1")
        acks: list[int] = []
        gw.on_publish = lambda c, u, mid, rc, p: acks.append(rc.value)
        gw.connect("127.0.0.1", sb.broker.port)
        gw.loop_start()
        gw.publish("edge-stn/gw2/status", b"impostor", qos=1)  # another gateway's subtree
        gw.publish("edge-stn/gw1/x", b"own", qos=1)
        assert wait_until(lambda: len(acks) == 2, 5)
        gw.disconnect()
        gw.loop_stop()
        own, other = sorted(acks)
        assert own < 0x80 and other == 0x87  # own subtree: accepted; another's: refused
    finally:
        daemon.request_stop()
        runner.join(15)
        rec.close()
    c = daemon.publisher.counters()
    assert c.results.acked > 0 and c.results.refused == 0 and c.connect_failures == 0
    topics = {m.topic for m in rec.messages}
    assert "edge-stn/gw1/cmd/reload" not in topics and "edge-stn/gw2/status" not in topics
    status = [json.loads(m.payload) for m in rec.messages if m.topic == "edge-stn/gw1/status"]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    assert all(sb.passwords["gw1"].encode() not in m.payload for m in rec.messages)


def test_mutual_tls_with_the_scripts_client_certificate(secure: Any) -> None:
    from edge_stn.publish.client import MqttPublisher, PublisherLimits
    from edge_stn.publish.payloads import DeviceInfo, ModelInfo

    sb: SecureBroker = secure(mutual_tls=True)
    certs = sb.certs
    tls = TlsConfig(
        ca_file=certs / "ca.crt", cert_file=certs / "gw1.crt", key_file=certs / "gw1.key"
    )
    info = DeviceInfo("gw1", "0", ModelInfo("m", "a" * 64), "b" * 64, "0123456789abcdef", 0.0)
    limits = PublisherLimits(reconnect_min_s=1, reconnect_max_s=1)
    pub = MqttPublisher(
        MqttConfig(host="127.0.0.1", port=sb.broker.port, tls=tls), info, limits=limits
    )
    pub.start()
    try:
        assert pub.wait_connected(10), (
            sb.broker.log()
        )  # no password: the certificate is the identity
        assert wait_until(lambda: pub.counters().status.acked >= 1, 5)  # its CN may write gw1/#
    finally:
        pub.stop(timeout=3)
    no_cert = MqttPublisher(
        MqttConfig(host="127.0.0.1", port=sb.broker.port, tls=TlsConfig(ca_file=certs / "ca.crt")),
        info,
        limits=limits,
    )
    no_cert.start()
    try:
        assert wait_until(lambda: no_cert.counters().connect_failures >= 1, 10)
        assert not no_cert.connected
    finally:
        no_cert.stop(timeout=3)


def run_daemon(
    folder: Path, name: str, doc: dict[str, Any], password: str
) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    doc = {
        **doc,
        "metrics": {"port": port},
        "log_format": "json",
        "outbox": {"path": str(folder / f"{name}-outbox.sqlite")},  # one outbox per daemon
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    env = {**os.environ, "GW_PASSWORD": password, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Files, not pipes: debug logging would fill a pipe nobody reads and block the daemon.
    with (folder / f"{name}.out").open("w") as out, (folder / f"{name}.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_stn.cli", "-v", "run", "--config", str(path)],
            stdout=out,
            stderr=err,
            text=True,
            env=env,
        )
    return proc, port


def output(folder: Path, name: str) -> tuple[str, str]:
    return (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text()


def metric(port: int, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_wrong_ca_wrong_password_and_acl_refusal(secure: Any, tmp_path: Path) -> None:
    sb: SecureBroker = secure()
    other_ca = make_certs(tmp_path / "other-ca") / "ca.crt"
    good_ca = sb.certs / "ca.crt"
    password = sb.passwords["gw1"]
    cases: dict[str, tuple[dict[str, Any], str, Callable[[int], bool]]] = {
        "wrong-ca": (
            daemon_doc(sb, "gw1", "gw1", "x", other_ca),
            password,
            lambda port: (metric(port, "edge_stn_mqtt_connect_failures_total") or 0) >= 2,
        ),
        "wrong-password": (
            daemon_doc(sb, "gw1", "gw1", "x", good_ca),
            password + "-wrong",
            lambda port: (metric(port, "edge_stn_mqtt_connect_refusals_total") or 0) >= 2,
        ),
        "acl": (  # a gateway that publishes outside its user's subtree
            daemon_doc(sb, "gw2", "gw1", "x", good_ca),
            password,
            lambda port: (
                (
                    metric(port, "edge_stn_mqtt_messages_total", kind="results", outcome="refused")
                    or 0
                )
                >= 5
            ),
        ),
    }
    procs = {name: run_daemon(tmp_path, name, doc, pw) for name, (doc, pw, _) in cases.items()}
    try:
        for name, (proc, port) in procs.items():
            if not wait_until(lambda p=port, n=name: cases[n][2](p), 30):
                proc.kill()
                proc.wait(10)
                pytest.fail(f"{name}: no sign of the fault: {output(tmp_path, name)[1][-3000:]}")
        time.sleep(1.0)
        for name, (proc, _) in procs.items():
            assert proc.poll() is None, f"{name}: the daemon exited {proc.returncode}"
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            proc.wait(20)
        outputs = {name: output(tmp_path, name) for name in procs}
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    for name, (proc, _) in procs.items():
        assert proc.returncode == 0, (name, outputs[name][1][-2000:])
    logs = {
        name: [json.loads(line) for line in err.splitlines() if line.strip()]
        for name, (_, err) in outputs.items()
    }

    # No secret anywhere: not in a debug line, not in paho's own, not in an error.
    for name, (out, err) in outputs.items():
        for text in (out, err):
            assert password not in text and sb.passwords["consumer"] not in text, name

    def errors(name: str) -> list[str]:
        return [d["message"] for d in logs[name] if d["level"] == "error"]

    def attempts(name: str, needle: str) -> int:
        return sum(1 for d in logs[name] if needle in d["message"])

    ca_errors = [e for e in logs["wrong-ca"] if "CERTIFICATE_VERIFY_FAILED" in e["message"]]
    assert ca_errors and ca_errors[0]["level"] == "warning"
    assert "cannot reach broker" in ca_errors[0]["message"]
    (pw_error,) = errors("wrong-password")
    assert (
        "refused the connection" in pw_error and "check mqtt.username and mqtt.password" in pw_error
    )
    # Many refusals (results, crops, status: every one counted), one error line a minute.
    acl_errors = [e for e in errors("acl") if "the broker refused" in e]
    assert len(acl_errors) == 1, errors("acl")
    assert "not authorized by the broker's ACL" in acl_errors[0]
    assert " on edge-stn/gw2/" in acl_errors[0]
    # ... and each refused result's dead letter is a debug detail, not a warning per message
    dead = [d for d in logs["acl"] if "dead-lettered" in d["message"]]
    assert dead and all(d["level"] == "debug" for d in dead), dead[:3]
    # Back-off, not a crash loop: a handful of attempts in the seconds the test ran.
    n_ca = attempts("wrong-ca", "cannot reach broker")
    n_pw = attempts("wrong-password", "refused the connection")
    assert 2 <= n_ca <= 8 and 2 <= n_pw <= 8, (n_ca, n_pw)
