"""``lifecycle: ecs``: drive the Fargate service directly with the user's AWS credentials.

For accounts without the Lambda control plane. It does what the runbook's manual steps do
(``update-service --desired-count 1``, list and describe the service's tasks, read the
task's network interface and its public IP; ``--desired-count 0`` to stop) by calling the
same ECS functions the Wake/Kill/Status Lambdas run, with the user's profile and region.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint, LifecycleError, ProgressCallback, WakeCancelled, WakeRefused
from desktop.lifecycle.polling import REQUEST_TIMEOUT, TransientLifecycleError, wait_until_running
from lambdas import control
from server.framing import ControlPlaneError, ServerStatus

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Everything this backend calls; the hint for an access-denied error.
REQUIRED_PERMISSIONS = (
    "ecs:DescribeServices, ecs:UpdateService, ecs:ListTasks, ecs:DescribeTasks, ec2:DescribeNetworkInterfaces"
)
#: Control-plane error codes that may pass on their own (retried while waking).
_TRANSIENT_CODES = frozenset({"throttled", "aws_unreachable"})
#: Errors of a wake that mean the service was never scaled up (so there is nothing to stop).
_REFUSED_CODES = frozenset(
    {
        "config",
        "cluster_not_found",
        "service_not_found",
        "access_denied",
        "aws_credentials_invalid",
        "aws_credentials_missing",
    }
)


def desktop_error(error: ControlPlaneError, config: AgentConfig) -> LifecycleError:
    """Reword a control-plane error for someone using their own AWS profile (not a Lambda role)."""
    where = f"in region {config.aws_region}" if config.aws_region else "in the profile's region"
    profile = f"AWS profile {config.aws_profile!r}" if config.aws_profile else "your AWS credentials"
    messages = {
        "cluster_not_found": f"ECS cluster {config.cluster_name!r} was not found {where}: check "
        "cluster_name and aws_region, or deploy the fluidity-fargate stack",
        "service_not_found": f"ECS service {config.service_name!r} was not found in cluster "
        f"{config.cluster_name!r} {where}: check service_name, or deploy the fluidity-fargate stack",
        "access_denied": f"AWS refused the request for {profile}; it needs {REQUIRED_PERMISSIONS} "
        f"({error.message})",
        "aws_credentials_invalid": f"AWS rejected {profile}: refresh them (aws configure / aws sso login)",
        "aws_credentials_missing": "no AWS credentials found: set aws_profile or run `aws configure`",
    }
    message = messages.get(error.error, error.message)
    if error.error in _TRANSIENT_CODES:
        return TransientLifecycleError(error.error, message)
    return LifecycleError(error.error, message)


class EcsLifecycle:
    """Scales ``cluster_name``/``service_name`` between 0 and 1 with boto3."""

    name = "ecs"

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._control = control.ControlConfig(
            cluster=config.cluster_name, service=config.service_name, tunnel_port=config.server_port
        )
        self._lock = threading.Lock()
        self._clients: tuple[Any, Any] | None = None

    def _aws(self) -> tuple[Any, Any]:
        # boto3 is imported and the session built on first use, on the controller's worker
        # thread, so starting the tray never waits for it.
        with self._lock:
            if self._clients is None:
                import boto3
                from botocore.config import Config
                from botocore.exceptions import NoRegionError, ProfileNotFound

                try:
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
                except ProfileNotFound:
                    raise LifecycleError(
                        "config", f"AWS profile {self._config.aws_profile!r} not found (aws_profile)"
                    ) from None
                except NoRegionError:
                    raise LifecycleError(
                        "config", "no AWS region: set aws_region or a region for the AWS profile"
                    ) from None
            return self._clients

    def _call(self, operation: Callable[[Any, Any, control.ControlConfig], _T]) -> _T:
        ecs, ec2 = self._aws()
        try:
            return operation(ecs, ec2, self._control)
        except control.ControlPlaneFailure as failure:
            raise desktop_error(failure.error, self._config) from None

    def _once(self, operation: Callable[[Any, Any, control.ControlConfig], ServerStatus]) -> ServerStatus:
        """One call outside a wake: a transient failure is reported, not retried."""
        try:
            return self._call(operation)
        except TransientLifecycleError as error:
            raise LifecycleError(error.code, error.message) from None

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        started = time.monotonic()
        if cancel.is_set():
            raise WakeCancelled()
        try:
            first = self._once(control.wake)
        except LifecycleError as error:
            if error.code in _REFUSED_CODES:
                raise WakeRefused(error.code, error.message) from None
            raise
        _log.info("ECS service woken", extra={"server_state": first.state.value})
        return wait_until_running(
            first,
            lambda _request_timeout: self._call(control.server_status),
            timeout=timeout,
            interval=self._config.wake_poll_interval,
            cancel=cancel,
            on_progress=on_progress,
            started=started,
        )

    def status(self) -> ServerStatus:
        return self._once(control.server_status)

    def kill(self) -> ServerStatus:
        status = self._once(control.kill)
        _log.info("ECS service scaled to zero", extra={"server_state": status.state.value})
        return status

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            client.close()
