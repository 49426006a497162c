"""One rank of the DDP test (tests/test_ddp.py), started by torchrun; not a test module.

usage: ddp_worker.py CONFIG_JSON DUMP_DIR MAX_STEPS

Trains per the config with `edge_stn.train.train`, then saves the rank's own model weights
to DUMP_DIR/rank<RANK>.pt (and the initial weights to DUMP_DIR/init<RANK>.pt), so the test can
compare what each process ended with. The model is the real one: the wrapper around
`build_model` only keeps a reference to it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

import edge_stn.train as training
from edge_stn.nn.models import STCNN, ModelSpec, PlainCNN
from edge_stn.training_config import TrainConfig


def main() -> None:
    config_path, dump_dir, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ["RANK"])
    built: list[torch.nn.Module] = []
    real_build = training.build_model

    def build_and_keep(spec: ModelSpec) -> STCNN | PlainCNN:
        model = real_build(spec)
        built.append(model)
        torch.save(copy.deepcopy(model.state_dict()), dump_dir / f"init{rank}.pt")
        return model

    training.build_model = build_and_keep
    cfg = TrainConfig.model_validate(json.loads(config_path.read_text()))
    training.train(cfg, progress=False, max_steps=max_steps)
    (model,) = built
    torch.save(model.state_dict(), dump_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
