"""A loopback RTSP server of one H.264 MP4 file, for tests (DESIGN §8).

Runs under the SYSTEM python3 (``/usr/bin/python3``), not the project's virtual environment:
it needs Debian's GStreamer bindings (``python3-gi``, ``gir1.2-gst-rtsp-server-1.0``,
``gstreamer1.0-plugins-base/good/bad``), which pip cannot install. ``tests/rtsp_server.py``
starts it; by hand::

    /usr/bin/python3 tests/rtsp_serve.py --port 8554 --video clip.mp4 --path /cam

Each client gets its own session that plays the file from its first frame at the file's own
rate (the server paces it on the clock, as a camera would) and ends at its end. The script
prints ``ready <port>`` once it listens and ``client <address>`` per connection, then runs until
it is killed.
"""

from __future__ import annotations

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--video", required=True, help="an MP4 file with an H.264 stream")
    parser.add_argument("--path", default="/stream", help="mount point (default /stream)")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    # No re-encoding: the file's H.264 goes out as it is, as a camera's stream would.
    location = args.video.replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! qtdemux ! h264parse '
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(False)  # every client starts at the first frame
    server.get_mount_points().add_factory(args.path, factory)

    def on_client(_server: object, client: GstRtspServer.RTSPClient) -> None:
        conn = client.get_connection()
        print(f"client {conn.get_ip() if conn else '?'}", flush=True)

    server.connect("client-connected", on_client)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr, flush=True)
        return 1
    print(f"ready {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
