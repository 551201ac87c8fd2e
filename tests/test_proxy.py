"""The local proxy end to end: real sockets on 127.0.0.1, real curl, requests and websockets.

Upstream connections go through the ``dialer`` fixture. Here it dials directly; a test
module can re-run every test over another transport (the tunnel) by star-importing this
module and defining its own ``dialer`` fixture.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from proxy_fixtures import (
    IO_TIMEOUT,
    DirectDialer,
    FailingDialer,
    OriginServer,
    ScriptedOrigin,
    TlsMaterial,
    WebSocketEchoServer,
    closed_port,
    make_tls_material,
    pattern_sha256,
    proxy_free_env,
    read_http_response,
)
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.sync.client import connect as ws_connect
from websockets.uri import parse_uri

from desktop.dialing import Dialer
from desktop.proxy import LOGGER_NAME, LocalProxy, ProxyBindError
from desktop.socket_stream import SocketStream

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dialer() -> Dialer:
    return DirectDialer()


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def origin_a() -> Iterator[OriginServer]:
    with OriginServer("a") as origin:
        yield origin


@pytest.fixture(scope="module")
def origin_b() -> Iterator[OriginServer]:
    with OriginServer("b") as origin:
        yield origin


@pytest.fixture(scope="module")
def tls_origin(tls_material: TlsMaterial) -> Iterator[OriginServer]:
    with OriginServer("tls", tls=tls_material.server_context()) as origin:
        yield origin


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[WebSocketEchoServer]:
    with WebSocketEchoServer() as server:
        yield server


@pytest.fixture(scope="module")
def wss_origin(tls_material: TlsMaterial) -> Iterator[WebSocketEchoServer]:
    with WebSocketEchoServer(tls=tls_material.server_context()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(dialer: Dialer) -> Iterator[LocalProxy]:
    with LocalProxy(dialer, listen_port=0) as running:
        yield running


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., LocalProxy]]:
    started: list[LocalProxy] = []

    def make(dialer: Dialer, **options: Any) -> LocalProxy:
        instance = LocalProxy(dialer, listen_port=0, **options)
        instance.start()
        started.append(instance)
        return instance

    yield make
    for instance in started:
        instance.stop()


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    return caplog


def proxied_client(proxy: LocalProxy, *, credentials: str = "") -> requests.Session:
    client = requests.Session()
    client.trust_env = False
    url = proxy.url.replace("http://", f"http://{credentials}@") if credentials else proxy.url
    client.proxies = {"http": url, "https": url}
    return client


def curl(proxy: LocalProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", "--proxy", proxy.url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=proxy_free_env(),
        check=False,
    )


def raw_client(proxy: LocalProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def exchange(proxy: LocalProxy, raw: bytes) -> tuple[bytes, bytes]:
    with raw_client(proxy) as sock:
        sock.sendall(raw)
        return read_http_response(sock)


def header_names(report: dict[str, Any]) -> set[str]:
    return {name.lower() for name, _ in report["headers"]}


def header(report: dict[str, Any], name: str) -> str | None:
    return next((value for key, value in report["headers"] if key.lower() == name.lower()), None)


def warnings_logged(log: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in log.records if r.name == LOGGER_NAME and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- plain HTTP


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
def test_each_method_reaches_the_origin_rewritten_with_its_body(
    proxy: LocalProxy, origin_a: OriginServer, method: str
) -> None:
    body = bytes(range(256)) * 40
    with proxied_client(proxy, credentials="user:secret") as client:
        reply = client.request(method, origin_a.url("/echo/x?q=1&r=2"), data=body, timeout=IO_TIMEOUT)
    assert reply.status_code == 200
    report = reply.json()
    assert (report["method"], report["path"]) == (method, "/echo/x?q=1&r=2")
    assert (report["body_length"], report["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert header(report, "Host") == f"127.0.0.1:{origin_a.port}"
    assert not header_names(report) & {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


def test_curl_upload_hop_by_hop_fields_are_stripped(
    proxy: LocalProxy, origin_a: OriginServer, tmp_path: Path
) -> None:
    payload = tmp_path / "upload.bin"
    payload.write_bytes(bytes(range(256)) * 1200)
    result = curl(
        proxy,
        "--proxy-user",
        "user:secret",
        "--header",
        "Connection: X-Hop",
        "--header",
        "X-Hop: must not pass",
        "--header",
        "X-End-To-End: kept",
        "--data-binary",
        f"@{payload}",
        origin_a.url("/echo/curl"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert header(report, "X-End-To-End") == "kept"
    assert header(report, "Host") == f"127.0.0.1:{origin_a.port}"
    assert not header_names(report) & {
        "proxy-authorization",
        "proxy-connection",
        "x-hop",
        "connection",
        "expect",
    }


def test_curl_chunked_upload(proxy: LocalProxy, origin_a: OriginServer, tmp_path: Path) -> None:
    payload = tmp_path / "chunked.bin"
    payload.write_bytes(bytes(range(256)) * 4000)
    result = curl(
        proxy,
        "--header",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{payload}",
        origin_a.url("/echo/chunked-upload"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert header(report, "Transfer-Encoding") == "chunked"
    assert report["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()


def test_requests_generator_body_is_sent_chunked(proxy: LocalProxy, origin_a: OriginServer) -> None:
    pieces = [b"first", b"x" * 300_000, b"last"]
    with proxied_client(proxy) as client:
        report = client.post(origin_a.url("/echo"), data=iter(pieces), timeout=IO_TIMEOUT).json()
    assert header(report, "Transfer-Encoding") == "chunked"
    assert report["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


class _GatedDialer(DirectDialer):
    """Direct streams whose second send (the first body block) waits for the test's gate,
    as a tunnel stream waits for credit."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    async def dial(self, host: str, port: int) -> SocketStream:
        stream = await super().dial(host, port)
        send = stream.sendall
        calls = 0

        async def gated(data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
            nonlocal calls
            calls += 1
            await send(data, timeout)
            while calls == 2 and not self.gate.is_set():
                await asyncio.sleep(0.01)

        stream.sendall = gated  # type: ignore[method-assign]
        return stream


def test_a_chunked_body_tail_that_arrives_while_a_send_waits_is_relayed(
    make_proxy: Callable[..., LocalProxy], origin_a: OriginServer
) -> None:
    gate = threading.Event()
    proxy = make_proxy(_GatedDialer(gate))
    pieces = [b"x" * 100_000, b"last"]
    body = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"
    with raw_client(proxy) as sock:
        head = f"POST {origin_a.url('/echo')} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode() + body[:100_010])
        time.sleep(0.3)  # the proxy is inside the gated send now
        sock.sendall(body[100_010:])  # read while it waits
        time.sleep(0.3)
        gate.set()
        response, report_body = read_http_response(sock, bytearray())
    assert response.startswith(b"HTTP/1.1 200 ")
    assert json.loads(report_body)["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_expect_100_continue_is_answered_before_the_body(proxy: LocalProxy, origin_a: OriginServer) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(
            f"PUT {origin_a.url('/echo')} HTTP/1.1\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        pending = bytearray()
        interim, _ = read_http_response(sock, pending)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"hello")
        head, body = read_http_response(sock, pending)
    assert head.startswith(b"HTTP/1.1 200 ")
    report = json.loads(body)
    assert report["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "expect" not in header_names(report)


def test_keep_alive_serves_different_origins_on_one_client_connection(
    proxy: LocalProxy, origin_a: OriginServer, origin_b: OriginServer
) -> None:
    reports = []
    with raw_client(proxy) as sock:
        pending = bytearray()
        for origin in (origin_a, origin_a, origin_b, origin_a):
            sock.sendall(f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: ignored.example\r\n\r\n".encode())
            head, body = read_http_response(sock, pending)
            assert head.startswith(b"HTTP/1.1 200 ")
            reports.append(json.loads(body))
    assert [r["origin"] for r in reports] == ["a", "a", "b", "a"]
    assert [header(r, "Host") for r in reports] == [
        f"127.0.0.1:{origin_a.port}",
        f"127.0.0.1:{origin_a.port}",
        f"127.0.0.1:{origin_b.port}",
        f"127.0.0.1:{origin_a.port}",
    ]
    # The same origin twice in a row reuses one upstream connection.
    assert reports[0]["peer"] == reports[1]["peer"]


def test_pipelined_requests_are_answered_in_order(
    proxy: LocalProxy, origin_a: OriginServer, origin_b: OriginServer
) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(
            f"POST {origin_a.url('/echo/1')} HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
            f"GET {origin_b.url('/echo/2')} HTTP/1.1\r\n\r\n".encode()
        )
        pending = bytearray()
        first = json.loads(read_http_response(sock, pending)[1])
        second = json.loads(read_http_response(sock, pending)[1])
    assert (first["origin"], first["path"], first["body_length"]) == ("a", "/echo/1", 3)
    assert (second["origin"], second["path"]) == ("b", "/echo/2")


def test_http_1_0_client_gets_the_response_then_the_connection_closes(
    proxy: LocalProxy, origin_a: OriginServer
) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"GET {origin_a.url('/echo')} HTTP/1.0\r\n\r\n".encode())
        head, body = read_http_response(sock)
        assert json.loads(body)["version"] == "HTTP/1.0"
        assert sock.recv(1) == b""


def test_response_framings_are_tracked(proxy: LocalProxy, origin_a: OriginServer) -> None:
    with proxied_client(proxy) as client:
        chunked = client.get(origin_a.url("/chunked/1000003"), timeout=IO_TIMEOUT)
        assert chunked.headers["Transfer-Encoding"] == "chunked"
        assert hashlib.sha256(chunked.content).hexdigest() == pattern_sha256(1_000_003)
        head = client.head(origin_a.url("/download/5000"), timeout=IO_TIMEOUT)
        assert (head.status_code, head.headers["Content-Length"], head.content) == (200, "5000", b"")
        assert client.get(origin_a.url("/status/204"), timeout=IO_TIMEOUT).status_code == 204
        assert client.get(origin_a.url("/status/304"), timeout=IO_TIMEOUT).status_code == 304
        assert client.get(origin_a.url("/status/404"), timeout=IO_TIMEOUT).text == "status 404\n"
        closing = client.get(origin_a.url("/close/300000"), timeout=IO_TIMEOUT)
        assert hashlib.sha256(closing.content).hexdigest() == pattern_sha256(300_000)
        # The same client connection pool keeps working after each of those.
        assert client.get(origin_a.url("/echo"), timeout=IO_TIMEOUT).json()["origin"] == "a"


def test_chunked_response_then_next_request_on_the_same_connection(
    proxy: LocalProxy, origin_a: OriginServer
) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"GET {origin_a.url('/chunked/70000')} HTTP/1.1\r\n\r\n".encode())
        received = bytearray()
        while not received.endswith(b"\r\n\r\n") or b"\r\n0\r\n" not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200 ")
        assert b"X-Body-Sha256: " + pattern_sha256(70000).encode() in received
        sock.sendall(f"GET {origin_a.url('/echo/after')} HTTP/1.1\r\n\r\n".encode())
        assert json.loads(read_http_response(sock)[1])["path"] == "/echo/after"


def test_100_mib_download_is_intact(proxy: LocalProxy, origin_a: OriginServer) -> None:
    size = 100 * MIB
    digest = hashlib.sha256()
    with proxied_client(proxy) as client:
        reply = client.get(origin_a.url(f"/download/{size}"), stream=True, timeout=IO_TIMEOUT)
        assert reply.status_code == 200
        for block in reply.iter_content(MIB):
            digest.update(block)
    assert digest.hexdigest() == pattern_sha256(size)


def test_200_concurrent_requests_all_succeed(proxy: LocalProxy, origin_a: OriginServer) -> None:
    def fetch(index: int) -> str:
        with proxied_client(proxy) as client:
            reply = client.get(origin_a.url(f"/echo/{index}"), timeout=30)
            reply.raise_for_status()
            return str(reply.json()["path"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        paths = list(pool.map(fetch, range(200)))
    assert paths == [f"/echo/{index}" for index in range(200)]


# --------------------------------------------------------------------------- CONNECT and WebSocket


def test_https_through_connect_with_curl_and_requests(
    proxy: LocalProxy, tls_origin: OriginServer, tls_material: TlsMaterial
) -> None:
    result = curl(
        proxy,
        "--cacert",
        str(tls_material.ca_path),
        "--data-binary",
        "secret",
        tls_origin.url("/echo", "localhost"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["origin"], report["body_sha256"]) == ("tls", hashlib.sha256(b"secret").hexdigest())
    with proxied_client(proxy) as client:
        reply = client.get(
            tls_origin.url("/download/3000000", "localhost"),
            verify=str(tls_material.ca_path),
            timeout=IO_TIMEOUT,
        )
    assert hashlib.sha256(reply.content).hexdigest() == pattern_sha256(3_000_000)


def test_connect_forwards_pipelined_bytes_and_half_closes(proxy: LocalProxy) -> None:
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(IO_TIMEOUT)

    def count_until_eof() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(IO_TIMEOUT)
            data = bytearray()
            while chunk := conn.recv(65536):
                data += chunk
            received.append(bytes(data))
            conn.sendall(b"got %d bytes" % len(data))

    server = threading.Thread(target=count_until_eof, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    with raw_client(proxy) as sock:
        sock.sendall(
            f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\nearly bytes|".encode()
        )
        pending = bytearray()
        while b"\r\n\r\n" not in pending:
            pending += sock.recv(4096)
        head, _, rest = bytes(pending).partition(b"\r\n\r\n")
        assert head == b"HTTP/1.1 200 Connection established"
        sock.sendall(b"x" * 500_000)
        sock.shutdown(socket.SHUT_WR)
        reply = bytearray(rest)
        while chunk := sock.recv(65536):
            reply += chunk
    server.join(IO_TIMEOUT)
    listener.close()
    assert received == [b"early bytes|" + b"x" * 500_000]
    assert reply == b"got 500012 bytes"


def test_websocket_through_connect(proxy: LocalProxy, ws_origin: WebSocketEchoServer) -> None:
    with ws_connect(ws_origin.url("/chat"), proxy=proxy.url, open_timeout=IO_TIMEOUT) as ws:
        ws.send("hello")
        assert ws.recv(timeout=IO_TIMEOUT) == "hello"
        ws.send(b"\x00\x01" * 40000)
        assert ws.recv(timeout=IO_TIMEOUT) == b"\x00\x01" * 40000


def test_secure_websocket_through_connect(
    proxy: LocalProxy, wss_origin: WebSocketEchoServer, tls_material: TlsMaterial
) -> None:
    with ws_connect(
        wss_origin.url("/chat", "localhost"),
        proxy=proxy.url,
        ssl=tls_material.client_context(),
        open_timeout=IO_TIMEOUT,
    ) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=IO_TIMEOUT) == "over tls"


def test_websocket_upgrade_in_absolute_form_switches_to_a_raw_relay(
    proxy: LocalProxy, ws_origin: WebSocketEchoServer
) -> None:
    protocol = ClientProtocol(parse_uri(ws_origin.url("/chat")))
    protocol.send_request(protocol.connect())
    handshake = b"".join(protocol.data_to_send())
    absolute = handshake.replace(b"GET /chat ", f"GET http://127.0.0.1:{ws_origin.port}/chat ".encode(), 1)
    with raw_client(proxy) as sock:
        sock.sendall(absolute)
        events: list[object] = []

        def pump_until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                data = sock.recv(65536)
                assert data, "proxy closed the WebSocket"
                protocol.receive_data(data)
                events.extend(protocol.events_received())

        def echoed(message: bytes) -> Callable[[], bool]:
            return lambda: any(isinstance(e, Frame) and e.data == message for e in events)

        pump_until(lambda: any(isinstance(e, Response) for e in events))
        response = next(e for e in events if isinstance(e, Response))
        assert response.status_code == 101
        for message in (b"first", b"second" * 10000):
            protocol.send_binary(message)
            sock.sendall(b"".join(protocol.data_to_send()))
            pump_until(echoed(message))
        assert all(e.opcode == Opcode.BINARY for e in events if isinstance(e, Frame))


def test_refused_upgrade_continues_as_plain_http(proxy: LocalProxy, origin_a: OriginServer) -> None:
    upgrade = (
        f"GET {origin_a.url('/echo/ws')} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with raw_client(proxy) as sock:
        sock.sendall(upgrade.encode())
        pending = bytearray()
        report = json.loads(read_http_response(sock, pending)[1])
        assert (header(report, "Upgrade"), header(report, "Connection")) == ("websocket", "Upgrade")
        sock.sendall(f"GET {origin_a.url('/echo/next')} HTTP/1.1\r\n\r\n".encode())
        assert json.loads(read_http_response(sock, pending)[1])["path"] == "/echo/next"


# --------------------------------------------------------------------------- failures a client sees


def assert_error(head: bytes, body: bytes, status: int, *words: str) -> None:
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert b"Content-Type: text/plain; charset=utf-8" in head
    text = body.decode()
    assert text.startswith("Fluidity proxy: ")
    for word in words:
        assert word in text


def test_garbage_gets_400_and_the_proxy_keeps_serving(
    proxy: LocalProxy, origin_a: OriginServer, proxy_log: pytest.LogCaptureFixture
) -> None:
    head, body = exchange(proxy, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage")
    assert_error(head, body, 400, "not HTTP")
    head, body = exchange(proxy, b"hello there\r\n\r\n")
    assert_error(head, body, 400, "request line")
    with proxied_client(proxy) as client:
        assert client.get(origin_a.url("/echo"), timeout=IO_TIMEOUT).status_code == 200
    failures = warnings_logged(proxy_log)
    assert len(failures) == 2
    assert all(r.exc_info is None and "400" in r.getMessage() for r in failures)


@pytest.mark.parametrize(
    ("request_line", "words"),
    [
        ("GET https://127.0.0.1:1/ HTTP/1.1", ("CONNECT",)),
        ("GET /just/a/path HTTP/1.1", ("this is a proxy",)),
        ("CONNECT no-port.example HTTP/1.1", ("host:port",)),
    ],
)
def test_requests_a_proxy_cannot_serve_get_400(
    proxy: LocalProxy, request_line: str, words: tuple[str, ...]
) -> None:
    head, body = exchange(proxy, f"{request_line}\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert_error(head, body, 400, *words)


def test_conflicting_body_framing_gets_400(proxy: LocalProxy, origin_a: OriginServer) -> None:
    head, body = exchange(
        proxy,
        f"POST {origin_a.url('/echo')} HTTP/1.1\r\n"
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc".encode(),
    )
    assert_error(head, body, 400, "Transfer-Encoding and Content-Length")


#: A whole second request, hidden in the body of the first.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    ("option", "framing", "body"),
    [
        ("content-length", f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
        ("Content-Length, close", f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
        (
            "keep-alive, Transfer-Encoding",
            "Transfer-Encoding: chunked",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
        ),
        ("host", f"Content-Length: {len(SMUGGLED)}", SMUGGLED),
    ],
)
def test_smuggling_through_a_connection_option_gets_400_and_nothing_reaches_the_origin(
    proxy: LocalProxy, option: str, framing: str, body: bytes
) -> None:
    """Issue 9: dropping the framing field a Connection option names would forward a POST with
    no length, so the origin would read the body as a second request whose response the
    client's next request would get. Instead the request is refused before anything is dialled."""
    with ScriptedOrigin([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]) as origin:
        url = f"http://127.0.0.1:{origin.port}"
        with raw_client(proxy) as sock:
            fields = f"Host: 127.0.0.1\r\nConnection: {option}\r\n{framing}\r\n"
            sock.sendall(
                f"POST {url}/upload HTTP/1.1\r\n{fields}\r\n".encode()
                + body
                + f"GET {url}/next HTTP/1.1\r\n\r\n".encode()
            )
            head, text = read_http_response(sock)
            assert_error(head, text, 400, "Connection header names", "framing")
            assert sock.recv(65536) == b"", "nothing after the refusal is served"
        # The origin's first (and only) connection is this later, honest request.
        assert exchange(proxy, f"GET {url}/legit HTTP/1.1\r\n\r\n".encode())[1] == b"ok"
    assert [request.split(b"\r\n")[0] for request in origin.requests] == [b"GET /legit HTTP/1.1"]
    assert b"smuggled" not in b"".join(origin.requests)


def test_a_64_kib_uri_gets_414(proxy: LocalProxy, origin_a: OriginServer) -> None:
    head, body = exchange(proxy, f"GET {origin_a.url('/echo/')}{'a' * 65536} HTTP/1.1\r\n\r\n".encode())
    assert_error(head, body, 414, "URI too long", "request line is longer than 65536 bytes")
    assert b"Proxy-Status: fluidity; error=http_request_error" in head


@pytest.mark.parametrize(
    ("path", "fields", "words"),
    [
        ("/echo", f"X-Big: {'a' * 70_000}\r\n", "larger than 65536 bytes"),
        ("/echo", "".join(f"Cookie-{i}: {'c' * 60}\r\n" for i in range(1200)), "larger than 65536 bytes"),
        (f"/echo/{'u' * 60_000}", f"Cookie: {'c' * 10_000}\r\n", "header fields too large"),
        ("/echo", "".join(f"X-{i}: {i}\r\n" for i in range(150)), "too many header fields"),
    ],
)
def test_oversized_header_block_gets_431(
    proxy: LocalProxy, origin_a: OriginServer, path: str, fields: str, words: str
) -> None:
    head, body = exchange(proxy, f"GET {origin_a.url(path)} HTTP/1.1\r\n{fields}\r\n".encode())
    assert_error(head, body, 431, words)


def test_slow_head_gets_408_and_the_timer_covers_the_whole_head(
    make_proxy: Callable[..., LocalProxy], dialer: Dialer, origin_a: OriginServer
) -> None:
    slow = make_proxy(dialer, header_timeout=0.6)
    with raw_client(slow) as sock:
        sock.sendall(f"GET {origin_a.url('/echo')} HTTP/1.1\r\n".encode())
        # Drip a header line every 50 ms, far inside the timeout: only a timer for the
        # whole head (not one per recv) stops this. Stop as soon as the answer is there.
        for _ in range(int(IO_TIMEOUT / 0.05)):
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                break
            sock.sendall(b"X-Drip: 1\r\n")
        head, body = read_http_response(sock)
    assert_error(head, body, 408, "not complete within 0.6 s")


def test_silent_client_is_closed_without_a_response(
    make_proxy: Callable[..., LocalProxy], dialer: Dialer
) -> None:
    quiet = make_proxy(dialer, header_timeout=0.3)
    with raw_client(quiet) as sock:
        assert sock.recv(1024) == b""


def test_policy_refusal_gets_403_with_the_reason(
    make_proxy: Callable[..., LocalProxy], proxy_log: pytest.LogCaptureFixture
) -> None:
    # A real egress-policy decision: 10.0.0.1 is private, so it is judged, never dialled.
    guarded = make_proxy(DirectDialer())
    head, body = exchange(guarded, b"GET http://10.0.0.1:8080/x HTTP/1.1\r\n\r\n")
    assert_error(head, body, 403, "10.0.0.1:8080", "egress policy", "private", "(policy)")
    assert b"Proxy-Status: fluidity; error=http_request_denied" in head
    [record] = warnings_logged(proxy_log)
    assert "403" in record.getMessage() and record.exc_info is None


def test_policy_refusal_of_connect_reaches_curl(make_proxy: Callable[..., LocalProxy]) -> None:
    guarded = make_proxy(FailingDialer("policy", "port 25 is not in the egress port allow-list"))
    result = curl(guarded, "--verbose", "https://mail.example:25/")
    assert result.returncode != 0
    assert "403" in result.stderr


def test_refused_connection_gets_502(proxy: LocalProxy, proxy_log: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    head, body = exchange(proxy, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n".encode())
    assert_error(head, body, 502, f"127.0.0.1:{port}", "(refused)")
    head, body = exchange(proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert_error(head, body, 502, "(refused)")
    assert len(warnings_logged(proxy_log)) == 2


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("timeout", 504),
        ("dns", 502),
        ("unreachable", 502),
        ("tunnel_down", 502),
        ("limit", 502),
        ("internal", 502),
        ("shutting_down", 502),
        ("cancelled", 502),
    ],
)
def test_dial_failures_map_to_statuses(
    make_proxy: Callable[..., LocalProxy], proxy_log: pytest.LogCaptureFixture, reason: str, status: int
) -> None:
    failing = make_proxy(FailingDialer(reason, f"simulated {reason}"))
    for request in (
        b"GET http://site.example/ HTTP/1.1\r\n\r\n",
        b"CONNECT site.example:443 HTTP/1.1\r\n\r\n",
    ):
        head, body = exchange(failing, request)
        assert_error(head, body, status, "site.example", f"simulated {reason}", f"({reason})")
    with raw_client(failing) as sock:
        sock.sendall(b"HEAD http://site.example/ HTTP/1.1\r\n\r\n")
        head, _ = read_http_response(sock, head_request=True)
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        assert sock.recv(1024) == b"", "an answer to HEAD has no body"
    assert all(r.exc_info is None for r in warnings_logged(proxy_log))


class _BrokenDialer:
    """A dialer whose transport fails underneath it instead of raising DialError."""

    async def dial(self, host: str, port: int) -> Any:
        raise ConnectionResetError("link reset while opening")


def test_a_transport_error_escaping_the_dialer_is_a_502(make_proxy: Callable[..., LocalProxy]) -> None:
    broken = make_proxy(_BrokenDialer())
    head, body = exchange(broken, b"GET http://site.example/ HTTP/1.1\r\n\r\n")
    assert_error(head, body, 502, "link reset while opening", "(internal)")


def test_curl_shows_the_failure_text(make_proxy: Callable[..., LocalProxy]) -> None:
    failing = make_proxy(FailingDialer("dns", "cannot resolve 'nowhere.example'"))
    result = curl(failing, "--write-out", "%{http_code}", "http://nowhere.example/")
    assert result.stdout.splitlines() == [
        "Fluidity proxy: cannot resolve nowhere.example:80: cannot resolve 'nowhere.example' (dns)",
        "502",
    ]


def test_upstream_dying_mid_response_closes_the_client(
    proxy: LocalProxy, origin_a: OriginServer, proxy_log: pytest.LogCaptureFixture
) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"GET {origin_a.url('/truncate/400000')} HTTP/1.1\r\n\r\n".encode())
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"Content-Length: 400000" in head
    assert len(body) == 200_000
    assert any("mid-response" in r.getMessage() for r in warnings_logged(proxy_log))


def test_origin_answering_before_taking_the_whole_body_is_relayed(proxy: LocalProxy) -> None:
    """An origin that refuses an upload early and closes (with the upload unread, so the
    kernel resets the connection): the client still gets the refusal."""
    refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
    size = 8 * MIB
    with ScriptedOrigin([refusal]) as origin, raw_client(proxy) as sock:
        sock.sendall(
            f"PUT http://127.0.0.1:{origin.port}/up HTTP/1.1\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        with contextlib.suppress(OSError):
            sock.sendall(b"u" * size)
        head, body = read_http_response(sock)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert body == b"too large"


def test_stale_kept_alive_upstream_is_replaced_transparently(proxy: LocalProxy) -> None:
    """An origin that closes idle connections without saying so: the next request is retried once."""
    replies = [b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswer %d" % index for index in range(2)]
    with ScriptedOrigin(replies) as origin, raw_client(proxy) as sock:
        pending = bytearray()
        bodies = []
        for _ in range(2):
            sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n\r\n".encode())
            bodies.append(read_http_response(sock, pending)[1])
    assert bodies == [b"answer 0", b"answer 1"]
    assert len(origin.requests) == 2


@pytest.mark.parametrize(("version", "relayed"), [("HTTP/1.1", True), ("HTTP/1.0", False)])
def test_interim_responses_reach_http_1_1_clients_only(
    proxy: LocalProxy, version: str, relayed: bool
) -> None:
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    with ScriptedOrigin([reply]) as origin, raw_client(proxy) as sock:
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/ {version}\r\n\r\n".encode())
        pending = bytearray()
        heads = [read_http_response(sock, pending)]
        if relayed:
            heads.append(read_http_response(sock, pending))
    assert [head.split(b"\r\n")[0] for head, _ in heads] == (
        [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"] if relayed else [b"HTTP/1.1 200 OK"]
    )
    assert heads[-1][1] == b"ok"


def test_unasked_protocol_switch_from_upstream_is_a_502(proxy: LocalProxy) -> None:
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    with ScriptedOrigin([switch]) as origin:
        head, body = exchange(
            proxy, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n".encode()
        )
    assert_error(head, body, 502, "switched protocols")
    assert b"upgrade" not in origin.requests[0].lower()


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting Content-Length"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed response"),
        (b"", "closed the connection without a response"),
    ],
)
def test_broken_upstream_responses_are_a_502(proxy: LocalProxy, reply: bytes, words: str) -> None:
    with ScriptedOrigin([reply]) as origin:
        head, body = exchange(proxy, f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n\r\n".encode())
    assert_error(head, body, 502, words)


def test_a_connection_option_cannot_unframe_a_response(proxy: LocalProxy) -> None:
    """The response head is relayed as is: its Content-Length still ends the body, so the client
    connection stays in step and carries the next exchange."""
    replies = [
        b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
    ]
    with ScriptedOrigin(replies) as origin, raw_client(proxy) as sock:
        pending = bytearray()
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/1 HTTP/1.1\r\n\r\n".encode())
        head, body = read_http_response(sock, pending)
        assert (b"Content-Length: 5" in head, body) == (True, b"hello")
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/2 HTTP/1.1\r\n\r\n".encode())
        assert read_http_response(sock, pending)[1] == b"next"


def test_content_length_beside_transfer_encoding_is_not_relayed(proxy: LocalProxy) -> None:
    """RFC 9112 §6.3: the proxy frames by Transfer-Encoding, so a client must not see a length to trust."""
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
    ]
    with ScriptedOrigin(replies) as origin, raw_client(proxy) as sock:
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/1 HTTP/1.1\r\n\r\n".encode())
        received = bytearray()
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed early after {bytes(received)!r}"
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/2 HTTP/1.1\r\n\r\n".encode())
        assert read_http_response(sock)[1] == b"next"


# --------------------------------------------------------------------------- lifecycle


def test_defaults_bind_loopback_and_report_the_real_port(dialer: Dialer) -> None:
    with LocalProxy(dialer, listen_port=0) as fresh:
        host, port = fresh.address
        assert host == "127.0.0.1" and port > 0
        assert fresh.url == f"http://127.0.0.1:{port}"
        assert fresh.running


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_loopback_listener(dialer: Dialer, origin_a: OriginServer) -> None:
    with LocalProxy(dialer, "::1", 0) as on_v6:
        assert on_v6.url == f"http://[::1]:{on_v6.address[1]}"
        with proxied_client(on_v6) as client:
            report = client.get(origin_a.url("/echo/v6"), timeout=IO_TIMEOUT).json()
    assert report["path"] == "/echo/v6"


def test_port_in_use_is_a_clear_bind_error(proxy: LocalProxy, dialer: Dialer) -> None:
    with pytest.raises(ProxyBindError, match=f"cannot listen on 127.0.0.1:{proxy.address[1]}"):
        LocalProxy(dialer, listen_port=proxy.address[1]).start()


def test_stop_closes_open_tunnels_and_client_connections(dialer: Dialer, origin_a: OriginServer) -> None:
    doomed = LocalProxy(dialer, listen_port=0)
    doomed.start()
    tunnel = raw_client(doomed)
    tunnel.sendall(f"CONNECT 127.0.0.1:{origin_a.port} HTTP/1.1\r\n\r\n".encode())
    assert tunnel.recv(4096).startswith(b"HTTP/1.1 200 ")
    idle = raw_client(doomed)
    idle.sendall(f"GET {origin_a.url('/echo')} HTTP/1.1\r\n\r\n".encode())
    read_http_response(idle)
    assert doomed.active_connections == 2
    doomed.stop()
    assert tunnel.recv(4096) == b""
    assert idle.recv(4096) == b""
    assert doomed.active_connections == 0
    assert not doomed.running
    with pytest.raises(RuntimeError):
        _ = doomed.address
    tunnel.close()
    idle.close()


def test_tls_client_hello_sent_to_the_plain_proxy_port_is_refused(proxy: LocalProxy) -> None:
    context = ssl.create_default_context()
    with raw_client(proxy) as sock, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(sock, server_hostname="localhost")
