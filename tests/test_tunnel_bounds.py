"""The tunnel server's resources stay bounded under the attacks an internet-facing port gets.

Each test attacks a real ``fluidity-server`` child process on loopback and reads its
threads, file descriptors and memory from /proc, with bounds far from the expected
values so the tests cannot flake; a good agent keeps working meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from origin_fixtures import http_origin_fixture  # noqa: F401  (registers the fixture)
from proxy_fixtures import IO_TIMEOUT, OriginServer
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    AgentFactory,
    Pki,
    ServerFactory,
    agent_factory_fixture,
    process_rss,
    proxy_session,
    server_factory_fixture,
    wait_until,
)

from server.config import ServerConfig
from server.config_loader import load
from server.framing import (
    HEADER,
    DataReceived,
    Event,
    FailReason,
    FrameType,
    Role,
    StreamOpened,
    StreamOpenFailed,
    StreamReset,
    TunnelConnection,
)
from server.tls import client_context
from server.tunnel_server import TunnelServer

MIB = 1024 * 1024
E = TypeVar("E")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RawTunnel:
    """A hand-driven agent: TLS with the client certificate and the sans-I/O protocol, no proxy."""

    def __init__(self, pki: Pki, port: int) -> None:
        context = client_context(pki.path("ca.crt"), pki.path("client.crt"), pki.path("client.key"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname="fluidity-server")
        self.conn = TunnelConnection(Role.AGENT, "raw-test-agent")
        self.conn.initiate()
        self.flush()
        self.events: list[Event] = []
        while self.conn.peer_hello is None:
            self.read()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def read(self) -> list[Event]:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise ConnectionError("server closed the tunnel")
        events = self.conn.receive_data(data)
        self.events += events
        return events

    def wait_for(self, kind: type[E], count: int = 1, timeout: float = 15.0) -> list[E]:
        deadline = time.monotonic() + timeout
        while len([e for e in self.events if isinstance(e, kind)]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} {kind.__name__} in {timeout} s")
            self.read()
        return [e for e in self.events if isinstance(e, kind)]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def raw_tunnels(pki: Pki) -> Iterator[list[RawTunnel]]:
    made: list[RawTunnel] = []
    yield made
    for tunnel in made:
        tunnel.close()


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never send a byte (they are closed by the caller)."""
    made = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        made.append(sock)
    return made


def test_a_silent_tcp_flood_is_capped_and_a_connected_agent_keeps_working(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    server = server_factory("--max-handshakes", "40", "--max-handshakes-per-source", "0")
    assert server.process is not None
    pid = server.process.pid
    running = agent_factory(server.port)
    base_threads, base_fds = threads(pid), fds(pid)
    flood = silent_connections(server.port, 600)
    try:
        wait_until(
            lambda: len(server.messages("too many connections in handshake, closing new ones")) > 0, 10, "cap"
        )
        # 600 connections, a cap of 40: the rest were closed at once, and no thread was started.
        assert fds(pid) <= base_fds + 40 + 20
        assert threads(pid) <= base_threads + 4
        with proxy_session(running.proxy_url) as session:
            reply = session.get(http_origin.url("/download/1000"), timeout=IO_TIMEOUT)
        assert reply.status_code == 200 and len(reply.content) == 1000
    finally:
        for sock in flood:
            sock.close()


def test_handshakes_that_never_finish_are_closed_at_the_deadline(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory("--handshake-timeout", "1s", "--max-handshakes", "30")
    assert server.process is not None
    pid = server.process.pid
    base_fds = fds(pid)
    stalled = []
    for _ in range(30):  # each sends half a ClientHello and waits
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=IO_TIMEOUT)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        stalled.append(sock)
    try:
        wait_until(lambda: fds(pid) <= base_fds + 3, 10, "stalled handshakes closed")
        for sock in stalled:
            sock.settimeout(IO_TIMEOUT)
            assert sock.recv(100) == b""  # closed by the server
        refused = server.messages("tunnel refused")
        assert any("no TLS handshake and HELLO within 1 s" in str(line.get("reason")) for line in refused)
        RawTunnel(pki, server.port).close()  # and a real agent gets in afterwards
    finally:
        for sock in stalled:
            sock.close()


def test_open_requests_over_the_stream_limit_fail_while_dials_are_pending(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory("--max-streams-per-tunnel", "8", "--connect-timeout", "30s")
    assert server.process is not None
    pid = server.process.pid
    # A black hole on loopback: a listener whose accept queue is full drops further SYNs.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)]
    tunnel = RawTunnel(pki, server.port)
    base_threads = threads(pid)
    try:
        for _ in range(50):
            tunnel.conn.open_stream("127.0.0.1", port)
        tunnel.flush()
        failures = tunnel.wait_for(StreamOpenFailed, 42)
        assert {f.reason for f in failures} == {FailReason.LIMIT}
        assert threads(pid) <= base_threads + 2  # pending dials hold no thread
    finally:
        tunnel.close()
        for sock in fillers:
            sock.close()
        hole.close()


def test_a_ping_flood_whose_pongs_are_never_read_stays_bounded(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory()
    assert server.process is not None
    pid = server.process.pid
    tunnel = RawTunnel(pki, server.port)
    tunnel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = process_rss(pid)
    ping = HEADER.pack(FrameType.PING, 0, 0, 8) + b"12345678"
    burst = ping * 10_000
    deadline = time.monotonic() + 20
    sent = 0
    try:
        tunnel.sock.settimeout(5)
        while sent < 300_000 and time.monotonic() < deadline:
            tunnel.sock.sendall(burst)
            sent += 10_000
    except (TimeoutError, OSError):
        pass  # the server stopped reading us: also bounded
    grown = process_rss(pid) - before
    tunnel.close()
    assert sent >= 10_000
    assert grown < 40 * MIB, f"server grew {grown / MIB:.1f} MiB under {sent} PINGs"


def test_a_thousand_idle_streams_stay_small_and_memory_returns(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory()
    assert server.process is not None
    pid = server.process.pid
    sink = socket.socket()  # connections complete in the kernel's accept queue: an idle origin
    sink.bind(("127.0.0.1", 0))
    sink.listen(4096)
    port = sink.getsockname()[1]
    tunnel = RawTunnel(pki, server.port)
    baseline = process_rss(pid)
    try:
        for _ in range(1000):
            tunnel.conn.open_stream("127.0.0.1", port)
        tunnel.flush()
        tunnel.wait_for(StreamOpened, 1000, timeout=60)
        grown = process_rss(pid) - baseline
        assert grown < 40 * MIB, f"1000 idle streams cost the server {grown / MIB:.1f} MiB"
    finally:
        tunnel.close()
        sink.close()
    wait_until(lambda: fds(pid) < 100, 15, "streams released after the tunnel closed")
    assert process_rss(pid) - baseline < 40 * MIB


def test_a_hung_origin_is_released_when_the_agent_resets_the_stream(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = server_factory()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(1)
    tunnel = RawTunnel(pki, server.port)
    try:
        sid = tunnel.conn.open_stream("127.0.0.1", hung.getsockname()[1])
        tunnel.flush()
        tunnel.wait_for(StreamOpened)
        origin_side, _ = hung.accept()
        tunnel.conn.send_data(sid, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        tunnel.flush()
        origin_side.settimeout(IO_TIMEOUT)
        assert origin_side.recv(100).startswith(b"GET /")
        tunnel.conn.reset_stream(sid, FailReason.CANCELLED, "client went away")
        tunnel.flush()
        assert origin_side.recv(100) == b""  # the server closed the origin connection at once
        origin_side.close()
    finally:
        tunnel.close()
        hung.close()


def test_an_idle_stream_is_reset_after_the_idle_timeout(server_factory: ServerFactory, pki: Pki) -> None:
    server = server_factory("--stream-idle-timeout", "1s")
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    idle.listen(1)
    tunnel = RawTunnel(pki, server.port)
    try:
        tunnel.conn.open_stream("127.0.0.1", idle.getsockname()[1])
        tunnel.flush()
        tunnel.wait_for(StreamOpened)
        (reset,) = tunnel.wait_for(StreamReset, timeout=10)
        assert reset.reason is FailReason.TIMEOUT and "idle for 1 s" in reset.message
    finally:
        tunnel.close()
        idle.close()


def test_data_flows_both_ways_on_a_raw_stream(server_factory: ServerFactory, pki: Pki) -> None:
    server = server_factory()
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(1)
    tunnel = RawTunnel(pki, server.port)
    try:
        sid = tunnel.conn.open_stream("127.0.0.1", echo.getsockname()[1])
        tunnel.flush()
        tunnel.wait_for(StreamOpened)
        peer, _ = echo.accept()
        tunnel.conn.send_data(sid, b"ping")
        tunnel.flush()
        peer.settimeout(IO_TIMEOUT)
        assert peer.recv(10) == b"ping"
        peer.sendall(b"pong")
        (data,) = tunnel.wait_for(DataReceived)
        assert data.data == b"pong"
        peer.close()
    finally:
        tunnel.close()
        echo.close()


# --------------------------------------------------------------------------- the accept path, in-process


class FailingAcceptor:
    """Accepts like the listener, but the first calls fail as an exhausted system would."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        sock, peer = listener.accept()
        return sock, (str(peer[0]), int(peer[1]))


def test_the_listener_survives_accept_failures_and_keeps_serving(pki: Pki, tmp_path: Path) -> None:
    config = load(
        ServerConfig,
        None,
        env={},
        overrides={
            "listen_address": "127.0.0.1",
            "listen_port": 0,
            "ca_file": pki.path("ca.crt"),
            "cert_file": pki.path("server.crt"),
            "key_file": pki.path("server.key"),
            "heartbeat_file": tmp_path / "heartbeat",
        },
    )
    acceptor = FailingAcceptor(
        [
            OSError(errno.EMFILE, "Too many open files"),
            OSError(errno.ENFILE, "Too many open files in system"),
            MemoryError(),
            OSError(errno.ECONNABORTED, "Software caused connection abort"),
            OSError(errno.ENOBUFS, "No buffer space available"),
        ]
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, TunnelServer] = {}

    async def run() -> None:
        server = TunnelServer(config, acceptor=acceptor)
        holder["server"] = server
        await server.start()
        started.set()
        while not server.stats().total_tunnels:
            await asyncio.sleep(0.05)
        await server.shutdown(grace=0)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        port = holder["server"].address[1]
        # Each failure costs a back-off, but the listener comes back every time.
        deadline = time.monotonic() + 30
        while True:
            try:
                RawTunnel(pki, port).close()
                break
            except (OSError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        thread.join(15)
        assert not thread.is_alive()
        assert acceptor.calls >= 6
        assert (tmp_path / "heartbeat").is_file()
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


def test_data_sent_with_the_open_waits_at_the_server_until_its_dial_completes(
    server_factory: ServerFactory, pki: Pki
) -> None:
    """0-RTT: OPEN, DATA and FIN leave in one write; the target gets the bytes once it is connected."""
    server = server_factory()
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    tunnel = RawTunnel(pki, server.port)
    try:
        sid = tunnel.conn.open_stream("127.0.0.1", target.getsockname()[1])
        assert tunnel.conn.send_data(sid, b"GET /early HTTP/1.0\r\n\r\n") == 23
        tunnel.conn.end_stream(sid)
        frames = bytes(tunnel.conn.data_to_send())
        assert frames.count(HEADER.pack(FrameType.FIN, 0, sid, 0)) == 1
        tunnel.sock.sendall(frames)  # one write: nothing waits for OPEN_OK
        peer, _ = target.accept()
        peer.settimeout(IO_TIMEOUT)
        received = b""
        while chunk := peer.recv(100):  # the FIN arrives after the data
            received += chunk
        assert received == b"GET /early HTTP/1.0\r\n\r\n"
        peer.close()
        tunnel.wait_for(StreamOpened)
    finally:
        tunnel.close()
        target.close()
