"""The export step (issue 3): a verified, TensorRT-compatible ONNX file with its metadata.

Real exports of a real (3-step) TC checkpoint, read back with onnx and run with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from _export_helpers import REPO, files_in, train_tc_smoke  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from edge_stn import cli  # noqa: E402
from edge_stn.errors import ExportError, ModelError  # noqa: E402
from edge_stn.export import verify  # noqa: E402
from edge_stn.export.onnx_export import ExportOptions, ExportResult, export_model  # noqa: E402
from edge_stn.export.trt_report import TRT8, TRT10, tensorrt_report  # noqa: E402
from edge_stn.runtime.metadata import (  # noqa: E402
    METADATA_KEY,
    file_sha256,
    read_model_metadata,
    sidecar_path,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tc_smoke(tmp_path_factory.mktemp("tc-smoke") / "run")


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_model(checkpoint, out, ExportOptions(with_canonical=True))


@pytest.fixture(scope="module")
def exported_fp16(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The FP16 export, through the CLI: its exit code, printed report and files."""
    out = tmp_path_factory.mktemp("export16") / "model16.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(["export", str(checkpoint), "--out", str(out), "--fp16"])
    return {"rc": rc, "out": out, "printed": printed.getvalue()}


def _nodes(path: Path, op: str) -> list[Any]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# --- the FP32 export -------------------------------------------------------------------------


def test_export_passes_verification(exported: ExportResult) -> None:
    v = exported.verification
    assert v.passed, v.failures
    assert v.parity is not None and v.batches is not None
    assert v.parity.images == 256
    assert v.parity.max_abs_diff["logits"] <= 1e-4
    assert v.parity.max_abs_diff["theta"] <= 1e-5
    assert v.parity.argmax_agreement == 1.0
    assert v.batches.batch_sizes == [1, 7, 32] and v.batches.argmax_identical
    assert "full check" in v.checker
    assert exported.trt.compatible(TRT10) and exported.trt.compatible(TRT8)


def test_written_file_keeps_the_contract(exported: ExportResult) -> None:
    path = exported.model_path
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ops = {n.op_type for n in model.graph.node}
    assert "AffineGrid" not in ops and "MatMul" in ops
    (sampler,) = _nodes(path, "GridSample")
    attrs = _attrs(sampler)
    assert attrs["mode"] == b"bilinear" and attrs["align_corners"] == 0
    assert attrs["padding_mode"] == b"zeros"
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert files_in(path.parent) == ["model.json", "model.onnx"]  # one file + sidecar, no .data
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and dims == ["batch", 1, 60, 60]
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert outs == {
        "logits": ["batch", 10],
        "theta": ["batch", 2, 3],
        "canonical": ["batch", 1, 28, 28],
    }


def test_onnx_runtime_matches_torch_on_any_batch(exported: ExportResult, checkpoint: Path) -> None:
    from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    x = ckpt["verify_images"][:5].numpy().astype(np.float32) / 255.0
    with torch.inference_mode():
        ref = model_from_checkpoint(ckpt)(torch.from_numpy(x))
    sess = ort.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    logits, theta, canonical = sess.run(None, {"images": x})
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4
    assert np.abs(theta - ref.theta.numpy()).max() <= 1e-5
    assert np.abs(canonical - ref.canonical.numpy()).max() <= 1e-4


def test_metadata_round_trip(exported: ExportResult, checkpoint: Path) -> None:
    doc = read_model_metadata(exported.model_path)
    assert doc == exported.document
    assert doc["labels"] == [str(i) for i in range(10)] and doc["background_label"] is None
    assert doc["input"] == {
        "name": "images",
        "channels": 1,
        "height": 60,
        "width": 60,
        "pixel_scale": 1 / 255,
        "mean": 0.0,
        "std": 1.0,
        "color": "gray",
        "dtype": "float32",
        "layout": "NCHW",
    }
    assert [o["name"] for o in doc["outputs"]] == ["logits", "theta", "canonical"]
    assert doc["stn"]["output_height"] == 28 and doc["stn"]["align_corners"] is False
    assert doc["window"] is None and doc["opset"] == 17 and doc["precision"] == "fp32"
    assert doc["training"]["dataset"] == "tc" and doc["training"]["arch"] == "stcnn"
    assert doc["training"]["checkpoint_sha256"] == file_sha256(checkpoint)
    assert {"edge_stn", "torch", "onnx", "onnxruntime", "exporter"} <= set(doc["producer"])
    side = json.loads(sidecar_path(exported.model_path).read_text())
    assert side["sha256"] == file_sha256(exported.model_path) == exported.sha256
    assert side["verification"]["passed"] is True
    assert side["verification"]["tensorrt"]["static_check"] is True
    assert {k: side[k] for k in doc} == doc


def test_metadata_reads_without_onnx_and_torch(exported: ExportResult) -> None:
    """A gateway has onnxruntime only: the metadata comes through ONNX Runtime, torch-free."""
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from edge_stn.runtime.metadata import read_model_metadata\n"
        f"doc = read_model_metadata({str(exported.model_path)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(doc['schema_version'], len(doc['labels']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "10"]


def test_sidecar_sha256_mismatch_is_refused(
    exported: ExportResult, exported_fp16: dict[str, Any], tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(exported.model_path, model)
    shutil.copy(sidecar_path(exported.model_path), sidecar_path(model))
    assert read_model_metadata(model)["opset"] == 17
    shutil.copy(exported_fp16["out"], model)  # another model under the old sidecar
    with pytest.raises(ModelError, match="sha256"):
        read_model_metadata(model)
    sidecar_path(model).write_text("{not json")
    with pytest.raises(ModelError, match="sidecar"):
        read_model_metadata(model)
    sidecar_path(model).unlink()  # no sidecar: the embedded document alone is enough
    assert read_model_metadata(model)["precision"] == "fp16"


def test_missing_or_invalid_metadata_is_refused(exported: ExportResult, tmp_path: Path) -> None:
    model = onnx.load(str(exported.model_path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ModelError, match="no 'edge_stn' metadata"):
        read_model_metadata(bare)
    helper.set_model_props(model, {METADATA_KEY: "{]"})
    onnx.save(model, str(bare))
    with pytest.raises(ModelError, match="not valid JSON"):
        read_model_metadata(bare)
    helper.set_model_props(model, {METADATA_KEY: json.dumps({"schema_version": 1})})
    onnx.save(model, str(bare))
    with pytest.raises(ModelError, match="missing fields"):
        read_model_metadata(bare)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk")
    with pytest.raises(ModelError):
        read_model_metadata(tmp_path / "junk.onnx")
    with pytest.raises(ModelError, match="no such model file"):
        read_model_metadata(tmp_path / "absent.onnx")


# --- FP16 ------------------------------------------------------------------------------------


def test_fp16_export_keeps_geometry_fp32(exported_fp16: dict[str, Any]) -> None:
    assert exported_fp16["rc"] == 0
    path: Path = exported_fp16["out"]
    side = json.loads(sidecar_path(path).read_text())
    parity = side["verification"]["parity"]
    assert parity["argmax_agreement"] >= 0.995
    assert any("runs FP16 nodes in FP32" in n for n in side["verification"]["notes"])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    assert {types[i.name] for i in g.input} == {TensorProto.FLOAT}
    assert {types[o.name] for o in g.output} == {TensorProto.FLOAT}
    (sampler,) = (n for n in g.node if n.op_type == "GridSample")
    assert [types[i] for i in sampler.input] == [TensorProto.FLOAT, TensorProto.FLOAT]
    (grid,) = (n for n in g.node if n.op_type == "MatMul")
    assert all(types[i] == TensorProto.FLOAT for i in grid.input)
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    assert side["tensorrt"]["fp32_layers"] and side["precision"] == "fp16"


def test_export_prints_report_and_next_steps(exported_fp16: dict[str, Any]) -> None:
    printed = exported_fp16["printed"]
    assert "static check" in printed and "no TensorRT build ran here" in printed
    assert "# TensorRT 10.x" in printed and "# TensorRT 8.5/8.6" in printed
    assert "--minShapes=images:1x1x60x60" in printed and "--maxShapes=images:32x1x60x60" in printed
    assert "--stronglyTyped" in printed and "--layerPrecisions=" in printed
    assert "model:" in printed and "providers:" in printed


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("build-engine-trt10.sh", ["--memPoolSize=workspace:1024", "--stronglyTyped"]),
        ("build-engine-trt8.sh", ["--workspace=1024", "--fp16", "--layerPrecisions="]),
    ],
)
def test_recipe_scripts_build_from_the_sidecar(
    script: str, flags: list[str], exported_fp16: dict[str, Any]
) -> None:
    if shutil.which("sha256sum") is None or shutil.which("python3") is None:
        pytest.skip("needs sha256sum and python3")
    env = {**os.environ, "TRTEXEC": "/bin/echo"}  # prints the command line trtexec would get
    proc = subprocess.run(
        ["bash", str(REPO / "export" / script), str(exported_fp16["out"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--minShapes=images:1x1x60x60" in proc.stdout
    assert "--maxShapes=images:32x1x60x60" in proc.stdout
    assert all(f in proc.stdout for f in flags), proc.stdout


# --- bad input -------------------------------------------------------------------------------


def test_opset_20_refused_without_flag(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), "--opset", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-opset-20" in err and err.count("\n") == 1
    assert files_in(tmp_path) == []


def test_opset_20_with_flag_is_for_onnx_runtime_only(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m20.onnx"
    result = export_model(
        checkpoint, out, ExportOptions(opset=20, allow_opset_20=True, verify=False)
    )
    (sampler,) = _nodes(out, "GridSample")
    assert _attrs(sampler)["mode"] == b"linear"
    assert not result.trt.compatible(TRT10)
    assert any("for ONNX Runtime only" in line for line in result.next_steps)
    assert not any(line.strip().startswith("trtexec") for line in result.next_steps)


def _damaged(kind: str, checkpoint: Path, folder: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:5000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {}, "epoch": 3}, path)
    return path  # "missing": never written


@pytest.mark.parametrize("kind", ["missing", "truncated", "empty", "foreign"])
def test_bad_checkpoint_exits_2_and_leaves_nothing(
    kind: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    bad = _damaged(kind, checkpoint, src)
    out = tmp_path / "out"
    out.mkdir()
    rc = cli.main(["export", str(bad), "--out", str(out / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("edge-stn: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert files_in(out) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--opset", "15"],
        ["--opset", "21"],
        ["--opset", "seventeen"],
        ["--batch-profile", "8,1,32"],
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(["export", str(checkpoint), "--out", str(tmp_path / "m.onnx"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("where", ["no-folder", "folder-is-a-file", "not-onnx", "is-a-folder"])
def test_unwritable_output_exits_2(
    where: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.onnx").mkdir()
    out = {
        "no-folder": tmp_path / "absent" / "m.onnx",
        "folder-is-a-file": tmp_path / "file" / "m.onnx",
        "not-onnx": tmp_path / "m.txt",
        "is-a-folder": tmp_path / "dir.onnx",
    }[where]
    rc = cli.main(["export", str(checkpoint), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert files_in(tmp_path) == ["file"]


def test_failed_verification_leaves_the_old_model(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    monkeypatch.setitem(verify.FP32_LIMITS, "logits", -1.0)  # no export can meet it
    with pytest.raises(ExportError, match="verification failed: logits differ"):
        export_model(checkpoint, out)
    assert files_in(tmp_path) == ["m.onnx"] and out.read_bytes() == b"previous model"


# --- pieces ----------------------------------------------------------------------------------


def test_simplify_is_verified_after(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxslim")
    result = export_model(checkpoint, tmp_path / "s.onnx", ExportOptions(simplify=True))
    assert result.verification.passed
    assert any("onnxslim" in n for n in result.notes)
    assert "onnxslim" in read_model_metadata(tmp_path / "s.onnx")["producer"]


def _graph(nodes: list[Any], opset: int, inputs: list[Any], outputs: list[Any]) -> Any:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_trt_report_flags_affinegrid_and_linear_gridsample() -> None:
    f = TensorProto.FLOAT
    theta = helper.make_tensor_value_info("theta", f, [1, 2, 3])
    size = helper.make_tensor_value_info("size", TensorProto.INT64, [4])
    x = helper.make_tensor_value_info("x", f, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("y", f, [1, 1, 8, 8])
    model = _graph(
        [
            helper.make_node("AffineGrid", ["theta", "size"], ["grid"], name="ag"),
            helper.make_node("GridSample", ["x", "grid"], ["y"], name="gs", mode="linear"),
        ],
        20,
        [theta, size, x],
        [y],
    )
    report = tensorrt_report(model)
    assert not report.compatible(TRT10) and not report.compatible(TRT8)
    text = "\n".join(report.lines())
    assert "AffineGrid" in text and "'linear'" in text and "static check" in text
    assert report.blocking()


def test_trt_report_passes_exported_model_and_names_version_limits(exported: ExportResult) -> None:
    report = tensorrt_report(onnx.load(str(exported.model_path)))
    assert report.blocking() == []
    assert report.op_counts["GridSample"] == 1
    assert any("8.5" in f.message for f in report.findings if f.op == "GridSample")
