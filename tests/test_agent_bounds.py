"""The agent's resources stay bounded too: idle tunnels, runaway local clients, clients that leave.

The agent runs as a real ``fluidity-agent`` child process (static lifecycle) against a real
server process; its threads, descriptors and memory are read from /proc with bounds far
from the expected values.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from proxy_fixtures import IO_TIMEOUT
from test_tunnel_bounds import fds, threads
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    REPO,
    AgentFactory,
    Pki,
    ServerFactory,
    agent_factory_fixture,
    free_port,
    process_rss,
    server_factory_fixture,
    wait_until,
)

from server.config_loader import without_settings_env

MIB = 1024 * 1024


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture
def agent_process(pki: Pki, server_factory: ServerFactory) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(*extra: str) -> AgentProcess:
        server = server_factory()
        port = free_port()
        args = [
            "--lifecycle", "static",
            "--server-address", "127.0.0.1",
            "--server-port", str(server.port),
            "--listen-port", str(port),
            "--ca-file", str(pki.path("ca.crt")),
            "--cert-file", str(pki.path("client.crt")),
            "--key-file", str(pki.path("client.key")),
            "--bypass", "",  # the targets are on loopback: through the tunnel
            *extra,
        ]  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "desktop.agent_cli", *args],
            cwd=REPO,
            env=without_settings_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        agent = AgentProcess(process, port)
        started.append(agent)
        wait_until(lambda: _answers_connect(port, server.port), 20, "agent proxy tunnels CONNECT")
        return agent

    yield start
    for agent in started:
        agent.process.terminate()
        try:
            agent.process.wait(10)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait(5)


def _answers_connect(port: int, target_port: int) -> bool:
    """True once a CONNECT through the agent gets its 200 (the tunnel is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n\r\n".encode())
            return sock.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def connect_through(port: int, target_port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.sendall(f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\n\r\n".encode())
    reply = sock.recv(100)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return sock


def test_a_thousand_idle_connect_tunnels_stay_small_in_the_agent(
    agent_process: Callable[..., AgentProcess],
) -> None:
    agent = agent_process()
    sink = socket.socket()  # connections complete in the kernel's accept queue: an idle origin
    sink.bind(("127.0.0.1", 0))
    sink.listen(4096)
    target = sink.getsockname()[1]
    baseline, base_threads = process_rss(agent.pid), threads(agent.pid)
    tunnels = []
    try:
        for _ in range(1000):
            tunnels.append(connect_through(agent.port, target))
        grown = process_rss(agent.pid) - baseline
        assert grown < 60 * MIB, f"1000 idle tunnels cost the agent {grown / MIB:.1f} MiB"
        assert threads(agent.pid) <= base_threads + 4  # no thread per connection
    finally:
        for sock in tunnels:
            sock.close()
        sink.close()
    wait_until(lambda: fds(agent.pid) < 100, 15, "tunnels released after the clients left")
    assert process_rss(agent.pid) - baseline < 60 * MIB


def test_client_connections_over_the_cap_are_closed_and_the_proxy_keeps_serving(
    agent_process: Callable[..., AgentProcess],
) -> None:
    agent = agent_process("--max-connections", "50")
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT) for _ in range(300)]
    try:
        time.sleep(0.5)
        assert fds(agent.pid) < 50 + 60  # the rest were closed at once
        closed = 0
        for sock in idle[60:]:
            sock.settimeout(IO_TIMEOUT)
            with contextlib.suppress(ConnectionResetError):
                if sock.recv(10) == b"":
                    closed += 1
                    continue
            closed += 1
        assert closed == len(idle) - 60
    finally:
        for sock in idle:
            sock.close()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    try:
        wait_until(lambda: fds(agent.pid) < 60, 15, "idle clients released")
        connect_through(agent.port, sink.getsockname()[1]).close()  # the listener still serves
    finally:
        sink.close()


def test_a_hung_origin_is_released_when_its_client_leaves(
    agent_process: Callable[..., AgentProcess],
) -> None:
    agent = agent_process()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(4)
    port = hung.getsockname()[1]
    try:
        client = socket.create_connection(("127.0.0.1", agent.port), timeout=IO_TIMEOUT)
        client.sendall(f"GET http://127.0.0.1:{port}/slow HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        origin_side, _ = hung.accept()
        origin_side.settimeout(IO_TIMEOUT)
        assert origin_side.recv(100).startswith(b"GET /slow")
        client.close()  # the client gives up; the origin never answered
        assert origin_side.recv(100) == b""  # so the agent and the server let go of it at once
        origin_side.close()
    finally:
        hung.close()


def test_a_stream_whose_both_ends_vanish_at_once_does_not_take_the_tunnel_down(
    server_factory: ServerFactory, agent_factory: AgentFactory
) -> None:
    """The target closes as the client does: half-closing an already closed socket fails at one
    stream's end, and only that stream may pay for it."""
    server = server_factory()
    running = agent_factory(server.port)
    since = running.agent.stats().connected_since
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(64)
    port = closer.getsockname()[1]
    try:
        for _ in range(20):
            client = connect_through(running.proxy_address[1], port)
            accepted, _ = closer.accept()
            accepted.close()
            client.close()
        time.sleep(0.5)
        stats = running.agent.stats()
        assert stats.connected_since == since and stats.consecutive_failures == 0
        connect_through(running.proxy_address[1], port).close()
    finally:
        closer.close()
