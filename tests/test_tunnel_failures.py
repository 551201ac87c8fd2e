"""What breaks, and what keeps working: bad bytes, dead targets, and a server that is
killed, stopped, frozen or frozen out, all through the real agent and server process.

Each test ends by showing the survivor still serves (a request through the agent works).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import socket
import ssl
import struct
import threading
from collections.abc import Iterator

import pytest
import requests
from frame_helpers import encode_frame
from origin_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    ControlledOrigin,
    controlled_origin_fixture,
    http_origin_fixture,
)
from proxy_fixtures import IO_TIMEOUT, OriginServer, closed_port, pattern_sha256
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    AgentFactory,
    Pki,
    RunningAgent,
    ServerFactory,
    ServerProcess,
    agent_factory_fixture,
    curl,
    proxy_session,
    server_factory_fixture,
    wait_until,
)

from desktop.tunnel_client import LinkState
from server.framing import (
    PROTOCOL_VERSION,
    Frame,
    FrameType,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    Role,
    TunnelConnection,
)

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
#: Seeded "random" bytes; the first byte is no frame type and no TLS record type, so the
#: peer's parser fails on the first byte instead of waiting for more.
GARBAGE = b"\xfe" + random.Random(1).randbytes(2047)


def assert_serves(agent: RunningAgent, origin: OriginServer) -> None:
    """The agent still carries a request end to end."""
    result = curl(agent.proxy_url, origin.url("/echo/still-serving"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/echo/still-serving"


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="fluidity.agent")
    return caplog


def log_records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == message]


# --------------------------------------------------------------------------- bad bytes


def test_garbage_on_the_proxy_port_gets_400_and_the_proxy_keeps_serving(
    agent: RunningAgent, http_origin: OriginServer
) -> None:
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(GARBAGE + b"\r\n\r\n")
        reply = bytearray()
        while data := sock.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 400 "), bytes(reply[:200])
    assert_serves(agent, http_origin)


def test_random_bytes_on_the_tunnel_port_close_only_that_connection(
    tunnel_server: ServerProcess, agent: RunningAgent, http_origin: OriginServer
) -> None:
    with socket.create_connection(("127.0.0.1", tunnel_server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(GARBAGE)
        try:
            leftover = sock.recv(65536)
            while leftover and leftover.startswith(b"\x15"):  # at most a TLS alert, then the close
                leftover = sock.recv(65536)
        except ConnectionResetError:
            leftover = b""
    assert leftover == b""
    refused = tunnel_server.wait_for("tunnel refused")
    assert "does not speak TLS" in str(refused["reason"]), refused
    assert_serves(agent, http_origin)


def _mtls_session(pki: Pki, port: int) -> ssl.SSLSocket:
    """A TLS session with the good client certificate, i.e. one that passes authentication."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(pki.path("ca.crt"))
    context.load_cert_chain(pki.path("client.crt"), pki.path("client.key"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    return context.wrap_socket(sock, server_hostname="fluidity-server")


def _server_answer(session: ssl.SSLSocket, sent: bytes) -> list[object]:
    """Send ``sent``, read until the server closes, and decode what it said as an agent would."""
    session.sendall(sent)
    decoder = TunnelConnection(Role.AGENT, "test-agent")
    events: list[object] = []
    while data := session.recv(65536):
        events += decoder.receive_data(data)
    return events


@pytest.mark.parametrize(
    ("sent", "reason", "detail"),
    [
        (GARBAGE, GoAwayReason.PROTOCOL_ERROR, "unknown frame type 254"),
        (
            encode_frame(
                Frame(FrameType.HELLO, 0, Hello("agent", "from-the-future", PROTOCOL_VERSION + 1).encode())
            ),
            GoAwayReason.VERSION_MISMATCH,
            f"peer speaks Fluidity protocol {PROTOCOL_VERSION + 1}",
        ),
    ],
    ids=["random-bytes", "wrong-version"],
)
def test_bad_first_frame_inside_mtls_gets_goaway_and_close(
    pki: Pki,
    tunnel_server: ServerProcess,
    agent: RunningAgent,
    http_origin: OriginServer,
    sent: bytes,
    reason: GoAwayReason,
    detail: str,
) -> None:
    with _mtls_session(pki, tunnel_server.port) as session:
        events = _server_answer(session, sent)
    assert len(events) == 2, events
    assert isinstance(events[0], HelloReceived) and events[0].hello.peer == "server"
    goaway = events[1]
    assert isinstance(goaway, GoAwayReceived)
    assert goaway.reason is reason
    assert detail in goaway.message
    logged = tunnel_server.wait_for("protocol error from peer", goaway=reason.label)
    assert detail in str(logged["error"])
    assert_serves(agent, http_origin)


def test_unreachable_target_gets_502_naming_the_cause(agent: RunningAgent, http_origin: OriginServer) -> None:
    port = closed_port()
    with proxy_session(agent.proxy_url) as session:
        response = session.get(f"http://127.0.0.1:{port}/", timeout=IO_TIMEOUT)
    assert response.status_code == 502
    assert f"connection refused by 127.0.0.1:{port}" in response.text
    assert_serves(agent, http_origin)


# --------------------------------------------------------------------------- resets inside a tunnel


@pytest.fixture
def silent_target() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP target that accepts and then says nothing; the test decides how each connection ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1]), accepted
    stop.set()
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
    listener.close()
    for conn in accepted:
        conn.close()
    thread.join(IO_TIMEOUT)


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _open_connect_tunnel(agent: RunningAgent, port: int) -> socket.socket:
    sock = socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    return sock


def test_client_reset_inside_connect_releases_the_proxy_connection(
    agent: RunningAgent, silent_target: tuple[int, list[socket.socket]], http_origin: OriginServer
) -> None:
    port, accepted = silent_target
    client = _open_connect_tunnel(agent, port)
    wait_until(lambda: len(accepted) == 1, IO_TIMEOUT, "target accepted the tunnelled connection")
    wait_until(lambda: agent.agent.stats().proxy_connections == 1, IO_TIMEOUT, "proxy sees the client")
    _reset(client)
    # The target never speaks, so only the client's reset can end the relay.
    wait_until(lambda: agent.agent.stats().proxy_connections == 0, IO_TIMEOUT, "proxy released the client")
    wait_until(lambda: agent.agent.stats().active_streams == 0, IO_TIMEOUT, "agent released the stream")
    assert_serves(agent, http_origin)


def test_target_reset_inside_connect_releases_the_server_stream(
    server_factory: ServerFactory,
    agent_factory: AgentFactory,
    silent_target: tuple[int, list[socket.socket]],
) -> None:
    server = server_factory("--shutdown-grace", "5s")
    agent = agent_factory(server.port)
    port, accepted = silent_target
    with _open_connect_tunnel(agent, port) as client:
        wait_until(lambda: len(accepted) == 1, IO_TIMEOUT, "target accepted the tunnelled connection")
        _reset(accepted[0])
        # The client never speaks, so only the target's reset can end the relay.
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
    # A stream still held by the server would make the drain wait out the whole grace.
    server.signal(signal.SIGTERM)
    stopped = server.wait_for("stopped", timeout=15)
    assert stopped["drained"] is True
    assert server.wait_for("shutting down")["streams"] == 0
    assert server.wait() == 0


# --------------------------------------------------------------------------- server death and restart


def test_agent_reconnects_to_a_killed_and_restarted_server(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    server = server_factory()
    agent = agent_factory(server.port)
    assert_serves(agent, http_origin)
    server.signal(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL
    wait_until(lambda: agent.agent.link_state is not LinkState.CONNECTED, IO_TIMEOUT, "agent saw the death")
    restarted = server_factory(port=server.port)
    assert agent.agent.wait_connected(20.0), agent.agent.stats().last_error
    assert_serves(agent, http_origin)
    assert restarted.wait_for("tunnel connected")


def test_sigterm_lets_an_in_flight_download_finish_and_refuses_new_requests(
    server_factory: ServerFactory,
    agent_factory: AgentFactory,
    controlled_origin: ControlledOrigin,
    http_origin: OriginServer,
    agent_log: pytest.LogCaptureFixture,
) -> None:
    server = server_factory()  # shutdown grace 10 s
    agent = agent_factory(server.port, request_wait=1.0)
    size, hold = 4 * MIB, MIB
    result: dict[str, object] = {}

    def download() -> None:
        with proxy_session(agent.proxy_url) as session:
            response = session.get(controlled_origin.url(f"/bytes/{size}?hold={hold}"), timeout=30)
            result["status"] = response.status_code
            result["sha256"] = hashlib.sha256(response.content).hexdigest()
            result["size"] = len(response.content)

    downloader = threading.Thread(target=download)
    downloader.start()
    try:
        assert controlled_origin.holding.wait(IO_TIMEOUT), "the download never started"
        server.signal(signal.SIGTERM)
        assert server.wait_for("shutting down")["streams"] == 1
        wait_until(lambda: log_records(agent_log, "peer sent GOAWAY"), IO_TIMEOUT, "agent got GOAWAY")
        goaway = log_records(agent_log, "peer sent GOAWAY")[0]
        assert goaway.__dict__["reason"] == "shutdown"

        # The server is draining (the download is held), and its listener is closed.
        with proxy_session(agent.proxy_url) as session:
            refused = session.get(http_origin.url("/echo/during-drain"), timeout=IO_TIMEOUT)
        assert server.process is not None and server.process.poll() is None
        assert refused.status_code == 502
        assert "the tunnel is down" in refused.text and "waited 1 s" in refused.text
    finally:
        controlled_origin.release.set()
        downloader.join(30)
    assert result == {"status": 200, "sha256": pattern_sha256(size), "size": size}
    assert server.wait(15) == 0
    assert server.wait_for("stopped")["drained"] is True
    assert not server.messages("shutdown grace expired")


def test_agent_declares_a_frozen_server_dead_and_reconnects_after_it_thaws(
    server_factory: ServerFactory,
    agent_factory: AgentFactory,
    http_origin: OriginServer,
    agent_log: pytest.LogCaptureFixture,
) -> None:
    server = server_factory()
    agent = agent_factory(
        server.port,
        keepalive_interval=0.2,
        keepalive_timeout=1.0,
        connect_timeout=1.0,
        reconnect_backoff_max=0.5,
    )
    assert_serves(agent, http_origin)
    server.signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: agent.agent.link_state is not LinkState.CONNECTED, IO_TIMEOUT, "link declared dead"
        )
        lost = log_records(agent_log, "tunnel lost, reconnecting")
        assert lost and "no sign of life from the peer for 1 s" in lost[0].__dict__["reason"]
    finally:
        server.signal(signal.SIGCONT)
    assert agent.agent.wait_connected(20.0), agent.agent.stats().last_error
    assert_serves(agent, http_origin)


def test_requests_fail_fast_with_a_clear_error_while_no_server_is_up(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    server = server_factory()
    agent = agent_factory(server.port, request_wait=0.5)
    server.stop()
    wait_until(
        lambda: "connection refused" in (agent.agent.stats().last_error or ""),
        IO_TIMEOUT,
        "agent tried to reconnect and was refused",
    )
    with pytest.raises(requests.HTTPError) as raised, proxy_session(agent.proxy_url) as session:
        session.get(http_origin.url("/echo/nobody-home"), timeout=IO_TIMEOUT).raise_for_status()
    assert raised.value.response is not None
    assert raised.value.response.status_code == 502
    assert "connection refused" in raised.value.response.text
