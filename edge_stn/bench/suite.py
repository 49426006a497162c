"""``edge-stn bench``: every section in one run, on one machine, into one JSON document.

Sections (any subset, in this order): ``model`` (ONNX Runtime vs PyTorch eager), ``pipeline``
(the daemon on H.264 files against decode-only), ``latency`` (e2e latency of wall-clock cameras
over a long window) and ``scaling`` (1, 2, 4, 8 cameras); resources (memory, CPU, time to the
first result) are gathered from the daemon runs of the others. The daemon runs in its own
process against a private mosquitto on a free loopback port (:class:`edge_stn.demo.PrivateBroker`).
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_stn import __version__
from edge_stn.bench.live import bench_live
from edge_stn.bench.machine import describe_machine, load_average, usable_cores
from edge_stn.bench.model import REPO_CHECKPOINT, bench_model
from edge_stn.bench.pipeline import bench_pipeline
from edge_stn.bench.targets import evaluate_targets, resources
from edge_stn.bench.videos import FFMPEG_HINT
from edge_stn.errors import EdgeStnError

logger = logging.getLogger(__name__)

SCHEMA = "edge-stn/bench"
SCHEMA_VERSION = 1
SECTIONS = ("model", "pipeline", "latency", "scaling")


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and for how long (the defaults are the full run of docs/benchmarks.md,
    about 12 minutes; :meth:`quick` is a smoke run of well under a minute)."""

    sections: tuple[str, ...] = SECTIONS
    repeats: int = 3
    threads: tuple[int, ...] = field(default_factory=lambda: tuple(sorted({1, usable_cores()})))
    """Thread counts of the model section (each runtime gets the same)."""
    batches: tuple[int, ...] = (1, 8, 32)
    model_seconds: float = 1.0
    checkpoint: Path = REPO_CHECKPOINT
    resolutions: tuple[tuple[int, int], ...] = ((1280, 720), (1920, 1080))
    video_frames: int = 300
    objects: int = 5
    camera_size: tuple[int, int] = (1280, 720)
    camera_fps: float = 15.0
    latency_cameras: int = 4
    latency_seconds: float = 60.0
    warmup_seconds: float = 5.0
    scaling_cameras: tuple[int, ...] = (1, 2, 4, 8)
    scaling_seconds: float = 20.0
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise EdgeStnError(
                f"unknown section(s) {', '.join(unknown) or '(none given)'}: choose among "
                f"{', '.join(SECTIONS)}",
                key="--sections",
            )
        for name in ("repeats", "video_frames", "latency_cameras"):
            if getattr(self, name) < 1:
                raise EdgeStnError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if any(n < 1 for n in (*self.scaling_cameras, *self.batches, *self.threads)):
            raise EdgeStnError("thread counts, camera counts and batch sizes must be >= 1")

    @classmethod
    def quick_run(cls, **overrides: Any) -> BenchOptions:
        """Every section, briefly: one repeat, 20-frame videos, 3-second camera windows."""
        base = cls(
            repeats=1,
            model_seconds=0.2,
            video_frames=20,
            latency_cameras=2,
            latency_seconds=3.0,
            warmup_seconds=1.0,
            scaling_cameras=(1, 2),
            scaling_seconds=3.0,
            quick=True,
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


def run_bench(options: BenchOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sections of ``options`` and return the benchmark document (see docs/benchmarks.md)."""
    machine = describe_machine()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "edge_stn": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "options": options.to_dict(),
        "machine": machine,
        "sections": {},
        "notes": [],
    }
    sections: dict[str, Any] = doc["sections"]
    o = options
    if "model" in o.sections:
        progress(f"model: ONNX Runtime vs PyTorch eager, {o.threads} thread(s)")
        sections["model"] = bench_model(
            thread_counts=o.threads, batches=o.batches, repeats=o.repeats, seconds=o.model_seconds,
            checkpoint=o.checkpoint, progress=progress,
        )  # fmt: skip
        if sections["model"]["skipped"]:
            doc["notes"].append(sections["model"]["skipped"])
    daemon_sections = [s for s in ("pipeline", "latency", "scaling") if s in o.sections]
    if daemon_sections:
        with tempfile.TemporaryDirectory(prefix="edge-stn-bench-") as tmp:
            _daemon_sections(doc, o, Path(tmp), daemon_sections, progress)
    doc["resources"] = resources(doc)
    doc["targets"] = evaluate_targets(doc)
    machine["load_average_end"] = load_average()
    return doc


def _daemon_sections(
    doc: dict[str, Any],
    o: BenchOptions,
    folder: Path,
    names: Sequence[str],
    progress: Callable[[str], None],
) -> None:
    from edge_stn.demo import PrivateBroker

    sections: dict[str, Any] = doc["sections"]
    try:
        broker = PrivateBroker(folder)
        broker.start()
    except EdgeStnError as exc:
        reason = f"no broker: {exc}"
        for name in names:
            sections[name] = _skipped(reason)
        doc["notes"].append(reason)
        return
    w, h = o.camera_size
    try:
        if "pipeline" in names:
            if doc["machine"]["ffmpeg"] is None:
                sections["pipeline"] = _skipped(FFMPEG_HINT)
                doc["notes"].append(FFMPEG_HINT)
            else:
                sections["pipeline"] = bench_pipeline(
                    folder, broker.port, resolutions=o.resolutions, frames=o.video_frames,
                    fps=o.camera_fps, objects=o.objects, repeats=o.repeats, progress=progress,
                )  # fmt: skip
        for name, counts, seconds in (
            ("latency", (o.latency_cameras,), o.latency_seconds),
            ("scaling", o.scaling_cameras, o.scaling_seconds),
        ):
            if name in names:
                sections[name] = bench_live(
                    folder, broker.port, label=name, camera_counts=counts, seconds=seconds,
                    warmup_s=o.warmup_seconds, repeats=o.repeats, width=w, height=h,
                    fps=o.camera_fps, objects=o.objects, progress=progress,
                )  # fmt: skip
    finally:
        broker.stop()
