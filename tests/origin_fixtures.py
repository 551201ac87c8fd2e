"""Loopback origins for the tunnel end-to-end tests.

The echo/download HTTP origin, its TLS twin and the WebSocket echo servers come from
``proxy_fixtures`` (the proxy's own tests use the same ones); this module wraps them as
pytest fixtures and adds the one origin only the tunnel tests need: ``ControlledOrigin``,
which counts the bytes it manages to send (to show back-pressure reaching it), can hold a
response half-way until the test releases it (a download that is provably in flight), and
can hold N requests until all N are waiting at once (to prove streams are concurrent); and
``EarlyRefusalOrigin``, which refuses uploads before reading them.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from proxy_fixtures import (
    IO_TIMEOUT,
    OriginServer,
    TlsMaterial,
    WebSocketEchoServer,
    iter_pattern,
    make_tls_material,
)

#: Size of one write of a download: small enough that the send counter tracks back-pressure closely.
WRITE_BLOCK = 64 * 1024


class _ControlledHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /bytes/N[?hold=K] (N pattern bytes, optionally pausing after K) and /gate/NAME."""

    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT
    server: _ControlledHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        parts = urlsplit(self.path)
        name, _, argument = parts.path.lstrip("/").partition("/")
        if name == "bytes" and argument.isdigit():
            hold = parse_qs(parts.query).get("hold", [""])[0]
            self._download(int(argument), int(hold) if hold.isdigit() else None)
        elif name == "gate" and argument:
            self._gate(argument)
        else:
            body = b"no such route\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _download(self, size: int, hold_after: int | None) -> None:
        origin = self.server.origin
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        written = 0
        for block in iter_pattern(size):  # the same bytes as pattern_bytes(size)
            for start in range(0, len(block), WRITE_BLOCK):
                if hold_after is not None and written >= hold_after:
                    hold_after = None
                    origin.holding.set()
                    if not origin.release.wait(IO_TIMEOUT):
                        self.close_connection = True
                        return  # never released: give up rather than hang a test
                piece = block[start : start + WRITE_BLOCK]
                self.wfile.write(piece)
                written += len(piece)
                origin.count_sent(len(piece))

    def _gate(self, name: str) -> None:
        try:
            self.server.origin.gate.wait(IO_TIMEOUT)
            status, body = 200, f"passed {name}".encode()
        except threading.BrokenBarrierError:
            status, body = 504, f"gate broken before {name} could pass".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _ControlledHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    origin: ControlledOrigin

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that vanished mid-download is expected here; don't print tracebacks."""


class ControlledOrigin:
    """An HTTP/1.1 origin on 127.0.0.1 whose pace the test controls (see the module docstring)."""

    def __init__(self, gate_parties: int = 1) -> None:
        self._server = _ControlledHTTPServer(("127.0.0.1", 0), _ControlledHandler)
        self._server.origin = self
        self._lock = threading.Lock()
        self._sent = 0
        self.holding = threading.Event()  # a /bytes?hold= response reached its pause
        self.release = threading.Event()  # let held responses continue
        self.gate = threading.Barrier(gate_parties)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="controlled-origin", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count_sent(self, size: int) -> None:
        with self._lock:
            self._sent += size

    @property
    def sent(self) -> int:
        """Body bytes handed to the kernel so far, over all responses."""
        with self._lock:
            return self._sent

    def start(self) -> ControlledOrigin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.gate.abort()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(IO_TIMEOUT)

    def __enter__(self) -> ControlledOrigin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EarlyRefusalOrigin:
    """Answers every request with 413 as soon as its head arrives and closes without reading the
    body, so the kernel resets the connection while the client is still uploading."""

    REPLY = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, name="early-refusal-origin", daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with conn:
                conn.settimeout(IO_TIMEOUT)
                head = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in head:
                        data = conn.recv(65536)
                        if not data:
                            break
                        head += data
                    conn.sendall(self.REPLY)

    def start(self) -> EarlyRefusalOrigin:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self._listener.close()
        self._thread.join(IO_TIMEOUT)

    def __enter__(self) -> EarlyRefusalOrigin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_until_sent_settles(origin: ControlledOrigin, quiet: float = 0.5, timeout: float = 20.0) -> int:
    """Poll until the origin's send counter stops moving for ``quiet`` seconds: it is blocked."""
    deadline = time.monotonic() + timeout
    last = origin.sent
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = origin.sent
        if now == last:
            return now
        last = now
    raise AssertionError(f"origin never stopped sending within {timeout} s (sent {origin.sent} bytes)")


# --------------------------------------------------------------------------- fixtures
# Import the ``*_fixture`` functions into a test module to use the fixture named without
# the suffix (the names differ so a test's argument does not shadow the import).


@pytest.fixture(name="tls_material", scope="module")
def tls_material_fixture(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("origin-tls"))


@pytest.fixture(name="http_origin", scope="module")
def http_origin_fixture() -> Iterator[OriginServer]:
    with OriginServer("alpha") as origin:
        yield origin


@pytest.fixture(name="second_origin", scope="module")
def second_origin_fixture() -> Iterator[OriginServer]:
    with OriginServer("beta") as origin:
        yield origin


@pytest.fixture(name="tls_origin", scope="module")
def tls_origin_fixture(tls_material: TlsMaterial) -> Iterator[OriginServer]:
    with OriginServer("secure", tls=tls_material.server_context()) as origin:
        yield origin


@pytest.fixture(name="ws_origin", scope="module")
def ws_origin_fixture() -> Iterator[WebSocketEchoServer]:
    with WebSocketEchoServer() as server:
        yield server


@pytest.fixture(name="wss_origin", scope="module")
def wss_origin_fixture(tls_material: TlsMaterial) -> Iterator[WebSocketEchoServer]:
    with WebSocketEchoServer(tls=tls_material.server_context()) as server:
        yield server


@pytest.fixture(name="controlled_origin")
def controlled_origin_fixture() -> Iterator[ControlledOrigin]:
    with ControlledOrigin() as origin:
        yield origin
