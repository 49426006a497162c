"""Synthetic test videos with their ground truth, for the end-to-end measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_scenes(
    folder: Path, seeds: tuple[int, ...], frames: int
) -> list[tuple[Path, dict[str, Any]]]:
    """`edge-stn synth-video` scenes (default knobs; H.264 where ffmpeg is installed): the
    video of each seed and its truth document.

    The scene phase is 0, as before phases existed: the accuracy targets were set on these
    scenes, and a seed's phase shows other segments in the same frames. (Which digits a few
    videos show moves the figures: over four triples of 300-frame videos the rotation residual
    median ranged 6.5-11.5 deg.)"""
    from edge_stn.video.synth_video import write_synthetic_video

    out = []
    for seed in seeds:
        v = write_synthetic_video(
            folder / f"s{seed}.mp4",
            folder / f"s{seed}.json",
            frames=frames,
            seed=seed,
            phase_frames=0,
        )
        out.append((v.video, json.loads(v.truth.read_text())))
    return out
