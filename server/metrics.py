"""Publishes the tunnel server's activity to CloudWatch, where the Sleep Lambda reads it.

Every ``interval`` seconds (and once more on graceful shutdown) the publisher sends
ActiveConnections, ActiveStreams and LastActivityTimestamp to the ``Fluidity`` namespace,
once with the dimension ``Service=<service name>`` (what the Sleep Lambda and the
dashboard read) and once without dimensions (what the runbook's plain
``aws cloudwatch get-metric-statistics --namespace Fluidity --metric-name ...`` reads).
Publishing is best effort: a CloudWatch or network failure is logged and never stops
the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from server.framing import (
    DEFAULT_SERVICE_NAME,
    METRIC_ACTIVE_CONNECTIONS,
    METRIC_ACTIVE_STREAMS,
    METRIC_LAST_ACTIVITY,
    METRICS_NAMESPACE,
    metric_dimensions,
)

_log = logging.getLogger("fluidity.server.metrics")


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The server's activity at one moment."""

    active_connections: int  # connected agent tunnels
    active_streams: int
    last_activity: float  # epoch seconds of the last stream activity


class MetricsSettings(Protocol):
    """The part of the server configuration the publisher needs (``ServerConfig`` has it)."""

    @property
    def emit_metrics(self) -> bool: ...
    @property
    def metrics_interval(self) -> float: ...
    @property
    def metrics_namespace(self) -> str: ...
    @property
    def service_name(self) -> str: ...
    @property
    def aws_region(self) -> str | None: ...


class MetricsPublisher:
    """Sends a ``MetricsSnapshot`` to CloudWatch on a daemon thread every ``interval`` seconds."""

    def __init__(
        self,
        cloudwatch_client: Any,
        *,
        snapshot: Callable[[], MetricsSnapshot],
        namespace: str = METRICS_NAMESPACE,
        service_name: str = DEFAULT_SERVICE_NAME,
        interval: float = 60.0,
        logger: logging.Logger = _log,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"metrics interval must be positive, got {interval}")
        self._client = cloudwatch_client
        self._snapshot = snapshot
        self.namespace = namespace
        self.service_name = service_name
        self.interval = interval
        self._log = logger
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.published = 0  # successful PutMetricData calls
        self.failures = 0

    def start(self) -> None:
        """Publish now and then every interval, on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("metrics publisher already started")
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()
        self._log.info(
            "publishing metrics",
            extra={"namespace": self.namespace, "service": self.service_name, "interval_s": self.interval},
        )

    def stop(self, final: bool = True) -> None:
        """Stop the thread; with ``final`` send one last datapoint (graceful shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final:
            self.publish_once()

    def publish_once(self) -> bool:
        """Send the current snapshot; False (and a log line) when it could not be sent."""
        with self._publish_lock:
            try:
                snap = self._snapshot()
                self._client.put_metric_data(Namespace=self.namespace, MetricData=self._metric_data(snap))
            except Exception as exc:  # noqa: BLE001 - metrics must never take the server down
                self.failures += 1
                self._log.warning(
                    "could not publish metrics to CloudWatch",
                    extra={"namespace": self.namespace, "error": f"{type(exc).__name__}: {exc}"},
                )
                self._failing = True
                return False
            self.published += 1
            if self._failing:
                self._log.info("publishing metrics works again", extra={"namespace": self.namespace})
                self._failing = False
            return True

    def _run(self) -> None:
        while True:
            self.publish_once()
            if self._stop.wait(self.interval):
                return

    def _metric_data(self, snap: MetricsSnapshot) -> list[dict[str, Any]]:
        now = datetime.fromtimestamp(time.time(), UTC)
        values = (
            (METRIC_ACTIVE_CONNECTIONS, float(snap.active_connections), "Count"),
            (METRIC_ACTIVE_STREAMS, float(snap.active_streams), "Count"),
            (METRIC_LAST_ACTIVITY, float(snap.last_activity), "None"),
        )
        return [
            {"MetricName": name, "Dimensions": dims, "Timestamp": now, "Value": value, "Unit": unit}
            for dims in (metric_dimensions(self.service_name), [])
            for name, value, unit in values
        ]


def publisher_from_config(
    config: MetricsSettings,
    snapshot: Callable[[], MetricsSnapshot],
    *,
    session: Any = None,
    endpoint_url: str | None = None,
    logger: logging.Logger = _log,
) -> MetricsPublisher | None:
    """A publisher for the server's settings, or None when ``emit_metrics`` is off.

    boto3 is imported and a client created only when metrics are on. ``session`` is a
    ``boto3.session.Session`` (default: a new one, so AWS_* environment variables and the
    task role apply); ``endpoint_url`` overrides AWS_ENDPOINT_URL.
    """
    if not config.emit_metrics:
        return None
    import boto3
    from botocore.config import Config

    session = session if session is not None else boto3.session.Session()
    client = session.client(
        "cloudwatch",
        region_name=config.aws_region,
        endpoint_url=endpoint_url,
        config=Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}),
    )
    return MetricsPublisher(
        client,
        snapshot=snapshot,
        namespace=config.metrics_namespace,
        service_name=config.service_name,
        interval=config.metrics_interval,
        logger=logger,
    )
