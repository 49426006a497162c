"""Shared fixtures of the foundation's tests.

`smoke_run` trains ONE tiny ST-CNN on RTS for a single epoch, once per test session; the tests
that need a real checkpoint (evaluation, resume, CLI errors) share it and never write into its
folder: a test that resumes or damages a run works on its own copy (`copy_smoke_run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from smoke import SMOKE_STEPS_PER_EPOCH, SmokeRun, smoke_config_dict

pytest_plugins = ["mqtt_broker", "rtsp_server"]  # real mosquitto and RTSP servers (DESIGN §8)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """One epoch of the smoke ST-CNN (about 10 s on one core); treat its folder as read-only."""
    pytest.importorskip("torch")
    from edge_stn.train import train
    from edge_stn.training_config import TrainConfig

    out = tmp_path_factory.mktemp("smoke") / "run"
    doc = smoke_config_dict(out)
    result = train(TrainConfig.model_validate(doc), progress=False, max_steps=SMOKE_STEPS_PER_EPOCH)
    return SmokeRun(out, result.best_path, result.last_path, doc, result.test_error)


@pytest.fixture(scope="session")
def smoke_checkpoint(smoke_run: SmokeRun) -> Path:
    """best.pt of the smoke ST-CNN (RTS, 42x42 input, 21x21 canonical crop); do not modify."""
    return smoke_run.best


@pytest.fixture
def copy_smoke_run(smoke_run: SmokeRun, tmp_path: Path) -> Path:
    """A private copy of the smoke run folder that a test may resume or damage."""
    dst = tmp_path / "run"
    shutil.copytree(smoke_run.out_dir, dst)
    return dst


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started by a test keep their outbox in the test's folder, never in ~/.local."""
    monkeypatch.setenv("EDGE_STN_STATE_DIR", str(tmp_path / "state"))
