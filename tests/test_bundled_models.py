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
