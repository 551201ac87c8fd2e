"""The cloud lifecycle backends, driven by the controller with a real agent and tunnel server.

AWS is a moto server on loopback reached by real boto3. The ``lambda`` backend talks to
``LocalGateway``: a real HTTP front that enforces x-api-key and runs the real handlers.
The Fargate task is seeded as the ECS scheduler would start it, with its public IP
(an Elastic IP moto lets us choose) set to 127.0.0.1, where the test's tunnel server listens.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from proxy_fixtures import OriginServer
from tray_fixtures import fetch_through_proxy, wait_for_snapshot, wait_for_state, wait_until_stopped
from tunnel_fixtures import Pki, ServerProcess, agent_config, free_port

from desktop.config import AgentConfig
from desktop.controller import Controller, State
from desktop.lifecycle.base import LifecycleError, ServerLifecycle
from desktop.lifecycle.ecs import EcsLifecycle
from desktop.lifecycle.factory import create_lifecycle
from desktop.lifecycle.lambda_api import LambdaLifecycle
from desktop.lifecycle.polling import TransientLifecycleError, wait_until_running
from desktop.lifecycle.static import StaticLifecycle
from lambdas.local_gateway import LocalGateway
from server.framing import ServerState, ServerStatus

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


API_KEY = "test-api-key-0123456789"
LOOPBACK = "127.0.0.1"


def seed_task_at_loopback(fluidity: FluidityCloud) -> str:
    """Start the service's task as ECS would; its public IP is 127.0.0.1 (our tunnel server)."""
    task = fluidity.seed_running_task(public_ip=False)
    ec2 = fluidity.moto.client("ec2")
    allocation = ec2.allocate_address(Domain="vpc", Address=LOOPBACK)
    ec2.associate_address(AllocationId=allocation["AllocationId"], NetworkInterfaceId=task.eni_id)
    return task.task_arn


def seed_when_desired(fluidity: FluidityCloud, stop: threading.Event) -> threading.Thread:
    """Play the ECS scheduler: once the service wants a task, start one."""

    def scheduler() -> None:
        while not stop.wait(0.05):
            if fluidity.describe_service()["desiredCount"] >= 1:
                seed_task_at_loopback(fluidity)
                return

    thread = threading.Thread(target=scheduler, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def origin() -> Iterator[OriginServer]:
    with OriginServer() as server:
        yield server


@pytest.fixture
def gateway(moto_server: MotoEndpoint, tunnel_server: ServerProcess) -> Iterator[LocalGateway]:
    env = {**moto_server.env(), "TUNNEL_PORT": str(tunnel_server.port)}
    with LocalGateway(API_KEY, env=env) as front:
        yield front


def lambda_config(pki: Pki, gateway: LocalGateway, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "lifecycle": "lambda",
        "api_url": gateway.url,
        "api_key": API_KEY,
        "wake_poll_interval": 0.1,
        "connection_timeout": 20.0,
        "listen_port": free_port(),
    }
    values.update(overrides)
    return agent_config(pki, 8443, **values)


def controller_for(config: AgentConfig, lifecycle: ServerLifecycle) -> Controller:
    return Controller(config, lifecycle, monitor_interval=0.1)


def connect_and_browse(controller: Controller, origin: OriginServer) -> None:
    controller.connect()
    wait_for_state(controller, State.WAKING)
    snap = wait_for_state(controller, State.CONNECTED, timeout=30)
    assert snap.endpoint is not None and snap.endpoint.host == LOOPBACK
    status, body = fetch_through_proxy(snap.proxy_address, origin.url("/echo/through-the-cloud"))
    assert status == 200 and b"/echo/through-the-cloud" in body


# ----------------------------------------------------------------------------- lambda


def test_lambda_connect_wakes_waits_for_the_task_and_disconnect_scales_to_zero(
    pki: Pki,
    cloud: FluidityCloud,
    gateway: LocalGateway,
    tunnel_server: ServerProcess,
    origin: OriginServer,
) -> None:
    config = lambda_config(pki, gateway)
    assert config.effective_kill_on_disconnect()
    controller = controller_for(config, create_lifecycle(config))
    stop = threading.Event()
    scheduler = seed_when_desired(cloud, stop)
    try:
        connect_and_browse(controller, origin)
        assert cloud.describe_service()["desiredCount"] == 1
        assert controller.snapshot().endpoint.port == tunnel_server.port  # type: ignore[union-attr]

        controller.disconnect()
        snap = wait_until_stopped(controller)
        assert (snap.state, snap.detail) == (State.DISCONNECTED, "server stopped")
        assert cloud.describe_service()["desiredCount"] == 0
    finally:
        stop.set()
        scheduler.join(5)
        assert controller.shutdown(30)


def test_lambda_wrong_api_key_is_an_error_with_the_cause(
    pki: Pki,
    cloud: FluidityCloud,
    gateway: LocalGateway,
) -> None:
    config = lambda_config(pki, gateway, api_key="not-the-key")
    controller = controller_for(config, LambdaLifecycle(config))
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None
        assert "Forbidden (check the API key)" in snap.error and "HTTP 403" in snap.error
        assert cloud.describe_service()["desiredCount"] == 0
        wait_until_stopped(controller)
        assert controller.snapshot().state is State.ERROR  # the cleanup keeps the cause visible
    finally:
        assert controller.shutdown(30)


def test_lambda_timeout_waiting_for_the_task_is_an_error_and_stops_the_service(
    pki: Pki,
    cloud: FluidityCloud,
    gateway: LocalGateway,
) -> None:
    config = lambda_config(pki, gateway, connect_timeout=0.5, connection_timeout=1.0)
    controller = controller_for(config, LambdaLifecycle(config))
    try:
        controller.connect()  # no task is ever seeded: moto's service never starts one
        snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None and "was not ready within 1 s" in snap.error
        assert "starting" in snap.error
        wait_until_stopped(controller)
        assert cloud.describe_service()["desiredCount"] == 0
    finally:
        assert controller.shutdown(30)


def test_lambda_disconnect_cancels_waking(
    pki: Pki,
    cloud: FluidityCloud,
    gateway: LocalGateway,
) -> None:
    config = lambda_config(pki, gateway)
    controller = controller_for(config, LambdaLifecycle(config))
    try:
        controller.connect()
        wait_for_snapshot(
            controller, lambda s: s.server is not None and s.server.state is ServerState.STARTING
        )
        controller.disconnect()
        snap = wait_until_stopped(controller)
        assert snap.state is State.DISCONNECTED
        assert cloud.describe_service()["desiredCount"] == 0
    finally:
        assert controller.shutdown(30)


def test_lambda_unreachable_control_plane_is_an_error(pki: Pki) -> None:
    config = agent_config(
        pki, 8443, lifecycle="lambda", api_url=f"http://127.0.0.1:{free_port()}/prod", api_key=API_KEY
    )
    lifecycle = LambdaLifecycle(config)
    with pytest.raises(LifecycleError) as caught:
        lifecycle.wake(timeout=5, cancel=threading.Event(), on_progress=lambda *_: None)
    assert caught.value.code == "unreachable"
    assert "cannot reach the control plane" in caught.value.message


# ----------------------------------------------------------------------------- ecs


def test_ecs_connect_wakes_waits_for_the_task_and_disconnect_scales_to_zero(
    pki: Pki,
    cloud: FluidityCloud,
    aws_env: dict[str, str],
    tunnel_server: ServerProcess,
    origin: OriginServer,
) -> None:
    config = agent_config(
        pki,
        tunnel_server.port,
        lifecycle="ecs",
        wake_poll_interval=0.1,
        connection_timeout=20.0,
        listen_port=free_port(),
    )
    lifecycle = create_lifecycle(config)
    assert isinstance(lifecycle, EcsLifecycle)
    controller = controller_for(config, lifecycle)
    stop = threading.Event()
    scheduler = seed_when_desired(cloud, stop)
    try:
        connect_and_browse(controller, origin)
        assert cloud.describe_service()["desiredCount"] == 1

        controller.disconnect()
        wait_until_stopped(controller)
        assert cloud.describe_service()["desiredCount"] == 0
        assert lifecycle.status().state in (ServerState.STOPPING, ServerState.STOPPED)
    finally:
        stop.set()
        scheduler.join(5)
        assert controller.shutdown(30)


def test_ecs_missing_service_is_an_error_naming_it(
    pki: Pki,
    cloud: FluidityCloud,
    aws_env: dict[str, str],
) -> None:
    config = agent_config(pki, 8443, lifecycle="ecs", service_name="no-such-service")
    controller = controller_for(config, EcsLifecycle(config))
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
        assert snap.error is not None
        assert "ECS service 'no-such-service' was not found in cluster 'fluidity'" in snap.error
        assert "service_name" in snap.error
    finally:
        assert controller.shutdown(30)


def test_ecs_missing_profile_is_a_config_error(pki: Pki, aws_env: dict[str, str]) -> None:
    config = agent_config(pki, 8443, lifecycle="ecs", aws_profile="nobody-has-this-profile")
    with pytest.raises(LifecycleError) as caught:
        EcsLifecycle(config).status()
    assert caught.value.code == "config"
    assert "AWS profile 'nobody-has-this-profile' not found" in caught.value.message


# ----------------------------------------------------------------------------- shared parts


def test_factory_picks_the_configured_backend(pki: Pki, tmp_path: Path) -> None:
    cases: dict[str, dict[str, Any]] = {
        "static": {"server_address": "203.0.113.7"},
        "lambda": {"api_url": "https://example.invalid/prod", "api_key": API_KEY},
        "ecs": {},
        "local": {},
    }
    for name, extra in cases.items():
        lifecycle = create_lifecycle(agent_config(pki, 8443, lifecycle=name, **extra))
        assert lifecycle.name == name
        lifecycle.close()


def test_static_backend_returns_the_fixed_address(pki: Pki) -> None:
    config = agent_config(pki, 9443, lifecycle="static", server_address="203.0.113.7")
    seen: list[ServerStatus] = []
    endpoint = StaticLifecycle(config).wake(
        timeout=1, cancel=threading.Event(), on_progress=lambda status, _elapsed: seen.append(status)
    )
    assert (endpoint.host, endpoint.port) == ("203.0.113.7", 9443)
    assert seen and seen[0].state is ServerState.RUNNING


def test_polling_retries_transient_failures_and_reports_progress() -> None:
    starting = ServerStatus(ServerState.STARTING, 1, 0, 1)
    replies: list[ServerStatus | Exception] = [
        TransientLifecycleError("throttled", "status: throttled"),
        starting,
        ServerStatus(ServerState.RUNNING, 1, 1, 0, public_ip="198.51.100.9", port=8443),
    ]

    def fetch(_timeout: float) -> ServerStatus:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    progress: list[ServerState] = []
    endpoint = wait_until_running(
        starting,
        fetch,
        timeout=10,
        interval=0.01,
        cancel=threading.Event(),
        on_progress=lambda status, _elapsed: progress.append(status.state),
    )
    assert (endpoint.host, endpoint.port) == ("198.51.100.9", 8443)
    assert progress == [ServerState.STARTING, ServerState.STARTING, ServerState.RUNNING]
    assert replies == []


def test_polling_timeout_names_the_last_problem() -> None:
    def fetch(_timeout: float) -> ServerStatus:
        raise TransientLifecycleError("unreachable", "status: cannot reach the control plane")

    with pytest.raises(LifecycleError) as caught:
        wait_until_running(
            ServerStatus(ServerState.STARTING, 1, 0, 0),
            fetch,
            timeout=1.0,
            interval=0.05,
            cancel=threading.Event(),
            on_progress=lambda *_: None,
        )
    assert caught.value.code == "timeout"
    assert "last seen: starting: 0 of 1 tasks running" in caught.value.message
    assert "last poll: status: cannot reach the control plane" in caught.value.message
