"""The INT8 build (issue 6): static QDQ quantization of the classifier of an exported model, its
verification against the fp32 model, and the daemon's default model on the CPU.

A real quantization of the bundled demo model (fewer calibration and test samples than the
default, a few seconds on one core), loaded by the runtime's Engine and scored on test windows
that neither calibration nor the quantizer's own verification saw.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from _export_helpers import files_in  # noqa: E402

from edge_stn import cli  # noqa: E402
from edge_stn.config import (  # noqa: E402
    BUNDLED_DEMO_MODEL,
    BUNDLED_DEMO_MODEL_INT8,
    ModelConfig,
    bundled_demo_model,
)
from edge_stn.errors import ExportError, ModelError  # noqa: E402
from edge_stn.export import quantize as quantize_mod  # noqa: E402
from edge_stn.export.quantize import (  # noqa: E402
    QuantizeOptions,
    QuantizeResult,
    float_nodes,
    quantize_model,
)
from edge_stn.runtime.engine import Engine  # noqa: E402
from edge_stn.runtime.metadata import (  # noqa: E402
    METADATA_KEY,
    file_sha256,
    int8_path,
    read_model_metadata,
    sidecar_path,
)

pytestmark = pytest.mark.skipif(not BUNDLED_DEMO_MODEL.is_file(), reason="demo model missing")

FAST = QuantizeOptions(calibration_samples=256, verify_samples=1)  # one pass of the test split
CPU = ["CPUExecutionProvider"]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the bundled fp32 demo model and its sidecar."""
    dst = tmp_path_factory.mktemp("fp32") / "demo.onnx"
    shutil.copyfile(BUNDLED_DEMO_MODEL, dst)
    shutil.copyfile(sidecar_path(BUNDLED_DEMO_MODEL), sidecar_path(dst))
    return dst


@pytest.fixture(scope="module")
def quantized(source: Path) -> QuantizeResult:
    return quantize_model(source, None, FAST)


def _engine(path: Path) -> Engine:
    return Engine(ModelConfig(path=path, providers=["cpu"], intra_op_threads=1))


def test_int8_runs_in_the_engine_and_keeps_accuracy(
    quantized: QuantizeResult, source: Path
) -> None:
    """Measured through the runtime on test windows drawn with another seed than the
    quantizer's verification: error within 1 point of fp32, agreement >= 98%, theta equal."""
    from edge_stn.data.windows_data import build_window_sources

    assert quantized.model_path == int8_path(source)  # the default: beside its source
    fp32, int8 = _engine(BUNDLED_DEMO_MODEL), _engine(quantized.model_path)
    assert int8.metadata["precision"] == "int8" and int8.labels == fp32.labels
    test = build_window_sources(fp32.metadata["window"], 0).test
    rng = np.random.default_rng(99)
    samples = test.draw(rng.permutation(test.num_items())[:800].astype(np.int64), rng)
    logits32, theta32 = fp32.infer(samples.images)
    logits8, theta8 = int8.infer(samples.images)
    err32 = float(np.mean(logits32.argmax(1) != samples.labels))
    err8 = float(np.mean(logits8.argmax(1) != samples.labels))
    agree = float(np.mean(logits8.argmax(1) == logits32.argmax(1)))
    print(f"\n800 test windows: error fp32 {err32:.4f}, int8 {err8:.4f}, agreement {agree:.4f}")
    assert abs(err8 - err32) <= 0.01
    assert agree >= 0.98
    assert np.abs(theta8 - theta32).max() <= 1e-5
    assert not np.array_equal(logits8, logits32), "the classifier really runs in INT8"


def test_verification_report_and_sidecar(quantized: QuantizeResult) -> None:
    v = quantized.verification
    assert v.passed and v.check is not None
    c = v.check
    assert c.samples == 1250 and c.passes == 1 and c.dataset == "windows"
    assert c.argmax_agreement >= 0.98
    assert c.error_int8 <= c.error_fp32 + 0.01
    assert c.max_abs_diff["theta"] <= 1e-5 and c.max_abs_diff["canonical"] <= 1e-5
    side = json.loads(quantized.sidecar_path.read_text())
    assert side["sha256"] == file_sha256(quantized.model_path) == quantized.sha256
    assert side["model_file"] == quantized.model_path.name
    assert side["verification"]["passed"] is True
    assert side["verification"]["int8"]["argmax_agreement"] == c.argmax_agreement
    assert "tensorrt" in side["verification"]


def test_metadata_is_kept_with_a_quantization_record(
    quantized: QuantizeResult, source: Path
) -> None:
    before = read_model_metadata(source)
    after = read_model_metadata(quantized.model_path)  # the sidecar check passes too
    changed = {"precision", "created", "producer", "tensorrt", "quantization", "opset"}
    assert {k: v for k, v in after.items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    assert after["precision"] == "int8" and after["opset"] == before["opset"]
    q = after["quantization"]
    assert q["source"] == {
        "model_file": source.name,
        "sha256": file_sha256(source),
        "precision": "fp32",
    }
    assert q["calibration"]["samples"] == 256 and q["calibration"]["seed"] == 0
    assert q["calibration"]["dataset"] == "windows" and q["calibration"]["split"] == "train"
    assert q["format"] == "QDQ" and q["quantized_node_count"] == len(q["quantized_nodes"]) > 0


def test_only_the_classifier_is_quantized(quantized: QuantizeResult, source: Path) -> None:
    q = read_model_metadata(quantized.model_path)["quantization"]
    assert all("/classifier/" in name for name in q["quantized_nodes"])
    fp32 = onnx.load(str(source))
    classifier = [
        n
        for n in fp32.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and "/classifier/" in n.name
    ]
    first = [n.name for n in classifier if n.input[0] == "canonical"]  # reads the STN's crop
    assert len(first) == 1
    assert sorted(q["quantized_nodes"]) == sorted(n.name for n in classifier if n.name not in first)
    model = onnx.load(str(quantized.model_path))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    geometry = [g.node[k] for k in float_nodes(g)]
    assert {n.op_type for n in geometry} >= {"Conv", "Gemm", "MatMul", "GridSample"}
    floats = [*geometry, *(n for n in g.node if n.name in first)]
    for n in floats:  # the localization net, theta, the grid, the sampler, the first layer
        assert all(
            producer.get(i) is None or "Quantize" not in producer[i].op_type for i in n.input
        )
    # The published outputs come straight from their float producers, not from a DequantizeLinear.
    assert [o.name for o in g.output] == ["logits", "theta", "canonical"]
    assert {o.name: producer[o.name].op_type for o in g.output} == {
        "logits": "Gemm",
        "theta": "Reshape",
        "canonical": "GridSample",
    }
    assert {p.key for p in model.metadata_props} == {METADATA_KEY}


def test_the_cli_writes_nothing_for_a_broken_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 100)
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(BUNDLED_DEMO_MODEL))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    for path, needle in ((junk, "not a readable ONNX model"), (foreign, "no 'edge_stn' metadata")):
        assert cli.main(["quantize", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edge-stn: error: ") and needle in err[0]
    assert cli.main(["quantize", str(tmp_path / "missing.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert files_in(tmp_path) == ["foreign.onnx", "junk.onnx"]


def test_an_int8_model_is_not_quantized_again(quantized: QuantizeResult, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is a int8 model: quantize the fp32 export"):
        quantize_model(quantized.model_path, tmp_path / "again.onnx", FAST)
    with pytest.raises(ExportError, match="would replace its fp32 source"):
        quantize_model(BUNDLED_DEMO_MODEL, BUNDLED_DEMO_MODEL, FAST)
    assert not any(tmp_path.iterdir())


def test_failed_verification_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quantize_mod, "GEOMETRY_LIMIT", -1.0)  # no model can meet it
    out = tmp_path / "m-int8.onnx"
    with pytest.raises(ExportError, match="INT8 verification failed, nothing written: theta"):
        quantize_model(source, out, QuantizeOptions(calibration_samples=16, verify_samples=1))
    assert not any(tmp_path.iterdir())


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["export", "ckpt.pt", "--out", str(tmp_path / "m.onnx"), "--int8", "--fp16"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 2
    assert "--int8" in capsys.readouterr().err
    assert cli.main(["quantize", str(BUNDLED_DEMO_MODEL), "--min-agreement", "2"]) == 2
    assert "--min-agreement" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the daemon's default


@pytest.mark.parametrize(
    ("configured", "available", "expected"),
    [
        (["tensorrt", "cuda", "cpu"], CPU, BUNDLED_DEMO_MODEL_INT8),
        (["tensorrt", "cuda", "cpu"], GPU, BUNDLED_DEMO_MODEL),
        (["cuda", "cpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"], BUNDLED_DEMO_MODEL),
        (["tensorrt"], ["TensorrtExecutionProvider", "CPUExecutionProvider"], BUNDLED_DEMO_MODEL),
        # a GPU provider the build has but the config does not name: ONNX Runtime runs on the CPU
        (["cpu"], GPU, BUNDLED_DEMO_MODEL_INT8),
        (
            ["cuda", "cpu"],
            ["TensorrtExecutionProvider", "CPUExecutionProvider"],
            BUNDLED_DEMO_MODEL_INT8,
        ),
    ],
)
def test_bundled_default_follows_the_providers(
    configured: list[Any], available: list[str], expected: Path
) -> None:
    assert bundled_demo_model(configured, available) == expected


def test_default_model_is_int8_on_the_cpu_and_fp32_with_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU))
    cfg = ModelConfig()
    assert cfg.model_path == BUNDLED_DEMO_MODEL_INT8 and cfg.bundled_build == "int8, CPU"
    engine = Engine(ModelConfig(providers=["cpu"], intra_op_threads=1))
    assert engine.path == BUNDLED_DEMO_MODEL_INT8 and engine.metadata["precision"] == "int8"
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU))
    assert cfg.model_path == BUNDLED_DEMO_MODEL and cfg.bundled_build == "fp32, GPU provider"
    explicit = ModelConfig(path=BUNDLED_DEMO_MODEL_INT8)
    assert explicit.model_path == BUNDLED_DEMO_MODEL_INT8 and explicit.bundled_build is None


def test_shipped_int8_is_built_from_the_shipped_fp32() -> None:
    """If the fp32 demo model is re-exported, its INT8 build must be made again."""
    q = read_model_metadata(BUNDLED_DEMO_MODEL_INT8)["quantization"]
    assert q["source"]["sha256"] == file_sha256(BUNDLED_DEMO_MODEL), (
        "rebuild it: edge-stn quantize edge_stn/assets/demo-stcnn.onnx"
    )
    assert q["calibration"]["samples"] == 1024


def test_a_folder_model_calibrates_on_its_folder_training_split(tmp_path: Path) -> None:
    """The folder data set needs the folder (the metadata records only its split); the split
    is the trainer's (test fraction and seed from the metadata)."""
    import cv2

    from edge_stn.errors import DataError
    from edge_stn.runtime.engine import InputScaling

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(10):
            img = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), img)
    doc = {
        "training": {"dataset": "folder", "folder": {"test_fraction": 0.2, "seed": 0}},
        "labels": ["a", "b"],
        "input": {
            "height": 32,
            "width": 32,
            "channels": 1,
            "pixel_scale": 1 / 255,
            "mean": 0.5,
            "std": 0.25,
        },
    }
    model = tmp_path / "m.onnx"
    with pytest.raises(DataError, match="--data-folder"):
        quantize_mod._sources(doc, None, model)
    train, test, name = quantize_mod._sources(doc, tmp_path, model)
    assert name == f"folder {tmp_path}" and train.num_items() + test.num_items() == 20
    scaling = InputScaling.from_metadata(doc["input"])
    x = quantize_mod.calibration_windows(train, 8, 0, scaling)
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32
    assert x.min() >= (0 - 0.5) / 0.25 and x.max() <= (1 - 0.5) / 0.25  # scaled as the runtime does
    again = quantize_mod.calibration_windows(train, 8, 0, scaling)
    assert np.array_equal(x, again), "fixed by the seed"
