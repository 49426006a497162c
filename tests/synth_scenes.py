"""Synthetic test videos with their ground truth, for the end-to-end measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_scenes(
    folder: Path, seeds: tuple[int, ...], frames: int
) -> list[tuple[Path, dict[str, Any]]]:
    """`edge-stn synth-video` scenes (default knobs; H.264 where ffmpeg is installed): the
    video of each seed and its truth document."""
    from edge_stn.video.synth_video import write_synthetic_video

    out = []
    for seed in seeds:
        v = write_synthetic_video(
            folder / f"s{seed}.mp4", folder / f"s{seed}.json", frames=frames, seed=seed
        )
        out.append((v.video, json.loads(v.truth.read_text())))
    return out
