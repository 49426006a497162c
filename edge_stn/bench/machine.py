"""What a benchmark ran on: CPU, cores, memory, load, and the versions of what it measured
(``/proc`` on Linux; :mod:`importlib.metadata` for versions, so torch is named without being
imported)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

from edge_stn.runtime.engine import usable_cores

__all__ = ["describe_machine", "load_average", "usable_cores"]

PACKAGES = (
    "edge-stn",
    "numpy",
    "opencv-python-headless",
    "opencv-python",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "paho-mqtt",
    "pydantic",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import cv2

    out["opencv (module)"] = cv2.__version__
    return out


def tool_version(binary: str, *args: str) -> str | None:
    """The first line a tool prints about its version, or None when it is not installed."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if binary == "mosquitto" else None)
    if path is None or not os.access(path, os.X_OK):
        return None
    try:
        proc = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else None


def describe_machine() -> dict[str, Any]:
    mem = memory_total_bytes()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "ffmpeg": tool_version("ffmpeg", "-version"),
        "mosquitto": tool_version("mosquitto", "-h"),
        "load_average_start": load_average(),
    }
