"""The tray's state machine: the pure transition rules, then the driver with real parts.

The transition function is exercised directly (no threads, no display). The driver tests
use the real agent, a real tunnel server process and the real static/local backends.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_fixtures import OriginServer
from tray_fixtures import fetch_through_proxy, wait_for_snapshot, wait_for_state, wait_until_stopped
from tunnel_fixtures import Pki, ServerProcess, agent_config, free_port, wait_until

from desktop.controller import (
    AgentSample,
    ConnectRequested,
    Controller,
    DisconnectRequested,
    LinkChanged,
    Policy,
    Rewake,
    SessionFailed,
    SessionStopped,
    Snapshot,
    StartSession,
    State,
    StopSession,
    WakeProgress,
    WakeSucceeded,
    advance,
)
from desktop.lifecycle.base import Endpoint
from desktop.lifecycle.local import LocalLifecycle
from desktop.lifecycle.static import StaticLifecycle
from desktop.tunnel_client import LinkState
from server.framing import ServerState, ServerStatus

CLOUD = Policy(kill_on_disconnect=True, can_rewake=True)
STATIC = Policy(kill_on_disconnect=False, can_rewake=False)
SERVER = Endpoint("203.0.113.7", 8443)


def run(snap: Snapshot, *events: object, policy: Policy = CLOUD) -> tuple[Snapshot, list[object]]:
    effects: list[object] = []
    for number, event in enumerate(events):
        snap, new = advance(snap, event, policy, now=100.0 + number)  # type: ignore[arg-type]
        effects += new
    return snap, effects


def connected(policy: Policy = CLOUD) -> Snapshot:
    snap, _ = run(
        Snapshot(),
        ConnectRequested(),
        WakeSucceeded(1, SERVER),
        LinkChanged(1, LinkState.CONNECTED, None),
        policy=policy,
    )
    return snap


# ----------------------------------------------------------------------------- transition rules


def test_connect_wakes_then_connects_then_connected() -> None:
    snap, effects = run(Snapshot(), ConnectRequested())
    assert snap.state is State.WAKING and snap.session == 1 and snap.waking_since == 100.0
    assert effects == [StartSession(1)]

    starting = ServerStatus(ServerState.STARTING, 1, 0, 1, message="the server is starting")
    snap, effects = run(snap, WakeProgress(1, starting, 3.0), WakeSucceeded(1, SERVER))
    assert snap.state is State.CONNECTING and snap.endpoint == SERVER and snap.server == starting
    assert effects == []

    snap, _ = run(snap, LinkChanged(1, LinkState.CONNECTED, None))
    assert snap.state is State.CONNECTED and snap.was_connected and snap.error is None


def test_connect_while_busy_is_ignored() -> None:
    for busy in (run(Snapshot(), ConnectRequested())[0], connected()):
        assert run(busy, ConnectRequested()) == (busy, [])


def test_disconnect_cancels_waking_and_kills_per_policy() -> None:
    waking, _ = run(Snapshot(), ConnectRequested())
    snap, effects = run(waking, DisconnectRequested())
    assert snap.state is State.DISCONNECTED and snap.stopping
    assert effects == [StopSession(1, kill=True)]
    assert run(waking, DisconnectRequested(), policy=STATIC)[1] == [StopSession(1, kill=False)]


def test_reports_from_an_ended_session_are_ignored() -> None:
    snap, _ = run(Snapshot(), ConnectRequested(), DisconnectRequested())
    late, effects = run(snap, WakeSucceeded(1, SERVER), LinkChanged(1, LinkState.CONNECTED, None))
    assert late.state is State.DISCONNECTED and effects == []
    # A new session ignores the previous one's late failure.
    snap, _ = run(snap, ConnectRequested())
    assert run(snap, SessionFailed(1, "timeout", "old"))[0] == snap


def test_failure_is_an_error_state_with_the_cause_and_stops_paying() -> None:
    waking, _ = run(Snapshot(), ConnectRequested())
    snap, effects = run(waking, SessionFailed(1, "forbidden", "wake failed: Forbidden (check the API key)"))
    assert snap.state is State.ERROR
    assert snap.error == "wake failed: Forbidden (check the API key)"
    assert effects == [StopSession(1, kill=True)]
    # The cleanup finishing keeps the error visible; Connect retries with a new session.
    snap, _ = run(snap, SessionStopped(1, None))
    assert snap.state is State.ERROR and not snap.stopping
    retry, effects = run(snap, ConnectRequested())
    assert retry.state is State.WAKING and retry.error is None and effects == [StartSession(2)]


def test_a_failed_kill_after_disconnect_is_an_error() -> None:
    snap, _ = run(connected(), DisconnectRequested())
    snap, _ = run(snap, SessionStopped(1, "kill failed: Forbidden (check the API key) (HTTP 403)"))
    assert snap.state is State.ERROR
    assert snap.error is not None and snap.error.startswith("could not stop the server: kill failed")


def test_successful_stop_says_the_server_stopped() -> None:
    snap, _ = run(connected(), DisconnectRequested(), SessionStopped(1, None))
    assert (snap.state, snap.stopping, snap.detail) == (State.DISCONNECTED, False, "server stopped")


def test_tunnel_drop_reconnects_then_rewakes_a_vanished_server_once() -> None:
    snap, _ = run(connected(), LinkChanged(1, LinkState.RECONNECTING, "tunnel lost: reset"))
    assert snap.state is State.CONNECTING and snap.detail == "reconnecting: tunnel lost: reset"

    refused = "cannot reach 203.0.113.7:8443: connection refused"
    snap, effects = run(snap, AgentSample(1, LinkState.RECONNECTING, 0, 2, refused))
    assert snap.state is State.CONNECTING and effects == []
    snap, effects = run(snap, AgentSample(1, LinkState.RECONNECTING, 0, 3, refused))
    assert snap.state is State.WAKING and snap.rewoken and effects == [Rewake(1)]
    assert refused in snap.detail

    # The re-woken server comes back: connected again, and a later loss may re-wake again.
    snap, _ = run(snap, WakeSucceeded(1, Endpoint("198.51.100.2", 8443)))
    snap, _ = run(snap, AgentSample(1, LinkState.RECONNECTING, 0, 5, refused))
    assert snap.state is State.CONNECTING, "only one re-wake per connection"
    snap, _ = run(snap, LinkChanged(1, LinkState.CONNECTED, None))
    assert snap.state is State.CONNECTED and not snap.rewoken


def test_static_servers_are_never_rewoken() -> None:
    snap, _ = run(connected(STATIC), LinkChanged(1, LinkState.RECONNECTING, "lost"), policy=STATIC)
    snap, effects = run(snap, AgentSample(1, LinkState.RECONNECTING, 0, 10, "refused"), policy=STATIC)
    assert snap.state is State.CONNECTING and effects == []


def test_samples_update_active_streams() -> None:
    snap, effects = run(connected(), AgentSample(1, LinkState.CONNECTED, 4, 0, None))
    assert snap.active_streams == 4 and snap.state is State.CONNECTED and effects == []


# ----------------------------------------------------------------------------- driver, real parts


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


def make_controller(config: object, lifecycle: object) -> Controller:
    return Controller(config, lifecycle, monitor_interval=0.1)  # type: ignore[arg-type]


def test_static_connect_carries_traffic_and_disconnect_frees_the_port(
    pki: Pki, tunnel_server: ServerProcess, origin: OriginServer
) -> None:
    config = agent_config(pki, tunnel_server.port, lifecycle="static", listen_port=free_port())
    controller = make_controller(config, StaticLifecycle(config))
    try:
        controller.connect()
        snap = wait_for_state(controller, State.CONNECTED)
        assert snap.endpoint == Endpoint("127.0.0.1", tunnel_server.port)
        status, body = fetch_through_proxy(snap.proxy_address, origin.url("/echo/hello"))
        assert status == 200 and b"/echo/hello" in body

        controller.disconnect()
        assert controller.snapshot().state is State.DISCONNECTED  # at once, before the work is done
        wait_until_stopped(controller)
        with socket.create_server(snap.proxy_address):
            pass  # the proxy port is free again
    finally:
        assert controller.shutdown(30)


def test_port_in_use_is_an_error_and_connect_works_once_it_is_free(
    pki: Pki, tunnel_server: ServerProcess
) -> None:
    port = free_port()
    config = agent_config(pki, tunnel_server.port, lifecycle="static", listen_port=port)
    controller = make_controller(config, StaticLifecycle(config))
    try:
        with socket.create_server(("127.0.0.1", port)):
            controller.connect()
            snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None and f"cannot listen on 127.0.0.1:{port}" in snap.error
        assert snap.error.count("cannot listen on") == 1, snap.error  # the reason, said once
        wait_until_stopped(controller)
        controller.connect()
        wait_for_state(controller, State.CONNECTED)
    finally:
        assert controller.shutdown(30)


class CountingLifecycle(StaticLifecycle):
    """A static server whose wakes and kills are counted (what a paid lifecycle would bill)."""

    wakes = 0
    kills = 0

    def wake(self, *args: object, **kwargs: object) -> Endpoint:
        type(self).wakes += 1
        return super().wake(*args, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> object:
        type(self).kills += 1
        return super().kill()


def test_a_busy_port_is_found_before_the_server_is_woken(pki: Pki, tunnel_server: ServerProcess) -> None:
    port = free_port()
    config = agent_config(pki, tunnel_server.port, lifecycle="static", listen_port=port)
    CountingLifecycle.wakes = CountingLifecycle.kills = 0
    controller = make_controller(config, CountingLifecycle(config))
    try:
        with socket.create_server(("127.0.0.1", port)):
            controller.connect()
            snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None and "cannot listen on" in snap.error
        wait_until_stopped(controller)
        assert CountingLifecycle.wakes == 0 and CountingLifecycle.kills == 0  # nothing woken, nothing paid
    finally:
        assert controller.shutdown(30)


def test_requests_made_while_the_server_wakes_wait_for_the_tunnel(
    pki: Pki, tunnel_server: ServerProcess, origin: OriginServer
) -> None:
    """The proxy listens before the wake; a request sent meanwhile is answered once the tunnel is up."""
    import threading

    release = threading.Event()

    class SlowWake(StaticLifecycle):
        def wake(self, *args: object, **kwargs: object) -> Endpoint:
            release.wait(10)
            return super().wake(*args, **kwargs)  # type: ignore[arg-type]

    port = free_port()
    config = agent_config(pki, tunnel_server.port, lifecycle="static", listen_port=port)
    controller = make_controller(config, SlowWake(config))
    try:
        controller.connect()
        wait_until(lambda: _accepts(port), 10, "the proxy listens while the server wakes")
        assert controller.snapshot().state is State.WAKING
        result: dict[str, object] = {}
        fetcher = threading.Thread(
            target=lambda: result.update(
                reply=fetch_through_proxy(("127.0.0.1", port), origin.url("/echo/w"))
            )
        )
        fetcher.start()
        release.set()
        fetcher.join(30)
        status, body = result["reply"]  # type: ignore[misc]
        assert status == 200 and b"/echo/w" in body
    finally:
        release.set()
        assert controller.shutdown(30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_missing_certificates_for_a_remote_server_are_an_error(pki: Pki, tmp_path: Path) -> None:
    config = agent_config(pki, free_port(), lifecycle="static", ca_file=tmp_path / "ca.crt")
    controller = make_controller(config, StaticLifecycle(config))
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None
        assert "missing ca.crt" in snap.error and "Import bundle" in snap.error
    finally:
        assert controller.shutdown(30)


def test_unreachable_server_times_out_into_an_error_with_the_cause(pki: Pki) -> None:
    closed = free_port()
    config = agent_config(
        pki, closed, lifecycle="static", connect_timeout=0.5, connection_timeout=1.0, listen_port=free_port()
    )
    controller = make_controller(config, StaticLifecycle(config))
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None
        assert f"could not connect to the server at 127.0.0.1:{closed} within 1 s" in snap.error
        assert "connection refused" in snap.error
    finally:
        assert controller.shutdown(30)


def test_local_server_that_dies_is_rewoken(pki: Pki, tmp_path: Path, origin: OriginServer) -> None:
    cert_dir = tmp_path / "certs"
    shutil.copytree(pki.dir, cert_dir)
    config = agent_config(
        pki,
        free_port(),
        lifecycle="local",
        listen_port=free_port(),
        ca_file=cert_dir / "ca.crt",
        cert_file=cert_dir / "client.crt",
        key_file=cert_dir / "client.key",
        reconnect_backoff_max=0.3,
        connection_timeout=30.0,
    )
    lifecycle = LocalLifecycle(config, server_log=tmp_path / "server.log")
    controller = make_controller(config, lifecycle)
    try:
        controller.connect()
        snap = wait_for_state(controller, State.CONNECTED, timeout=30)
        process = lifecycle._process  # the child the backend started; a crash is simulated below
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)

        wait_for_snapshot(controller, lambda s: s.rewoken or s.state is State.WAKING, timeout=30)
        again = wait_for_state(controller, State.CONNECTED, timeout=30)
        assert lifecycle._process is not None and lifecycle._process.pid != process.pid
        assert again.session == snap.session
        status, _ = fetch_through_proxy(again.proxy_address, origin.url("/status/204"))
        assert status == 204
    finally:
        assert controller.shutdown(30)
    assert lifecycle.status().state is ServerState.STOPPED  # Quit stops the local server
