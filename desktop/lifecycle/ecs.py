"""``lifecycle: ecs``: drive the Fargate service directly with the user's AWS credentials.

For accounts without the Lambda control plane. It does exactly what the runbook's manual
steps do: ``update-service --desired-count 1``, list and describe the service's tasks, read
the task's network interface and its public IP; ``--desired-count 0`` to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint, LifecycleError, ProgressCallback, WakeCancelled
from desktop.lifecycle.polling import REQUEST_TIMEOUT, TransientLifecycleError, wait_until_running
from server.framing import ServerState, ServerStatus

_log = logging.getLogger(__name__)

_MISSING_CODES = frozenset(
    {"ClusterNotFoundException", "ServiceNotFoundException", "ServiceNotActiveException"}
)
_DENIED_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
    }
)
_RETRY_CODES = frozenset(
    {"ThrottlingException", "Throttling", "RequestLimitExceeded", "ServerException", "ServiceUnavailable"}
)


def translate_aws_error(error: Exception, action: str, where: str) -> LifecycleError:
    """A botocore error as a LifecycleError whose message says what to fix."""
    from botocore import exceptions as aws

    if isinstance(error, aws.ProfileNotFound):
        profile = error.kwargs.get("profile")
        return LifecycleError("config", f"AWS profile {profile!r} not found (aws_profile)")
    if isinstance(error, aws.NoRegionError):
        return LifecycleError("config", "no AWS region: set aws_region or a region for the AWS profile")
    if isinstance(error, aws.NoCredentialsError | aws.PartialCredentialsError):
        return LifecycleError("credentials", "no AWS credentials: set aws_profile or configure the AWS CLI")
    if isinstance(error, aws.ClientError):
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        text = str(error.response.get("Error", {}).get("Message", "")) or code
        http_status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING_CODES:
            return LifecycleError("no_such_service", f"{action}: {where} does not exist ({code}: {text})")
        if code in _DENIED_CODES:
            return LifecycleError("forbidden", f"{action}: AWS refused the request ({code}: {text})")
        if code in _RETRY_CODES or http_status >= 500:
            return TransientLifecycleError("aws_unavailable", f"{action}: {code}: {text}")
        return LifecycleError("aws_error", f"{action}: {code}: {text}")
    if isinstance(error, aws.EndpointConnectionError | aws.ConnectTimeoutError | aws.ReadTimeoutError):
        return TransientLifecycleError("unreachable", f"{action}: cannot reach AWS: {error}")
    if isinstance(error, aws.BotoCoreError):
        return LifecycleError("aws_error", f"{action}: {error}")
    raise error


def _running_service_task(ecs: Any, cluster: str, service: str) -> dict[str, Any] | None:
    arns = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus="RUNNING").get("taskArns", [])
    if not arns:
        return None
    tasks = ecs.describe_tasks(cluster=cluster, tasks=arns[:100]).get("tasks", [])
    for task in tasks:
        group = task.get("group")
        if group is not None and group != f"service:{service}":
            continue  # a task of another service or a one-off run_task in the same cluster
        if task.get("lastStatus") == "RUNNING":
            return dict(task)
    return None


def _network_interface_id(task: dict[str, Any]) -> str | None:
    for attachment in task.get("attachments", []):
        if attachment.get("type") != "ElasticNetworkInterface":
            continue
        for detail in attachment.get("details", []):
            if detail.get("name") == "networkInterfaceId":
                return str(detail.get("value"))
    return None


def _public_ip(ec2: Any, eni_id: str) -> str | None:
    interfaces = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id]).get("NetworkInterfaces", [])
    if not interfaces:
        return None
    ip = interfaces[0].get("Association", {}).get("PublicIp")
    return str(ip) if ip else None


def read_service_status(ecs: Any, ec2: Any, cluster: str, service: str, port: int) -> ServerStatus:
    """The service's counts and, when a task is running, its public IP (runbook "Get server public IP")."""
    reply = ecs.describe_services(cluster=cluster, services=[service])
    found = [s for s in reply.get("services", []) if s.get("status") == "ACTIVE"]
    if not found:
        raise LifecycleError(
            "no_such_service", f"ECS service {service!r} not found in cluster {cluster!r} (service_name)"
        )
    svc = found[0]
    desired, running, pending = (int(svc.get(k, 0)) for k in ("desiredCount", "runningCount", "pendingCount"))
    if desired == 0:
        state = ServerState.STOPPED if running == 0 and pending == 0 else ServerState.STOPPING
        return ServerStatus(state, desired, running, pending, port=port)
    task = _running_service_task(ecs, cluster, service)
    if task is None:
        return ServerStatus(ServerState.STARTING, desired, running, pending, port=port)
    eni = _network_interface_id(task)
    ip = _public_ip(ec2, eni) if eni else None
    state = ServerState.RUNNING if ip else ServerState.STARTING
    message = "" if ip else "task is running without a public IP (the service needs assignPublicIp ENABLED)"
    return ServerStatus(
        state, desired, running, pending, ip, port, task_arn=task.get("taskArn"), message=message
    )


class EcsLifecycle:
    """Scales ``cluster_name``/``service_name`` between 0 and 1 with boto3."""

    name = "ecs"

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._cluster = config.cluster_name
        self._service = config.service_name
        self._port = config.server_port
        self._where = f"ECS service {self._service!r} in cluster {self._cluster!r}"
        self._lock = threading.Lock()
        self._clients: tuple[Any, Any] | None = None

    def _aws(self) -> tuple[Any, Any]:
        # boto3 is imported and the session built on first use, in the caller's worker thread,
        # so starting the tray never waits for it.
        with self._lock:
            if self._clients is None:
                import boto3
                from botocore.config import Config

                session = boto3.Session(
                    profile_name=self._config.aws_profile, region_name=self._config.aws_region
                )
                settings = Config(
                    connect_timeout=self._config.connect_timeout,
                    read_timeout=REQUEST_TIMEOUT,
                    retries={"max_attempts": 2, "mode": "standard"},
                )
                self._clients = (
                    session.client("ecs", config=settings),
                    session.client("ec2", config=settings),
                )
            return self._clients

    def _guarded(self, action: str, call: Any) -> Any:
        try:
            ecs, ec2 = self._aws()
            return call(ecs, ec2)
        except LifecycleError:
            raise
        except Exception as error:  # botocore raises many types; translate_aws_error re-raises others
            raise translate_aws_error(error, action, self._where) from None

    def _read_status(self, action: str) -> ServerStatus:
        return self._guarded(
            action, lambda ecs, ec2: read_service_status(ecs, ec2, self._cluster, self._service, self._port)
        )

    def _set_desired(self, action: str, count: int) -> None:
        self._guarded(
            action,
            lambda ecs, _ec2: ecs.update_service(
                cluster=self._cluster, service=self._service, desiredCount=count
            ),
        )
        _log.info("ECS desired count set", extra={"desired_count": count, "service": self._service})

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        started = time.monotonic()
        if cancel.is_set():
            raise WakeCancelled()
        try:
            self._set_desired("wake", 1)
            first = self._read_status("wake")
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None
        return wait_until_running(
            first,
            lambda _request_timeout: self._read_status("status"),
            timeout=timeout,
            interval=self._config.wake_poll_interval,
            cancel=cancel,
            on_progress=on_progress,
            started=started,
        )

    def status(self) -> ServerStatus:
        try:
            return self._read_status("status")
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None

    def kill(self) -> ServerStatus:
        try:
            self._set_desired("kill", 0)
            return self._read_status("kill")
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            client.close()
