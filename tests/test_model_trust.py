"""Model integrity and authenticity (issue 7, part 3): Ed25519 signatures made by
`edge-stn sign-model`, the sha256 allow-list, the fallback to the last good model when a new
one fails to load or warm up, and the hot swap on SIGHUP. Real files, real ONNX Runtime, real
mosquitto."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import Mosquitto, Subscriber, wait_until

from edge_stn.cli import main
from edge_stn.config import ModelConfig, ModelTrustConfig, load_config
from edge_stn.errors import ModelError, ModelIntegrityError
from edge_stn.runtime.fallback import FallbackStore, open_engine
from edge_stn.runtime.metadata import file_sha256, read_model_metadata
from edge_stn.runtime.signing import signature_path

pytest.importorskip("onnxruntime")

ASSETS = Path(__file__).resolve().parents[1] / "edge_stn" / "assets"
DEMO = ASSETS / "demo-stcnn.onnx"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A copy of the bundled demo model with its sidecar."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DEMO, folder / DEMO.name)
    shutil.copy(DEMO.with_suffix(".json"), folder / "demo-stcnn.json")
    return folder / DEMO.name


def new_key(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """`edge-stn sign-model --new-key`: the private key file and the printed public key."""
    key = tmp_path / f"{name}.pem"
    assert main(["sign-model", "--new-key", str(key)]) == 0
    out = capsys.readouterr().out
    public = out.strip().splitlines()[-1].strip()
    assert len(public) == 44 and public.endswith("=")
    assert key.stat().st_mode & 0o777 == 0o600
    return key, public


def sign(model: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sign-model", str(model), "--key", str(key)]) == 0
    assert "signed" in capsys.readouterr().out


def signed_config(model: Path, public: str, **trust: Any) -> ModelConfig:
    return ModelConfig(
        path=model,
        providers=["cpu"],  # type: ignore[list-item]
        trust=ModelTrustConfig(require="signature", public_keys=[public], **trust),
    )


def test_a_signed_model_loads_and_says_by_whom(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_stn.runtime.engine import Engine

    key, public = new_key(tmp_path, "release", capsys)
    sign(model, key, capsys)
    sig = json.loads(signature_path(model).read_text())
    assert sig["sha256"] == file_sha256(model) and sig["algorithm"] == "ed25519"
    engine = Engine(signed_config(model, public))
    assert engine.trust == f"signed by {sig['key_id']}"
    # the key may also come from a file, PEM or base64
    key_file = tmp_path / "release.pub"
    key_file.write_text(public + "\n")
    by_file = ModelConfig(
        path=model,
        providers=["cpu"],  # type: ignore[list-item]
        trust=ModelTrustConfig(require="signature", public_key_files=[key_file]),
    )
    assert Engine(by_file).trust.startswith("signed by ")


@pytest.mark.parametrize("case", ["unsigned", "other key", "changed after signing", "garbage sig"])
def test_bad_signatures_are_refused_before_loading(
    case: str, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_stn.runtime.engine import Engine

    key, public = new_key(tmp_path, "release", capsys)
    other, _ = new_key(tmp_path, "intruder", capsys)
    expected = {
        "unsigned": "unsigned: no signature file demo-stcnn.onnx.sig",
        "other key": "mis-signed: the signature (key ",
        "changed after signing": "mis-signed: its signature is for sha256",
        "garbage sig": "is not an edge-stn Ed25519 signature",
    }[case]
    if case == "other key":
        sign(model, other, capsys)
    elif case == "changed after signing":
        sign(model, key, capsys)
        with model.open("ab") as fh:
            fh.write(b"\0")
    elif case == "garbage sig":
        signature_path(model).write_text('{"format": "edge-stn-signature", "version": 1}')
    with pytest.raises(ModelIntegrityError) as err:
        Engine(signed_config(model, public))
    assert expected in str(err.value) and str(model) in str(err.value)


def test_allow_list_and_either(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_stn.runtime.engine import Engine

    sha = file_sha256(model)
    listed = ModelTrustConfig(require="allowlist", allowed_sha256=[sha.upper()])
    cfg = ModelConfig(path=model, providers=["cpu"], trust=listed)  # type: ignore[list-item]
    assert Engine(cfg).trust == "allow-listed"
    other = ModelTrustConfig(require="allowlist", allowed_sha256=["0" * 64])
    with pytest.raises(ModelIntegrityError, match=r"is not in model\.trust\.allowed_sha256"):
        Engine(ModelConfig(path=model, providers=["cpu"], trust=other))  # type: ignore[list-item]
    _, public = new_key(tmp_path, "k", capsys)
    either = ModelTrustConfig(require="either", public_keys=[public], allowed_sha256=["0" * 64])
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        Engine(ModelConfig(path=model, providers=["cpu"], trust=either))  # type: ignore[list-item]


def write_daemon_config(
    folder: Path, model: Path, broker_port: int = 1, **model_extra: Any
) -> Path:
    doc = {
        "device_id": "gw1",
        "model": {"path": str(model), "providers": ["cpu"], **model_extra},
        "cameras": [{"id": "cam0", "source": "synthetic"}],
        "mqtt": {"host": "127.0.0.1", "port": broker_port},
    }
    path = folder / "daemon.yaml"
    path.write_text(json.dumps(doc))
    return path


def test_start_up_refusals_are_one_line_exit_2(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, public = new_key(tmp_path, "k", capsys)
    trust = {"require": "signature", "public_keys": [public]}
    cfg = write_daemon_config(tmp_path, model, trust=trust)
    # An unsigned model: through the real console entry point, in a fresh interpreter.
    proc = subprocess.run(
        [sys.executable, "-m", "edge_stn.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("edge-stn: error: ") and "unsigned" in lines[0]
    assert "demo-stcnn.onnx" in lines[0]
    # An unreadable public key file, an invalid inline key.
    for trust_doc, needle in (
        (
            {"require": "signature", "public_key_files": [str(tmp_path / "missing.pub")]},
            "model.trust.public_key_files.0: cannot read public key file",
        ),
        (
            {"require": "signature", "public_key_files": [str(tmp_path)]},
            "model.trust.public_key_files.0: cannot read public key file",
        ),
        (
            {"require": "signature", "public_keys": ["not-a-key"]},
            "model.trust.public_keys.0: expected an Ed25519 public key",
        ),
        ({"require": "signature"}, "model.trust: require 'signature' needs public_keys"),
    ):
        cfg = write_daemon_config(tmp_path, model, trust=trust_doc)
        assert main(["run", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    # config check says the same before deployment
    cfg = write_daemon_config(tmp_path, model, trust=trust)
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "warning: model.path: the daemon will refuse it: unsigned" in out


def test_sign_model_bad_input(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (
            ["sign-model", str(model), "--key", str(tmp_path / "nope.pem")],
            "cannot read the private key",
        ),
        (["sign-model", str(model)], "--key PRIVATE_KEY is required"),
        (["sign-model", str(tmp_path / "none.onnx"), "--key", str(model)], "no such model file"),
        (["sign-model", str(model), "--key", str(model)], "not a PEM private key"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    key, _ = new_key(tmp_path, "k", capsys)
    assert main(["sign-model", "--new-key", str(key)]) == 2  # never overwrites a key
    assert "refusing to overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- fallback


def failing_warmup_model(path: Path) -> Path:
    """A model that passes every load-time check but fails on its first run: its graph
    reshapes the batch into a shape that does not divide (what a wrong static export does)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    doc = read_model_metadata(DEMO)
    c, h, w = (doc["input"][k] for k in ("channels", "height", "width"))
    k = len(doc["labels"])

    def const(name: str, values: list[int]) -> Any:
        tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return helper.make_node("Constant", [], [name], value=tensor)

    nodes = [
        const("flat_shape", [5, -1]),  # 1 x 1 x 48 x 48 does not divide into 5 rows
        helper.make_node("Reshape", ["images", "flat_shape"], ["flat"]),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        const("logits_shape", [5, k]),
        helper.make_node("Expand", ["mean", "logits_shape"], ["logits"]),
        const("theta_shape", [-1, 2, 3]),
        helper.make_node("Reshape", ["flat", "theta_shape"], ["theta"]),
    ]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", c, h, w])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("theta", TensorProto.FLOAT, ["batch", 2, 3]),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, {"edge_stn": json.dumps(doc)})
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("broken", ["corrupt", "warm-up fails"])
def test_a_new_model_that_fails_falls_back_to_the_previous(
    broken: str, model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keep = tmp_path / "state" / "models"
    good = ModelConfig(path=model, providers=["cpu"], fallback_dir=keep)  # type: ignore[list-item]
    first = open_engine(good)
    kept = FallbackStore(keep).last_good()
    assert kept is not None and kept.sha256 == first.sha256 and kept.path.is_file()
    assert (kept.path.parent / "demo-stcnn.json").is_file()  # the sidecar travels along

    new = tmp_path / "new" / "next.onnx"
    new.parent.mkdir()
    if broken == "corrupt":
        new.write_bytes(DEMO.read_bytes()[:50_000])  # truncated in transfer
    else:
        failing_warmup_model(new)
    caplog.set_level(logging.ERROR, logger="edge_stn.runtime")
    engine = open_engine(good.model_copy(update={"path": new}))
    assert engine.sha256 == first.sha256 and engine.path == kept.path
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "next.onnx failed to load" in message and "running the previous model" in message
    if broken == "warm-up fails":
        assert "warm-up failed" in message
    # Without a fallback folder (or with a sha256 pin) the failure is the start-up error.
    with pytest.raises(ModelError):
        open_engine(good.model_copy(update={"path": new, "fallback_dir": None}))
    with pytest.raises(ModelError):
        open_engine(good.model_copy(update={"path": new, "sha256": file_sha256(new)}))


def test_integrity_failures_never_fall_back(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = tmp_path / "keep"
    open_engine(ModelConfig(path=model, providers=["cpu"], fallback_dir=keep))  # type: ignore[list-item]
    _, public = new_key(tmp_path, "k", capsys)
    unsigned = signed_config(model, public).model_copy(update={"fallback_dir": keep})
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        open_engine(unsigned)
    with pytest.raises(ModelIntegrityError, match="no such model file"):
        open_engine(unsigned.model_copy(update={"path": tmp_path / "gone.onnx"}))


def test_keeping_a_copy_on_a_read_only_folder_is_survived(
    model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    caplog.set_level(logging.WARNING, logger="edge_stn.runtime")
    engine = open_engine(ModelConfig(path=model, providers=["cpu"], fallback_dir=blocker / "sub"))  # type: ignore[list-item]
    assert engine.sha256 == file_sha256(model)
    assert any("running without one" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- hot swap (SIGHUP)


def resaved(src: Path, dst: Path) -> Path:
    """The same network with different bytes (another sha256), no sidecar."""
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(src))
    m.doc_string = "re-saved for a swap test"
    onnx.save(m, str(dst))
    return dst


def test_sighup_swaps_a_signed_model_and_keeps_the_running_one_on_failure(
    mosquitto: Mosquitto,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edge_stn.daemon import Daemon

    key, public = new_key(tmp_path, "k", capsys)
    second = resaved(model, model.with_name("second.onnx"))
    sign(second, key, capsys)
    bad = model.with_name("bad.onnx")
    bad.write_bytes(b"\x08\x07 not an onnx model")
    sign(bad, key, capsys)
    trust = {"require": "signature", "public_keys": [public]}
    keep = tmp_path / "keep"
    store = FallbackStore(keep)
    cfg_path = write_daemon_config(tmp_path, model, mosquitto.port, fallback_dir=str(keep))
    sub = Subscriber(mosquitto, ["edge-stn/gw1/#"])
    daemon = Daemon(load_config(cfg_path), config_path=cfg_path)
    runner = threading.Thread(target=daemon.run, kwargs={"install_signals": False})
    runner.start()

    def results() -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/result"))]

    def statuses() -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in sub.on(lambda m: m.topic.endswith("/status"))]

    try:
        assert wait_until(lambda: len(results()) >= 3, 20)
        first_sha = file_sha256(model)
        # 1. a model that cannot load: refused, the running one is kept
        caplog.set_level(logging.INFO, logger="edge_stn")
        write_daemon_config(tmp_path, bad, mosquitto.port, trust=trust, fallback_dir=str(keep))
        daemon.request_reload()
        assert wait_until(
            lambda: any("new model refused, keeping" in r.getMessage() for r in caplog.records),
            20,
        )
        assert daemon.engine.sha256 == first_sha
        kept = store.last_good()
        assert kept is not None and kept.sha256 == first_sha  # kept at start-up, not replaced
        n = len(results())
        assert wait_until(lambda: len(results()) >= n + 2, 20), "still detecting"
        # 2. the signed second model: swapped without stopping the camera
        write_daemon_config(tmp_path, second, mosquitto.port, trust=trust, fallback_dir=str(keep))
        daemon.request_reload()
        second_sha = file_sha256(second)
        assert wait_until(lambda: daemon.engine.sha256 == second_sha, 20)
        # the model swapped in is the new last good one (the run loop keeps it after the swap)
        assert wait_until(lambda: getattr(store.last_good(), "sha256", None) == second_sha, 5)
        n = len(results())
        assert wait_until(lambda: len(results()) >= n + 3, 20)
        assert wait_until(
            lambda: any(s.get("model", {}).get("sha256") == second_sha for s in statuses()), 5
        )
    finally:
        daemon.request_stop()
        runner.join(15)
        sub.close()
    docs = sorted(results(), key=lambda r: r["seq"])
    assert [r["seq"] for r in docs] == list(range(len(docs))), "no gap across the swap"
    shas = [r["model"]["sha256"] for r in docs]
    switch = shas.index(second_sha)
    assert set(shas[:switch]) == {first_sha} and set(shas[switch:]) == {second_sha}
    assert daemon.config.model.path == second
