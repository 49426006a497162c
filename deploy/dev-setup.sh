#!/usr/bin/env bash
# Sets up a development / workstation environment in .venv on a fresh Debian machine:
# PyTorch (CPU build) first, so a loose `torch` requirement never pulls a multi-GB CUDA build,
# then edge-stn with the cpu, train, export and dev extras; Debian's mosquitto and ffmpeg for the
# tests and the demo, and GStreamer's RTSP server for the live-source tests. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
# GStreamer's RTSP server, run by the system python3 in the live-source tests.
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base \
    gstreamer1.0-plugins-good gstreamer1.0-plugins-bad; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
  done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: please install ${need_apt[*]} (Debian packages) for the tests and the demo" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[cpu,train,export,dev]'
echo "edge-stn installed in .venv ($(.venv/bin/edge-stn --version))"
