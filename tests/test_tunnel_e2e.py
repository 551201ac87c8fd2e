"""Traffic through the whole chain: client -> agent proxy -> one mTLS tunnel -> server process -> origin.

Real clients (curl, requests, websockets) talk to a real agent whose tunnel ends in a
`fluidity-server` child process; the origins listen on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import random
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from origin_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    ControlledOrigin,
    EarlyRefusalOrigin,
    http_origin_fixture,
    second_origin_fixture,
    tls_material_fixture,
    tls_origin_fixture,
    ws_origin_fixture,
    wss_origin_fixture,
)
from proxy_fixtures import (
    IO_TIMEOUT,
    OriginServer,
    TlsMaterial,
    WebSocketEchoServer,
    pattern_sha256,
    read_http_response,
)
from tunnel_fixtures import RunningAgent, ServerProcess, clean_env, curl, proxy_session
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.sync.client import connect as ws_connect
from websockets.uri import parse_uri

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
BODY = random.Random(7).randbytes(300_000)
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def body_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.bin"
    path.write_bytes(BODY)
    return path


def header(report: dict[str, Any], name: str) -> str | None:
    """A request header as the origin saw it (case-insensitive name)."""
    return next((value for key, value in report["headers"] if key.lower() == name.lower()), None)


def assert_echo(report: dict[str, Any], origin: str, method: str, path: str) -> None:
    assert (report["origin"], report["method"], report["path"]) == (origin, method, path)
    assert (report["body_length"], report["body_sha256"]) == (len(BODY), BODY_SHA256)


# --------------------------------------------------------------------------- plain HTTP


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method", METHODS)
def test_curl_sends_every_method_with_a_body(
    agent: RunningAgent, http_origin: OriginServer, body_file: Path, method: str, chunked: bool
) -> None:
    extra = ["--header", "Transfer-Encoding: chunked"] if chunked else []
    result = curl(
        agent.proxy_url,
        "--request", method,
        "--data-binary", f"@{body_file}",
        *extra,
        http_origin.url(f"/echo/{method.lower()}?q=1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_echo(report, "alpha", method, f"/echo/{method.lower()}?q=1")
    if chunked:
        assert header(report, "Transfer-Encoding") == "chunked"
        assert header(report, "Content-Length") is None
    else:
        assert header(report, "Content-Length") == str(len(BODY))


def test_requests_sends_every_method_with_fixed_and_chunked_bodies(
    agent: RunningAgent, http_origin: OriginServer
) -> None:
    def pieces() -> Iterator[bytes]:
        for start in range(0, len(BODY), 70_001):
            yield BODY[start : start + 70_001]

    with proxy_session(agent.proxy_url) as session:
        for method in METHODS:
            fixed = session.request(method, http_origin.url("/echo/fixed"), data=BODY, timeout=IO_TIMEOUT)
            assert fixed.status_code == 200
            assert_echo(fixed.json(), "alpha", method, "/echo/fixed")
            streamed = session.request(
                method, http_origin.url("/echo/gen"), data=pieces(), timeout=IO_TIMEOUT
            )
            assert streamed.status_code == 200
            assert_echo(streamed.json(), "alpha", method, "/echo/gen")
            assert header(streamed.json(), "Transfer-Encoding") == "chunked"


def test_requests_receives_a_chunked_response_with_trailer(
    agent: RunningAgent, http_origin: OriginServer
) -> None:
    size = 5 * MIB + 17
    with proxy_session(agent.proxy_url) as session:
        response = session.get(http_origin.url(f"/chunked/{size}"), timeout=IO_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)


def test_keep_alive_serves_two_origins_in_turn_on_one_client_connection(
    agent: RunningAgent, http_origin: OriginServer, second_origin: OriginServer
) -> None:
    pending = bytearray()
    seen = []
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        for origin in (http_origin, second_origin, http_origin, second_origin):
            url = origin.url("/echo/keepalive")
            sock.sendall(
                f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n".encode()
                + BODY
            )
            head, body = read_http_response(sock, pending)
            assert head.startswith(b"HTTP/1.1 200 "), head
            report = json.loads(body)
            assert_echo(report, report["origin"], "POST", "/echo/keepalive")
            seen.append(report["origin"])
    assert seen == ["alpha", "beta", "alpha", "beta"]


def test_origin_refusing_an_upload_early_gets_its_answer_through(agent: RunningAgent) -> None:
    """The origin answers 413 and resets while the body is still coming: the server must relay
    the answer it already received before tearing the stream down, not replace it with a 502."""
    size = 8 * MIB  # more than the socket buffers and windows on the way can absorb
    with EarlyRefusalOrigin() as origin:
        for attempt in range(10):  # the answer and the reset race inside the server: try often
            with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
                sock.sendall(
                    f"PUT http://127.0.0.1:{origin.port}/upload HTTP/1.1\r\n"
                    f"Content-Length: {size}\r\n\r\n".encode()
                )
                with contextlib.suppress(OSError):
                    sock.sendall(b"u" * size)
                head, body = read_http_response(sock)
            assert head.startswith(b"HTTP/1.1 413 "), (attempt, head, body)
            assert body == b"too large"


# --------------------------------------------------------------------------- HTTPS via CONNECT


def test_curl_https_through_connect(
    agent: RunningAgent, tls_origin: OriginServer, tls_material: TlsMaterial, body_file: Path
) -> None:
    result = curl(
        agent.proxy_url,
        "--cacert", str(tls_material.ca_path),
        "--data-binary", f"@{body_file}",
        tls_origin.url("/echo/secret", "localhost"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_echo(json.loads(result.stdout), "secure", "POST", "/echo/secret")


def test_requests_https_through_connect(
    agent: RunningAgent, tls_origin: OriginServer, tls_material: TlsMaterial
) -> None:
    size = 3 * MIB
    with proxy_session(agent.proxy_url) as session:
        session.verify = str(tls_material.ca_path)
        for method in METHODS:
            response = session.request(
                method, tls_origin.url("/echo/tls", "localhost"), data=BODY, timeout=IO_TIMEOUT
            )
            assert_echo(response.json(), "secure", method, "/echo/tls")
        download = session.get(tls_origin.url(f"/download/{size}", "localhost"), timeout=IO_TIMEOUT)
    assert hashlib.sha256(download.content).hexdigest() == pattern_sha256(size)


# --------------------------------------------------------------------------- volume and concurrency


def test_100_mib_download_arrives_intact(agent: RunningAgent, http_origin: OriginServer) -> None:
    size = 100 * MIB
    command = [
        "curl", "--silent", "--show-error", "--fail", "--max-time", "60",
        "--proxy", agent.proxy_url, http_origin.url(f"/download/{size}"),
    ]  # fmt: skip
    digest = hashlib.sha256()
    received = 0
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        while block := process.stdout.read(MIB):
            digest.update(block)
            received += len(block)
        error = process.stderr.read()
        code = process.wait(10)
    assert code == 0, error
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)


def test_200_streams_are_open_at_the_same_time(agent: RunningAgent, tunnel_server: ServerProcess) -> None:
    """Every request is held by the origin until all 200 are waiting, so they must share the tunnel."""
    count = 200
    with ControlledOrigin(gate_parties=count) as origin:

        def fetch(index: int) -> tuple[int, bytes]:
            with proxy_session(agent.proxy_url) as session:
                response = session.get(origin.url(f"/gate/{index}"), timeout=30)
                return response.status_code, response.content

        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            results = list(pool.map(fetch, range(count)))
    assert results == [(200, f"passed {index}".encode()) for index in range(count)]
    assert agent.agent.stats().consecutive_failures == 0
    assert tunnel_server.messages("tunnel connected") and not tunnel_server.messages("stream failed")


# --------------------------------------------------------------------------- WebSocket


def _echo_over_websocket(url: str, proxy_url: str, **options: Any) -> None:
    with ws_connect(url, proxy=proxy_url, open_timeout=IO_TIMEOUT, **options) as ws:
        ws.send("hello through the tunnel")
        assert ws.recv(timeout=IO_TIMEOUT) == "hello through the tunnel"
        payload = random.Random(3).randbytes(700_000)
        ws.send(payload)
        assert ws.recv(timeout=IO_TIMEOUT) == payload


def test_websocket_echo_over_ws(agent: RunningAgent, ws_origin: WebSocketEchoServer) -> None:
    _echo_over_websocket(ws_origin.url("/chat"), agent.proxy_url)


def test_websocket_echo_over_wss(
    agent: RunningAgent, wss_origin: WebSocketEchoServer, tls_material: TlsMaterial
) -> None:
    _echo_over_websocket(
        wss_origin.url("/chat", "localhost"), agent.proxy_url, ssl=tls_material.client_context()
    )


def test_websocket_upgrade_in_absolute_form(agent: RunningAgent, ws_origin: WebSocketEchoServer) -> None:
    """A plain-HTTP proxy client (no CONNECT) upgrades in place; the tunnel then carries raw frames."""
    protocol = ClientProtocol(parse_uri(ws_origin.url("/chat")))
    protocol.send_request(protocol.connect())
    handshake = b"".join(protocol.data_to_send())
    absolute = handshake.replace(
        b"GET /chat ", f"GET {ws_origin.url('/chat')} ".encode().replace(b"ws://", b"http://"), 1
    )
    events: list[object] = []
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:

        def pump_until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                data = sock.recv(65536)
                assert data, "the proxy closed the WebSocket"
                protocol.receive_data(data)
                events.extend(protocol.events_received())

        sock.sendall(absolute)
        pump_until(lambda: any(isinstance(event, Response) for event in events))
        response = next(event for event in events if isinstance(event, Response))
        assert response.status_code == 101
        for message in (b"first", b"second" * 50_000):
            protocol.send_binary(message)
            sock.sendall(b"".join(protocol.data_to_send()))
            pump_until(lambda m=message: any(isinstance(e, Frame) and e.data == m for e in events))  # type: ignore[misc]
