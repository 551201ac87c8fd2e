"""Loopback origins and dialers for exercising the local proxy with real sockets.

Reusable by any test that needs something behind the proxy: a keep-alive HTTP/1.1
origin that echoes what it received and serves deterministic downloads, the same
origin over TLS, WebSocket echo servers, a dialer that connects directly over TCP
(standing where the tunnel client stands in the product) and a dialer that always fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from websockets.sync.server import Server, ServerConnection, serve

from desktop import certificates
from desktop.direct import DirectDialer as ProductDirectDialer
from desktop.socket_stream import SocketStream
from server.egress import EgressPolicy
from server.framing import FailReason
from server.stream_api import DialError

#: Every network wait in these fixtures is bounded by this; it is a hang guard, not a measurement.
IO_TIMEOUT = 10.0
LOOPBACK_ONLY = EgressPolicy(["127.0.0.0/8", "::1/128"])

_PATTERN_BLOCK = random.Random(20240601).randbytes(1 << 20)


# --------------------------------------------------------------------------- dialers


class DirectDialer(ProductDirectDialer):
    """The agent's direct dialer under a loopback-only policy, recording what it dialled.

    It uses the tunnel server's own target dialer, so refusals, timeouts and policy
    denials carry the same reasons the tunnel would report.
    """

    def __init__(self, policy: EgressPolicy = LOOPBACK_ONLY, timeout: float = 5.0) -> None:
        super().__init__(policy, timeout)
        self.dialled: list[tuple[str, int]] = []

    async def dial(self, host: str, port: int) -> SocketStream:
        self.dialled.append((host, port))
        return await super().dial(host, port)


class FailingDialer:
    """Refuses every dial with the same DialError, to show how each failure reaches a client.

    ``reason`` is a FailReason's label ("dns", "tunnel_down"), as the client sees it.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        self.attempts = 0

    async def dial(self, host: str, port: int) -> SocketStream:
        self.attempts += 1
        raise DialError(FailReason[self.reason.upper()], self.message)


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- payloads


def pattern_bytes(size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes (a 1 MiB block repeated)."""
    repeats, rest = divmod(size, len(_PATTERN_BLOCK))
    return _PATTERN_BLOCK * repeats + _PATTERN_BLOCK[:rest]


def iter_pattern(size: int, block: int = 1 << 20) -> Iterator[memoryview]:
    view = memoryview(_PATTERN_BLOCK)
    while size > 0:
        take = min(size, block, len(view))
        yield view[:take]
        size -= take


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in iter_pattern(size):
        digest.update(piece)
    return digest.hexdigest()


# --------------------------------------------------------------------------- HTTP origin


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """Routes: /echo* (JSON of what arrived), /download/N, /chunked/N, /close/N, /truncate/N, /status/N."""

    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT
    server: _OriginHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._route()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _route(self) -> None:
        path = self.path
        if path.startswith("/echo"):
            self._echo()
            return
        name, _, argument = path.lstrip("/").partition("/")
        handler = {
            "download": self._download,
            "chunked": self._chunked,
            "close": self._until_close,
            "truncate": self._truncate,
            "status": self._status,
        }.get(name)
        if handler is None or not argument.isdigit():
            self._send_simple(404, b"no such route\n")
            return
        self._drain_body()
        handler(int(argument))

    # -- request bodies

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length)

    def _drain_body(self) -> None:
        self._read_body()

    # -- responses

    def _send_simple(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _echo(self) -> None:
        body = self._read_body()
        report = {
            "origin": self.server.name,
            "method": self.command,
            "path": self.path,
            "version": self.request_version,
            "headers": list(self.headers.items()),
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
        }
        self._send_simple(200, json.dumps(report).encode(), "application/json")

    def _download(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command != "HEAD":
            for piece in iter_pattern(size):
                self.wfile.write(piece)

    def _chunked(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Trailer", "X-Body-Sha256")
        self.end_headers()
        if self.command == "HEAD":
            return
        data = pattern_bytes(size)
        sizes = (1, 7, 4096, 65536 + 3, 300_000)
        offset = index = 0
        while offset < len(data):
            piece = data[offset : offset + sizes[index % len(sizes)]]
            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            offset += len(piece)
            index += 1
        self.wfile.write(b"0\r\nX-Body-Sha256: %s\r\n\r\n" % hashlib.sha256(data).hexdigest().encode())

    def _until_close(self, size: int) -> None:
        """An HTTP/1.0-style response whose body ends when the connection closes."""
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        )
        for piece in iter_pattern(size):
            self.wfile.write(piece)
        self.close_connection = True

    def _truncate(self, size: int) -> None:
        """Promise ``size`` bytes, send half, then drop the connection: an upstream dying mid-response."""
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(pattern_bytes(size // 2))
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _status(self, status: int) -> None:
        if status in (204, 304):
            self.send_response(status)
            self.end_headers()
            return
        self._send_simple(status, f"status {status}\n".encode())


class _OriginHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    name = "origin"


class OriginServer:
    """A keep-alive HTTP/1.1 origin on 127.0.0.1 (optionally TLS), run in a background thread."""

    def __init__(self, name: str = "origin", tls: ssl.SSLContext | None = None) -> None:
        self._server = _OriginHTTPServer(("127.0.0.1", 0), _OriginHandler)
        self._server.name = name
        if tls is not None:
            # Handshake lazily in the handler thread so one slow client cannot stall accept().
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"origin-{name}", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> OriginServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(IO_TIMEOUT)

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ScriptedOrigin:
    """A raw TCP origin: connection N reads one request head, sends ``replies[N]`` and closes.

    For behaviour a well-mannered server never shows: closing kept-alive connections
    silently, answering before reading an upload, unsolicited 1xx/101 responses.
    """

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(IO_TIMEOUT)
        self._thread = threading.Thread(target=self._serve, name="scripted-origin", daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def _serve(self) -> None:
        for reply in self.replies:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                self.requests.append(head)
                conn.sendall(reply)

    def __enter__(self) -> ScriptedOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join(IO_TIMEOUT)
        self._listener.close()


# --------------------------------------------------------------------------- WebSocket origin


class WebSocketEchoServer:
    """A WebSocket server on 127.0.0.1 that sends every message back (optionally over TLS)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._server: Server = serve(self._echo, "127.0.0.1", 0, ssl=tls, compression=None)
        self.scheme = "wss" if tls is not None else "ws"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ws-echo", daemon=True)

    @staticmethod
    def _echo(connection: ServerConnection) -> None:
        for message in connection:
            connection.send(message)

    @property
    def port(self) -> int:
        return int(self._server.socket.getsockname()[1])

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> WebSocketEchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(IO_TIMEOUT)

    def __enter__(self) -> WebSocketEchoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1, as PEM files."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context


def make_tls_material(directory: Path) -> TlsMaterial:
    """Create a CA and a serverAuth certificate (SAN localhost, 127.0.0.1) under ``directory``."""
    ca = certificates.generate_ca("proxy test CA", days=2)
    leaf = certificates.issue_leaf(
        ca, "server", "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"], days=2
    )
    directory.mkdir(parents=True, exist_ok=True)
    material = TlsMaterial(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certificates.write_certificate(material.ca_path, ca.certificate, force=True)
    certificates.write_certificate(material.cert_path, leaf.certificate, force=True)
    certificates.write_private_key(material.key_path, leaf.private_key, force=True)
    return material


# --------------------------------------------------------------------------- clients


def proxy_free_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without proxy settings, so a subprocess uses only explicit ones."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy")
    }
    env["NO_PROXY"] = ""
    env["no_proxy"] = ""
    env.update(extra or {})
    return env


def read_http_response(
    sock: socket.socket, buffer: bytearray | None = None, *, head_request: bool = False
) -> tuple[bytes, bytes]:
    """Read one response from ``sock``: (head, body); no chunked bodies.

    A deliberately small client for raw-socket tests; ``buffer`` carries bytes read past
    one response into the next call. 1xx, 204 and 304 responses and answers to HEAD
    have no body; otherwise Content-Length is used, or the body runs until close.
    """
    pending = buffer if buffer is not None else bytearray()
    while b"\r\n\r\n" not in pending:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed inside a response head: {bytes(pending)!r}")
        pending += data
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end])
    del pending[:end]
    status = int(head.split(b" ", 2)[1])
    if head_request or status < 200 or status in (204, 304):
        return head, b""
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        while data := sock.recv(65536):
            pending += data
        body = bytes(pending)
        pending.clear()
        return head, body
    while len(pending) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed inside a response body")
        pending += data
    body = bytes(pending[:length])
    del pending[:length]
    return head, body
