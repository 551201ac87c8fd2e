"""ECS operations of the control plane: read the server's state, wake it, kill it.

Plain functions over boto3 clients, so they run the same inside Lambda, behind the local
gateway and in tests. Every AWS failure leaves here as a ``ControlPlaneFailure`` that
carries a reply the user can act on (which name is wrong, which permission is missing).

Only the standard library, boto3 and the ``server`` modules the Lambda bundle ships
(``lambdas/packaging.py`` SERVER_MODULES) may be imported: the bundle carries nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from server.durations import parse_duration
from server.errors import FluidityError
from server.framing import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_SERVICE_NAME,
    METRICS_NAMESPACE,
    TUNNEL_PORT,
    ControlPlaneError,
    ServerState,
    ServerStatus,
)

#: Seconds the desktop should wait before polling again while the task starts or stops.
TRANSITION_RETRY_AFTER = 5
#: Seconds to back off after AWS throttled us.
THROTTLED_RETRY_AFTER = 5
DEFAULT_IDLE_THRESHOLD = 600.0

_PERMISSION = re.compile(r"not authorized to perform:?\s*([A-Za-z0-9-]+:[A-Za-z0-9*]+)")
_ACCESS_DENIED_CODES = frozenset(
    {"AccessDeniedException", "AccessDenied", "UnauthorizedOperation", "UnauthorizedAccess"}
)
_BAD_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "AuthFailure",
    }
)
_THROTTLING_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "ThrottledException",
        "SlowDown",
    }
)
STARTING_TASK_STATES = frozenset({"PROVISIONING", "PENDING", "ACTIVATING"})


class ConfigError(FluidityError, ValueError):
    """The Lambda's environment variables are malformed."""


class ControlPlaneFailure(FluidityError):
    """An operation failed in a way the caller should see as a ``ControlPlaneError`` reply."""

    def __init__(self, error: ControlPlaneError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """What the control plane operates on; read from the Lambda's environment."""

    cluster: str = DEFAULT_CLUSTER_NAME
    service: str = DEFAULT_SERVICE_NAME
    idle_threshold: float = DEFAULT_IDLE_THRESHOLD
    tunnel_port: int = TUNNEL_PORT
    metrics_namespace: str = METRICS_NAMESPACE

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ControlConfig:
        """Read CLUSTER_NAME, SERVICE_NAME, IDLE_THRESHOLD, TUNNEL_PORT and METRICS_NAMESPACE."""
        threshold_text = env.get("IDLE_THRESHOLD", "").strip()
        try:
            threshold = parse_duration(threshold_text) if threshold_text else DEFAULT_IDLE_THRESHOLD
        except ValueError:
            raise ConfigError(
                f"IDLE_THRESHOLD must be a duration like 10m, 600s or 600, got {threshold_text!r}"
            ) from None
        if threshold <= 0:
            raise ConfigError(f"IDLE_THRESHOLD must be longer than zero, got {threshold_text!r}")
        port_text = env.get("TUNNEL_PORT", "").strip()
        try:
            port = int(port_text) if port_text else TUNNEL_PORT
        except ValueError:
            raise ConfigError(f"TUNNEL_PORT must be a port number, got {port_text!r}") from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"TUNNEL_PORT must be 1..65535, got {port}")
        return cls(
            cluster=env.get("CLUSTER_NAME", "").strip() or DEFAULT_CLUSTER_NAME,
            service=env.get("SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
            idle_threshold=threshold,
            tunnel_port=port,
            metrics_namespace=env.get("METRICS_NAMESPACE", "").strip() or METRICS_NAMESPACE,
        )


# --------------------------------------------------------------------------- AWS errors


@contextmanager
def aws_call(action: str, config: ControlConfig) -> Iterator[None]:
    """Turn any AWS failure inside the block into a ``ControlPlaneFailure`` naming ``action``."""
    try:
        yield
    except ClientError as exc:
        raise ControlPlaneFailure(error_from_client_error(exc, action, config)) from exc
    except BotoCoreError as exc:
        raise ControlPlaneFailure(error_from_botocore(exc, action)) from exc


def error_from_client_error(exc: ClientError, action: str, config: ControlConfig) -> ControlPlaneError:
    """Map an AWS error reply to the error a user can act on (see the runbook's Lambda section)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", ""))
    http_status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "ClusterNotFoundException":
        return cluster_not_found(config)
    if code in ("ServiceNotFoundException", "ServiceNotActiveException"):
        return service_not_found(config, "does not exist or is not active")
    if code in _THROTTLING_CODES:
        return ControlPlaneError(
            "throttled",
            f"AWS is throttling {action} calls; try again in {THROTTLED_RETRY_AFTER} seconds",
            503,
            THROTTLED_RETRY_AFTER,
        )
    if code in _BAD_CREDENTIAL_CODES:
        return ControlPlaneError(
            "aws_credentials_invalid",
            f"AWS rejected the control plane's credentials when calling {action} ({code}); "
            "check the Lambda execution role",
            502,
        )
    if code in _ACCESS_DENIED_CODES or http_status == 403:
        found = _PERMISSION.search(message)
        permission = found.group(1) if found else action
        return ControlPlaneError(
            "access_denied",
            f"the control plane is not allowed to call {permission}: add {permission} to the "
            "Lambda execution role (aws lambda get-function --function-name <function> "
            "--query 'Configuration.Role')",
            502,
        )
    return ControlPlaneError("aws_error", f"{action} failed: {code}: {message[:300]}", 502)


def error_from_botocore(exc: BotoCoreError, action: str) -> ControlPlaneError:
    """Map a failure that never got an AWS reply (network, credentials) to a clear error."""
    if isinstance(
        exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError
    ):
        return ControlPlaneError(
            "aws_unreachable",
            f"could not reach AWS for {action}: {exc}",
            503,
            THROTTLED_RETRY_AFTER,
        )
    if isinstance(exc, NoCredentialsError):
        return ControlPlaneError(
            "aws_credentials_missing",
            f"no AWS credentials were found for {action}; the Lambda needs an execution role",
            500,
        )
    return ControlPlaneError("aws_error", f"{action} failed: {exc}", 502)


def cluster_not_found(config: ControlConfig) -> ControlPlaneError:
    return ControlPlaneError(
        "cluster_not_found",
        f"ECS cluster {config.cluster!r} was not found: check CLUSTER_NAME in the Lambda's "
        "environment or deploy the fluidity-fargate stack",
        404,
    )


def service_not_found(config: ControlConfig, why: str) -> ControlPlaneError:
    return ControlPlaneError(
        "service_not_found",
        f"ECS service {config.service!r} in cluster {config.cluster!r} {why}: check SERVICE_NAME "
        "in the Lambda's environment or deploy the fluidity-fargate stack",
        404,
    )


# --------------------------------------------------------------------------- reading state


def describe_service(ecs: Any, config: ControlConfig) -> dict[str, Any]:
    """The ECS service description; a missing or inactive service is a ``ControlPlaneFailure``."""
    with aws_call("ecs:DescribeServices", config):
        reply = ecs.describe_services(cluster=config.cluster, services=[config.service])
    services = reply.get("services") or []
    if not services:
        reasons = ", ".join(str(f.get("reason", "?")) for f in reply.get("failures") or []) or "MISSING"
        raise ControlPlaneFailure(service_not_found(config, f"was not found ({reasons})"))
    service: dict[str, Any] = services[0]
    status = service.get("status")
    if status != "ACTIVE":
        raise ControlPlaneFailure(service_not_found(config, f"is {status} (deleted or being deleted)"))
    return service


def service_tasks(ecs: Any, config: ControlConfig) -> list[dict[str, Any]]:
    """Tasks of the service that ECS wants running (any start-up stage), newest first."""
    with aws_call("ecs:ListTasks", config):
        arns = ecs.list_tasks(
            cluster=config.cluster, serviceName=config.service, desiredStatus="RUNNING"
        ).get("taskArns", [])
    if not arns:
        return []
    with aws_call("ecs:DescribeTasks", config):
        tasks = ecs.describe_tasks(cluster=config.cluster, tasks=arns[:100]).get("tasks", [])
    group = f"service:{config.service}"
    mine = [t for t in tasks if t.get("group", group) == group]
    return sorted(mine, key=task_started_at, reverse=True)


def task_started_at(task: Mapping[str, Any]) -> float:
    """Epoch seconds the task started (or was created); 0 when ECS has not said yet."""
    for key in ("startedAt", "createdAt"):
        value = task.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
    return 0.0


def task_public_ip(ec2: Any, task: Mapping[str, Any], config: ControlConfig) -> str | None:
    """Follow task → ENI attachment → EC2 network interface → public IP, as the runbook does by hand."""
    eni_id = None
    for attachment in task.get("attachments") or []:
        if attachment.get("type") != "ElasticNetworkInterface":
            continue
        for detail in attachment.get("details") or []:
            if detail.get("name") == "networkInterfaceId":
                eni_id = detail.get("value")
    if not eni_id:
        return None
    try:
        with aws_call("ec2:DescribeNetworkInterfaces", config):
            interfaces = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id]).get(
                "NetworkInterfaces", []
            )
    except ControlPlaneFailure as failure:
        if failure.error.error == "aws_error" and "NotFound" in failure.error.message:
            return None  # the task is being torn down and its interface is already gone
        raise
    for interface in interfaces:
        ip = (interface.get("Association") or {}).get("PublicIp")
        if ip:
            return str(ip)
    return None


def server_status(
    ecs: Any, ec2: Any, config: ControlConfig, service: Mapping[str, Any] | None = None
) -> ServerStatus:
    """Where the server is in its lifecycle and, once running, its address (changes nothing)."""
    if service is None:
        service = describe_service(ecs, config)
    desired = int(service.get("desiredCount", 0))
    running = int(service.get("runningCount", 0))
    pending = int(service.get("pendingCount", 0))
    tasks = service_tasks(ecs, config)
    if desired == 0:
        if running or pending or tasks:
            return ServerStatus(
                ServerState.STOPPING,
                desired,
                running,
                pending,
                port=config.tunnel_port,
                retry_after=TRANSITION_RETRY_AFTER,
                task_arn=tasks[0].get("taskArn") if tasks else None,
                message="the server is stopping",
            )
        return ServerStatus(
            ServerState.STOPPED,
            desired,
            running,
            pending,
            port=config.tunnel_port,
            message="the server is stopped; POST /wake starts it",
        )
    for task in tasks:
        if task.get("lastStatus") == "RUNNING":
            ip = task_public_ip(ec2, task, config)
            message = f"the server is running at {ip}:{config.tunnel_port}"
            if ip is None:
                message = (
                    "the server task is running but has no public IP: the service needs "
                    "assignPublicIp=ENABLED and a public subnet"
                )
            return ServerStatus(
                ServerState.RUNNING,
                desired,
                running,
                pending,
                public_ip=ip,
                port=config.tunnel_port,
                task_arn=task.get("taskArn"),
                message=message,
            )
    starting = next((t for t in tasks if t.get("lastStatus") in STARTING_TASK_STATES), None)
    detail = f"task is {starting.get('lastStatus')}" if starting else "waiting for ECS to place a task"
    return ServerStatus(
        ServerState.STARTING,
        desired,
        running,
        pending,
        port=config.tunnel_port,
        retry_after=TRANSITION_RETRY_AFTER,
        task_arn=starting.get("taskArn") if starting else None,
        message=f"the server is starting ({detail})",
    )


# --------------------------------------------------------------------------- changing state


def set_desired_count(ecs: Any, config: ControlConfig, count: int) -> dict[str, Any]:
    """Set the service's desired task count; returns the updated service description."""
    with aws_call("ecs:UpdateService", config):
        reply = ecs.update_service(cluster=config.cluster, service=config.service, desiredCount=count)
    service: dict[str, Any] = reply["service"]
    return service


def wake(ecs: Any, ec2: Any, config: ControlConfig) -> ServerStatus:
    """Ask for one server task; does nothing when one is already wanted (idempotent)."""
    service = describe_service(ecs, config)
    if int(service.get("desiredCount", 0)) == 0:
        service = set_desired_count(ecs, config, 1)
    return server_status(ecs, ec2, config, service)


def kill(ecs: Any, ec2: Any, config: ControlConfig) -> ServerStatus:
    """Ask for zero server tasks; ECS then stops the task gracefully (SIGTERM). Idempotent."""
    service = describe_service(ecs, config)
    if int(service.get("desiredCount", 0)) != 0:
        service = set_desired_count(ecs, config, 0)
    return server_status(ecs, ec2, config, service)
