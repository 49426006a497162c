"""The gateway's side of the package never loads torch or the training extras (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "edge_stn",
    "edge_stn.geometry",
    "edge_stn.errors",
    "edge_stn.data",
    "edge_stn.training_config",
    "edge_stn.cli",
    "edge_stn.config",
    "edge_stn.records",
    "edge_stn.runtime.engine",
    "edge_stn.video",
    "edge_stn.video.synthetic",
    "edge_stn.video.synth_video",
    "edge_stn.detect",
    "edge_stn.detect.proposals",
    "edge_stn.detect.detector",
    "edge_stn.detect.nms",
    "edge_stn.detect.crops",
    "edge_stn.publish",
    "edge_stn.publish.topics",
    "edge_stn.publish.payloads",
    "edge_stn.publish.stats",
    "edge_stn.publish.client",
    "edge_stn.publish.outbox",
    "edge_stn.subscriber",
    "edge_stn.accuracy",
    "edge_stn.daemon",
    "edge_stn.ops.supervisor",
    "edge_stn.ops.metrics",
    "edge_stn.ops.logs",
    "edge_stn.runtime.signing",
    "edge_stn.runtime.fallback",
    "edge_stn.demo",
]
HEAVY = ["torch", "mlxtend", "matplotlib", "onnx", "tqdm"]


def loaded_after_import(module: str, extra: str = "") -> set[str]:
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); {extra}\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_heavy_dependencies(module: str) -> None:
    loaded = loaded_after_import(module)
    assert module in loaded
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


def test_cli_parser_is_built_without_torch() -> None:
    loaded = loaded_after_import("edge_stn.cli", "import edge_stn.cli as c; c.build_parser()")
    assert "torch" not in loaded


def test_the_probe_would_see_torch() -> None:
    # The check above can fail: importing the nn package does load torch.
    pytest.importorskip("torch")
    assert "torch" in loaded_after_import("edge_stn.nn")


def test_loading_a_model_loads_neither_torch_nor_onnx() -> None:
    # The engine reads the embedded document from the file's protobuf itself: importing onnx for
    # it cost the daemon 13 MB of resident memory (onnx is installed here, with the extras).
    pytest.importorskip("onnx")
    loaded = loaded_after_import(
        "edge_stn.runtime.engine",
        "from edge_stn.config import BUNDLED_DEMO_MODEL, ModelConfig; "
        "from edge_stn.runtime.engine import Engine; "
        "Engine(ModelConfig(path=BUNDLED_DEMO_MODEL))",
    )
    assert "onnxruntime" in loaded
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
