"""Checks of the cloud side: the control plane's Status call, and AWS read with the user's credentials.

Every check is a plain function of boto3 clients (or the Lambda backend) and a clock, so
tests run them against a moto server on loopback. Only read calls are made: the control
plane is asked for ``GET /status`` (never Wake), and AWS only for Describe/List/Get.
The ECS questions reuse ``lambdas.control`` (the code the Lambdas and the ecs backend run).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from desktop.config import AgentConfig
from desktop.doctor.model import CheckResult, Status, failed, info, passed, skipped, warned
from desktop.lifecycle.base import LifecycleError
from lambdas import control
from server.framing import (
    METRIC_ACTIVE_CONNECTIONS,
    METRICS_NAMESPACE,
    ServerState,
    ServerStatus,
    metric_dimensions,
)

LAMBDA_STACK = "fluidity-lambda"
FARGATE_STACK = "fluidity-fargate"
#: The functions of the fluidity-lambda stack; each carries CLUSTER_NAME and SERVICE_NAME.
FUNCTIONS = ("fluidity-wake", "fluidity-status", "fluidity-kill", "fluidity-sleep")
SLEEP_RULE = "fluidity-sleep-schedule"
SERVER_LOG_GROUP = "/fluidity/server"
#: ``awslogs-stream-prefix`` of the task definition: streams are ``server/<container>/<task id>``.
LOG_STREAM_PREFIX = "server"
#: How far back ``ActiveConnections`` must have been published while a task ran.
METRICS_WINDOW = timedelta(minutes=15)
#: A task younger than this may not have published its first datapoint yet (60 s interval).
METRICS_GRACE = timedelta(minutes=3)
_COMPLETE = frozenset({"CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE"})
_EXECUTE_API_REGION = re.compile(r"\.execute-api\.([a-z0-9-]+)\.amazonaws\.com")
_DEPLOY_FIX = (
    "deploy it with `fluidity-deploy deploy` (creates or updates fluidity-fargate and fluidity-lambda)"
)
_LOGS_HINT = (
    "the full log: `aws logs tail /fluidity/server --since 1h` (AWS CLI v2), or "
    "`aws logs filter-log-events --log-group-name /fluidity/server --log-stream-names {stream}` (v1)"
)

Clock = Callable[[], datetime]
#: This machine's public IPv4 address as seen from the internet, or None when it cannot be learnt.
PublicAddressSource = Callable[[], str | None]


# ----------------------------------------------------------------------------- control plane


def check_control_plane(
    config: AgentConfig,
    *,
    make_lifecycle: Callable[[AgentConfig], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[CheckResult], ServerStatus | None]:
    """``GET <api_url>/status`` with the API key, through the lambda backend the agent uses."""
    if make_lifecycle is None:
        from desktop.lifecycle.lambda_api import LambdaLifecycle

        make_lifecycle = LambdaLifecycle
    url = f"{(config.api_url or '').rstrip('/')}/status"
    started = clock()
    try:
        lifecycle = make_lifecycle(config)
        try:
            status: ServerStatus = lifecycle.status()
        finally:
            lifecycle.close()
    except LifecycleError as error:
        return _control_plane_failure(error, url), None
    elapsed = round((clock() - started) * 1000)
    answered = passed("control_plane.api", f"GET {url} answered in {elapsed}ms and accepted the API key")
    return [answered, _status_result(status)], status


def _control_plane_failure(error: LifecycleError, url: str) -> list[CheckResult]:
    key_fix = (
        "set api_key to the ApiKeyId output of fluidity-lambda (`fluidity-deploy outputs`, or "
        "`aws cloudformation describe-stacks --stack-name fluidity-lambda "
        "--query 'Stacks[0].Outputs[?OutputKey==`ApiKeyId`].OutputValue' --output text`)"
    )
    if error.code == "forbidden":
        if "Missing Authentication Token" in error.message:
            return [
                failed(
                    "control_plane.api",
                    f"{url} does not exist on the API ({error.message})",
                    "set api_url to the ApiGatewayUrl output of fluidity-lambda (it ends in /prod)",
                )
            ]
        return [failed("control_plane.api", f"the API rejected the API key: {error.message}", key_fix)]
    if error.code in ("unreachable", "config"):
        return [
            failed(
                "control_plane.api",
                error.message,
                "check api_url (the ApiGatewayUrl output of fluidity-lambda) and this machine's network",
            )
        ]
    answered = passed("control_plane.api", f"GET {url} answered and accepted the API key")
    if error.code == "bad_reply":
        return [
            answered,
            failed(
                "control_plane.reply",
                error.message,
                "api_url must be the fluidity-lambda API (the ApiGatewayUrl output); "
                "redeploy with `fluidity-deploy`",
            ),
        ]
    if error.code in ("cluster_not_found", "service_not_found"):
        fix = (
            "the Lambdas' CLUSTER_NAME / SERVICE_NAME do not name the deployed service: run "
            "`fluidity-deploy deploy` (it sets them from the fluidity-fargate outputs); "
            "`fluidity doctor --aws` shows which"
        )
        return [answered, failed("control_plane.reply", error.message, fix, error=error.code)]
    return [
        answered,
        failed(
            "control_plane.reply",
            error.message,
            "read the Status Lambda's log: `aws logs tail /aws/lambda/fluidity-status --since 15m` "
            "(AWS CLI v2); `fluidity doctor --aws` checks the deployment",
            error=error.code,
        ),
    ]


def _status_result(status: ServerStatus) -> CheckResult:
    counts = f"{status.running_count} of {status.desired_count} tasks running"
    details = status.to_json()
    if status.state is ServerState.RUNNING:
        if status.public_ip:
            return passed(
                "control_plane.reply",
                f"state running ({counts}), server at {status.public_ip}:{status.port}",
                **details,
            )
        return failed(
            "control_plane.reply",
            f"state running ({counts}) but the task has no public IP",
            "the service needs assignPublicIp ENABLED and a public subnet (fluidity-fargate sets both: "
            "redeploy with `fluidity-deploy deploy`)",
            **details,
        )
    if status.state is ServerState.STOPPED:
        return passed("control_plane.reply", f"state stopped ({counts}): Connect wakes it", **details)
    return passed(
        "control_plane.reply", f"state {status.state.value} ({counts}): {status.message}", **details
    )


# ----------------------------------------------------------------------------- AWS access


@dataclass(frozen=True)
class AwsClients:
    """The boto3 clients the AWS checks read from."""

    sts: Any
    cloudformation: Any
    ecs: Any
    ec2: Any
    events: Any
    lambda_: Any
    logs: Any
    cloudwatch: Any
    region: str = ""


def region_from_api_url(api_url: str | None) -> str | None:
    """The region in an API Gateway URL (``https://ID.execute-api.REGION.amazonaws.com/prod``)."""
    match = _EXECUTE_API_REGION.search(api_url or "")
    return match.group(1) if match else None


def open_aws_clients(config: AgentConfig) -> AwsClients:
    """Clients for the user's profile and region (aws_region, else the API URL's, else the profile's)."""
    import boto3
    from botocore.config import Config

    session = boto3.Session(
        profile_name=config.aws_profile, region_name=config.aws_region or region_from_api_url(config.api_url)
    )
    settings = Config(
        connect_timeout=config.connect_timeout,
        read_timeout=15,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return AwsClients(
        sts=session.client("sts", config=settings),
        cloudformation=session.client("cloudformation", config=settings),
        ecs=session.client("ecs", config=settings),
        ec2=session.client("ec2", config=settings),
        events=session.client("events", config=settings),
        lambda_=session.client("lambda", config=settings),
        logs=session.client("logs", config=settings),
        cloudwatch=session.client("cloudwatch", config=settings),
        region=session.region_name or "",
    )


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _error_message(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Message", "")) or str(error)


def aws_failure(check: str, action: str, error: Exception) -> CheckResult:
    """An AWS call failed: say which call and what the user's identity needs."""
    code = _error_code(error)
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation") or "not authorized" in (
        _error_message(error)
    ):
        return failed(
            check,
            f"AWS refused {action} ({code})",
            f"your AWS identity needs the read-only permission {action}",
        )
    if code:
        return failed(check, f"{action} failed: {code}: {_error_message(error)[:300]}", "")
    return failed(check, f"{action} failed: {error}", "check this machine's network and AWS_* settings")


def _aws_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


# ----------------------------------------------------------------------------- identity, stacks


def check_identity(clients: AwsClients, config: AgentConfig) -> CheckResult:
    from botocore.exceptions import NoCredentialsError, NoRegionError

    profile = f"profile {config.aws_profile}" if config.aws_profile else "default credentials"
    if not clients.region:
        return failed(
            "aws.credentials",
            "no AWS region",
            "set aws_region in the settings (or a region for the AWS profile, or AWS_REGION)",
        )
    try:
        identity = clients.sts.get_caller_identity()
    except NoCredentialsError:
        return failed(
            "aws.credentials",
            "no AWS credentials found",
            "run `aws configure` (or `aws sso login`), or set aws_profile / AWS_PROFILE",
        )
    except NoRegionError:
        return failed("aws.credentials", "no AWS region", "set aws_region (or AWS_REGION)")
    except _aws_errors() as error:
        return failed(
            "aws.credentials",
            f"AWS rejected the credentials ({_error_code(error) or error})",
            "refresh them: `aws configure` or `aws sso login`",
        )
    return passed(
        "aws.credentials",
        f"account {identity.get('Account')} as {identity.get('Arn')} ({profile}, region {clients.region})",
    )


def check_stack(cfn: Any, name: str, *, required: bool) -> tuple[CheckResult, dict[str, str] | None]:
    """The stack exists and is in a complete state; returns its outputs."""
    check = f"aws.stack.{name}"
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except _aws_errors() as error:
        if "does not exist" in _error_message(error):
            stacks = []
        else:
            return aws_failure(check, "cloudformation:DescribeStacks", error), None
    stack = stacks[0] if stacks else None
    if stack is None or stack.get("StackStatus") == "DELETE_COMPLETE":
        if not required:
            return (
                warned(
                    check,
                    f"stack {name} is not deployed: no Sleep Lambda stops an idle server",
                    _DEPLOY_FIX,
                ),
                None,
            )
        return failed(check, f"stack {name} does not exist", _DEPLOY_FIX), None
    status = str(stack.get("StackStatus"))
    outputs = {item["OutputKey"]: item["OutputValue"] for item in stack.get("Outputs") or []}
    reason = stack.get("StackStatusReason")
    if status in _COMPLETE:
        return passed(check, f"{name} is {status}"), outputs
    if status == "UPDATE_ROLLBACK_COMPLETE":
        return (
            warned(
                check,
                f"{name} is {status}: its last update failed and was rolled back"
                + (f" ({reason})" if reason else ""),
                "see why with `aws cloudformation describe-stack-events --stack-name "
                f"{name}`, fix it and run `fluidity-deploy deploy` again",
            ),
            outputs,
        )
    if status.endswith("IN_PROGRESS"):
        return warned(
            check, f"{name} is {status}", "wait until it finishes, then run the doctor again"
        ), outputs
    return (
        failed(
            check,
            f"{name} is {status}" + (f" ({reason})" if reason else ""),
            f"`aws cloudformation describe-stack-events --stack-name {name}` shows why; fix it, then "
            "`fluidity-deploy destroy` and `fluidity-deploy deploy`",
        ),
        outputs,
    )


def check_outputs(
    config: AgentConfig, lambda_outputs: Mapping[str, str] | None, fargate_outputs: Mapping[str, str] | None
) -> CheckResult:
    """The settings name what the stacks created (the runbook copies these outputs by hand)."""
    mismatches: list[str] = []
    fixes: list[str] = []
    compared: list[str] = []
    if config.lifecycle == "lambda" and lambda_outputs is not None:
        url = lambda_outputs.get("ApiGatewayUrl")
        if url is not None:
            compared.append("ApiGatewayUrl")
            if url.rstrip("/") != (config.api_url or "").rstrip("/"):
                mismatches.append(f"api_url is {config.api_url}, the ApiGatewayUrl output is {url}")
                fixes.append(f"api_url: {url}")
        key = lambda_outputs.get("ApiKeyId")
        if key is not None:
            compared.append("ApiKeyId")
            if key != config.api_key:
                mismatches.append("api_key differs from the ApiKeyId output")
                fixes.append("api_key: the ApiKeyId output (`fluidity-deploy outputs`)")
    if config.lifecycle == "ecs" and fargate_outputs is not None:
        for key, value in (("ClusterName", config.cluster_name), ("ServiceName", config.service_name)):
            output = fargate_outputs.get(key)
            if output is None:
                continue
            compared.append(key)
            if output != value:
                setting = "cluster_name" if key == "ClusterName" else "service_name"
                mismatches.append(f"{setting} is {value!r}, the {key} output is {output!r}")
                fixes.append(f"{setting}: {output}")
    if mismatches:
        return failed(
            "aws.outputs",
            "; ".join(mismatches),
            "put the stack outputs into your settings: " + "; ".join(fixes),
        )
    if not compared:
        return skipped("aws.outputs", "no stack outputs to compare with the settings")
    return passed("aws.outputs", f"the settings match the {', '.join(compared)} outputs")


# ----------------------------------------------------------------------------- ECS


def check_cluster(ecs: Any, cluster: str, region: str) -> CheckResult:
    try:
        reply = ecs.describe_clusters(clusters=[cluster])
    except _aws_errors() as error:
        return aws_failure("aws.cluster", "ecs:DescribeClusters", error)
    found = [c for c in reply.get("clusters") or [] if c.get("status") == "ACTIVE"]
    if not found:
        return failed(
            "aws.cluster",
            f"ECS cluster {cluster!r} does not exist in {region or 'this region'}",
            f"{_DEPLOY_FIX}; or correct cluster_name / aws_region",
        )
    return passed("aws.cluster", f"ECS cluster {cluster} is ACTIVE")


def check_service(ecs: Any, cluster: str, service: str) -> tuple[CheckResult, dict[str, Any] | None]:
    config = control.ControlConfig(cluster=cluster, service=service)
    try:
        description = control.describe_service(ecs, config)
    except control.ControlPlaneFailure as failure:
        if failure.error.error in ("service_not_found", "cluster_not_found"):
            return (
                failed(
                    "aws.service",
                    f"ECS service {service!r} does not exist in cluster {cluster!r} (or is not active)",
                    f"{_DEPLOY_FIX}; or correct service_name",
                ),
                None,
            )
        return failed("aws.service", failure.error.message, ""), None
    desired = int(description.get("desiredCount", 0))
    running = int(description.get("runningCount", 0))
    pending = int(description.get("pendingCount", 0))
    counts = f"desired {desired}, running {running}, pending {pending}"
    return (
        passed("aws.service", f"ECS service {service} is ACTIVE: {counts}", desired=desired, running=running),
        description,
    )


@dataclass(frozen=True)
class TaskFindings:
    results: list[CheckResult]
    running_task: dict[str, Any] | None = None
    public_ip: str | None = None
    security_groups: list[str] = field(default_factory=list)


def _task_id(task: Mapping[str, Any]) -> str:
    return str(task.get("taskArn", "")).rsplit("/", 1)[-1]


def _stopped_tasks(ecs: Any, cluster: str, service: str) -> list[dict[str, Any]]:
    arns = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus="STOPPED").get("taskArns", [])
    if not arns:
        return []
    tasks = ecs.describe_tasks(cluster=cluster, tasks=arns[:100]).get("tasks", [])
    group = f"service:{service}"
    mine = [task for task in tasks if task.get("group", group) == group]

    def stopped_at(task: Mapping[str, Any]) -> float:
        for key in ("stoppedAt", "stoppingAt", "createdAt"):
            value = task.get(key)
            if isinstance(value, datetime):
                return value.timestamp()
        return 0.0

    return sorted(mine, key=stopped_at, reverse=True)


def task_log_lines(logs: Any, task: Mapping[str, Any], log_group: str, limit: int = 3) -> list[str]:
    """The most telling lines the task's container wrote to its log stream (errors first)."""
    containers = task.get("containers") or [{}]
    container = containers[0].get("name") or "fluidity-server"
    stream = f"{LOG_STREAM_PREFIX}/{container}/{_task_id(task)}"
    try:
        events = logs.filter_log_events(logGroupName=log_group, logStreamNames=[stream], limit=200).get(
            "events", []
        )
    except _aws_errors():
        return []
    lines = [_log_text(event.get("message", "")) for event in events]
    lines = [line for line in lines if line]
    telling = [line for line in lines if re.search(r"error|cannot start|traceback|exec format", line, re.I)]
    chosen = (telling or lines)[-limit:]
    return [line[:300] for line in chosen]


def _log_text(raw: str) -> str:
    """A server JSON log line as ``level: message`` (other lines as they are)."""
    text = raw.strip()
    try:
        entry = json.loads(text)
    except ValueError:
        return text
    if not isinstance(entry, dict):
        return text
    message = str(entry.get("message", text))
    error = entry.get("error")
    level = entry.get("level")
    shown = f"{level}: {message}" if level else message
    return f"{shown} ({error})" if error else shown


_NORMAL_STOPS = ("scaled to zero", "scaling activity", "task stopped by user")


def diagnose_stopped_task(task: Mapping[str, Any], log_lines: Sequence[str]) -> CheckResult:
    """Why a task stopped (its stoppedReason, the container's exit code, the log) and the fix."""
    reason = str(task.get("stoppedReason") or "no reason given")
    containers = task.get("containers") or []
    exit_codes = [c.get("exitCode") for c in containers if c.get("exitCode") is not None]
    container_reasons = [str(c["reason"]) for c in containers if c.get("reason")]
    exit_code = exit_codes[0] if exit_codes else None
    text = " ".join([reason, *container_reasons])
    lowered = text.lower()
    logs = " ".join(log_lines).lower()
    stream = (
        f"{LOG_STREAM_PREFIX}/{(containers[0].get('name') if containers else None) or 'fluidity-server'}/"
    )
    stream += _task_id(task)
    found = f"task {_task_id(task)} stopped: {reason}"
    if container_reasons:
        found += f" ({'; '.join(container_reasons)})"
    if exit_code is not None:
        found += f"; container exit code {exit_code}"
    if log_lines:
        found += "; log: " + " | ".join(log_lines)
    details: dict[str, Any] = {
        "task": _task_id(task),
        "stopped_reason": reason,
        "exit_code": exit_code,
        "log": list(log_lines),
    }
    if (
        "cannotpullcontainer" in lowered
        or "pull image" in lowered
        or ("image" in lowered and "not found" in lowered)
    ):
        return failed(
            "aws.task",
            found,
            "the image could not be pulled: build and push it to the RepositoryUri output with the ImageTag "
            "tag (`make docker-build-server`, `docker tag`, `docker push`), and make sure the execution "
            "role may pull from ECR",
            **details,
        )
    if "resourceinitializationerror" in lowered:
        if any(word in lowered for word in ("secret", "ssm", "parameter")):
            fix = (
                "the task cannot read its TLS parameters: run `fluidity-deploy secrets --cert-dir certs` in "
                "the stack's region"
            )
        else:
            fix = (
                "the task could not reach ECR, SSM or CloudWatch Logs: it needs a public IP in a public "
                "subnet (fluidity-fargate sets both; redeploy with `fluidity-deploy deploy`)"
            )
        return failed("aws.task", found, fix, **details)
    if "outofmemory" in lowered or exit_code == 137:
        return failed(
            "aws.task",
            found,
            "the server ran out of memory: raise Memory in server/cloudformation.yaml (e.g. 1024) and run "
            "`fluidity-deploy deploy`",
            **details,
        )
    if "exec format error" in logs or "exec format error" in lowered:
        return failed(
            "aws.task",
            found,
            "the image was built for another CPU: rebuild with `make docker-build-server` (linux/amd64) "
            "and push it again",
            **details,
        )
    if "capacity" in lowered:
        return failed("aws.task", found, "Fargate has no capacity now: wait and retry, or use another region")
    if any(stop in lowered for stop in _NORMAL_STOPS) and not exit_code:
        return info("aws.task", found, **details)
    if "cannot start" in logs and any(word in logs for word in ("certificate", "tls", "key", ".crt", "pem")):
        fix = (
            "the server cannot load its TLS files: `fluidity-deploy secrets --cert-dir certs`, then "
            "`aws ecs update-service --cluster fluidity --service fluidity-server --force-new-deployment`"
        )
    else:
        fix = "the server failed at start-up: fix what its log says; " + _LOGS_HINT.format(stream=stream)
    return failed("aws.task", found, fix, **details)


def check_tasks(
    clients: AwsClients,
    cluster: str,
    service_name: str,
    service: Mapping[str, Any],
    *,
    log_group: str,
    port: int,
) -> TaskFindings:
    """The running task (and its public IP), or why the newest task stopped."""
    config = control.ControlConfig(cluster=cluster, service=service_name, tunnel_port=port)
    desired = int(service.get("desiredCount", 0))
    groups = list(
        ((service.get("networkConfiguration") or {}).get("awsvpcConfiguration") or {}).get("securityGroups")
        or []
    )
    try:
        tasks = control.service_tasks(clients.ecs, config)
    except control.ControlPlaneFailure as failure:
        return TaskFindings([failed("aws.task", failure.error.message, "")], security_groups=groups)
    running = next((task for task in tasks if task.get("lastStatus") == "RUNNING"), None)
    if running is not None:
        try:
            ip = control.task_public_ip(clients.ec2, running, config)
        except control.ControlPlaneFailure as failure:
            return TaskFindings(
                [
                    passed("aws.task", f"task {_task_id(running)} is RUNNING"),
                    failed("aws.public_ip", failure.error.message, ""),
                ],
                running,
                security_groups=groups,
            )
        started = running.get("startedAt")
        since = f" since {started:%Y-%m-%d %H:%M} UTC" if isinstance(started, datetime) else ""
        task_line = passed("aws.task", f"task {_task_id(running)} is RUNNING{since}", task=_task_id(running))
        if ip is None:
            address = failed(
                "aws.public_ip",
                "the running task has no public IP",
                "the service needs assignPublicIp ENABLED in a public subnet (fluidity-fargate sets both)",
            )
        else:
            address = passed("aws.public_ip", f"server public IP {ip} (port {port})", public_ip=ip)
        return TaskFindings([task_line, address], running, ip, groups)
    starting = next((task for task in tasks if task.get("lastStatus") in control.STARTING_TASK_STATES), None)
    if starting is not None:
        return TaskFindings(
            [
                info(
                    "aws.task",
                    f"task {_task_id(starting)} is {starting.get('lastStatus')}: the server is starting",
                )
            ],
            security_groups=groups,
        )
    try:
        stopped = _stopped_tasks(clients.ecs, cluster, service_name)
    except _aws_errors() as error:
        return TaskFindings([aws_failure("aws.task", "ecs:ListTasks", error)], security_groups=groups)
    if desired == 0:
        stopped_now = info("aws.task", "no task: the server is stopped (desired 0); Connect wakes it")
        if stopped:
            # The last run may have failed (and then been stopped): that is the thing to fix.
            verdict = diagnose_stopped_task(stopped[0], task_log_lines(clients.logs, stopped[0], log_group))
            if verdict.status is not Status.INFO:
                return TaskFindings([verdict], security_groups=groups)
        return TaskFindings([stopped_now], security_groups=groups)
    if not stopped:
        return TaskFindings(
            [
                warned(
                    "aws.task",
                    f"desired {desired} but no task yet: ECS has not placed one",
                    "wait a minute; if it stays so, `aws ecs describe-services --cluster fluidity --services "
                    "fluidity-server --query 'services[0].events[:5]'` shows why",
                )
            ],
            security_groups=groups,
        )
    last = stopped[0]
    return TaskFindings(
        [diagnose_stopped_task(last, task_log_lines(clients.logs, last, log_group))], security_groups=groups
    )


# ----------------------------------------------------------------------------- network


def _rule_cidrs(permission: Mapping[str, Any], port: int) -> list[str]:
    protocol = str(permission.get("IpProtocol"))
    if protocol not in ("tcp", "-1", "6"):
        return []
    if protocol != "-1" and not (
        int(permission.get("FromPort", -1)) <= port <= int(permission.get("ToPort", -1))
    ):
        return []
    cidrs = [str(r["CidrIp"]) for r in permission.get("IpRanges") or [] if r.get("CidrIp")]
    cidrs += [str(r["CidrIpv6"]) for r in permission.get("Ipv6Ranges") or [] if r.get("CidrIpv6")]
    return cidrs


def check_security_group(
    ec2: Any, group_ids: Sequence[str], port: int, public_address: PublicAddressSource
) -> CheckResult:
    """The task's security group lets this machine's public address reach the tunnel port."""
    if not group_ids:
        return skipped("aws.security_group", "the service names no security group")
    try:
        groups = ec2.describe_security_groups(GroupIds=list(group_ids)).get("SecurityGroups", [])
    except _aws_errors() as error:
        return aws_failure("aws.security_group", "ec2:DescribeSecurityGroups", error)
    cidrs = [
        cidr
        for group in groups
        for perm in group.get("IpPermissions") or []
        for cidr in _rule_cidrs(perm, port)
    ]
    names = ", ".join(group_ids)
    allow_fix = (
        "let your address in: `fluidity-deploy deploy --allowed-cidr {ip}/32` (or the default 0.0.0.0/0; "
        "mutual TLS still refuses anyone without your client certificate)"
    )
    if not cidrs:
        return failed(
            "aws.security_group",
            f"{names} allows no inbound TCP {port}",
            allow_fix.format(ip="YOUR.PUBLIC.IP"),
        )
    if "0.0.0.0/0" in cidrs:
        return passed("aws.security_group", f"{names} allows TCP {port} from anywhere (0.0.0.0/0)")
    address = public_address()
    shown = ", ".join(cidrs)
    if address is None:
        return warned(
            "aws.security_group",
            f"{names} allows TCP {port} from {shown}; this machine's public address is unknown, "
            "so whether it is included cannot be checked",
            "pass it with --public-ip ADDRESS (e.g. from https://checkip.amazonaws.com)",
        )
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return warned("aws.security_group", f"{address!r} is not an IP address", "pass --public-ip ADDRESS")
    inside = [
        cidr
        for cidr in cidrs
        if ip.version == ipaddress.ip_network(cidr, strict=False).version
        and ip in ipaddress.ip_network(cidr, strict=False)
    ]
    if inside:
        return passed(
            "aws.security_group", f"{names} allows TCP {port} from {inside[0]}, which includes {address}"
        )
    return failed(
        "aws.security_group",
        f"{names} allows TCP {port} only from {shown}; "
        f"this machine's public address {address} is not included",
        allow_fix.format(ip=address),
    )


# ----------------------------------------------------------------------------- control-plane resources


def check_lambda_environment(
    lambda_client: Any, cluster: str, service: str, *, required: bool
) -> CheckResult:
    """Each control-plane Lambda's CLUSTER_NAME / SERVICE_NAME name the deployed service."""
    wrong: dict[str, list[str]] = {}  # "CLUSTER_NAME=x" -> the functions that have it
    missing: list[str] = []
    for name in FUNCTIONS:
        try:
            configuration = lambda_client.get_function_configuration(FunctionName=name)
        except _aws_errors() as error:
            if _error_code(error) == "ResourceNotFoundException":
                missing.append(name)
                continue
            return aws_failure("aws.lambda_env", "lambda:GetFunctionConfiguration", error)
        variables = (configuration.get("Environment") or {}).get("Variables") or {}
        for key, expected in (("CLUSTER_NAME", cluster), ("SERVICE_NAME", service)):
            value = variables.get(key, "")
            if value != expected:
                wrong.setdefault(f"{key}={value or '(unset)'}, the server's is {expected}", []).append(name)
    if wrong:
        return failed(
            "aws.lambda_env",
            "; ".join(
                f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} {setting}"
                for setting, names in wrong.items()
            ),
            "run `fluidity-deploy deploy` (it sets them from the fluidity-fargate outputs), or fix one by "
            "hand: `aws lambda get-function-configuration --function-name fluidity-wake --query "
            "'Environment.Variables'` shows them",
        )
    if missing:
        verdict = failed if required else warned
        return verdict("aws.lambda_env", f"not deployed: {', '.join(missing)}", _DEPLOY_FIX)
    return passed(
        "aws.lambda_env", f"{', '.join(FUNCTIONS)} use CLUSTER_NAME={cluster}, SERVICE_NAME={service}"
    )


def check_sleep_schedule(events: Any, *, required: bool) -> CheckResult:
    try:
        rule = events.describe_rule(Name=SLEEP_RULE)
    except _aws_errors() as error:
        if _error_code(error) == "ResourceNotFoundException":
            verdict = failed if required else warned
            return verdict(
                "aws.sleep_schedule",
                f"the EventBridge rule {SLEEP_RULE} does not exist: nothing stops an idle server",
                _DEPLOY_FIX,
            )
        return aws_failure("aws.sleep_schedule", "events:DescribeRule", error)
    state = rule.get("State")
    schedule = rule.get("ScheduleExpression", "")
    if state != "ENABLED":
        return failed(
            "aws.sleep_schedule",
            f"{SLEEP_RULE} is {state}: the Sleep Lambda never runs, "
            "so an idle server keeps running (and costing)",
            f"aws events enable-rule --name {SLEEP_RULE}",
        )
    return passed("aws.sleep_schedule", f"{SLEEP_RULE} is ENABLED ({schedule})")


def check_metrics(
    cloudwatch: Any, service: str, running_task: Mapping[str, Any] | None, now: datetime
) -> CheckResult:
    """``ActiveConnections`` arrived in the last 15 minutes while a task ran (idle detection needs it)."""
    if running_task is None:
        return skipped("aws.metrics", "no task is running, so no metrics are expected")
    started = running_task.get("startedAt")
    window_start = now - METRICS_WINDOW
    if isinstance(started, datetime):
        if now - started < METRICS_GRACE:
            age = int((now - started).total_seconds())
            return info("aws.metrics", f"the task started {age} s ago; its first metrics may not be in yet")
        window_start = max(window_start, started)
    try:
        reply = cloudwatch.get_metric_statistics(
            Namespace=METRICS_NAMESPACE,
            MetricName=METRIC_ACTIVE_CONNECTIONS,
            Dimensions=metric_dimensions(service),
            StartTime=window_start,
            EndTime=now,
            Period=60,
            Statistics=["Maximum", "SampleCount"],
        )
    except _aws_errors() as error:
        return aws_failure("aws.metrics", "cloudwatch:GetMetricStatistics", error)
    points = reply.get("Datapoints") or []
    if not points:
        minutes = max(1, round((now - window_start).total_seconds() / 60))
        return failed(
            "aws.metrics",
            f"no {METRIC_ACTIVE_CONNECTIONS} datapoints in the last {minutes} min although the task runs",
            'set emit_metrics: true and metrics_interval: "60s" in configs/server.yaml (rebuild and push the '
            "image), and let the task role call cloudwatch:PutMetricData; without them the Sleep Lambda "
            "counts the server as idle and stops it 10 minutes after it started",
        )
    highest = max(float(point.get("Maximum", 0.0)) for point in points)
    unit = "minute" if len(points) == 1 else "minutes"
    return passed(
        "aws.metrics",
        f"{METRIC_ACTIVE_CONNECTIONS} arrived in {len(points)} {unit} of the last 15 (highest {highest:g})",
    )


def check_alarms(cloudwatch: Any) -> CheckResult:
    try:
        alarms = cloudwatch.describe_alarms(AlarmNamePrefix="fluidity", StateValue="ALARM").get(
            "MetricAlarms", []
        )
    except _aws_errors() as error:
        return aws_failure("aws.alarms", "cloudwatch:DescribeAlarms", error)
    if not alarms:
        return passed("aws.alarms", "no fluidity alarm is in ALARM state")
    found = "; ".join(f"{a['AlarmName']} ({a.get('StateReason', '')[:160]})" for a in alarms)
    functions = sorted(
        {
            f"/aws/lambda/fluidity-{kind}"
            for a in alarms
            for kind in ("wake", "sleep", "kill")
            if kind in a["AlarmName"].lower()
        }
    )
    where = ", ".join(functions) or "the functions' logs"
    return warned(
        "aws.alarms",
        f"in ALARM: {found}",
        f"read {where}: `aws logs tail LOG_GROUP --since 1h` (AWS CLI v2) or "
        "`aws logs filter-log-events --log-group-name LOG_GROUP` (v1)",
    )


# ----------------------------------------------------------------------------- all AWS checks


@dataclass(frozen=True)
class AwsFindings:
    results: list[CheckResult]
    public_ip: str | None = None


def run_aws_checks(
    clients: AwsClients,
    config: AgentConfig,
    *,
    now: datetime,
    public_address: PublicAddressSource,
) -> AwsFindings:
    """Every AWS check in order; stops only where the next ones cannot run (no credentials, no cluster)."""
    identity = check_identity(clients, config)
    if identity.status is Status.FAIL:
        return AwsFindings([identity, skipped("aws", "the other AWS checks need working credentials")])
    results = [identity]
    lambda_required = config.lifecycle == "lambda"
    lambda_stack, lambda_outputs = check_stack(clients.cloudformation, LAMBDA_STACK, required=lambda_required)
    fargate_stack, fargate_outputs = check_stack(clients.cloudformation, FARGATE_STACK, required=True)
    results += [lambda_stack, fargate_stack, check_outputs(config, lambda_outputs, fargate_outputs)]
    if config.lifecycle == "ecs" or fargate_outputs is None:
        cluster, service_name = config.cluster_name, config.service_name
    else:
        cluster = fargate_outputs.get("ClusterName", config.cluster_name)
        service_name = fargate_outputs.get("ServiceName", config.service_name)
    log_group = (fargate_outputs or {}).get("LogGroupName", SERVER_LOG_GROUP)
    public_ip: str | None = None
    running_task: dict[str, Any] | None = None
    cluster_result = check_cluster(clients.ecs, cluster, clients.region)
    results.append(cluster_result)
    if cluster_result.status is Status.PASS:
        service_result, service = check_service(clients.ecs, cluster, service_name)
        results.append(service_result)
        if service is not None:
            tasks = check_tasks(
                clients, cluster, service_name, service, log_group=log_group, port=config.server_port
            )
            results += tasks.results
            public_ip, running_task = tasks.public_ip, tasks.running_task
            groups = tasks.security_groups or [
                group for group in [(fargate_outputs or {}).get("SecurityGroupId")] if group
            ]
            results.append(check_security_group(clients.ec2, groups, config.server_port, public_address))
    else:
        results.append(
            skipped("aws.service", f"no cluster {cluster!r}, so no service, task or network to check")
        )
    wants_control_plane = lambda_required or lambda_outputs is not None
    if wants_control_plane:
        results.append(
            check_lambda_environment(clients.lambda_, cluster, service_name, required=lambda_required)
        )
        results.append(check_sleep_schedule(clients.events, required=lambda_required))
    else:
        results.append(
            skipped("aws.lambda_env", "no fluidity-lambda stack: no control-plane Lambdas to check")
        )
    results.append(check_metrics(clients.cloudwatch, service_name, running_task, now))
    results.append(check_alarms(clients.cloudwatch))
    return AwsFindings(results, public_ip)
