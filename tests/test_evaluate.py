"""Evaluation: Wilson's interval, scoring a checkpoint, the figure, the CLI's JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from smoke import SmokeRun

from edge_stn.evaluate import scores_from_logits, wilson_interval


@pytest.mark.parametrize(
    "errors,n,low,high",
    [
        (0, 10, 0.0, 0.2775),  # textbook values of the 95% Wilson score interval
        (1, 10, 0.0179, 0.4042),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (20, 1000, 0.01298, 0.03069),  # 2% of 1,000 test digits: about +/-0.9 points
        (200, 10000, 0.01742, 0.02294),  # 2% of 10,000 samples: about a third as wide
    ],
)
def test_wilson_interval_known_values(errors: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(errors, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_of_nothing_is_undefined() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_scores_from_logits() -> None:
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]  # predicts 0, 1, 2, 0
    labels = np.array([0, 1, 1, 2])
    sc = scores_from_logits(logits, labels, ["a", "b", "c"])
    assert (sc.samples, sc.errors) == (4, 2)
    assert sc.error == 0.5
    assert sc.per_class_error == {"a": 0.0, "b": 0.5, "c": 1.0}
    assert sc.ci_low < 0.5 < sc.ci_high


@pytest.mark.slow
def test_evaluate_checkpoint_scores_ten_distortions_per_test_digit(
    smoke_checkpoint: Path, tmp_path: Path
) -> None:
    import cv2

    from edge_stn.evaluate import evaluate

    figure = tmp_path / "fig.png"
    ev = evaluate(smoke_checkpoint, "rts", figure=figure)
    assert ev.passes == 10 and ev.samples == 10 * 1000
    assert ev.error == ev.errors / ev.samples
    assert ev.ci95[0] < ev.error < ev.ci95[1]
    assert ev.ci95[1] - ev.ci95[0] < 0.03  # 10,000 samples
    assert ev.error < 0.75  # the smoke model learned something (chance: 0.9)
    assert sorted(ev.per_class_error) == [str(i) for i in range(10)]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(figure))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 10  # not a blank page
    doc = json.loads(json.dumps(ev.to_json()))
    assert doc["samples"] == 10000 and len(doc["ci95"]) == 2
    assert "error" in ev.table()


@pytest.mark.slow
def test_evaluate_agrees_with_the_training_summary(smoke_run: SmokeRun) -> None:
    """Training scores its best checkpoint with the same fixed seed: one pass must agree."""
    from edge_stn.evaluate import evaluate

    summary = json.loads((smoke_run.out_dir / "summary.json").read_text())
    ev = evaluate(smoke_run.best, "rts", passes=1)
    assert ev.samples == summary["test_samples"] == 1000
    assert ev.error == pytest.approx(summary["test_error"], abs=1e-12)


@pytest.mark.slow
def test_cli_evaluate_json(smoke_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from edge_stn.cli import main

    figure, out = tmp_path / "f.png", tmp_path / "ev.json"
    argv = ["evaluate", "--model", str(smoke_checkpoint), "--dataset", "rts", "--passes", "1"]
    rc = main([*argv, "--json", "--figure", str(figure), "--json-out", str(out)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["samples"] == 1000 and doc["dataset"] == "rts" and doc["figure"] == str(figure)
    assert figure.is_file()
