"""`edge-stn bench` (issue 6): the structure and sanity of what it writes, never its speed.

The real parts run: ONNX Runtime and PyTorch on the bundled model, H.264 files written by the
system's ffmpeg, `edge-stn run` in its own process, a real mosquitto, synthetic wall-clock
cameras. The runs are the `--quick` ones (seconds each).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import MOSQUITTO

from edge_stn.bench.live import frame_gaps
from edge_stn.bench.report import KEEP_MARKER, fmt, write_markdown
from edge_stn.bench.summary import percentiles, spread
from edge_stn.cli import main

pytest.importorskip("onnxruntime")
needs_broker = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto missing")
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg missing")


def test_spread_percentiles_and_gaps() -> None:
    s = spread([3.0, 1.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["spread"] == pytest.approx(1.0) and math.isnan(s["values"][3])
    assert spread([])["median"] is None and spread([5.0])["spread"] == 0.0
    p = percentiles([float(v) for v in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)
    assert p["max"] == 100.0 and p["n"] == 100
    assert percentiles([])["p99"] is None
    assert frame_gaps([7, 1, 2, 4, 4]) == 3  # 3, 5 and 6 are missing
    assert frame_gaps([]) == 0
    assert fmt({"median": 2.0, "min": 1.0, "max": 3.5, "n": 3}, 1, " ms") == "2.0 ms (1.0-3.5)"
    assert fmt(None) == "n/a"


def test_regenerating_the_markdown_keeps_the_hand_written_notes(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    write_markdown(page, "# Benchmarks\n\nfirst run\n")
    text = page.read_text()
    assert text.count(KEEP_MARKER) == 1
    page.write_text(text + "\n## Profile\n\nwritten by hand\n")
    write_markdown(page, "# Benchmarks\n\nsecond run\n")
    text = page.read_text()
    assert "second run" in text and "first run" not in text
    assert text.index("second run") < text.index(KEEP_MARKER) < text.index("written by hand")


def test_bad_bench_arguments_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--sections", "model,speed", "--out", str(tmp_path)]) == 2
    assert "speed" in capsys.readouterr().err
    assert main(["bench", "--cameras", "1,0", "--out", str(tmp_path)]) == 2
    assert "--cameras" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def _fig_ok(fig: dict[str, Any], lo: float = 0.0, hi: float = math.inf) -> bool:
    return fig["n"] >= 1 and lo < fig["min"] <= fig["median"] <= fig["max"] < hi


@needs_broker
@needs_ffmpeg
def test_quick_model_and_pipeline_sections(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--quick", "--sections", "model,pipeline", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == "edge-stn/bench" and doc["version"] == 1
    m = doc["machine"]
    assert m["usable_cores"] >= 1 and m["cpu"] and "onnxruntime" in m["packages"]
    assert m["ffmpeg"].startswith("ffmpeg") and "mosquitto" in m["mosquitto"]

    model = doc["sections"]["model"]
    (run,) = model["runs"]
    assert run["threads"] == 1 and [r["batch"] for r in run["batches"]] == [1, 8, 32]
    for r in run["batches"]:
        assert _fig_ok(r["onnxruntime_crops_s"]) and _fig_ok(r["onnxruntime_crops_per_cpu_s"])
        if model["torch"] is not None:
            assert _fig_ok(r["torch_crops_s"])
            ort, pt = r["onnxruntime_crops_s"]["values"], r["torch_crops_s"]["values"]
            assert r["ratio"]["values"] == pytest.approx(
                [a / b for a, b in zip(ort, pt, strict=True)]
            )
    if model["torch"] is not None:
        assert model["logits_max_abs_diff"] < 1e-3, "the same weights in both runtimes"
    else:
        assert "torch" in model["skipped"]

    videos = doc["sections"]["pipeline"]["videos"]
    assert [(v["video"]["width"], v["video"]["height"]) for v in videos] == [
        (1280, 720),
        (1920, 1080),
    ]
    for v in videos:
        assert v["frames_published"] == v["frames"] == 20, "one result per frame of the file"
        assert _fig_ok(v["decode_fps"]) and _fig_ok(v["daemon_fps"]) and _fig_ok(v["ratio"])
        (r,) = v["runs"]
        assert r["ratio"] == pytest.approx(r["daemon_fps"] / r["decode_fps"])
        assert 4.0 <= v["detections_per_frame"]["median"] <= 7.0, "5 digits per frame"
        assert 20.0 < v["rss_peak_mb"]["median"] < 2000.0
    targets = {t["what"]: t for t in doc["targets"]}
    t720 = targets["720p H.264 file: daemon fps / decode-only fps"]
    assert t720["measured"] == videos[0]["ratio"]["median"] and t720["met"] in (True, False)
    md = (out / "benchmarks.md").read_text()
    assert "## 1. The model" in md and "| 1 | 8 |" in md and "1920x1080" in md
    assert "Not run (`--sections`)" in md  # latency and scaling
    assert (out / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
    # Each daemon run had a fresh outbox of its own in the work folder (a shared one would
    # replay a previous run's leftovers into this run's figures).
    # The daemons inherit the state folder (this test's own, see conftest): nothing there.
    state = Path(os.environ["EDGE_STN_STATE_DIR"])
    assert not state.is_dir() or not list(state.glob("outbox-*"))


@needs_broker
def test_quick_latency_and_scaling_sections(tmp_path: Path) -> None:
    out = tmp_path / "out"
    md, js = tmp_path / "page.md", tmp_path / "b.json"
    argv = ["bench", "--quick", "--sections", "latency,scaling", "--out", str(out)]
    assert main([*argv, "--markdown", str(md), "--json", str(js)]) == 0
    doc = json.loads(js.read_text())
    assert set(doc["sections"]) == {"latency", "scaling"}
    lat, sc = doc["sections"]["latency"], doc["sections"]["scaling"]
    assert [c["cameras"] for c in lat["configs"]] == [2]
    assert [c["cameras"] for c in sc["configs"]] == [1, 2]
    assert (sc["width"], sc["height"], sc["fps"], sc["objects"]) == (1280, 720, 15.0, 5)
    for c in [*lat["configs"], *sc["configs"]]:
        (run,) = c["runs"]
        assert run["cameras_seen"] == c["cameras"] and run["processed"] > 0
        # A camera cannot deliver more than it offers; a few frames of slack for the window.
        assert 0 < run["fps_per_camera"] <= 15.0 * (1 + 2 / c["seconds"])
        e2e = run["e2e_ms"]
        assert 0 < e2e["p50"] <= e2e["p95"] <= e2e["p99"] <= e2e["max"]
        assert run["detect_ms"]["p50"] <= run["publish_ms"]["p50"] <= e2e["p50"]
        assert run["dropped"] >= 0 and run["drop_rate"] is not None
        assert 4.0 <= run["detections_per_frame"] <= 7.0
        assert 20.0 < run["rss_end_mb"] <= run["rss_peak_mb"] < 2000.0
        assert 0 < run["first_result_s"] < 30 and run["cpu_percent"] > 0
        assert set(run["daemon_counters"]) >= {"reader_stale", "result_queue", "publish"}
    rows = [r["run"] for r in doc["resources"]]
    assert rows == [
        "latency: 2 camera(s) 1280x720 at 15 fps",
        "scaling: 1 camera(s) 1280x720 at 15 fps",
        "scaling: 2 camera(s) 1280x720 at 15 fps",
    ]
    four = [t for t in doc["targets"] if t["what"].startswith("4 cameras")]
    assert four and all(t["met"] is None and t["detail"] == "no 4-camera run" for t in four)
    page = md.read_text()
    assert "## 3. Latency" in page and "## 4. Scaling" in page and KEEP_MARKER in page
    assert page.count("| 2 |") >= 2  # the 2-camera rows of both tables
    assert (out / "benchmarks.png").is_file()
