"""Flow control through the real chain: a reader that stops reading stalls only its own stream.

Credit-based windows must hold the stalled stream's unsent data where it came from (the
origin's socket) instead of in the agent's or the server's memory, while other streams on
the same tunnel run at full speed. Memory is read from the outside: the agent stream's
buffered byte count, and the server process's resident set size from /proc.
"""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest
from origin_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    ControlledOrigin,
    controlled_origin_fixture,
    http_origin_fixture,
    wait_until_sent_settles,
)
from proxy_fixtures import IO_TIMEOUT, OriginServer, pattern_sha256
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    AgentFactory,
    RunningAgent,
    ServerFactory,
    agent_factory_fixture,
    process_rss,
    server_factory_fixture,
)

from server.tunnel_session import TunnelStream

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
STALLED_SIZE = 200 * MIB
#: RSS growth allowed while a stalled stream's origin keeps pushing 200 MiB at the server.
RSS_SLACK = 8 * MIB


def agent_streams_to(agent: RunningAgent, port: int) -> list[TunnelStream]:
    """The agent's tunnel streams to 127.0.0.1:``port`` (reads the tunnel client's current session)."""
    client = agent.agent._client
    assert client is not None
    session = client._session
    assert session is not None, "agent has no tunnel"
    relays = list(session.relays.values())  # a snapshot: the loop thread owns the dict
    return [stream for stream in relays if isinstance(stream, TunnelStream) and stream.port == port]


def download_through(agent: RunningAgent, url: str, size: int) -> str:
    """GET ``url`` through the agent's proxy on a raw socket; the body's sha256."""
    digest = hashlib.sha256()
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: origin\r\n\r\n".encode())
        body = read_head(sock)
        digest.update(body)
        received = len(body)
        while received < size:
            block = sock.recv(MIB)
            assert block, f"connection closed after {received} of {size} bytes"
            digest.update(block)
            received += len(block)
    assert received == size
    return digest.hexdigest()


def read_head(sock: socket.socket) -> bytes:
    """Read a response head; return the body bytes that came with it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed inside the response head: {buffer!r}"
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return rest


@pytest.mark.parametrize(
    "window",
    [None, 64 * 1024],
    ids=["default-window", "64k-window"],
)
def test_a_stalled_reader_holds_back_only_its_own_stream(
    server_factory: ServerFactory,
    agent_factory: AgentFactory,
    http_origin: OriginServer,
    controlled_origin: ControlledOrigin,
    window: int | None,
) -> None:
    flags = ("--initial-window", str(window), "--max-payload", "16384") if window else ()
    server = server_factory(*flags)
    overrides = {"initial_window": window, "max_payload": 16384} if window else {}
    agent = agent_factory(server.port, **overrides)
    agent_window = agent.config.initial_window
    assert server.process is not None
    pid = server.process.pid

    # Warm up the server's allocator with a transfer like the one measured below.
    assert download_through(agent, http_origin.url(f"/download/{16 * MIB}"), 16 * MIB) == pattern_sha256(
        16 * MIB
    )
    rss_before = process_rss(pid)

    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as stalled:
        stalled.sendall(
            f"GET {controlled_origin.url(f'/bytes/{STALLED_SIZE}')} HTTP/1.1\r\nHost: o\r\n\r\n".encode()
        )
        first = read_head(stalled)  # then stop reading

        # Another stream on the same tunnel completes while this one is stalled.
        other = 48 * MIB
        assert download_through(agent, http_origin.url(f"/download/{other}"), other) == pattern_sha256(other)

        stuck_at = wait_until_sent_settles(controlled_origin)
        (stream,) = agent_streams_to(agent, controlled_origin.port)
        assert 0 < stream.buffered <= agent_window
        # Back-pressure reached the origin: it is blocked far short of 200 MiB; what it did send
        # sits in kernel socket buffers, the proxy's one relay block and one window per hop.
        assert stuck_at < 48 * MIB
        rss_after = process_rss(pid)
        assert rss_after - rss_before < RSS_SLACK, (rss_before, rss_after)

        # Nothing was lost while stalled: resume reading and get every byte.
        digest = hashlib.sha256(first)
        received = len(first)
        while received < STALLED_SIZE:
            block = stalled.recv(MIB)
            assert block, f"stalled stream closed after {received} bytes"
            digest.update(block)
            received += len(block)
    assert received == STALLED_SIZE
    assert digest.hexdigest() == pattern_sha256(STALLED_SIZE)
    assert controlled_origin.sent == STALLED_SIZE


def test_many_parallel_downloads_do_not_queue_every_window_in_the_server(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    """With 24 streams and the agent's 4 MiB windows, the server may hold 96 MiB of credit;
    it must queue only what the TLS link can take next, not every stream's whole window."""
    from concurrent.futures import ThreadPoolExecutor

    server = server_factory()
    agent = agent_factory(server.port)
    assert agent.config.initial_window >= 4 * MIB
    assert server.process is not None
    pid = server.process.pid
    size = 12 * MIB
    assert download_through(agent, http_origin.url(f"/download/{size}"), size) == pattern_sha256(size)
    rss_before = process_rss(pid)
    peak = rss_before
    with ThreadPoolExecutor(24) as pool:
        futures = [
            pool.submit(download_through, agent, http_origin.url(f"/download/{size}"), size)
            for _ in range(24)
        ]
        while not all(f.done() for f in futures):
            peak = max(peak, process_rss(pid))
            threading.Event().wait(0.01)
        digests = {f.result() for f in futures}
    assert digests == {pattern_sha256(size)}
    # Measured: about +40 MiB (relay buffers, thread stacks, malloc arenas) with the queue
    # bound, about +260 MiB without it.
    assert peak - rss_before < 96 * MIB, (rss_before, peak)


@pytest.mark.parametrize("tuning", [True, False])
def test_a_download_sizes_the_stream_window_to_the_path(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer, tuning: bool
) -> None:
    """With window tuning, streams start at 256 KiB and a download on loopback (a fast path)
    grows the window, by the tuner's PING timing, to well above that; without it, every stream
    gets initial_window from the start and no timing PINGs are sent."""
    from server.flow_control import TUNED_START_WINDOW

    server = server_factory()
    agent = agent_factory(server.port, window_tuning=tuning)
    size = 32 * MIB
    assert download_through(agent, http_origin.url(f"/download/{size}"), size) == pattern_sha256(size)
    client = agent.agent._client
    assert client is not None and client._session is not None
    session = client._session
    if tuning:
        assert session.tuner is not None
        assert session.peer_hello is not None and session.conn.initial_window == TUNED_START_WINDOW
        assert session.tuner.min_rtt < 1.0  # the PING right after HELLO came back
        assert session.conn.stream_window == session.tuner.window >= 4 * TUNED_START_WINDOW
    else:
        assert session.tuner is None
        assert session.conn.initial_window == agent.config.initial_window == session.conn.stream_window
