"""Sections 3 and 4: wall-clock cameras. Synthetic cameras render moving digits at a fixed
frame rate by the wall clock and, like real cameras, never wait: when the pipeline falls behind,
the reader keeps only the newest frame and the older ones are lost.

A run measures, after a warm-up counted from the first result, for ``seconds``:

* ``e2e_ms`` (DESIGN §7): arrival at the subscriber minus ``capture_ts``, p50/p95/p99, and the
  daemon's own ``detect_ms`` and ``publish_ms``;
* sustained frames/s per camera, and dropped frames: the gaps in each camera's ``frame_index``
  among the results received (a frame the camera skipped, the reader replaced, a queue or the
  publisher dropped: every loss a consumer can see), with the daemon's own drop counters from
  its ``stats`` messages beside them;
* the daemon's CPU (percent of one core, and CPU time per frame, which a busy neighbour on the
  machine disturbs less), resident memory at the end and at its peak, and the time from the
  process start to the first result received.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_stn.bench.daemon_run import (
    DEVICE,
    HOST,
    DaemonRun,
    Received,
    reduce_to_for,
    run_daemon,
)
from edge_stn.bench.summary import percentiles, spread


def cameras_config(
    n: int, port: int, *, width: int, height: int, fps: float, objects: int
) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "cameras": [
            {
                "id": f"cam{i}",
                "source": "synthetic",
                "fps": fps,
                "synthetic": {"width": width, "height": height, "objects": objects, "seed": i},
                "proposals": {"reduce_to": reduce_to_for(width)},
            }
            for i in range(n)
        ],
        "mqtt": {"host": HOST, "port": port},
        "stats_interval_s": 1,
    }


def frame_gaps(indices: Sequence[int]) -> int:
    """Frames missing between the first and the last of a camera's frame indices."""
    s = sorted(set(indices))
    return (s[-1] - s[0] + 1 - len(s)) if s else 0


def _counter_delta(run: DaemonRun) -> dict[str, int]:
    """The daemon's own drop counters over the window (its stats are cumulative)."""
    docs = run.stats
    if not docs:
        return {}
    before = [d for ts, d in docs if ts <= run.window[0]]
    first = before[-1] if before else docs[0][1]
    last = docs[-1][1]

    def total(doc: dict[str, Any], key: str) -> int:
        return sum(int(c.get(key, 0)) for c in doc.get("cameras", {}).values())

    def drop(doc: dict[str, Any], key: str) -> int:
        return int(doc.get("drops", {}).get(key, 0))

    mqtt_dropped = int(last.get("mqtt", {}).get("results", {}).get("dropped", 0)) - int(
        first.get("mqtt", {}).get("results", {}).get("dropped", 0)
    )
    return {
        "reader_stale": total(last, "drops") - total(first, "drops"),
        "result_queue": drop(last, "result_queue") - drop(first, "result_queue"),
        "publish": drop(last, "publish") - drop(first, "publish"),
        "mqtt_results_dropped": mqtt_dropped,
    }


def measure_live(run: DaemonRun, cameras: int, fps: float) -> dict[str, Any]:
    t0, t1 = run.window
    seconds = max(1e-6, t1 - t0)
    inside: list[Received] = [r for r in run.results if t0 <= r.capture_ts < t1]
    per_cam: dict[str, list[int]] = defaultdict(list)
    for r in inside:
        per_cam[r.camera].append(r.frame_index)
    dropped = sum(frame_gaps(v) for v in per_cam.values())
    processed = len(inside)
    rss_end, rss_peak = run.rss_end_bytes(), run.rss_peak_bytes()
    return {
        "cameras": cameras,
        "seconds": seconds,
        "offered_fps_per_camera": fps,
        "fps_per_camera": processed / seconds / cameras,
        "fps_ratio": processed / seconds / (cameras * fps),
        "processed": processed,
        "dropped": dropped,
        "drop_rate": dropped / (dropped + processed) if dropped + processed else None,
        "cameras_seen": len(per_cam),
        "detections_per_frame": sum(r.detections for r in inside) / processed
        if processed
        else None,
        "e2e_ms": percentiles([r.e2e_ms for r in inside]),
        "detect_ms": percentiles([r.detect_ms for r in inside]),
        "publish_ms": percentiles([r.publish_ms for r in inside]),
        "daemon_counters": _counter_delta(run),
        "cpu_percent": run.cpu_percent(),
        "cpu_ms_per_frame": run.cpu_ms_per_result(),
        "rss_end_mb": rss_end / 2**20 if rss_end else None,
        "rss_peak_mb": rss_peak / 2**20 if rss_peak else None,
        "first_result_s": run.first_result_s,
    }


def live_run(
    folder: Path,
    port: int,
    name: str,
    *,
    cameras: int,
    seconds: float,
    warmup_s: float,
    width: int = 1280,
    height: int = 720,
    fps: float = 15.0,
    objects: int = 5,
) -> dict[str, Any]:
    cfg = cameras_config(cameras, port, width=width, height=height, fps=fps, objects=objects)
    run = run_daemon(
        folder,
        name,
        cfg,
        port=port,
        live_seconds=seconds,
        warmup_s=warmup_s,
        timeout_s=60.0 + warmup_s + seconds,
    )
    return measure_live(run, cameras, fps)


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one live configuration: the spread of each figure across repeats."""

    def fig(get: Callable[[dict[str, Any]], float | None]) -> dict[str, Any]:
        return spread([v for v in (get(r) for r in runs) if v is not None])

    return {
        "cameras": runs[0]["cameras"],
        "seconds": runs[0]["seconds"],
        "repeats": len(runs),
        "fps_per_camera": fig(lambda r: r["fps_per_camera"]),
        "fps_ratio": fig(lambda r: r["fps_ratio"]),
        "dropped": fig(lambda r: r["dropped"]),
        "dropped_max": max(r["dropped"] for r in runs),
        "drop_rate": fig(lambda r: r["drop_rate"]),
        "e2e_p50_ms": fig(lambda r: r["e2e_ms"]["p50"]),
        "e2e_p95_ms": fig(lambda r: r["e2e_ms"]["p95"]),
        "e2e_p99_ms": fig(lambda r: r["e2e_ms"]["p99"]),
        "e2e_p99_ms_max": max(
            (r["e2e_ms"]["p99"] for r in runs if r["e2e_ms"]["p99"] is not None), default=None
        ),
        "detect_p50_ms": fig(lambda r: r["detect_ms"]["p50"]),
        "publish_p50_ms": fig(lambda r: r["publish_ms"]["p50"]),
        "cpu_percent": fig(lambda r: r["cpu_percent"]),
        "cpu_ms_per_frame": fig(lambda r: r["cpu_ms_per_frame"]),
        "rss_end_mb": fig(lambda r: r["rss_end_mb"]),
        "rss_peak_mb": fig(lambda r: r["rss_peak_mb"]),
        "rss_peak_mb_max": max((r["rss_peak_mb"] or 0.0) for r in runs),
        "first_result_s": fig(lambda r: r["first_result_s"]),
        "runs": list(runs),
    }


def bench_live(
    folder: Path,
    port: int,
    *,
    label: str,
    camera_counts: Sequence[int],
    seconds: float,
    warmup_s: float,
    repeats: int,
    width: int = 1280,
    height: int = 720,
    fps: float = 15.0,
    objects: int = 5,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each camera count ``repeats`` times; repeats of a count are interleaved with the other
    counts (1, 2, 4, 8, 1, 2, ...), so slow drift in the machine's load spreads over all."""
    by_count: dict[int, list[dict[str, Any]]] = {n: [] for n in camera_counts}
    for r in range(repeats):
        for n in camera_counts:
            m = live_run(
                folder, port, f"{label}-{n}cam-{r}", cameras=n, seconds=seconds,
                warmup_s=warmup_s, width=width, height=height, fps=fps, objects=objects,
            )  # fmt: skip
            by_count[n].append(m)
            e2e = m["e2e_ms"]
            progress(
                f"{label}: repeat {r + 1}/{repeats}, {n} camera(s) {width}x{height} at {fps:g} "
                f"fps: {m['fps_per_camera']:5.2f} fps/camera, {m['dropped']} dropped, e2e p50 "
                f"{_ms(e2e['p50'])} p99 {_ms(e2e['p99'])}, CPU {_pct(m['cpu_percent'])}, "
                f"RSS {_mb(m['rss_end_mb'])}"
            )
    return {
        "width": width,
        "height": height,
        "fps": fps,
        "objects": objects,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "repeats": repeats,
        "configs": [summarize_runs(by_count[n]) for n in camera_counts],
    }


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}%"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} MB"
