"""The server's CloudWatch metrics publisher, against a moto server over real HTTP."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from server.config import ServerConfig
from server.framing import metric_dimensions
from server.metrics import MetricsPublisher, MetricsSnapshot, publisher_from_config

if TYPE_CHECKING:
    from cloud_fixtures import MotoEndpoint


HANG_GUARD = 10.0


@pytest.fixture
def cloudwatch(moto_server: MotoEndpoint) -> Any:
    moto_server.reset()
    return moto_server.client("cloudwatch")


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the hang guard")
        time.sleep(0.01)


def statistics(
    cloudwatch: Any, metric: str, dimensions: list[dict[str, str]] | None = None
) -> dict[str, float]:
    """One 1-hour bucket of the metric, as the runbook's get-metric-statistics reads it."""
    now = datetime.now(UTC)
    reply = cloudwatch.get_metric_statistics(
        Namespace="Fluidity",
        MetricName=metric,
        Dimensions=metric_dimensions("fluidity-server") if dimensions is None else dimensions,
        StartTime=now - timedelta(hours=1),
        EndTime=now + timedelta(minutes=1),
        Period=3600,
        Statistics=["Maximum", "Minimum", "SampleCount"],
    )
    points = reply["Datapoints"]
    assert len(points) <= 1
    return points[0] if points else {}


def unreachable_cloudwatch() -> Any:
    """A real client for a loopback port where nothing listens (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return boto3.session.Session().client(
        "cloudwatch",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )


def test_publish_once_sends_the_three_metrics_with_the_service_dimension(cloudwatch: Any) -> None:
    publisher = MetricsPublisher(
        cloudwatch, snapshot=lambda: MetricsSnapshot(2, 5, 1_790_000_000.5), interval=60
    )
    assert publisher.publish_once() is True
    assert statistics(cloudwatch, "ActiveConnections")["Maximum"] == 2
    assert statistics(cloudwatch, "ActiveStreams")["Maximum"] == 5
    assert statistics(cloudwatch, "LastActivityTimestamp")["Maximum"] == 1_790_000_000.5
    # A copy without dimensions serves the runbook's plain get-metric-statistics command.
    listed = cloudwatch.list_metrics(Namespace="Fluidity", MetricName="ActiveConnections")["Metrics"]
    assert sorted(str(m["Dimensions"]) for m in listed) == sorted(
        [str([]), str([{"Name": "Service", "Value": "fluidity-server"}])]
    )


def test_start_publishes_at_once_and_stop_sends_a_final_datapoint(cloudwatch: Any) -> None:
    current = {"connections": 3}
    publisher = MetricsPublisher(
        cloudwatch,
        snapshot=lambda: MetricsSnapshot(current["connections"], 1, time.time()),
        service_name="fluidity-server",
        interval=60,
    )
    publisher.start()
    wait_until(lambda: publisher.published == 1)
    current["connections"] = 0  # the agent disconnected, then the task is told to stop
    publisher.stop(final=True)
    assert publisher.published == 2
    stats = statistics(cloudwatch, "ActiveConnections")
    assert (stats["SampleCount"], stats["Maximum"], stats["Minimum"]) == (2, 3, 0)


def test_publishes_every_interval_until_stopped(cloudwatch: Any) -> None:
    publisher = MetricsPublisher(
        cloudwatch, snapshot=lambda: MetricsSnapshot(1, 0, time.time()), interval=0.05
    )
    publisher.start()
    wait_until(lambda: publisher.published >= 3)
    publisher.stop(final=False)
    sent = publisher.published
    assert statistics(cloudwatch, "ActiveConnections")["SampleCount"] == sent
    with pytest.raises(RuntimeError, match="already started"):
        publisher.start()


def test_failures_are_logged_and_never_stop_the_publisher(caplog: pytest.LogCaptureFixture) -> None:
    publisher = MetricsPublisher(
        unreachable_cloudwatch(), snapshot=lambda: MetricsSnapshot(0, 0, time.time()), interval=0.05
    )
    with caplog.at_level(logging.WARNING, logger="fluidity.server.metrics"):
        assert publisher.publish_once() is False
        publisher.start()
        wait_until(lambda: publisher.failures >= 3)  # the thread keeps trying after a failure
        publisher.stop(final=True)
    assert publisher.published == 0
    warning = caplog.records[0]
    assert warning.getMessage() == "could not publish metrics to CloudWatch"
    assert "EndpointConnectionError" in warning.__dict__["error"]


def test_a_failing_snapshot_is_logged_not_raised(cloudwatch: Any, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> MetricsSnapshot:
        raise RuntimeError("stats unavailable")

    publisher = MetricsPublisher(cloudwatch, snapshot=broken, interval=60)
    with caplog.at_level(logging.WARNING, logger="fluidity.server.metrics"):
        assert publisher.publish_once() is False
    assert "stats unavailable" in caplog.records[0].__dict__["error"]


def test_recovery_after_failures_is_logged(
    moto_server: MotoEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = {"ok": False}

    def snapshot() -> MetricsSnapshot:
        if not healthy["ok"]:
            raise OSError("counters not ready")
        return MetricsSnapshot(0, 0, time.time())

    publisher = MetricsPublisher(moto_server.client("cloudwatch"), snapshot=snapshot, interval=60)
    with caplog.at_level(logging.INFO, logger="fluidity.server.metrics"):
        assert publisher.publish_once() is False
        healthy["ok"] = True
        assert publisher.publish_once() is True
    assert [r.getMessage() for r in caplog.records if r.name == "fluidity.server.metrics"] == [
        "could not publish metrics to CloudWatch",
        "publishing metrics works again",
    ]


def test_factory_creates_nothing_when_metrics_are_off() -> None:
    config = dataclasses.replace(ServerConfig(), emit_metrics=False)
    untouchable = object()  # any attempt to build a client from it would raise AttributeError
    assert publisher_from_config(config, lambda: MetricsSnapshot(0, 0, 0.0), session=untouchable) is None


def test_factory_builds_a_publisher_from_the_server_settings(
    cloudwatch: Any, moto_server: MotoEndpoint
) -> None:
    config = dataclasses.replace(
        ServerConfig(),
        emit_metrics=True,
        metrics_interval=30.0,
        service_name="fluidity-test",
        aws_region="us-east-1",
    )
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    publisher = publisher_from_config(
        config, lambda: MetricsSnapshot(4, 2, time.time()), session=session, endpoint_url=moto_server.url
    )
    assert publisher is not None
    assert (publisher.namespace, publisher.service_name, publisher.interval) == (
        "Fluidity",
        "fluidity-test",
        30.0,
    )
    assert publisher.publish_once() is True
    dims = metric_dimensions("fluidity-test")
    assert statistics(cloudwatch, "ActiveConnections", dims)["Maximum"] == 4


def test_interval_must_be_positive(cloudwatch: Any) -> None:
    with pytest.raises(ValueError, match="interval"):
        MetricsPublisher(cloudwatch, snapshot=lambda: MetricsSnapshot(0, 0, 0.0), interval=0)
