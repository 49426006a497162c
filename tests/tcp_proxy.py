"""A small fault-injecting TCP proxy on loopback (DESIGN §8): it sits between a client and a
server and can cut the link (every connection closed, new ones closed at once) or stall it
(nothing forwarded either way, connections left open, as when a route dies silently), then
restore it. Threads are bounded: :meth:`FaultProxy.close` ends them all."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class FaultProxy:
    """``FaultProxy(server_port).start()`` listens on ``self.port`` and forwards to the server."""

    def __init__(self, server_port: int, server_host: str = HOST) -> None:
        self.server = (server_host, server_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.host = HOST
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._threads: list[threading.Thread] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._cut = False
        self._closing = threading.Event()
        self.accepted = 0
        self.cuts = 0
        self.stalls = 0

    def start(self) -> FaultProxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                cut = self._cut
            if cut:  # the link is down: the connection dies at once
                client.close()
                continue
            try:
                server = socket.create_connection(self.server, timeout=2)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            self._spawn(self._pipe, "proxy-up", pair, client, server)
            self._spawn(self._pipe, "proxy-down", pair, server, client)

    def _hold(self, pair: _Pair) -> bool:
        """Wait while stalled; False when the pair or the proxy is closed meanwhile."""
        while not self._flowing.wait(0.05):
            if pair.closed.is_set() or self._closing.is_set():
                return False
        return not pair.closed.is_set()

    def _pipe(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if not self._hold(pair):  # stalled: the bytes wait here, and so does the sender
                return
            try:
                dst.sendall(data)
            except OSError:
                break
        # an end of stream travels only when the link flows (a stalled link carries no FIN)
        if self._hold(pair):
            pair.close()

    def cut(self) -> None:
        """Close every connection; new ones are closed at once until :meth:`restore`."""
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for p in pairs:
            p.close()

    def stall(self) -> None:
        """Forward nothing, either way, until :meth:`restore` (connections stay open)."""
        with self._lock:
            self.stalls += 1
        self._flowing.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        self._flowing.set()

    def close(self) -> None:
        self._closing.set()
        self._flowing.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
            threads = list(self._threads)
        for p in pairs:
            p.close()
        self._listener.close()
        for t in threads:
            t.join(2.0)
