"""Builders for the export tests (not a test module): a 3-step TC checkpoint and file helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TC_CONFIG = REPO / "configs" / "train-tc.yaml"
SMOKE_STEPS = 3


def tc_smoke_config(out: Path) -> Any:
    """configs/train-tc.yaml's model, trained for a few steps: no validation split, one
    evaluation pass, one thread, so the checkpoint takes seconds (about 10 s on one core)."""
    from edge_stn.training_config import TrainConfig

    doc = yaml.safe_load(TC_CONFIG.read_text())
    doc.update(out=str(out), device="cpu", threads=1)
    doc["data"].update(val_per_class=0, passes_per_epoch=1, eval_passes=1)
    return TrainConfig.model_validate(doc)


def train_tc_smoke(out: Path) -> Path:
    """Train the TC smoke model into ``out``; return its best.pt."""
    from edge_stn.train import train

    return Path(train(tc_smoke_config(out), progress=False, max_steps=SMOKE_STEPS).best_path)


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones included, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
