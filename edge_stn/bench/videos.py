"""Benchmark videos: H.264 files of moving digits written with the system's ffmpeg (libx264),
as cameras send H.264 and pip's OpenCV cannot write it, and the decode-only frame rate of the
daemon's own file reader (the limit a pipeline that decodes every frame cannot beat).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge_stn.errors import EdgeStnError
from edge_stn.video.file import FileSource
from edge_stn.video.synthetic import MotionSettings, MovingDigits

FFMPEG_HINT = "ffmpeg is not installed: sudo apt-get install ffmpeg"


def find_ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found is None:
        raise EdgeStnError(FFMPEG_HINT)
    return found


@dataclass(frozen=True)
class BenchVideo:
    path: Path
    width: int
    height: int
    frames: int
    fps: float
    objects: int
    bytes: int

    @property
    def label(self) -> str:
        return f"{self.height}p"

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.path.name,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": self.fps,
            "objects_per_frame": self.objects,
            "codec": "H.264 (libx264, main profile, no B-frames, GOP 2 s)",
            "megabits_per_s": round(self.bytes * 8 / (self.frames / self.fps) / 1e6, 2),
        }


def write_h264(
    path: Path,
    *,
    width: int,
    height: int,
    frames: int,
    fps: float = 15.0,
    objects: int = 5,
    seed: int = 0,
) -> BenchVideo:
    """Frames of the synthetic scene (``objects`` digits each) piped raw into ffmpeg."""
    ffmpeg = find_ffmpeg()
    scene = MovingDigits(width, height, fps, seed, MotionSettings(count=objects))
    cmd = [
        ffmpeg, "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", f"{fps:g}",
        "-i", "-",
        "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", "-bf", "0",
        "-g", str(max(1, round(2 * fps))), "-pix_fmt", "yuv420p",
        str(path),
    ]  # fmt: skip
    log = path.with_suffix(".ffmpeg.log")
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=err)
        assert proc.stdin is not None
        try:
            for i in range(frames):
                image, _ = scene.frame_bgr(i)
                proc.stdin.write(image.tobytes())
        except BrokenPipeError:
            pass  # ffmpeg ended early: its log says why
        finally:
            proc.stdin.close()
        code = proc.wait(timeout=120)
    if code != 0 or not path.is_file():
        text = log.read_text(errors="replace").strip()[-300:]
        raise EdgeStnError(f"ffmpeg could not write an H.264 video: {text}", path=path)
    log.unlink(missing_ok=True)
    return BenchVideo(path, width, height, frames, fps, objects, path.stat().st_size)


@dataclass(frozen=True)
class DecodeRun:
    frames: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def decode_only(path: Path) -> DecodeRun:
    """Every frame of ``path`` read by the daemon's file source (OpenCV's FFmpeg backend, BGR
    frames), and nothing else; the open is not timed."""
    source = FileSource("bench", path)
    source.open()
    try:
        n = 0
        t0 = time.perf_counter()
        while source.read() is not None:
            n += 1
        return DecodeRun(n, time.perf_counter() - t0)
    finally:
        source.close()
