"""The monthly budget against the real lambda backend: AWS is a moto server on loopback.

The control plane is ``LocalGateway`` (the real handlers behind a real HTTP front) and the
Fargate task is seeded as the ECS scheduler would start it. The tunnel itself is not the
subject here, so the agent is a stand-in that reports a connected tunnel; time is a fake
clock, so months of server time are fed, not waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from tray_fixtures import wait_for_snapshot, wait_for_state, wait_until_stopped
from tunnel_fixtures import Pki, agent_config, free_port

from desktop.budget import UsageWatch
from desktop.config import AgentConfig
from desktop.controller import Controller, State
from desktop.lifecycle.base import Endpoint
from desktop.lifecycle.lambda_api import LambdaLifecycle
from desktop.lifecycle.metered import MeteredLifecycle
from desktop.tunnel_client import LinkObserver, LinkState
from desktop.usage import UsageStore
from lambdas.local_gateway import LocalGateway

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint

API_KEY = "test-api-key-0123456789"
HOUR = 3600.0
NOON = time.mktime((2026, 6, 10, 12, 0, 0, 0, 0, -1))


class FakeClock:
    def __init__(self) -> None:
        self.now = NOON

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Stats:
    link_state: LinkState = LinkState.CONNECTED
    active_streams: int = 0
    last_error: str | None = None
    consecutive_failures: int = 0


class ConnectedAgent:
    """Stands in for desktop.agent.Agent: its tunnel is up as soon as it starts."""

    def __init__(self, _config: AgentConfig, _on_link_change: LinkObserver) -> None:
        self.endpoint: Endpoint | None = None

    def listen(self) -> None:
        pass

    def start(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def set_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        return True

    def stop(self) -> None:
        self.endpoint = None

    @property
    def proxy_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 0)

    def stats(self) -> Stats:
        return Stats()


@pytest.fixture
def gateway(moto_server: MotoEndpoint) -> Iterator[LocalGateway]:
    with LocalGateway(API_KEY, env={**moto_server.env(), "TUNNEL_PORT": "8443"}) as front:
        yield front


def scale_up_when_desired(cloud: FluidityCloud, stop: threading.Event) -> threading.Thread:
    """Play the ECS scheduler: once the service wants a task, start one."""

    def scheduler() -> None:
        while not stop.wait(0.05):
            if cloud.describe_service()["desiredCount"] >= 1:
                cloud.seed_running_task()
                return

    thread = threading.Thread(target=scheduler, daemon=True)
    thread.start()
    return thread


def lambda_config(pki: Pki, gateway: LocalGateway, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "lifecycle": "lambda",
        "api_url": gateway.url,
        "api_key": API_KEY,
        "wake_poll_interval": 0.1,
        "connection_timeout": 20.0,
        "listen_port": free_port(),
        "price_per_hour": 0.0173,
        "price_per_gb_out": 0.09,
        "monthly_budget": 1.0,
    }
    values.update(overrides)
    return agent_config(pki, 8443, **values)


def test_reaching_the_budget_disconnects_and_stops_the_server_through_the_lambda(
    pki: Pki, cloud: FluidityCloud, gateway: LocalGateway
) -> None:
    clock = FakeClock()
    store = UsageStore(None, clock=clock)
    # Recorded earlier this month: 40 h of server time (≈ $0.69 of the $1.00 budget).
    store.server_woken(NOON - 50 * HOUR)
    store.server_stopped("stopped by Fluidity", NOON - 10 * HOUR)
    config = lambda_config(pki, gateway)
    lifecycle = MeteredLifecycle(LambdaLifecycle(config), store, clock=clock)
    controller = Controller(config, lifecycle, agent_factory=ConnectedAgent, monitor_interval=0.1)
    notices: list[tuple[str, bool]] = []
    watch = UsageWatch(
        controller,
        store,
        how_to_raise="raise monthly_budget in agent.yaml",
        on_notice=lambda message, warning: notices.append((message, warning)),
        clock=clock,
    )
    stop = threading.Event()
    scheduler = scale_up_when_desired(cloud, stop)
    try:
        assert watch.connect_refusal() is None
        controller.connect()
        wait_for_state(controller, State.CONNECTED, timeout=30)
        assert cloud.describe_service()["desiredCount"] == 1

        clock.now = NOON + 8 * HOUR  # 48 h: 83 %
        watch.check()
        assert [message for message, _ in notices] == [
            "Fluidity has used 83% of this month's budget: ≈ $0.83 of $1.00. "
            "At $1.00 it disconnects and stops the server."
        ]
        assert controller.snapshot().state is State.CONNECTED

        clock.now = NOON + 18 * HOUR  # 58 h: the budget is reached
        watch.check()
        snap = wait_until_stopped(controller)
        assert snap.state is State.ERROR
        assert snap.error == (
            "Monthly budget reached: ≈ $1.00 of $1.00 this month, so Fluidity disconnected and stopped the "
            "server. To go on this month, raise monthly_budget in agent.yaml."
        )
        assert cloud.describe_service()["desiredCount"] == 0  # the Kill Lambda ran
        assert store.run is None and store.last_stop is not None

        refusal = watch.connect_refusal()
        assert refusal is not None and refusal.startswith("Not connecting: this month's budget is used up")
        watch.confirm_over_budget()  # "Connect anyway": the next session is not stopped again
        assert watch.connect_refusal() is None
    finally:
        stop.set()
        scheduler.join(5)
        assert controller.shutdown(30)


def test_a_refused_wake_gives_one_error_and_no_second_one_about_stopping(
    pki: Pki, cloud: FluidityCloud, gateway: LocalGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = lambda_config(pki, gateway, api_key="not-the-key")
    controller = Controller(
        config, LambdaLifecycle(config), agent_factory=ConnectedAgent, monitor_interval=0.1
    )
    try:
        controller.connect()
        snap = wait_for_state(controller, State.ERROR)
        wait_until_stopped(controller)
        assert snap.error == "wake failed: Forbidden (check the API key) (HTTP 403, forbidden)"
        assert not [r for r in caplog.records if "could not stop the server" in r.getMessage()]
        assert cloud.describe_service()["desiredCount"] == 0
    finally:
        assert controller.shutdown(30)


def test_the_watch_finds_a_server_the_sleep_lambda_stopped(
    pki: Pki, cloud: FluidityCloud, gateway: LocalGateway
) -> None:
    """Disconnected without Kill: the status poll notices when the server is gone."""
    clock = FakeClock()
    store = UsageStore(None, clock=clock)
    config = lambda_config(pki, gateway, kill_on_disconnect=False, monthly_budget=None)
    lifecycle = MeteredLifecycle(LambdaLifecycle(config), store, clock=clock)
    controller = Controller(config, lifecycle, agent_factory=ConnectedAgent, monitor_interval=0.1)
    watch = UsageWatch(controller, store, how_to_raise="-", on_notice=lambda *_: None, clock=clock)
    stop = threading.Event()
    scheduler = scale_up_when_desired(cloud, stop)
    try:
        controller.connect()
        wait_for_state(controller, State.CONNECTED, timeout=30)
        clock.now = NOON + HOUR
        watch.check()  # connected: an hour of evidence
        controller.disconnect()
        wait_until_stopped(controller)
        assert cloud.describe_service()["desiredCount"] == 1 and store.run is not None

        clock.now = NOON + HOUR + 30
        watch.check()  # still running: the reply counts as evidence
        cloud.set_desired_count(0)  # what the Sleep Lambda does after 10 idle minutes
        for task in cloud.moto.client("ecs").list_tasks(cluster=cloud.cluster)["taskArns"]:
            cloud.stop_task(task)
        clock.now = NOON + 2 * HOUR
        watch.check()
        wait_for_snapshot(controller, lambda s: store.run is None, timeout=5)
        assert store.month().server_seconds == pytest.approx(HOUR + 30)
    finally:
        stop.set()
        scheduler.join(5)
        assert controller.shutdown(30)
