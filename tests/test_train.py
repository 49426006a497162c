"""Training: outputs, learning, checkpoints, resume, and the refusals that protect a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from smoke import SMOKE_STEPS_PER_EPOCH, SmokeRun, smoke_config_dict, snapshot, write_config

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # trains (the shared smoke run, a few resumed steps)

from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from edge_stn.cli import main  # noqa: E402
from edge_stn.errors import CheckpointError, ConfigError  # noqa: E402
from edge_stn.train import train  # noqa: E402
from edge_stn.training_config import TrainConfig  # noqa: E402

RESUME_STEPS = 5


def config(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig.model_validate(smoke_config_dict(out, **changes))


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("edge-stn: error: ")
    return lines[0]


def test_training_writes_checkpoints_and_metrics(smoke_run: SmokeRun) -> None:
    out = smoke_run.out_dir
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json", "summary.json"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1]
    assert {"train_loss", "train_error", "val_error", "lr", "seconds"} <= set(rows[0])
    with (out / "metrics.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in csv_rows] == [1]
    assert float(csv_rows[0]["train_loss"]) == pytest.approx(rows[0]["train_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "stcnn" and summary["dataset"] == "rts"
    assert summary["test_samples"] == 1000
    assert summary["test_ci95"][0] <= summary["test_error"] <= summary["test_ci95"][1]
    assert summary["flops_per_image"] > 0


def test_the_smoke_model_learns(smoke_run: SmokeRun) -> None:
    """One epoch on RTS takes a tiny ST-CNN far below chance (90% error). Not a quality bar:
    a check that data, labels, loss and optimizer are wired together."""
    rows = json.loads((smoke_run.out_dir / "metrics.json").read_text())
    assert rows[0]["train_error"] < 0.85
    assert rows[0]["val_error"] < 0.75
    assert smoke_run.test_error < 0.75  # 1,000 test samples: chance would be 0.90 +/- 0.02


def test_checkpoints_load_with_weights_only(smoke_run: SmokeRun) -> None:
    for path in (smoke_run.best, smoke_run.last):
        doc = torch.load(path, map_location="cpu", weights_only=True)
        assert doc["format"] == "edge-stn/checkpoint" and doc["format_version"] == 1
        assert doc["labels"] == [str(i) for i in range(10)]
        assert doc["spec"]["arch"] == "stcnn" and doc["spec"]["in_size"] == [42, 42]
        assert doc["config"]["model"]["stn_out"] == [21, 21]
        assert doc["epoch"] == 0
    last = torch.load(smoke_run.last, map_location="cpu", weights_only=True)
    assert {"optimizer", "scheduler"} <= set(last)
    assert "optimizer" not in torch.load(smoke_run.best, map_location="cpu", weights_only=True)


def test_checkpoint_rebuilds_the_trained_model(smoke_run: SmokeRun) -> None:
    doc = load_checkpoint(smoke_run.best, expect_arch="stcnn")
    model = model_from_checkpoint(doc, smoke_run.best)
    assert not model.training
    x = doc["verify_images"].float() / 255.0
    with torch.no_grad():
        out = model(x)
    wrong = (out.logits.argmax(1) != doc["verify_labels"]).float().mean().item()
    assert wrong < 0.75
    assert out.canonical is not None and out.canonical.shape[-2:] == (21, 21)
    # The localization net left the identity: the STN does something.
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert (out.theta - eye).abs().amax() > 0.05


def test_resume_continues_from_last(copy_smoke_run: Path, tmp_path: Path, capsys) -> None:
    before = torch.load(copy_smoke_run / "last.pt", map_location="cpu", weights_only=True)
    cfg_path = write_config(tmp_path / "smoke.yaml", smoke_config_dict(copy_smoke_run))
    argv = ["train", "--config", str(cfg_path), "--resume", "--quiet"]
    assert main([*argv, "--max-steps", str(RESUME_STEPS)]) == 0
    after = torch.load(copy_smoke_run / "last.pt", map_location="cpu", weights_only=True)
    assert after["epoch"] == 1  # the epoch count goes on
    assert [r["epoch"] for r in json.loads((copy_smoke_run / "metrics.json").read_text())] == [1, 2]
    assert after["metrics"][0] == before["metrics"][0]
    # The optimizer and the one-cycle schedule went on too, they did not restart.
    assert after["scheduler"]["last_epoch"] == SMOKE_STEPS_PER_EPOCH + RESUME_STEPS
    key = "transformer.localization.regress.weight"
    assert not torch.equal(after["state_dict"][key], before["state_dict"][key])
    summary = json.loads((copy_smoke_run / "summary.json").read_text())
    assert summary["best_epoch"] in (1, 2)


def test_resume_refuses_a_checkpoint_of_the_other_arch(
    copy_smoke_run: Path, tmp_path: Path, capsys
) -> None:
    before = snapshot(copy_smoke_run)
    with pytest.raises(CheckpointError, match="'stcnn'"):
        train(config(copy_smoke_run, arch="cnn"), resume=True, progress=False, max_steps=1)
    cfg_path = write_config(tmp_path / "smoke.yaml", smoke_config_dict(copy_smoke_run))
    rc = main(["train", "--config", str(cfg_path), "--arch", "cnn", "--resume", "--quiet"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert "last.pt" in line and "cnn" in line
    assert snapshot(copy_smoke_run) == before


def test_resume_refuses_a_different_model_spec(copy_smoke_run: Path) -> None:
    before = snapshot(copy_smoke_run)
    with pytest.raises(CheckpointError, match="spec"):
        train(
            config(copy_smoke_run, **{"model.widths": [16, 32, 128]}),
            resume=True,
            progress=False,
            max_steps=1,
        )
    assert snapshot(copy_smoke_run) == before


def test_resume_needs_a_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(config(tmp_path / "empty"), resume=True, progress=False, max_steps=1)


def test_training_into_an_existing_run_is_refused(
    copy_smoke_run: Path, tmp_path: Path, capsys
) -> None:
    before = snapshot(copy_smoke_run)
    with pytest.raises(ConfigError, match="--resume"):
        train(config(copy_smoke_run), progress=False, max_steps=1)
    cfg_path = write_config(tmp_path / "smoke.yaml", smoke_config_dict(tmp_path / "elsewhere"))
    rc = main(["train", "--config", str(cfg_path), "--out", str(copy_smoke_run), "--quiet"])
    assert rc == 2
    assert "already holds a training run" in one_error_line(capsys.readouterr().err)
    assert snapshot(copy_smoke_run) == before
    assert not (tmp_path / "elsewhere").exists()


def test_the_cnn_baseline_trains_and_evaluates(tmp_path: Path) -> None:
    from edge_stn.evaluate import evaluate

    result = train(config(tmp_path / "cnn", arch="cnn"), progress=False, max_steps=3)
    doc = load_checkpoint(result.best_path, expect_arch="cnn")
    assert all(k.startswith("classifier.") for k in doc["state_dict"])
    figure = tmp_path / "cnn.png"
    ev = evaluate(result.best_path, "rts", passes=1, figure=figure)
    assert ev.samples == 1000 and ev.kind == "checkpoint, cnn"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_consistency_loss_trains_when_the_crop_is_smaller_than_the_input(tmp_path: Path) -> None:
    cfg = config(tmp_path / "cons", **{"optim.consistency_weight": 0.1, "data.val_per_class": 0})
    assert cfg.model.stn_out != (42, 42)  # the shipped configs' case: 28x28 crops of 60x60 / 42x42
    result = train(cfg, progress=False, max_steps=2)
    assert result.last_path.is_file()
