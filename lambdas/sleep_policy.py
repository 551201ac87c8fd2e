"""When the scheduled Sleep run may scale the server to zero, and the run itself.

The rule: scale down only when no agent connection was open during the idle window and
the newest activity (or the task's start, whichever is later) is older than the idle
threshold. A server that has sent no metrics at all counts as idle only once it has been
running longer than the threshold, so a task that just started is never stopped before
it could report. ``decide`` is pure; ``run_sleep`` gathers its inputs and acts on it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lambdas.control import (
    STARTING_TASK_STATES,
    ControlConfig,
    aws_call,
    describe_service,
    service_tasks,
    set_desired_count,
    task_started_at,
)
from server.framing import (
    METRIC_ACTIVE_CONNECTIONS,
    METRIC_LAST_ACTIVITY,
    ControlPlaneFormatError,
    metric_dimensions,
)

#: Look at least this far back, so a short threshold still sees a published datapoint.
MIN_LOOKBACK = 300.0
#: GetMetricStatistics returns at most 1440 datapoints per call.
_MAX_DATAPOINTS = 1440


class SleepAction(enum.StrEnum):
    """What one Sleep run did (or found): the ``action`` field of its decision."""

    SCALE_DOWN = "scale_down"
    KEEP_RUNNING = "keep_running"
    ALREADY_STOPPED = "already_stopped"


@dataclass(frozen=True, slots=True)
class SleepDecision:
    """What one scheduled Sleep run decided, with the numbers behind it (logged and returned)."""

    action: SleepAction
    reason: str
    checked_at: float  # epoch seconds
    idle_threshold: float  # seconds
    desired_count: int
    running_count: int
    pending_count: int
    running_since: float | None = None  # epoch seconds; newest task start or deployment update
    active_connections: float | None = None  # highest ActiveConnections in the window; None = no data
    last_activity: float | None = None  # newest LastActivityTimestamp value in the window
    idle_seconds: float | None = None
    datapoints: int = 0

    @property
    def scale_down(self) -> bool:
        return self.action is SleepAction.SCALE_DOWN

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "reason": self.reason,
            "checked_at": self.checked_at,
            "idle_threshold": self.idle_threshold,
            "desired_count": self.desired_count,
            "running_count": self.running_count,
            "pending_count": self.pending_count,
            "running_since": self.running_since,
            "active_connections": self.active_connections,
            "last_activity": self.last_activity,
            "idle_seconds": self.idle_seconds,
            "datapoints": self.datapoints,
        }

    @classmethod
    def from_json(cls, body: object) -> SleepDecision:
        if not isinstance(body, dict):
            raise ControlPlaneFormatError("sleep decision is not a JSON object")
        try:
            action = SleepAction(body["action"])
        except (KeyError, ValueError):
            raise ControlPlaneFormatError(f"bad sleep decision action {body.get('action')!r}") from None
        counts: list[int] = []
        for key in ("desired_count", "running_count", "pending_count", "datapoints"):
            value = body.get(key, 0)
            if not _is_count(value):
                raise ControlPlaneFormatError(f"sleep decision field {key} is not a count: {value!r}")
            counts.append(value)
        numbers: list[float | None] = []
        for key in _SLEEP_NUMBERS:
            value = body.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ControlPlaneFormatError(f"sleep decision field {key} is not a number: {value!r}")
            numbers.append(None if value is None else float(value))
        checked_at, threshold, running_since, connections, last_activity, idle = numbers
        if checked_at is None or threshold is None:
            raise ControlPlaneFormatError("sleep decision lacks checked_at or idle_threshold")
        reason = body.get("reason", "")
        return cls(
            action,
            reason if isinstance(reason, str) else str(reason),
            checked_at,
            threshold,
            counts[0],
            counts[1],
            counts[2],
            running_since,
            connections,
            last_activity,
            idle,
            counts[3],
        )


_SLEEP_NUMBERS = (
    "checked_at",
    "idle_threshold",
    "running_since",
    "active_connections",
    "last_activity",
    "idle_seconds",
)


def _is_count(value: object) -> bool:
    """A JSON count: an int (not a bool) in 0..1,000,000."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1_000_000


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    """The facts about the ECS service that the decision needs."""

    desired_count: int
    running_count: int
    pending_count: int
    running_since: float | None  # newest task start or deployment update, epoch seconds
    starting: bool  # a task is still being placed or provisioned


@dataclass(frozen=True, slots=True)
class MetricsWindow:
    """What CloudWatch holds for the server over the look-back window."""

    active_connections: float | None  # highest value; None when there are no datapoints
    last_activity: float | None  # newest LastActivityTimestamp value
    datapoints: int


def snapshot_service(service: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]]) -> ServiceSnapshot:
    """Reduce ECS descriptions to the decision's inputs.

    "Running since" is the newest of the tasks' start times and the primary deployment's
    update time: conservative, so a fresh start always gets a full threshold to report.
    """
    moments = [task_started_at(t) for t in tasks]
    for deployment in service.get("deployments") or []:
        if deployment.get("status") == "PRIMARY":
            for key in ("updatedAt", "createdAt"):
                value = deployment.get(key)
                if isinstance(value, datetime):
                    moments.append(value.timestamp())
                    break
    known = [m for m in moments if m > 0]
    running = int(service.get("runningCount", 0))
    pending = int(service.get("pendingCount", 0))
    starting = pending > 0 or any(t.get("lastStatus") in STARTING_TASK_STATES for t in tasks)
    if not tasks and running == 0:
        starting = True  # ECS has not placed the task yet
    return ServiceSnapshot(
        desired_count=int(service.get("desiredCount", 0)),
        running_count=running,
        pending_count=pending,
        running_since=max(known) if known else None,
        starting=starting,
    )


def decide(now: float, threshold: float, service: ServiceSnapshot, metrics: MetricsWindow) -> SleepDecision:
    """Whether to scale to zero now, with the reason and the numbers behind it."""

    def verdict(action: SleepAction, reason: str, idle: float | None = None) -> SleepDecision:
        return SleepDecision(
            action=action,
            reason=reason,
            checked_at=now,
            idle_threshold=threshold,
            desired_count=service.desired_count,
            running_count=service.running_count,
            pending_count=service.pending_count,
            running_since=service.running_since,
            active_connections=metrics.active_connections,
            last_activity=metrics.last_activity,
            idle_seconds=None if idle is None else round(idle, 3),
            datapoints=metrics.datapoints,
        )

    keep, down = SleepAction.KEEP_RUNNING, SleepAction.SCALE_DOWN
    if service.desired_count == 0:
        return verdict(SleepAction.ALREADY_STOPPED, "the service is already scaled to zero")
    if metrics.active_connections is not None and metrics.active_connections > 0:
        count = metrics.active_connections
        return verdict(keep, f"{count:g} agent connection(s) open during the look-back window")
    if service.starting:
        return verdict(keep, "the server is still starting")
    if service.running_since is None:
        return verdict(keep, "cannot tell since when the server runs")
    since_start = now - service.running_since
    if metrics.active_connections is None:
        if since_start > threshold:
            reason = (
                f"no metrics although the server has run {since_start:.0f} s "
                f"(threshold {threshold:g} s); is emit_metrics enabled on the server?"
            )
            return verdict(down, reason, since_start)
        return verdict(
            keep, f"the server started {since_start:.0f} s ago and has not reported yet", since_start
        )
    reference = max(service.running_since, metrics.last_activity or 0.0)
    idle = now - reference
    if idle >= threshold:
        return verdict(down, f"no connections and idle for {idle:.0f} s (threshold {threshold:g} s)", idle)
    return verdict(keep, f"idle for {idle:.0f} s, below the threshold of {threshold:g} s", idle)


def read_metrics(cloudwatch: Any, config: ControlConfig, now: float) -> MetricsWindow:
    """ActiveConnections (max) and LastActivityTimestamp (max) over the look-back window."""
    window = max(config.idle_threshold, MIN_LOOKBACK)
    period = max(60, math.ceil(window / _MAX_DATAPOINTS / 60) * 60)
    start = datetime.fromtimestamp(now - window, UTC)
    end = datetime.fromtimestamp(now + 60, UTC)  # include the datapoint of the current minute

    def maximum(metric: str) -> tuple[float | None, int]:
        with aws_call("cloudwatch:GetMetricStatistics", config):
            reply = cloudwatch.get_metric_statistics(
                Namespace=config.metrics_namespace,
                MetricName=metric,
                Dimensions=metric_dimensions(config.service),
                StartTime=start,
                EndTime=end,
                Period=period,
                Statistics=["Maximum"],
            )
        values = [float(p["Maximum"]) for p in reply.get("Datapoints", []) if "Maximum" in p]
        return (max(values) if values else None), len(values)

    connections, count = maximum(METRIC_ACTIVE_CONNECTIONS)
    last_activity, _ = maximum(METRIC_LAST_ACTIVITY)
    return MetricsWindow(connections, last_activity, count)


def run_sleep(ecs: Any, cloudwatch: Any, config: ControlConfig, now: float) -> SleepDecision:
    """One scheduled check: gather the inputs, decide, and scale to zero when the decision says so."""
    service = describe_service(ecs, config)
    if int(service.get("desiredCount", 0)) == 0:
        snapshot = snapshot_service(service, [])
        return decide(now, config.idle_threshold, snapshot, MetricsWindow(None, None, 0))
    snapshot = snapshot_service(service, service_tasks(ecs, config))
    decision = decide(now, config.idle_threshold, snapshot, read_metrics(cloudwatch, config, now))
    if decision.scale_down:
        set_desired_count(ecs, config, 0)
    return decision
