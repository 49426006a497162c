"""Section 1: the model alone. ONNX Runtime (CPU) against PyTorch eager (``inference_mode``) on
the same weights, the same input and the same thread count, at batch 1, 8 and 32; beside them
the model's INT8 build on ONNX Runtime (``<model>-int8.onnx``, what the daemon runs by default on
the CPU) when it exists, labelled as such: other weights, so no part of the fp32 comparison.

Both runtimes get the same float32 windows and compute every output (logits, theta and the
canonical crop of the bundled demo model). Within a repeat the two alternate in short slices
(five each), so a neighbour's load hits both alike and the ratio of one repeat is a fair
comparison. Besides crops per second (wall clock) each gets crops per CPU-second of this process
(all its threads): how much of the machine a crop costs, which a busy neighbour disturbs less.
By default it runs at one thread and at every core. Torch is imported only here, and only when
installed.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_stn.bench.summary import spread
from edge_stn.config import BUNDLED_DEMO_MODEL, CpuProvider, ModelConfig
from edge_stn.runtime.engine import Engine
from edge_stn.runtime.metadata import int8_path

logger = logging.getLogger(__name__)

REPO_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "demo-stcnn.pt"
"""The bundled demo model's training checkpoint (in a source checkout; not in the wheel)."""
SLICES = 5


@dataclass
class Timer:
    """Calls, wall time and process CPU time accumulated over slices of one callable."""

    calls: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def run(self, call: Callable[[], object], seconds: float) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        while True:
            call()
            n += 1
            if time.perf_counter() - t0 >= seconds:
                break
        self.calls += n
        self.wall_s += time.perf_counter() - t0
        self.cpu_s += time.process_time() - c0


def interleaved(
    calls: dict[str, Callable[[], object]], seconds: float, slices: int = SLICES
) -> dict[str, Timer]:
    """Each callable for ``seconds`` in all, in ``slices`` turns that alternate between them,
    after a warm-up (lazy allocations, kernel choice)."""
    for call in calls.values():
        for _ in range(3):
            call()
    timers = {name: Timer() for name in calls}
    for _ in range(slices):
        for name, call in calls.items():
            timers[name].run(call, seconds / slices)
    return timers


def _shown(path: Path) -> str:
    """``path`` relative to the source tree when it lies in it (the report is not about where
    the tree was checked out)."""
    root = REPO_CHECKPOINT.parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def torch_skip_reason(checkpoint: Path) -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'edge-stn[train]'): PyTorch not measured"
    if not checkpoint.is_file():
        return (
            f"checkpoint {checkpoint} not found (models/ ships in the source tree, not the "
            "wheel; pass --checkpoint): PyTorch not measured"
        )
    return None


def bench_model(
    *,
    thread_counts: Sequence[int],
    batches: Sequence[int] = (1, 8, 32),
    repeats: int = 3,
    seconds: float = 1.0,
    checkpoint: Path = REPO_CHECKPOINT,
    model: ModelConfig | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Crops/s of both runtimes per thread count, batch size and repeat, their ratio, and the
    largest difference of their logits on the same input (the same weights agree to ~1e-5).
    The fp32 file is ``model.path`` or the bundled demo model's fp32 build, whatever the daemon
    would pick on this machine; its INT8 build is timed too when it exists."""
    base = model or ModelConfig()
    fp32 = base.path if base.path is not None else BUNDLED_DEMO_MODEL
    int8 = int8_path(fp32) if int8_path(fp32).is_file() else None
    skip = torch_skip_reason(checkpoint)
    torch: Any = None
    torch_model: Any = None
    if skip is None:
        import torch as _torch

        from edge_stn.checkpoint import load_checkpoint, model_from_checkpoint

        torch = _torch
        torch_model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
        torch_model.eval()
    runs = []
    parity: float | None = None
    engine: Engine | None = None
    for threads in thread_counts:
        cfg = ModelConfig(
            path=fp32, sha256=base.sha256, providers=[CpuProvider()], intra_op_threads=threads
        )
        engine = Engine(cfg)
        session = engine.session
        session_int8 = None
        if int8 is not None:
            cfg8 = ModelConfig(path=int8, providers=[CpuProvider()], intra_op_threads=threads)
            session_int8 = Engine(cfg8).session
        rng = np.random.default_rng(0)
        c, (h, w) = engine.channels, engine.input_size
        inputs: dict[int, npt.NDArray[np.float32]] = {
            b: engine.preprocess(rng.integers(0, 256, (b, c, h, w), dtype=np.uint8)).astype(
                np.float32
            )
            for b in batches
        }
        if torch_model is not None:
            torch.set_num_threads(threads)
            if parity is None:
                x = inputs[max(batches)]
                with torch.inference_mode():
                    ref = torch_model(torch.from_numpy(x)).logits.numpy()
                got = session.run(["logits"], {engine.input_name: x})[0]
                parity = float(np.max(np.abs(np.asarray(got, np.float64) - ref)))
        figures: dict[int, dict[str, list[float]]] = {b: {} for b in batches}
        for r in range(repeats):
            for b in batches:
                calls: dict[str, Callable[[], object]] = {}
                feed = {engine.input_name: inputs[b]}

                def ort(session: Any = session, feed: dict[str, Any] = feed) -> object:
                    return session.run(None, feed)

                calls["onnxruntime"] = ort
                if session_int8 is not None:

                    def ort8(session: Any = session_int8, feed: dict[str, Any] = feed) -> object:
                        return session.run(None, feed)

                    calls["onnxruntime_int8"] = ort8
                if torch_model is not None:
                    xt = torch.from_numpy(inputs[b])

                    def eager(xt: Any = xt) -> object:
                        with torch.inference_mode():
                            return torch_model(xt)

                    calls["torch"] = eager
                timers = interleaved(calls, seconds)
                f = figures[b]
                for name, t in timers.items():
                    f.setdefault(f"{name}_crops_s", []).append(t.calls * b / t.wall_s)
                    f.setdefault(f"{name}_crops_per_cpu_s", []).append(
                        t.calls * b / t.cpu_s if t.cpu_s > 0 else float("nan")
                    )
                line = (
                    f"model: {threads} thread(s), repeat {r + 1}/{repeats}, batch {b:2d}: "
                    f"onnxruntime {f['onnxruntime_crops_s'][-1]:7.0f} crops/s"
                )
                if "onnxruntime_int8" in timers:
                    line += f", int8 {f['onnxruntime_int8_crops_s'][-1]:7.0f} crops/s"
                if "torch" in timers:
                    f.setdefault("ratio", []).append(
                        f["onnxruntime_crops_s"][-1] / f["torch_crops_s"][-1]
                    )
                    line += (
                        f", torch {f['torch_crops_s'][-1]:7.0f} crops/s, "
                        f"ratio {f['ratio'][-1]:5.2f}"
                    )
                progress(line)
        rows = []
        for b in batches:
            f = figures[b]
            row: dict[str, Any] = {"batch": b}
            for key in (
                "onnxruntime_crops_s",
                "torch_crops_s",
                "ratio",
                "onnxruntime_crops_per_cpu_s",
                "torch_crops_per_cpu_s",
                "onnxruntime_int8_crops_s",
                "onnxruntime_int8_crops_per_cpu_s",
            ):
                row[key] = spread(f[key]) if key in f else None
            rows.append(row)
        runs.append({"threads": threads, "batches": rows})
    assert engine is not None
    c, (h, w) = engine.channels, engine.input_size
    return {
        "model": engine.name,
        "onnx": _shown(engine.path),
        "onnx_int8": _shown(int8) if int8 is not None else None,
        "checkpoint": _shown(checkpoint) if torch_model is not None else None,
        "input": [c, h, w],
        "thread_counts": list(thread_counts),
        "seconds_per_measurement": seconds,
        "repeats": repeats,
        "torch": None if skip else torch.__version__,
        "skipped": skip,
        "logits_max_abs_diff": parity,
        "runs": runs,
    }
