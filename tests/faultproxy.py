"""A fault-injecting TCP proxy on 127.0.0.1, between the daemon and a test endpoint.

`FaultProxy(target_port)` listens on a random port and treats each new
connection according to its current `mode`, which a test may switch at any time:

- `pass`: forward both ways, byte for byte.
- `refuse`: nothing listens: the port is held by a socket that is bound but not
  listening, so a connect gets a real "connection refused" (a RST to the SYN).
- `reset`: accept, read the request, then close with SO_LINGER 0: a RST instead
  of an answer.
- `blackhole`: accept, read, never answer.
- `trickle`: forward the request, then relay the upstream answer one byte every
  `trickle_interval` seconds.
- `garbage`: read the request, answer `garbage` (bytes that are not HTTP), close.

Leaving `pass` closes the connections it was forwarding, so a kept-alive
connection cannot slip past a fault. With `tls` (a server-side SSLContext) the
proxy terminates TLS in `pass` mode: an https endpoint with that certificate.

Bounded: every loop polls at `_TICK` and ends when the proxy is closed; it only
ever connects to a loopback address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import ssl
import struct
import threading
import time
from typing import Literal

Mode = Literal["pass", "refuse", "reset", "blackhole", "trickle", "garbage"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "reset", "blackhole", "trickle", "garbage")
_TICK = 0.02  # seconds: how often loops look at the mode and at close()


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        mode: Mode = "pass",
        trickle_interval: float = 0.05,
        garbage: bytes = b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"FaultProxy only forwards to loopback, not {target_host}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.target = (target_host, target_port)
        self.trickle_interval = trickle_interval
        self.garbage = garbage
        self.tls = tls
        self.accepted = 0  # connections accepted, in every mode
        self._mode: Mode = mode
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._forwarding: set[socket.socket] = set()  # client sockets of `pass` connections
        self._placeholder: socket.socket | None = None  # holds the port while refusing
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]  # type: ignore[union-attr]
        if mode == "refuse":
            self._stop_listening()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    # -- control -----------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        """Switch now: connections accepted from here on get the new mode."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            old, self._mode = self._mode, mode
            if mode == "refuse" and self._listener is not None:
                self._stop_listening()
            elif mode != "refuse" and self._listener is None:
                self._start_listening()
            if old == "pass" and mode != "pass":
                for client in self._forwarding:
                    _hang_up(client)  # its thread sees the end and closes both sides

    def url(self, endpoint_url: str, scheme: str | None = None) -> str:
        """The endpoint's URL with this proxy's port (and optionally another scheme)."""
        rest = endpoint_url.split("://", 1)[1].split("/", 1)[1]
        return f"{scheme or endpoint_url.split('://')[0]}://127.0.0.1:{self.port}/{rest}"

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        with self._lock:
            for sock in (self._listener, self._placeholder):
                if sock is not None:
                    _close(sock)
            for client in self._forwarding:
                _hang_up(client)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listening (under self._lock) ------------------------------------------------------

    def _stop_listening(self) -> None:
        assert self._listener is not None
        _hang_up(self._listener)  # stops listening now, and wakes the accept loop's select()
        _close(self._listener)
        self._listener = None
        placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(placeholder, self.port)  # bound, never listening: connections are refused
        self._placeholder = placeholder

    def _start_listening(self) -> None:
        if self._placeholder is not None:
            _close(self._placeholder)
            self._placeholder = None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(listener, self.port)
        listener.listen()
        self._listener = listener

    # -- connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(_TICK)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], _TICK)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):  # the listener was closed under us: look again
                continue
            with self._lock:
                mode = self._mode
                self.accepted += 1
                if mode == "pass":
                    self._forwarding.add(client)
            threading.Thread(
                target=self._serve, args=(client, mode), name=f"faultproxy-{mode}", daemon=True
            ).start()

    def _serve(self, client: socket.socket, mode: Mode) -> None:
        upstream: socket.socket | None = None
        try:
            if mode == "pass":
                if self.tls is not None:
                    client = self._wrap(client)
                upstream = socket.create_connection(self.target, timeout=5)
                self._pump(client, upstream, trickle=False)
            elif mode == "trickle":
                upstream = socket.create_connection(self.target, timeout=5)
                self._pump(client, upstream, trickle=True)
            elif mode == "reset":
                self._read_request(client)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == "blackhole":
                while not self._closed.is_set() and self._receive(client) != b"":
                    pass
            elif mode == "garbage":
                self._read_request(client)
                client.sendall(self.garbage)
        except (OSError, ValueError):
            pass  # the client gave up, or the fault did its work
        finally:
            with self._lock:
                self._forwarding.discard(client)
            _close(client)
            if upstream is not None:
                _close(upstream)

    def _wrap(self, client: socket.socket) -> ssl.SSLSocket:
        assert self.tls is not None
        client.settimeout(5)  # the handshake; then select() does the waiting
        wrapped = self.tls.wrap_socket(client, server_side=True)
        with self._lock:
            self._forwarding.discard(client)
            self._forwarding.add(wrapped)
        return wrapped

    def _receive(self, sock: socket.socket) -> bytes | None:
        """What arrived within a tick: None if nothing, b"" once the peer has closed."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return sock.recv(65536)
        ready, _, _ = select.select([sock], [], [], _TICK)
        return sock.recv(65536) if ready else None

    def _read_request(self, client: socket.socket, limit: float = 2.0) -> bytes:
        """Read one request, headers and Content-Length body (or what comes within `limit`)."""
        data = b""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not self._closed.is_set():
            head, end, body = data.partition(b"\r\n\r\n")
            if end and len(body) >= _content_length(head):
                break
            chunk = self._receive(client)
            if chunk == b"":
                break
            data += chunk or b""
        return data

    def _pump(self, client: socket.socket, upstream: socket.socket, *, trickle: bool) -> None:
        """Forward both ways until either side closes; optionally trickle the answers."""
        sources = [client, upstream]
        backlog = b""  # upstream bytes not yet trickled to the client
        next_byte = 0.0
        while not self._closed.is_set():
            if backlog and time.monotonic() >= next_byte:
                client.sendall(backlog[:1])
                backlog = backlog[1:]
                next_byte = time.monotonic() + self.trickle_interval
            if upstream not in sources and not backlog:
                return  # upstream closed and everything it said has been trickled
            if isinstance(client, ssl.SSLSocket) and client.pending():
                ready = [client]
            else:
                wait = max(0.0, next_byte - time.monotonic()) if backlog else _TICK
                ready, _, _ = select.select(sources, [], [], min(wait, _TICK))
            for sock in ready:
                data = sock.recv(65536)
                if not data and sock is upstream and backlog:
                    sources.remove(upstream)
                elif not data:
                    return
                elif sock is client:
                    upstream.sendall(data)
                elif trickle:
                    backlog += data
                else:
                    client.sendall(data)


def _bind(sock: socket.socket, port: int) -> None:
    """Bind to our port; a select() in another thread may hold the old socket a tick longer."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            return sock.bind(("127.0.0.1", port))
        except OSError:
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.005)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 0


def _hang_up(sock: socket.socket) -> None:
    # The plain socket's shutdown, also under TLS: it wakes a thread blocked on it.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
