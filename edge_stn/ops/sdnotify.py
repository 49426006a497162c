"""sd_notify(3) over ``$NOTIFY_SOCKET``: a systemd ``Type=notify`` service's half of the protocol.

systemd passes the path of a unix datagram socket in ``NOTIFY_SOCKET`` (a leading ``@`` names
an abstract socket) and, with ``WatchdogSec=``, the watchdog period in ``WATCHDOG_USEC`` (for
the process ``WATCHDOG_PID``, when set). A service sends newline-separated ``KEY=VALUE``
assignments, one datagram per message: ``READY=1`` once it serves, ``WATCHDOG=1`` at least
every half period while it is healthy, ``STOPPING=1`` when it begins to stop, ``RELOADING=1``
during a reload, ``STATUS=...`` free text for ``systemctl status``.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op. A send that fails (the manager
went away) is logged once and never raises: notification must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Messages to the service manager; ``environ`` defaults to ``os.environ``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            logger.warning("NOTIFY_SOCKET %r is neither a path nor @abstract: ignored", raw)
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._failed = False
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not under systemd or failed."""
        if self.address is None:
            return False
        msg = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
        except OSError as exc:
            if not self._failed:
                logger.warning("sd_notify to %r failed: %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        self._failed = False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
