"""Multi-process training (DistributedDataParallel, gloo on CPU) through torchrun: two ranks
train on different shards for a few steps and must end with identical weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from smoke import smoke_config_dict

torch = pytest.importorskip("torch")

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 6


def torchrun_command() -> list[str]:
    beside = Path(sys.executable).with_name("torchrun")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow  # about 25 s; CI runs it (the README's test command selects every test)
def test_two_cpu_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    out, dumps = tmp_path / "run", tmp_path / "dumps"
    dumps.mkdir()
    # No validation split: every epoch is "best", so rank 0's final model is last.pt's.
    doc = smoke_config_dict(out, **{"data.val_per_class": 0, "optim.epochs": 2})
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        *torchrun_command(),
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(cfg_path),
        str(dumps),
        str(STEPS),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    load = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    rank0, rank1 = load(dumps / "rank0.pt"), load(dumps / "rank1.pt")
    init0, init1 = load(dumps / "init0.pt"), load(dumps / "init1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Training happened (the weights moved), from the same seeded start on both ranks.
    moved = [
        k for k in rank0 if rank0[k].is_floating_point() and not torch.equal(rank0[k], init0[k])
    ]
    assert "classifier.head.1.weight" in moved
    assert "transformer.localization.regress.weight" in moved
    assert all(torch.equal(init0[k], init1[k]) for k in init0)
    # Rank 0 wrote the run; its checkpoint holds those same weights.
    last = load(out / "last.pt")
    assert last["scheduler"]["last_epoch"] == STEPS
    for key in rank0:
        assert torch.equal(last["state_dict"][key], rank0[key]), key
    assert (out / "summary.json").is_file()
