"""The traffic meter counts what the proxy really relays: a download through the tunnel is
counted within 1 % of the bytes the origin sent, over plain HTTP and over CONNECT."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import pytest
from origin_fixtures import http_origin_fixture  # noqa: F401  (registers the fixture)
from proxy_fixtures import IO_TIMEOUT, OriginServer, pattern_sha256
from tunnel_fixtures import Pki, ServerProcess, agent_config

from desktop.agent import Agent
from desktop.lifecycle.base import Endpoint
from desktop.usage import UsageStore

SIZE = 8 * 1024 * 1024
Metered = tuple[Agent, UsageStore]


@pytest.fixture
def metered(pki: Pki, tunnel_server: ServerProcess) -> Iterator[tuple[Agent, UsageStore]]:
    store = UsageStore(None)  # in memory: nothing is written
    agent = Agent(agent_config(pki, tunnel_server.port), meter=store)
    agent.start(Endpoint("127.0.0.1", tunnel_server.port))
    assert agent.wait_connected(10.0), agent.stats().last_error
    yield agent, store
    agent.stop()


def read_body(sock: socket.socket, size: int) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    body = data.partition(b"\r\n\r\n")[2]
    digest = hashlib.sha256(body)
    received = len(body)
    while received < size:
        chunk = sock.recv(1024 * 1024)
        assert chunk, "the download ended early"
        digest.update(chunk)
        received += len(chunk)
    return digest.hexdigest()


def test_a_plain_http_download_is_counted(metered: Metered, http_origin: OriginServer) -> None:
    agent, store = metered
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"GET {http_origin.url(f'/download/{SIZE}')} HTTP/1.1\r\nHost: o\r\n\r\n".encode())
        assert read_body(sock, SIZE) == pattern_sha256(SIZE)
    today = store.day()
    assert SIZE <= today.down <= SIZE * 1.01
    assert 0 < today.up < 1000  # the request head
    assert today.top_hosts(1)[0][0] == "127.0.0.1"
    assert store.metering


def test_a_download_over_connect_is_counted(metered: Metered, http_origin: OriginServer) -> None:
    agent, store = metered
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{http_origin.port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.sendall(f"GET /download/{SIZE} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n".encode())
        assert read_body(sock, SIZE) == pattern_sha256(SIZE)
    assert SIZE <= store.day().down <= SIZE * 1.01
