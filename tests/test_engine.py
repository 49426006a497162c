"""The ONNX Runtime engine (issue 4 item 3): the metadata contract, providers with fallback,
warm-up, and outputs identical to ONNX Runtime called directly. Runs on the bundled TC model
(read-only: tests that damage a model work on a copy)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from edge_stn import config as config_mod  # noqa: E402
from edge_stn.config import BatchProfileConfig, ModelConfig  # noqa: E402
from edge_stn.errors import DTypeError, MissingExtraError, ModelError, ShapeError  # noqa: E402
from edge_stn.runtime.engine import (  # noqa: E402
    CPU_MAX_BATCH,
    Engine,
    default_intra_op_threads,
    provider_plan,
    softmax,
    usable_cores,
)
from edge_stn.runtime.metadata import METADATA_KEY, file_sha256  # noqa: E402
from edge_stn.windows import WindowSpec  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "edge_stn" / "assets"
TC_MODEL = ASSETS / "tc-stcnn.onnx"

pytestmark = pytest.mark.skipif(not TC_MODEL.is_file(), reason="bundled TC model missing")


def cpu_config(path: Path = TC_MODEL, **kw: Any) -> ModelConfig:
    return ModelConfig(path=path, providers=["cpu"], intra_op_threads=1, **kw)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(cpu_config())


@pytest.fixture
def copy_model(tmp_path: Path) -> Path:
    """A private copy of the TC model and its sidecar."""
    dst = tmp_path / "tc.onnx"
    shutil.copyfile(TC_MODEL, dst)
    shutil.copyfile(TC_MODEL.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def rewrite_metadata(src: Path, dst: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """``dst``: ``src`` with its embedded document changed (``change`` returns None to drop it);
    no sidecar."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    new = change(json.loads(props[METADATA_KEY]))
    del model.metadata_props[:]
    for key, value in props.items():
        if key == METADATA_KEY and new is None:
            continue
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(new) if key == METADATA_KEY else value
    onnx.save(model, str(dst))
    return dst


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 60, 60), dtype=np.uint8)


# ---------------------------------------------------------------- the happy path


def test_outputs_match_onnxruntime_called_directly(engine: Engine) -> None:
    x = images(7)
    logits, theta = engine.infer(x)
    sess = ort.InferenceSession(str(TC_MODEL), providers=["CPUExecutionProvider"])
    want_logits, want_theta = sess.run(["logits", "theta"], {"images": x.astype(np.float32) / 255})
    assert logits.shape == (7, 10) and theta.shape == (7, 2, 3)
    assert logits.dtype == np.float32 and theta.dtype == np.float32
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_allclose(theta, want_theta, atol=1e-6)


def test_metadata_properties(engine: Engine) -> None:
    assert engine.labels == [str(d) for d in range(10)]
    assert engine.background_label is None and engine.background_id is None
    assert engine.input_size == (60, 60) and engine.channels == 1
    assert engine.stn_output_size == (28, 28)
    assert engine.window_spec is None  # trained on whole images, not detection windows
    assert engine.name == "tc-stcnn"
    assert engine.sha256 == json.loads(TC_MODEL.with_suffix(".json").read_text())["sha256"]
    assert engine.providers == ["CPUExecutionProvider"]
    assert engine.warmup_s is not None and engine.max_batch == CPU_MAX_BATCH


def test_split_batches_equal_one_batch(engine: Engine, monkeypatch) -> None:
    x = images(7, seed=1)
    whole = engine.infer(x)
    monkeypatch.setattr(engine, "max_batch", 3)  # as under TensorRT with a profile max of 3
    parts = engine.infer(x)
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cpu_threads_default_to_half_the_cores_and_big_batches_are_split() -> None:
    eng = Engine(ModelConfig(path=TC_MODEL, providers=["cpu"]))
    assert eng.intra_op_threads == default_intra_op_threads() == max(1, usable_cores() // 2)
    assert (
        Engine(ModelConfig(path=TC_MODEL, providers=["cpu"], intra_op_threads=3)).intra_op_threads
        == 3
    )
    x = images(CPU_MAX_BATCH + 5, seed=2)
    logits, theta = eng.infer(x)  # two calls of at most CPU_MAX_BATCH
    tail_logits, tail_theta = eng.infer(x[CPU_MAX_BATCH:])
    assert logits.shape == (CPU_MAX_BATCH + 5, 10) and theta.shape == (CPU_MAX_BATCH + 5, 2, 3)
    np.testing.assert_allclose(logits[CPU_MAX_BATCH:], tail_logits, atol=1e-5)
    np.testing.assert_allclose(theta[CPU_MAX_BATCH:], tail_theta, atol=1e-6)


def test_empty_batch_and_softmax(engine: Engine) -> None:
    logits, theta = engine.infer(np.zeros((0, 1, 60, 60), np.uint8))
    assert logits.shape == (0, 10) and theta.shape == (0, 2, 3)
    p = softmax(engine.infer(images(3))[0])
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert (p >= 0).all()


def test_input_checks(engine: Engine) -> None:
    with pytest.raises(ShapeError, match=r"\(N, 1, 60, 60\)"):
        engine.infer(np.zeros((2, 60, 60), np.uint8))
    with pytest.raises(ShapeError, match=r"\(2, 1, 48, 48\)"):
        engine.infer(np.zeros((2, 1, 48, 48), np.uint8))
    with pytest.raises(DTypeError, match="float32, expected uint8"):
        engine.infer(np.zeros((2, 1, 60, 60), np.float32))


def test_window_spec_from_metadata(tmp_path: Path) -> None:
    def add_window(doc: dict[str, Any]) -> dict[str, Any]:
        doc["window"] = {"size": 60, "context_margin": 0.3, "min_side": 10}
        return doc

    model = rewrite_metadata(TC_MODEL, tmp_path / "win.onnx", add_window)
    spec = Engine(cpu_config(model), warmup=False).window_spec
    assert spec == WindowSpec(size=60, context_margin=0.3, min_side=10.0)


# ---------------------------------------------------------------- refusals


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    model = rewrite_metadata(TC_MODEL, tmp_path / "bare.onnx", lambda doc: None)
    with pytest.raises(ModelError, match=f"no '{METADATA_KEY}' metadata"):
        Engine(cpu_config(model))


def test_cnn_without_stn_is_refused(tmp_path: Path) -> None:
    def drop_stn(doc: dict[str, Any]) -> dict[str, Any]:
        doc["stn"] = None
        return doc

    model = rewrite_metadata(TC_MODEL, tmp_path / "cnn.onnx", drop_stn)
    with pytest.raises(ModelError, match="not an ST-CNN"):
        Engine(cpu_config(model))


def test_sidecar_sha256_mismatch_is_refused(copy_model: Path) -> None:
    side = copy_model.with_suffix(".json")
    doc = json.loads(side.read_text())
    doc["sha256"] = "0" * 64
    side.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="differs from its sidecar"):
        Engine(cpu_config(copy_model))


def test_configured_sha256(copy_model: Path) -> None:
    good = file_sha256(copy_model)
    assert Engine(cpu_config(copy_model, sha256=good.upper()), warmup=False).sha256 == good
    with pytest.raises(ModelError, match=r"differs from model\.sha256"):
        Engine(cpu_config(copy_model, sha256="f" * 64))


def test_missing_and_corrupt_files(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        Engine(cpu_config(tmp_path / "nope.onnx"))
    monkeypatch.setattr(config_mod, "BUNDLED_DEMO_MODEL", tmp_path / "demo-stcnn.onnx")
    monkeypatch.setattr(config_mod, "BUNDLED_DEMO_MODEL_INT8", tmp_path / "demo-stcnn-int8.onnx")
    with pytest.raises(ModelError, match="bundled demo model is not installed"):
        Engine(ModelConfig(providers=["cpu"]))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        Engine(cpu_config(junk))


def test_missing_onnxruntime_names_the_extras(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(MissingExtraError) as info:
        Engine(cpu_config())
    message = str(info.value)
    assert "pip install 'edge-stn[cpu]'" in message and "edge-stn[gpu]" in message


# ---------------------------------------------------------------- providers


def test_unavailable_providers_fall_back_to_cpu_with_a_log_line(caplog) -> None:
    cfg = ModelConfig(path=TC_MODEL, providers=["tensorrt", "cuda"])
    available = ort.get_available_providers()
    with caplog.at_level(logging.INFO, logger="edge_stn.runtime.engine"):
        eng = Engine(cfg, warmup=False)
    if "CUDAExecutionProvider" in available or "TensorrtExecutionProvider" in available:
        pytest.skip("this onnxruntime has a GPU provider")
    assert eng.providers == ["CPUExecutionProvider"]
    text = caplog.text
    assert "tensorrt (TensorrtExecutionProvider) is not available" in text
    assert "cuda (CUDAExecutionProvider) is not available" in text
    assert "cpu added as the last fallback" in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("preferred execution provider tensorrt is not in use" in r.message for r in warnings)


def test_provider_plan_options(tmp_path: Path) -> None:
    cfg = ModelConfig.model_validate(
        {
            "providers": [
                {"name": "tensorrt", "options": {"engine_cache_dir": str(tmp_path), "fp16": True}},
                {"name": "cuda", "options": {"device_id": 1}},
            ]
        }
    )
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    plan = provider_plan(
        cfg,
        everything,
        input_name="images",
        chw=(1, 48, 48),
        default_profile=BatchProfileConfig(min=1, opt=4, max=16),
    )
    assert [name for name, _ in plan] == everything
    trt = plan[0][1]
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "images:1x1x48x48"
    assert trt["trt_profile_opt_shapes"] == "images:4x1x48x48"
    assert trt["trt_profile_max_shapes"] == "images:16x1x48x48"
    assert plan[1][1] == {"device_id": "1"}
    # a profile in the config wins over the model's
    cfg2 = ModelConfig.model_validate(
        {
            "providers": [
                {"name": "tensorrt", "options": {"batch_profile": {"min": 2, "opt": 2, "max": 2}}}
            ]
        }
    )
    plan2 = provider_plan(cfg2, everything, input_name="x", chw=(3, 8, 8))
    assert plan2[0][1]["trt_profile_max_shapes"] == "x:2x3x8x8"
    assert [name for name, _ in plan2] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    # only what this build offers, CPU last
    only_cpu = provider_plan(cfg, ["CPUExecutionProvider"], input_name="images", chw=(1, 48, 48))
    assert only_cpu == [("CPUExecutionProvider", {})]


def test_a_gpu_provider_that_cannot_start_falls_back_to_the_cpu(monkeypatch, caplog) -> None:
    real = ort.InferenceSession

    def session(path: str, sess_options: Any = None, providers: Any = None, **kw: Any) -> Any:
        if providers != ["CPUExecutionProvider"]:
            raise RuntimeError("libcudart.so.12: cannot open shared object file")
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    with caplog.at_level(logging.WARNING, logger="edge_stn.runtime.engine"):
        eng = Engine(ModelConfig(path=TC_MODEL, providers=["cuda", "cpu"]))
    assert eng.providers == ["CPUExecutionProvider"]
    assert "could not start CUDAExecutionProvider (libcudart.so.12" in caplog.text
    assert "preferred execution provider cuda is not in use" in caplog.text
