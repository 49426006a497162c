"""Freed frames go back to the kernel (edge_stn.ops.memory), measured on a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A camera thread's life in miniature: a frame freed (which raises glibc's dynamic threshold),
# then 20 frames alive at once and freed; prints the resident anonymous MB left behind.
PROGRAM = """
import sys, threading
import numpy as np
from edge_stn.ops.memory import release_frames_to_the_kernel

def anon_mb():
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith("RssAnon"))
    return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    assert release_frames_to_the_kernel()

def camera():
    for _ in range(3):
        frame = np.ones(1280 * 720 * 3, np.uint8)
        del frame
        held = [np.ones(1280 * 720 * 3, np.uint8) for _ in range(20)]
        del held

before = anon_mb()
t = threading.Thread(target=camera)
t.start()
t.join()
print(anon_mb() - before)
"""


def _left_behind(mode: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    return float(proc.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_freed_frames_leave_no_resident_memory_behind() -> None:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    dynamic = _left_behind("dynamic")
    fixed = _left_behind("fixed")
    # 20 freed 720p frames (55 MB) stay in the thread's heap with glibc's dynamic threshold
    assert dynamic > 30, dynamic
    assert fixed < 5, fixed


def test_an_operator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_stn.ops.memory import release_frames_to_the_kernel

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_frames_to_the_kernel() is False


CPU_PROGRAM = """
import cv2
from edge_stn.ops.cpu import opencv_on_calling_threads
before = cv2.getNumThreads()
print(opencv_on_calling_threads(), before, cv2.getNumThreads())
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "True 1"), ({"OPENCV_FOR_THREADS_NUM": "2"}, "False 2")],
)
def test_the_daemon_runs_opencv_on_its_own_threads_unless_the_operator_chose(
    env: dict[str, str], expected: str
) -> None:
    """OpenCV's worker pool is off in the daemon (edge_stn.ops.cpu); an operator's
    OPENCV_FOR_THREADS_NUM wins. Run in a fresh process: the setting is process-wide."""
    proc = subprocess.run(
        [sys.executable, "-c", CPU_PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
    )
    chose, _, after = proc.stdout.split()
    assert f"{chose} {after}" == expected
