"""The issue's targets, checked against a benchmark document, and the resources table gathered
from its daemon runs."""

from __future__ import annotations

from typing import Any

MB = "MB"


def _median(fig: dict[str, Any] | None) -> float | None:
    return None if not fig else fig.get("median")


def _four_cameras(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The 4-camera configuration: from the latency section if it ran 4 cameras, else from
    the scaling section."""
    for name in ("latency", "scaling"):
        sec = doc["sections"].get(name) or {}
        for cfg in sec.get("configs", []):
            if cfg["cameras"] == 4:
                return dict(cfg, section=name)
    return None


def _target(
    what: str, target: str, measured: float | None, unit: str, ok: bool | None, detail: str = ""
) -> dict[str, Any]:
    return {
        "what": what,
        "target": target,
        "measured": measured,
        "unit": unit,
        "met": ok,
        "detail": detail,
    }


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    sections = doc["sections"]
    model = sections.get("model") or {}
    runs = model.get("runs") or []
    for run in runs:  # one target line per thread count
        b8 = next((r for r in run["batches"] if r["batch"] == 8), None)
        ratio = _median(b8["ratio"]) if b8 else None
        out.append(
            _target(
                "ONNX Runtime / PyTorch eager crops/s, batch 8",
                ">= 2.0",
                ratio,
                "x",
                None if ratio is None else ratio >= 2.0,
                f"{run['threads']} thread(s) each" if ratio is not None else "not measured",
            )
        )
    if not runs:
        out.append(
            _target("ONNX Runtime / PyTorch eager crops/s, batch 8", ">= 2.0", None, "x", None,
                    "not measured")
        )  # fmt: skip
    pipe = sections.get("pipeline") or {}
    v720 = next((v for v in pipe.get("videos", []) if v["video"]["height"] == 720), None)
    r720 = _median(v720["ratio"]) if v720 else None
    out.append(
        _target(
            "720p H.264 file: daemon fps / decode-only fps",
            ">= 0.5",
            r720,
            "x",
            None if r720 is None else r720 >= 0.5,
            "" if v720 else "not measured",
        )
    )
    four = _four_cameras(doc)
    if four is not None:
        where = f"{four['section']} section, {four['repeats']} repeat(s) of {four['seconds']:.0f} s"
        drops = four["dropped_max"]
        p99 = four["e2e_p99_ms_max"]
        rss = four["rss_peak_mb_max"]
        first = _median(four["first_result_s"])
        out += [
            _target("4 cameras 720p/15 fps: dropped frames (worst repeat)", "0", drops, "",
                    drops == 0, where),
            _target("4 cameras 720p/15 fps: p99 e2e latency (worst repeat)", "<= 50", p99, "ms",
                    None if p99 is None else p99 <= 50.0, where),
            _target("daemon peak RSS, 4 cameras", "<= 250", rss, MB, rss <= 250.0, where),
            _target("start to first published result (median)", "<= 3", first, "s",
                    None if first is None else first <= 3.0, where),
        ]  # fmt: skip
    else:
        for what, target, unit in (
            ("4 cameras 720p/15 fps: dropped frames (worst repeat)", "0", ""),
            ("4 cameras 720p/15 fps: p99 e2e latency (worst repeat)", "<= 50", "ms"),
            ("daemon peak RSS, 4 cameras", "<= 250", MB),
            ("start to first published result (median)", "<= 3", "s"),
        ):
            out.append(_target(what, target, None, unit, None, "no 4-camera run"))
    return out


def resources(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per daemon configuration run: memory, CPU, time to the first result."""
    rows = []
    pipe = doc["sections"].get("pipeline") or {}
    for v in pipe.get("videos", []):
        rows.append(
            {
                "run": f"{v['label']} file, as fast as possible",
                "rss_peak_mb": v["rss_peak_mb"],
                "cpu_percent": v["daemon_cpu_percent"],
                "first_result_s": v["first_result_s"],
            }
        )
    for name in ("latency", "scaling"):
        sec = doc["sections"].get(name) or {}
        for cfg in sec.get("configs", []):
            rows.append(
                {
                    "run": f"{name}: {cfg['cameras']} camera(s) {sec['width']}x{sec['height']} "
                    f"at {sec['fps']:g} fps",
                    "rss_end_mb": cfg["rss_end_mb"],
                    "rss_peak_mb": cfg["rss_peak_mb"],
                    "cpu_percent": cfg["cpu_percent"],
                    "first_result_s": cfg["first_result_s"],
                }
            )
    return rows
