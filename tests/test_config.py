"""The daemon config (issue 4 item 1): strict validation, key paths in errors, ${ENV}, hashes,
`edge-stn config check`, and the shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_stn import config as config_mod
from edge_stn.cli import main
from edge_stn.config import (
    DaemonConfig,
    TensorRTProvider,
    bundled_demo_model,
    check_config,
    config_hash,
    load_config,
    parse_config,
    redacted_dict,
    substitute_env,
)
from edge_stn.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
MINIMAL = "device_id: gw1\ncameras:\n  - {id: cam0, source: synthetic}\nmqtt: {host: broker, port: 1883}\n"


def minimal(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(MINIMAL)
    doc.update(changes)
    return doc


def write(tmp_path: Path, doc: dict[str, Any] | str, name: str = "daemon.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def config_error(doc: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, path=Path("daemon.yaml"), environ=environ or {})
    return str(info.value)


# ---------------------------------------------------------------- completeness and defaults


def test_minimal_config_is_complete(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.device_id == "gw1"
    assert [c.id for c in cfg.cameras] == ["cam0"]
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 1883)


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    assert cfg.client_id == "edge-stn-gw1"
    assert cfg.mqtt.protocol == "v5"
    assert cfg.mqtt.topic_prefix == "edge-stn"
    assert cfg.mqtt.password is None and cfg.mqtt.tls is None
    assert cfg.model.path is None and cfg.model.is_bundled
    assert cfg.model.model_path == bundled_demo_model(["tensorrt", "cuda", "cpu"])
    assert [p.name for p in cfg.model.providers] == ["tensorrt", "cuda", "cpu"]
    trt = cfg.model.providers[0]
    assert isinstance(trt, TensorRTProvider)
    cache = trt.options.engine_cache_dir
    assert cache.is_absolute() and "~" not in str(cache)
    cam = cfg.cameras[0]
    assert cam.fps is None and cam.on_end == "stop" and cam.rtsp_transport == "tcp"
    assert cam.kind == "synthetic" and cam.is_live
    assert cam.proposals.method == "components" and cam.roi is None
    assert cfg.crops.enabled and 0 < cfg.detection.score_threshold < 1
    assert cfg.stats_interval_s > 0


def test_every_field_has_a_default_and_a_description() -> None:
    def walk(model: type[Any], where: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{where}.{name} has no description"
            assert not field.is_required(), f"{where}.{name} has no default"
            for sub in config_mod._models_in(field.annotation):
                walk(sub, f"{where}.{name}")

    walk(DaemonConfig, "config")


def test_client_id_can_be_set() -> None:
    cfg = parse_config(minimal(mqtt={"host": "b", "client_id": "mine"}))
    assert cfg.client_id == "mine"


@pytest.mark.parametrize(
    "source,kind",
    [
        ("synthetic", "synthetic"),
        (0, "usb"),
        ("2", "usb"),
        ("rtsp://10.0.0.2/stream", "rtsp"),
        ("https://cam.local/video.mjpg", "http"),
        ("/videos/a.mp4", "file"),
    ],
)
def test_source_kinds(source: Any, kind: str) -> None:
    cfg = parse_config(minimal(cameras=[{"id": "c", "source": source}]))
    assert cfg.cameras[0].kind == kind
    assert cfg.cameras[0].is_live == (kind != "file")


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    doc = minimal(model={"path": "models/m.onnx"}, cameras=[{"id": "c", "source": "videos/a.mp4"}])
    cfg = load_config(write(tmp_path, doc), environ={})
    assert cfg.model.model_path == tmp_path / "models" / "m.onnx"
    assert cfg.cameras[0].source == str(tmp_path / "videos" / "a.mp4")


def test_providers_accept_the_export_snippet() -> None:
    from edge_stn.export.recipes import BatchProfile, run_config_snippet

    doc = yaml.safe_load(run_config_snippet(Path("m.onnx"), BatchProfile(2, 4, 16), fp16=True))
    cfg = parse_config(minimal(**doc))
    trt = cfg.model.provider("tensorrt")
    assert isinstance(trt, TensorRTProvider) and trt.options.fp16
    assert trt.options.batch_profile is not None and trt.options.batch_profile.max == 16
    assert [p.name for p in cfg.model.providers] == ["tensorrt", "cuda", "cpu"]


def test_protocol_spellings() -> None:
    for spelling, want in [(5, "v5"), ("v5", "v5"), ("3.1.1", "v311"), ("v311", "v311")]:
        assert parse_config(minimal(mqtt={"protocol": spelling})).mqtt.protocol == want


# ---------------------------------------------------------------- errors name the key path


@pytest.mark.parametrize(
    "changes,fragments",
    [
        (
            {"mqtt": {"host": "b", "prot": 1883}},
            ("mqtt.prot", "unknown key", "did you mean 'port'"),
        ),
        ({"cameras": [{"id": "c", "source": 0, "fsp": 5}]}, ("cameras.0.fsp", "unknown key")),
        (
            {"model": {"providers": [{"name": "cuda", "options": {"fp16": True}}]}},
            ("model.providers.0.options.fp16", "unknown key"),
        ),
        ({"model": {"providers": ["gpu"]}}, ("model.providers.0", "tensorrt, cuda or cpu")),
        ({"model": {"providers": ["cpu", "cpu"]}}, ("model.providers", "twice")),
        ({"device_id": "gw 1"}, ("device_id", "not a valid id")),
        ({"device_id": "x" * 65}, ("device_id", "not a valid id")),
        ({"cameras": [{"id": "front/door", "source": 0}]}, ("cameras.0.id", "not a valid id")),
        ({"cameras": []}, ("cameras", "at least one camera")),
        ({"cameras": [{"id": "c", "source": "udp://x"}]}, ("cameras.0.source", "scheme")),
        ({"cameras": [{"id": "c", "source": -1}]}, ("cameras.0.source", ">= 0")),
        ({"cameras": [{"id": "c", "source": 0, "fps": 0}]}, ("cameras.0.fps",)),
        ({"cameras": [{"id": "c", "source": 0, "on_end": "rewind"}]}, ("cameras.0.on_end",)),
        (
            {"cameras": [{"id": "c", "source": 0, "roi": [10, 10, 5, 20]}]},
            ("cameras.0.roi", "empty box"),
        ),
        (
            {"cameras": [{"id": "c", "source": 0, "proposals": {"method": "rois"}}]},
            ("cameras.0.proposals", "needs at least one box"),
        ),
        ({"cameras": [{"id": "c", "source": [0]}]}, ("cameras.0.source: expected a file path",)),
        (
            {"cameras": [{"id": "c", "source": 0, "proposals": {"threshold": "high"}}]},
            ("cameras.0.proposals.threshold: threshold must be 0-255, 'local' or 'otsu'",),
        ),
        (
            {"model": {"providers": [{"name": "tensorrt", "options": {"batch_profile": [1]}}]}},
            ("model.providers.0.options.batch_profile: ",),
        ),
        (
            {
                "model": {
                    "providers": [{"name": "tensorrt", "options": {"batch_profile": {"min": 9}}}]
                }
            },
            ("model.providers.0.options.batch_profile: need min <= opt <= max",),
        ),
        ({"mqtt": {"port": 70000}}, ("mqtt.port",)),
        ({"mqtt": {"protocol": 4}}, ("mqtt.protocol", "v5")),
        ({"mqtt": {"topic_prefix": "a/#"}}, ("mqtt.topic_prefix", "wildcard")),
        ({"mqtt": {"tls": {"cert_file": "c.pem"}}}, ("mqtt.tls", "key_file")),
        ({"crops": {"jpeg_quality": 101}}, ("crops.jpeg_quality",)),
        ({"detection": {"score_threshold": 1.5}}, ("detection.score_threshold",)),
        ({"stats_interval_s": "often"}, ("stats_interval_s",)),
    ],
)
def test_errors_name_the_key_path(changes: dict[str, Any], fragments: tuple[str, ...]) -> None:
    message = config_error(minimal(**changes))
    assert message.startswith("daemon.yaml: ")
    assert "Value error" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("reserved", ["status", "stats", "cam", "cmd"])
def test_reserved_ids_are_refused(reserved: str) -> None:
    assert "reserved" in config_error(minimal(device_id=reserved))
    message = config_error(minimal(cameras=[{"id": reserved, "source": 0}]))
    assert "cameras.0.id" in message and "reserved" in message


def test_duplicate_camera_ids() -> None:
    message = config_error(minimal(cameras=[{"id": "a", "source": 0}, {"id": "a", "source": 1}]))
    assert "cameras:" in message and "'a'" in message and "twice" in message


# ---------------------------------------------------------------- ${ENV}


def test_env_substitution() -> None:
    env = {"PW": "s3cret", "HOST": "mq.local", "PORT": "8883", "CAM": "1"}
    doc = minimal(
        mqtt={"host": "${HOST}", "port": "${PORT}", "username": "u", "password": "${PW}"},
        cameras=[
            {"id": "a", "source": "${CAM}"},
            {"id": "b", "source": "rtsp://u:${CAM_PW:-none}@h/$${literal}"},
        ],
    )
    cfg = parse_config(doc, environ=env)
    assert cfg.mqtt.host == "mq.local" and cfg.mqtt.port == 8883
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "s3cret"
    assert cfg.cameras[0].source == 1
    assert cfg.cameras[1].source == "rtsp://u:none@h/${literal}"


def test_unset_variable_names_the_key_path(tmp_path: Path) -> None:
    doc = minimal(mqtt={"host": "b", "username": "u", "password": "${EDGE_STN_TEST_UNSET}"})
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, doc), environ={})
    message = str(info.value)
    assert "daemon.yaml: mqtt.password: " in message
    assert "EDGE_STN_TEST_UNSET is not set" in message
    assert info.value.key == "mqtt.password"


def test_unset_variable_in_a_list_and_bad_reference() -> None:
    with pytest.raises(ConfigError, match=r"cameras\.0\.source: environment variable X"):
        substitute_env({"cameras": [{"source": "${X}"}]}, {})
    with pytest.raises(ConfigError, match="bad reference"):
        substitute_env({"a": "${not a name}"}, {})
    assert substitute_env({"a": "${X:-d}", "b": 3, "c": "$5"}, {"X": ""}) == {
        "a": "d",
        "b": 3,
        "c": "$5",
    }


# ---------------------------------------------------------------- secrets and the hash


def test_secrets_stay_out_of_hash_input_and_repr() -> None:
    doc = minimal(
        mqtt={"host": "b", "username": "u", "password": "hunter2-pw"},
        cameras=[{"id": "c", "source": "rtsp://viewer:cam-pw-77@10.0.0.2/s"}],
    )
    cfg = parse_config(doc)
    for text in (
        repr(cfg),
        str(cfg),
        repr(cfg.mqtt),
        repr(cfg.cameras[0]),
        str(redacted_dict(cfg)),
    ):
        assert "hunter2-pw" not in text and "cam-pw-77" not in text
    assert str(cfg.cameras[0].source).endswith("cam-pw-77@10.0.0.2/s")  # the daemon still has it


def test_config_hash_is_stable_and_ignores_secret_values() -> None:
    a = parse_config(minimal(mqtt={"host": "b", "username": "u", "password": "one"}))
    b = parse_config(minimal(mqtt={"host": "b", "username": "u", "password": "two"}))
    c = parse_config(minimal(mqtt={"host": "b", "username": "u", "password": "one", "port": 1884}))
    assert len(config_hash(a)) == 64
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert config_hash(a) == config_hash(
        parse_config(
            minimal(
                **yaml.safe_load(
                    yaml.safe_dump({"mqtt": {"username": "u", "password": "one", "host": "b"}})
                )
            )
        )
    )


# ---------------------------------------------------------------- warnings


def test_warnings() -> None:
    cfg = parse_config(
        minimal(
            mqtt={"host": "b", "protocol": "3.1.1", "username": "u", "password": "p"},
            cameras=[{"id": "a", "source": 0, "on_end": "loop"}, {"id": "b", "source": 0}],
        )
    )
    text = "\n".join(check_config(cfg))
    assert "mqtt.protocol" in text and "refused" in text
    assert "mqtt.password" in text and "clear text" in text
    assert "cameras.0.on_end" in text
    assert "cameras.1.source" in text
    tls = parse_config(minimal(mqtt={"host": "b", "port": 8883, "tls": {"insecure": True}}))
    assert any(w.startswith("mqtt.tls.insecure") for w in check_config(tls))


# ---------------------------------------------------------------- `edge-stn config check`


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["config", "check", str(write(tmp_path, MINIMAL))])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    first = out.splitlines()[0]
    assert first.startswith(f"ok: {tmp_path / 'daemon.yaml'}: 1 camera, model ")
    assert "broker broker:1883" in first


@pytest.mark.parametrize(
    "text,fragment",
    [
        (MINIMAL + "detektion: {}\n", "detektion: unknown key"),
        (MINIMAL.replace("gw1", "status"), "device_id: "),
        ("cameras: [\n", "not valid YAML"),
        (MINIMAL.replace("broker", "'${EDGE_STN_TEST_UNSET_HOST}'"), "mqtt.host: environment"),
    ],
)
def test_config_check_errors(
    text: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["config", "check", str(write(tmp_path, text))])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"edge-stn: error: {tmp_path / 'daemon.yaml'}: ")
    assert fragment in lines[0]


def test_config_check_missing_file_from_the_installed_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_stn.cli", "config", "check", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edge-stn: error: {tmp_path / 'nope.yaml'}: no such file"
    ]


# ---------------------------------------------------------------- shipped configs


def test_demo_config_passes(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("EDGE_STN_DEMO_PORT", raising=False)
    assert main(["config", "check", str(CONFIGS / "demo.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    monkeypatch.setenv("EDGE_STN_DEMO_PORT", "45123")
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.cameras[0].source == "synthetic" and cfg.model.is_bundled
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", 45123)


def test_gateway_config_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    for name in ("ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("PEM\n")
    monkeypatch.setenv("MQTT_PASSWORD", "pw-from-env")
    monkeypatch.setenv("CAM1_PASSWORD", "cam-from-env")
    monkeypatch.setenv("EDGE_STN_TLS_DIR", str(tmp_path))
    assert main(["config", "check", str(CONFIGS / "gateway.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "2 cameras" in out and "TLS" in out
    assert "pw-from-env" not in out and "cam-from-env" not in out
    assert "mqtt.tls" not in out  # the files exist
    cfg = load_config(CONFIGS / "gateway.yaml")
    assert sorted(c.kind for c in cfg.cameras) == ["rtsp", "usb"]
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == "pw-from-env"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == tmp_path / "ca.crt"


def test_gateway_config_without_its_secret(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("MQTT_PASSWORD", raising=False)
    monkeypatch.setenv("CAM1_PASSWORD", "x")
    assert main(["config", "check", str(CONFIGS / "gateway.yaml")]) == 2
    err = capsys.readouterr().err
    assert "mqtt.password: environment variable MQTT_PASSWORD is not set" in err


def test_check_reads_the_model(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = REPO / "edge_stn" / "assets" / "tc-stcnn.onnx"
    if not model.is_file():
        pytest.skip("bundled TC model missing")
    assert check_config(parse_config(minimal(model={"path": str(model)}))) == []
    pinned = parse_config(minimal(model={"path": str(model), "sha256": "a" * 64}))
    assert any("sha256 differs" in w for w in check_config(pinned))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    warnings = check_config(parse_config(minimal(model={"path": str(junk)})))
    assert len(warnings) == 1 and warnings[0].startswith("model.path: the daemon will refuse it")
