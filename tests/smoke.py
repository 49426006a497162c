"""Builders shared by the tests (not a test module): the smoke model's training config and a
file snapshot to prove that a refused command left a folder untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The smoke model: RTS (42x42, cheaper than TC's 60x60), a narrow classifier, a 21x21 canonical
# crop, one training pass over the 3,900 fit digits per epoch. 3 epochs are configured so a
# resumed run has epochs left; the session fixture stops after the first with `max_steps`.
SMOKE_VAL_PER_CLASS = 10
SMOKE_BATCH = 32
SMOKE_STEPS_PER_EPOCH = (4000 - 10 * SMOKE_VAL_PER_CLASS) // SMOKE_BATCH  # 121


def smoke_config_dict(out: Path, **changes: Any) -> dict[str, Any]:
    """The smoke model's training config (the YAML's mapping), writing to ``out``.

    ``changes`` override entries, dotted for sections:
    ``smoke_config_dict(out, **{"optim.lr": 1.0})``.
    """
    doc: dict[str, Any] = {
        "name": "smoke",
        "dataset": "rts",
        "arch": "stcnn",
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "out": str(out),
        "data": {"val_per_class": SMOKE_VAL_PER_CLASS, "passes_per_epoch": 1, "eval_passes": 1},
        "model": {
            "widths": [16, 32, 64],
            "stn_out": [21, 21],
            "loc_downsample": 2,
            "loc_channels": [8, 8],
            "loc_hidden": 16,
        },
        "optim": {"epochs": 3, "batch_size": SMOKE_BATCH, "lr": 0.01},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            doc[section][field] = value
        else:
            doc[key] = value
    return doc


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    """Write a config mapping as a YAML file (JSON is YAML) and return its path."""
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


@dataclass(frozen=True)
class SmokeRun:
    out_dir: Path
    best: Path
    last: Path
    config: dict[str, Any]
    test_error: float


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """mtime_ns and bytes of every file under ``folder``: compare to prove nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
