"""``edge-stn synth-video``: a test video of moving digits and its ground truth as JSON.

The frames are those of the synthetic camera (:class:`~edge_stn.video.synthetic.MovingDigits`,
test-split digits only, with its knobs), written as H.264 through Debian's ffmpeg (libx264) where
it is installed, as cameras send, else with OpenCV's ``mp4v`` encoder (pip's OpenCV cannot write
H.264). The truth file lists, per frame (``frame_index`` 0-based, as a file source numbers
them), every object's label, tight ink box ``[x0, y0, x1, y1]`` (frame pixels, edge
coordinates), centre, rotation (degrees, counter-clockwise) and scale. Both files are written
under temporary names and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_stn import __version__
from edge_stn.errors import EdgeStnError
from edge_stn.video.synthetic import MotionSettings, MovingDigits, truth_dict

TRUTH_SCHEMA = "edge-stn/synthetic-truth"
TRUTH_VERSION = 1


@dataclass(frozen=True)
class SynthVideo:
    video: Path
    truth: Path
    frames: int
    objects: int
    codec: str


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def ffmpeg_path() -> str | None:
    """Debian's ffmpeg (libx264), if installed."""
    return shutil.which("ffmpeg")


class _Writer:
    """Gray frames into a video: H.264 through ffmpeg's libx264 (as cameras send), or OpenCV's
    ``mp4v`` (pip's OpenCV cannot write H.264)."""

    def __init__(self, path: Path, codec: str, fps: float, size: tuple[int, int]) -> None:
        self.codec = codec
        self._proc: subprocess.Popen[bytes] | None = None
        self._cv: cv2.VideoWriter | None = None
        w, h = size
        if codec == "h264":
            exe = ffmpeg_path()
            if exe is None:
                raise EdgeStnError("codec h264 needs Debian's ffmpeg (apt-get install ffmpeg)")
            cmd = [exe, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo"]
            cmd += ["-pix_fmt", "gray", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-"]
            cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18"]
            cmd += ["-pix_fmt", "yuv420p", "-f", "mp4", str(path)]
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        else:
            self._cv = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
            if not self._cv.isOpened():
                raise EdgeStnError(
                    "OpenCV cannot write this video (use an .mp4 or .avi name in a writable "
                    "folder)",
                    path=path,
                )

    def write(self, gray: npt.NDArray[np.uint8]) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(np.ascontiguousarray(gray).tobytes())
            except BrokenPipeError:
                self.close()  # raises with ffmpeg's own message
        else:
            assert self._cv is not None
            self._cv.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            assert proc.stdin is not None and proc.stderr is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            if proc.wait() != 0:
                raise EdgeStnError(
                    f"ffmpeg failed: {err.splitlines()[-1] if err else proc.returncode}"
                )
        elif self._cv is not None:
            self._cv.release()
            self._cv = None


def write_synthetic_video(
    out: str | Path,
    truth: str | Path,
    *,
    frames: int = 300,
    width: int = 640,
    height: int = 480,
    fps: float = 15.0,
    seed: int = 0,
    settings: MotionSettings | None = None,
    codec: str = "auto",
    phase_frames: int | None = None,
) -> SynthVideo:
    """Write the scene's first ``frames`` frames and their truth. ``codec``: ``h264`` (ffmpeg),
    ``mp4v`` (OpenCV) or ``auto`` (h264 where ffmpeg is installed). ``phase_frames``: the
    scene phase (:class:`MovingDigits`; None: the seed's own)."""
    out, truth = Path(out), Path(truth)
    if frames < 1:
        raise EdgeStnError(f"frames must be >= 1, got {frames}")
    if codec not in ("auto", "h264", "mp4v"):
        raise EdgeStnError(f"codec must be auto, h264 or mp4v, got {codec!r}")
    if codec == "auto":
        codec = "h264" if ffmpeg_path() is not None else "mp4v"
    try:
        gen = MovingDigits(
            width, height, fps, seed, settings or MotionSettings(), phase_frames=phase_frames
        )
    except ValueError as exc:
        raise EdgeStnError(str(exc)) from None
    for p in (out, truth):
        if not p.parent.is_dir():
            raise EdgeStnError("no such folder", path=p.parent)
    tmp_video, tmp_truth = _temp(out), _temp(truth)
    per_frame: list[dict[str, Any]] = []
    writer = _Writer(tmp_video, codec, fps, (width, height))
    try:
        for i in range(frames):
            scene = gen.scene(i)
            writer.write(scene.image)
            per_frame.append({"frame_index": i, "objects": [truth_dict(o) for o in scene.objects]})
        writer.close()
    except BaseException:
        try:
            writer.close()
        finally:
            tmp_video.unlink(missing_ok=True)
        raise
    doc = {
        "schema": TRUTH_SCHEMA,
        "version": TRUTH_VERSION,
        "producer": f"edge-stn {__version__}",
        "video": out.name,
        "codec": codec,
        "width": width,
        "height": height,
        "fps": fps,
        "frame_count": frames,
        "digits": "MNIST test split (edge_stn/assets/digits.npz)",
        "box": "tight box of the digit's ink, [x0, y0, x1, y1] in frame pixels, edge coordinates",
        "angle": "degrees, counter-clockwise, of the digit drawn upright",
        "contrast": "peak ink level above the background, grey levels",
        "generator": gen.describe(),
        "frames": per_frame,
    }
    tmp_truth.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(tmp_video, out)
    os.replace(tmp_truth, truth)
    return SynthVideo(out, truth, frames, sum(len(f["objects"]) for f in per_frame), codec)
