"""The bundled ONNX models (edge_stn/assets/) against the shipped checkpoints (models/) and the
foundation's bars, run with ONNX Runtime the way a gateway runs them. A test re-exports the demo
model from its checkpoint and compares outputs, so the two can never drift apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_stn.evaluate import evaluate, predict_onnx
from edge_stn.runtime.metadata import file_sha256, read_model_metadata, sidecar_path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "edge_stn" / "assets"

# asset -> (data set, passes, highest acceptable test error)
BARS = {
    "tc-stcnn.onnx": ("tc", 10, 0.020),
    "rts-stcnn.onnx": ("rts", 10, 0.025),
    "demo-stcnn.onnx": ("windows", 2, 0.05),
    "demo-stcnn-int8.onnx": ("windows", 2, 0.05),  # the daemon's default on the CPU
}


@pytest.mark.parametrize("name", sorted(BARS))
def test_bundled_model_keeps_the_contract(name: str) -> None:
    path = ASSETS / name
    doc = read_model_metadata(path)  # refuses a missing document or a sha256 mismatch
    side = sidecar_path(path)
    import json

    sidecar = json.loads(side.read_text())
    assert sidecar["sha256"] == file_sha256(path)
    assert 16 <= doc["opset"] <= 17
    assert doc["stn"]["align_corners"] is False
    assert doc["labels"][:10] == [str(i) for i in range(10)]


@pytest.mark.parametrize("name", sorted(BARS))
def test_bundled_model_meets_its_bar_under_onnx_runtime(name: str) -> None:
    dataset, passes, bar = BARS[name]
    ev = evaluate(ASSETS / name, dataset, passes=passes, figure=None)
    assert ev.error <= bar, f"{name}: {ev.error:.4f} > {bar}"


def test_demo_model_re_exports_to_the_shipped_outputs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from edge_stn.checkpoint import load_checkpoint
    from edge_stn.export.onnx_export import ExportOptions, export_model

    ckpt = REPO / "models" / "demo-stcnn.pt"
    out = tmp_path / "demo.onnx"
    export_model(ckpt, out, ExportOptions(with_canonical=True))
    images = load_checkpoint(ckpt)["verify_images"]
    assert isinstance(images, torch.Tensor)
    x = images.numpy()
    shipped = predict_onnx(ASSETS / "demo-stcnn.onnx", x)
    fresh = predict_onnx(out, x)
    assert shipped.theta is not None and fresh.theta is not None
    assert np.abs(shipped.logits - fresh.logits).max() <= 1e-5
    assert np.abs(shipped.theta - fresh.theta).max() <= 1e-6


def _onnx_props(data: bytes) -> dict[str, str]:
    onnx = pytest.importorskip("onnx")
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return {p.key: p.value for p in model.metadata_props}


@pytest.mark.parametrize("name", [*sorted(BARS), "extra-props"])
def test_metadata_is_read_from_the_protobuf_as_onnx_reads_it(name: str, tmp_path: Path) -> None:
    from edge_stn.runtime.metadata import _metadata_props

    onnx = pytest.importorskip("onnx")
    if name in BARS:
        path = ASSETS / name
    else:  # several entries, non-ASCII text, an empty value, beside the document
        model = onnx.load(str(ASSETS / "rts-stcnn.onnx"))
        for key, value in (("author", "Zoë — édge"), ("empty", ""), ("z", "1" * 300)):
            model.metadata_props.add(key=key, value=value)
        path = tmp_path / "extra.onnx"
        onnx.save(model, str(path))
    props = _metadata_props(path)
    assert props == _onnx_props(path.read_bytes())
    assert "edge_stn" in props


def test_a_truncated_or_foreign_file_is_refused_by_the_protobuf_reader(tmp_path: Path) -> None:
    from edge_stn.errors import ModelError

    data = (ASSETS / "demo-stcnn.onnx").read_bytes()
    rng = np.random.default_rng(3)
    cuts = [len(data) - 1, len(data) // 2, *rng.integers(1, len(data) - 1, 8).tolist()]
    refused = 0
    for cut in cuts:
        path = tmp_path / "cut.onnx"
        path.write_bytes(data[:cut])
        try:
            read_model_metadata(path)
        except ModelError as exc:
            refused += 1
            assert "cut.onnx" in str(exc)
    # a cut inside the graph or the metadata always leaves a field running past the end
    assert refused == len(cuts)
    path = tmp_path / "text.onnx"
    path.write_text("ir_version: 8\n")  # a text dump is not the binary format
    with pytest.raises(ModelError, match=r"not a readable ONNX model|no 'edge_stn' metadata"):
        read_model_metadata(path)
