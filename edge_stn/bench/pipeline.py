"""Section 2: the pipeline against its limit. A daemon that must decode every frame of a file
cannot be faster than decoding alone, so each repeat measures, back to back on the same H.264
file, the daemon's file reader alone (decode-only frames/s) and the whole daemon (proposals,
ST-CNN, crops, JPEG, MQTT to a real broker), and reports their ratio.

The daemon's frame rate is its own: frames published over the time from the first frame's
capture to the last result's hand-over to MQTT (``publish_ts``), from the results' timestamps,
so neither the start-up nor the subscriber's lag counts. Beside it, the daemon's CPU time per
frame (``/proc``), which a busy neighbour on the machine disturbs less than frames per second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_stn.bench.daemon_run import DEVICE, HOST, BenchError, reduce_to_for, run_daemon
from edge_stn.bench.summary import spread
from edge_stn.bench.videos import BenchVideo, decode_only, write_h264


def file_config(video: BenchVideo, port: int) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "cameras": [
            {
                "id": "file0",
                "source": str(video.path),
                "proposals": {"reduce_to": reduce_to_for(video.width)},
            }
        ],
        "mqtt": {"host": HOST, "port": port},
        "stats_interval_s": 1,
    }


def bench_pipeline(
    folder: Path,
    port: int,
    *,
    resolutions: Sequence[tuple[int, int]] = ((1280, 720), (1920, 1080)),
    frames: int = 300,
    fps: float = 15.0,
    objects: int = 5,
    repeats: int = 3,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    videos = []
    for w, h in resolutions:
        progress(f"pipeline: writing a {w}x{h} H.264 video, {frames} frames, {objects} digits")
        videos.append(
            write_h264(folder / f"bench-{h}p.mp4", width=w, height=h, frames=frames, fps=fps,
                       objects=objects)
        )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v.label: [] for v in videos}
    for r in range(repeats):
        for video in videos:
            decoded = decode_only(video.path)
            run = run_daemon(
                folder,
                f"file-{video.label}-{r}",
                file_config(video, port),
                port=port,
                timeout_s=60.0 + video.frames / 2.0,
            )
            results = run.results
            if not results:
                raise BenchError(f"the daemon published nothing for {video.path.name}")
            span = max(x.publish_ts for x in results) - min(x.capture_ts for x in results)
            daemon_fps = len(results) / span if span > 0 else float("nan")
            ratio = daemon_fps / decoded.fps
            rss = run.rss_peak_bytes()
            runs[video.label].append(
                {
                    "decode_fps": decoded.fps,
                    "daemon_fps": daemon_fps,
                    "ratio": ratio,
                    "frames_decoded": decoded.frames,
                    "frames_published": len({x.frame_index for x in results}),
                    "detections_per_frame": sum(x.detections for x in results) / len(results),
                    "daemon_cpu_percent": run.cpu_percent(),
                    "daemon_cpu_ms_per_frame": run.cpu_ms_per_frame(),
                    "rss_peak_mb": rss / 2**20 if rss else None,
                    "first_result_s": run.first_result_s,
                }
            )
            progress(
                f"pipeline: repeat {r + 1}/{repeats} {video.label}: decode-only "
                f"{decoded.fps:6.1f} fps, daemon {daemon_fps:6.1f} fps, ratio {ratio:4.2f} "
                f"({len(results)}/{decoded.frames} frames published)"
            )
    rows = []
    for video in videos:
        rr = runs[video.label]
        rows.append(
            {
                "video": video.to_dict(),
                "label": video.label,
                "decode_fps": spread([x["decode_fps"] for x in rr]),
                "daemon_fps": spread([x["daemon_fps"] for x in rr]),
                "ratio": spread([x["ratio"] for x in rr]),
                "frames_published": min(x["frames_published"] for x in rr),
                "frames": video.frames,
                "detections_per_frame": spread([x["detections_per_frame"] for x in rr]),
                "daemon_cpu_percent": spread(
                    [x["daemon_cpu_percent"] for x in rr if x["daemon_cpu_percent"] is not None]
                ),
                "daemon_cpu_ms_per_frame": spread(
                    [x["daemon_cpu_ms_per_frame"] for x in rr if x["daemon_cpu_ms_per_frame"]]
                ),
                "rss_peak_mb": spread([x["rss_peak_mb"] for x in rr if x["rss_peak_mb"]]),
                "first_result_s": spread([x["first_result_s"] for x in rr if x["first_result_s"]]),
                "runs": rr,
            }
        )
    return {"repeats": repeats, "videos": rows}
