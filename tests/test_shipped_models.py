"""The shipped models against the foundation's bars (issue 2), scored end to end on the fixed
test split: 10 distortions of each of the 1,000 held-out test digits. A regression in the data,
the model code or the checkpoints cannot land."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from edge_stn.evaluate import evaluate  # noqa: E402
from edge_stn.nn.models import count_flops  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"

# model file -> (data set, highest acceptable test error)
BARS = {
    "tc-stcnn.pt": ("tc", 0.020),
    "rts-stcnn.pt": ("rts", 0.025),
}


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    out = {}
    for name in ("tc-stcnn.pt", "rts-stcnn.pt", "tc-cnn.pt", "rts-cnn.pt"):
        ds = "tc" if name.startswith("tc") else "rts"
        out[name] = evaluate(MODELS / name, ds, passes=10, figure=None).error
    return out


@pytest.mark.parametrize("name", sorted(BARS))
def test_stcnn_meets_its_bar(name: str, errors: dict[str, float]) -> None:
    _, bar = BARS[name]
    assert errors[name] <= bar, f"{name}: test error {errors[name]:.4f} above the bar {bar}"


def test_stcnn_no_worse_than_cnn_on_tc(errors: dict[str, float]) -> None:
    assert errors["tc-stcnn.pt"] <= errors["tc-cnn.pt"]


def test_stcnn_better_than_cnn_on_rts(errors: dict[str, float]) -> None:
    assert errors["rts-stcnn.pt"] < errors["rts-cnn.pt"]


@pytest.mark.parametrize("task", ["tc", "rts"])
def test_stcnn_costs_at_most_half_the_cnn_flops(task: str) -> None:
    flops = {}
    for arch in ("stcnn", "cnn"):
        ck = load_checkpoint(MODELS / f"{task}-{arch}.pt", expect_arch=arch)
        spec = ck["spec"]
        flops[arch] = count_flops(
            model_from_checkpoint(ck), spec["in_channels"], tuple(spec["in_size"])
        )
    assert flops["stcnn"] <= 0.5 * flops["cnn"], flops


def test_demo_model_classifies_windows() -> None:
    ev = evaluate(MODELS / "demo-stcnn.pt", "windows", passes=2, figure=None)
    assert ev.samples == 2 * 1429  # 1,000 test digits + 429 background windows (30%), twice
    assert ev.error <= 0.05, ev.error
