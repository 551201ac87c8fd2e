"""The control-plane Lambdas (Wake, Status, Kill, Sleep) against a moto server over real HTTP."""

from __future__ import annotations

import ast
import json
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError
from botocore.parsers import create_parser

from lambdas.control import ConfigError, ControlConfig, error_from_client_error
from lambdas.handlers import (
    SleepFailed,
    api_handler,
    error_reply,
    kill_handler,
    sleep_handler,
    status_handler,
    wake_handler,
)
from lambdas.sleep_policy import (
    MetricsWindow,
    ServiceSnapshot,
    SleepAction,
    SleepDecision,
    decide,
    run_sleep,
    snapshot_service,
)
from server.durations import parse_duration
from server.framing import (
    ControlPlaneError,
    ControlPlaneFormatError,
    ServerState,
    ServerStatus,
    parse_control_reply,
)

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


ROOT = Path(__file__).resolve().parent.parent


def api_event(method: str, path: str, *, resource: str | None = None) -> dict[str, Any]:
    """An API Gateway REST (v1) proxy event as API Gateway sends it for a per-route resource."""
    return {
        "resource": resource or path,
        "path": path,
        "httpMethod": method,
        "headers": {"x-api-key": "test-key", "Host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "multiValueHeaders": {"x-api-key": ["test-key"]},
        "queryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": resource or path,
            "httpMethod": method,
            "path": f"/prod{path}",
            "stage": "prod",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "identity": {"apiKey": "test-key", "sourceIp": "198.51.100.7"},
        },
        "body": None,
        "isBase64Encoded": False,
    }


def status_of(reply: dict[str, Any]) -> ServerStatus:
    """Parse a reply the way the desktop does; it must be a 200 with a status body."""
    assert reply["headers"]["Content-Type"] == "application/json"
    parsed = parse_control_reply(reply["statusCode"], reply["body"].encode())
    assert isinstance(parsed, ServerStatus), parsed
    assert reply["statusCode"] == 200
    return parsed


def error_of(reply: dict[str, Any], http_status: int) -> ControlPlaneError:
    assert reply["statusCode"] == http_status, reply
    parsed = parse_control_reply(reply["statusCode"], reply["body"].encode())
    assert isinstance(parsed, ControlPlaneError), parsed
    return parsed


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- wake / status / kill


def test_wake_from_zero_asks_for_one_task_and_reports_starting(aws_env: dict, cloud: FluidityCloud) -> None:
    reply = wake_handler(api_event("POST", "/wake"), None)
    status = status_of(reply)
    assert status.state is ServerState.STARTING
    assert status.desired_count == 1
    assert status.public_ip is None
    assert status.retry_after == 5
    assert reply["headers"]["Retry-After"] == "5"
    assert cloud.describe_service()["desiredCount"] == 1


def test_wake_is_idempotent_and_never_lowers_the_desired_count(aws_env: dict, cloud: FluidityCloud) -> None:
    status_of(wake_handler(api_event("POST", "/wake"), None))
    assert status_of(wake_handler(api_event("POST", "/wake"), None)).desired_count == 1
    cloud.set_desired_count(2)
    assert status_of(wake_handler(api_event("POST", "/wake"), None)).desired_count == 2
    assert cloud.describe_service()["desiredCount"] == 2


def test_running_task_reports_its_public_ip_and_the_tunnel_port(aws_env: dict, cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    status = status_of(status_handler(api_event("GET", "/status"), None))
    assert status.state is ServerState.RUNNING
    assert status.public_ip == task.public_ip
    assert status.port == 8443
    assert status.task_arn == task.task_arn
    assert status.retry_after is None
    # Wake on a running server changes nothing and answers with the address too.
    woken = status_of(wake_handler(api_event("POST", "/wake"), None))
    assert (woken.state, woken.public_ip, woken.desired_count) == (ServerState.RUNNING, task.public_ip, 1)


def test_running_task_without_public_ip_says_what_to_fix(aws_env: dict, cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    cloud.seed_running_task(public_ip=False)
    status = status_of(status_handler(api_event("GET", "/status"), None))
    assert status.state is ServerState.RUNNING
    assert status.public_ip is None
    assert "assignPublicIp=ENABLED" in status.message


def test_status_changes_nothing(aws_env: dict, cloud: FluidityCloud) -> None:
    status = status_of(status_handler(api_event("GET", "/status"), None))
    assert (status.state, status.desired_count) == (ServerState.STOPPED, 0)
    assert "POST /wake" in status.message
    assert cloud.describe_service()["desiredCount"] == 0


def test_kill_asks_for_zero_tasks_idempotently(aws_env: dict, cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    stopping = status_of(kill_handler(api_event("POST", "/kill"), None))
    assert stopping.desired_count == 0
    assert stopping.state is ServerState.STOPPING  # the task is still there until ECS stops it
    assert cloud.describe_service()["desiredCount"] == 0
    cloud.stop_task(task.task_arn)
    stopped = status_of(kill_handler(api_event("POST", "/kill"), None))
    assert (stopped.state, stopped.desired_count) == (ServerState.STOPPED, 0)


def test_one_router_serves_all_routes_and_logs_json_lines(
    aws_env: dict, cloud: FluidityCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    assert status_of(api_handler(api_event("GET", "/status"), None)).state is ServerState.STOPPED
    assert status_of(api_handler(api_event("POST", "/wake"), None)).state is ServerState.STARTING
    assert status_of(api_handler(api_event("POST", "/kill/"), None)).desired_count == 0
    # A greedy proxy resource routes by path.
    proxied = api_event("GET", "/status", resource="/{proxy+}")
    assert status_of(api_handler(proxied, None)).state is ServerState.STOPPED
    lines = json_lines(capsys.readouterr().out)
    assert [line["route"] for line in lines] == ["GET /status", "POST /wake", "POST /kill", "GET /status"]
    assert lines[1]["state"] == "starting" and lines[1]["desired_count"] == 1
    assert all(line["level"] == "info" and line["status_code"] == 200 for line in lines)


def test_direct_invocation_without_http_method_runs_the_functions_own_route(
    aws_env: dict, cloud: FluidityCloud
) -> None:
    assert status_of(wake_handler({}, None)).desired_count == 1
    error = error_of(api_handler({}, None), 400)
    assert error.error == "bad_request"


# --------------------------------------------------------------------------- route and method errors


def test_unknown_path_is_404_and_wrong_method_is_405(aws_env: dict, cloud: FluidityCloud) -> None:
    missing = error_of(api_handler(api_event("POST", "/reboot"), None), 404)
    assert missing.error == "not_found"
    assert "POST /wake" in missing.message and "GET /status" in missing.message
    reply = api_handler(api_event("GET", "/wake"), None)
    wrong = error_of(reply, 405)
    assert wrong.error == "method_not_allowed"
    assert reply["headers"]["Allow"] == "POST"
    assert "POST" in wrong.message
    # A per-route function checks its own route too.
    assert error_of(wake_handler(api_event("POST", "/kill"), None), 404).error == "not_found"
    assert error_of(status_handler(api_event("POST", "/status"), None), 405).error == "method_not_allowed"
    assert cloud.describe_service()["desiredCount"] == 0


# --------------------------------------------------------------------------- AWS errors


def test_missing_cluster_names_the_setting(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "fluidity-typo")
    error = error_of(wake_handler(api_event("POST", "/wake"), None), 404)
    assert error.error == "cluster_not_found"
    assert "'fluidity-typo'" in error.message and "CLUSTER_NAME" in error.message
    monkeypatch.delenv("CLUSTER_NAME")
    assert status_of(wake_handler(api_event("POST", "/wake"), None)).desired_count == 1


def test_missing_or_deleted_service_names_the_setting(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVICE_NAME", "fluidity-srv")
    error = error_of(status_handler(api_event("GET", "/status"), None), 404)
    assert error.error == "service_not_found"
    assert "'fluidity-srv'" in error.message and "SERVICE_NAME" in error.message
    monkeypatch.delenv("SERVICE_NAME")
    cloud.moto.client("ecs").delete_service(cluster=cloud.cluster, service=cloud.service, force=True)
    inactive = error_of(wake_handler(api_event("POST", "/wake"), None), 404)
    assert inactive.error == "service_not_found"
    assert "INACTIVE" in inactive.message


def test_access_denied_names_the_missing_permission(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto enforces IAM: a role that may read but not UpdateService gets a clear 502."""
    iam = cloud.moto.client("iam")
    iam.create_user(UserName="fluidity-wake")
    read_only = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "ecs:DescribeServices",
                    "ecs:ListTasks",
                    "ecs:DescribeTasks",
                    "ec2:DescribeNetworkInterfaces",
                ],
                "Resource": "*",
            }
        ],
    }
    iam.put_user_policy(
        UserName="fluidity-wake", PolicyName="read-only", PolicyDocument=json.dumps(read_only)
    )
    key = iam.create_access_key(UserName="fluidity-wake")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    cloud.moto.enforce_iam(True)
    try:
        denied = error_of(wake_handler(api_event("POST", "/wake"), None), 502)
        allowed = status_of(status_handler(api_event("GET", "/status"), None))
    finally:
        cloud.moto.enforce_iam(False)
    assert denied.error == "access_denied"
    assert "ecs:UpdateService" in denied.message and "execution role" in denied.message
    assert allowed.state is ServerState.STOPPED
    assert cloud.describe_service()["desiredCount"] == 0


def _aws_error(moto: MotoEndpoint, operation: str, status: int, body: dict[str, str]) -> ClientError:
    """The ClientError botocore raises for this HTTP error reply from ECS (real parser, real model)."""
    model = moto.client("ecs").meta.service_model.operation_model(operation)
    parsed = create_parser("json").parse(
        {
            "status_code": status,
            "headers": {"x-amzn-RequestId": "5f8d1a0c", "Content-Type": "application/x-amz-json-1.1"},
            "body": json.dumps(body).encode(),
        },
        model.output_shape,
    )
    return ClientError(parsed, operation)  # type: ignore[arg-type]


def test_ecs_throttling_becomes_503_with_a_retry_hint(moto_server: MotoEndpoint) -> None:
    """moto never throttles; this is the reply ECS sends when it does, through botocore's parser."""
    exc = _aws_error(
        moto_server, "UpdateService", 400, {"__type": "ThrottlingException", "message": "Rate exceeded"}
    )
    error = error_from_client_error(exc, "ecs:UpdateService", ControlConfig())
    assert (error.error, error.http_status, error.retry_after) == ("throttled", 503, 5)
    reply = error_reply(error)
    assert reply["headers"]["Retry-After"] == "5"
    assert json.loads(reply["body"]) == {
        "error": "throttled",
        "message": "AWS is throttling ecs:UpdateService calls; try again in 5 seconds",
        "retry_after": 5,
    }


def test_real_access_denied_message_is_parsed_for_the_permission(moto_server: MotoEndpoint) -> None:
    message = (
        "User: arn:aws:sts::123456789012:assumed-role/fluidity-lambda/fluidity-wake is not authorized "
        "to perform: ecs:UpdateService on resource: arn:aws:ecs:us-east-1:123456789012:service/fluidity/"
        "fluidity-server because no identity-based policy allows the ecs:UpdateService action"
    )
    exc = _aws_error(
        moto_server, "UpdateService", 400, {"__type": "AccessDeniedException", "message": message}
    )
    error = error_from_client_error(exc, "ecs:DescribeServices", ControlConfig())
    assert error.error == "access_denied"
    assert error.message.startswith("the control plane is not allowed to call ecs:UpdateService")
    bare = _aws_error(moto_server, "UpdateService", 400, {"__type": "AccessDeniedException", "message": ""})
    assert "ecs:UpdateService" in error_from_client_error(bare, "ecs:UpdateService", ControlConfig()).message


def test_unreachable_aws_is_503_and_the_next_call_works(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    error = error_of(wake_handler(api_event("POST", "/wake"), None), 503)
    assert error.error == "aws_unreachable"
    assert error.retry_after == 5
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env["AWS_ENDPOINT_URL"])
    assert status_of(wake_handler(api_event("POST", "/wake"), None)).desired_count == 1


def test_bad_configuration_and_unexpected_failures_are_formatted_500s(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IDLE_THRESHOLD", "ten minutes")
    config_error = error_of(status_handler(api_event("GET", "/status"), None), 500)
    assert config_error.error == "configuration_error"
    assert "IDLE_THRESHOLD" in config_error.message and "10m" in config_error.message
    monkeypatch.delenv("IDLE_THRESHOLD")
    # No region anywhere: boto3 cannot even build a client. Still a JSON reply, never a crash.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    crash = error_of(status_handler(api_event("GET", "/status", resource="/status"), None), 500)
    assert crash.error == "internal_error"
    assert "NoRegionError" in crash.message
    logged = json_lines(capsys.readouterr().out)
    assert any(line["level"] == "error" and "NoRegionError" in line.get("traceback", "") for line in logged)


def test_configuration_is_read_from_the_environment() -> None:
    assert ControlConfig.from_env({}) == ControlConfig("fluidity", "fluidity-server", 600.0, 8443, "Fluidity")
    for text in ("10m", "600s", "600", " 600 "):
        assert ControlConfig.from_env({"IDLE_THRESHOLD": text}).idle_threshold == 600.0
    assert parse_duration("1h") == 3600.0 and parse_duration("1.5m") == 90.0
    custom = ControlConfig.from_env({"CLUSTER_NAME": "c", "SERVICE_NAME": "s", "TUNNEL_PORT": "443"})
    assert (custom.cluster, custom.service, custom.tunnel_port) == ("c", "s", 443)
    for bad in (
        {"IDLE_THRESHOLD": "0"},
        {"IDLE_THRESHOLD": "-5m"},
        {"TUNNEL_PORT": "x"},
        {"TUNNEL_PORT": "0"},
    ):
        with pytest.raises(ConfigError):
            ControlConfig.from_env(bad)


# --------------------------------------------------------------------------- Sleep


def test_sleep_keeps_a_young_service_without_metrics(
    aws_env: dict, cloud: FluidityCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    cloud.set_desired_count(1)
    result = sleep_handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None)
    decision = SleepDecision.from_json(result)
    assert decision.action is SleepAction.KEEP_RUNNING
    assert decision.active_connections is None and decision.datapoints == 0
    assert decision.idle_threshold == 600.0
    assert "has not reported" in decision.reason
    assert cloud.describe_service()["desiredCount"] == 1
    (line,) = json_lines(capsys.readouterr().out)
    assert line["message"] == "sleep decision: keep_running"
    assert line["action"] == "keep_running" and line["running_since"] == decision.running_since


def test_sleep_on_a_stopped_service_does_nothing(aws_env: dict, cloud: FluidityCloud) -> None:
    decision = SleepDecision.from_json(sleep_handler({}, None))
    assert decision.action is SleepAction.ALREADY_STOPPED
    assert cloud.describe_service()["desiredCount"] == 0


def test_sleep_failure_is_logged_and_raised_for_the_error_alarm(
    aws_env: dict, cloud: FluidityCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLUSTER_NAME", "gone")
    with pytest.raises(SleepFailed, match="cluster_not_found"):
        sleep_handler({}, None)
    (line,) = json_lines(capsys.readouterr().out)
    assert line["level"] == "error" and line["error"] == "cluster_not_found"


class _Later:
    """Sleep runs "two minutes from now" with a one-minute threshold, so nothing has to wait."""

    threshold = 60.0

    def __init__(self, cloud: FluidityCloud) -> None:
        self.cloud = cloud
        self.now = time.time() + 2 * self.threshold
        self.config = ControlConfig(idle_threshold=self.threshold)

    def run(self) -> SleepDecision:
        moto = self.cloud.moto
        return run_sleep(moto.client("ecs"), moto.client("cloudwatch"), self.config, self.now)


def test_sleep_keeps_a_server_with_recent_activity(cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    later = _Later(cloud)
    cloud.put_metrics(at=later.now - 30, connections=0, streams=0, last_activity=later.now - 10)
    decision = later.run()
    assert decision.action is SleepAction.KEEP_RUNNING
    assert decision.active_connections == 0 and decision.last_activity == pytest.approx(later.now - 10)
    assert decision.idle_seconds == pytest.approx(10, abs=0.01)
    assert cloud.describe_service()["desiredCount"] == 1


def test_sleep_scales_an_idle_server_to_zero(cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    later = _Later(cloud)
    long_ago = later.now - 3600
    for minutes in (1, 2, 3):
        cloud.put_metrics(at=later.now - 60 * minutes, connections=0, streams=0, last_activity=long_ago)
    decision = later.run()
    assert decision.action is SleepAction.SCALE_DOWN
    assert decision.datapoints == 3 and decision.active_connections == 0
    assert decision.idle_seconds is not None and decision.idle_seconds >= later.threshold
    assert cloud.describe_service()["desiredCount"] == 0


def test_sleep_never_scales_down_with_connections_open(cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    later = _Later(cloud)
    cloud.put_metrics(at=later.now - 120, connections=0, last_activity=later.now - 3600)
    cloud.put_metrics(at=later.now - 30, connections=1, last_activity=later.now - 3600)
    decision = later.run()
    assert decision.action is SleepAction.KEEP_RUNNING
    assert decision.active_connections == 1
    assert "connection" in decision.reason
    assert cloud.describe_service()["desiredCount"] == 1


def test_sleep_scales_down_a_server_that_never_reported_after_the_threshold(cloud: FluidityCloud) -> None:
    cloud.set_desired_count(1)
    decision = _Later(cloud).run()
    assert decision.action is SleepAction.SCALE_DOWN
    assert decision.active_connections is None
    assert "emit_metrics" in decision.reason
    assert cloud.describe_service()["desiredCount"] == 0


def test_decision_rules_for_tasks_that_just_started() -> None:
    """Pure rule checks on the ECS shapes real AWS returns (moto leaves task times empty)."""
    now = 1_800_000_000.0
    service = {
        "desiredCount": 1,
        "runningCount": 1,
        "pendingCount": 0,
        "deployments": [{"status": "PRIMARY", "updatedAt": datetime.fromtimestamp(now - 86400, UTC)}],
    }
    fresh_task = {"lastStatus": "RUNNING", "startedAt": datetime.fromtimestamp(now - 30, UTC)}
    snapshot = snapshot_service(service, [fresh_task])
    assert snapshot.running_since == pytest.approx(now - 30)
    # Old activity from the previous task does not count against a task that just started.
    idle_metrics = MetricsWindow(active_connections=0, last_activity=now - 7200, datapoints=5)
    assert decide(now, 600, snapshot, idle_metrics).action is SleepAction.KEEP_RUNNING
    assert decide(now, 600, snapshot, MetricsWindow(None, None, 0)).action is SleepAction.KEEP_RUNNING
    old_task = {"lastStatus": "RUNNING", "startedAt": datetime.fromtimestamp(now - 3600, UTC)}
    assert decide(now, 600, snapshot_service(service, [old_task]), idle_metrics).scale_down
    provisioning = {"lastStatus": "PROVISIONING", "createdAt": datetime.fromtimestamp(now - 7200, UTC)}
    starting = snapshot_service({**service, "runningCount": 0, "pendingCount": 1}, [provisioning])
    assert starting.starting
    assert decide(now, 600, starting, MetricsWindow(None, None, 0)).reason == "the server is still starting"
    unplaced = snapshot_service({**service, "runningCount": 0}, [])
    assert decide(now, 600, unplaced, MetricsWindow(None, None, 0)).action is SleepAction.KEEP_RUNNING
    no_dates = ServiceSnapshot(1, 1, 0, None, False)
    assert decide(now, 600, no_dates, idle_metrics).action is SleepAction.KEEP_RUNNING


def test_sleep_decision_round_trips_through_json() -> None:
    decision = SleepDecision(SleepAction.SCALE_DOWN, "idle", 1.5, 600.0, 1, 1, 0, 1.0, 0.0, 0.5, 1.0, 3)
    assert SleepDecision.from_json(json.loads(json.dumps(decision.to_json()))) == decision
    with pytest.raises(ControlPlaneFormatError):
        SleepDecision.from_json({"action": "nap", "checked_at": 1, "idle_threshold": 1})
    with pytest.raises(ControlPlaneFormatError):
        SleepDecision.from_json({**decision.to_json(), "idle_seconds": "long"})


#: The ``server`` modules the Lambda zip ships (lambdas/packaging.py SERVER_MODULES).
SHIPPED_SERVER_MODULES = {
    "server",
    "server.durations",
    "server.errors",
    "server.framing",
    "server.json_logging",
}


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names."""
    modules: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.append(node.module)
    return modules


def test_lambda_modules_import_only_what_the_bundle_carries() -> None:
    """The Lambda zip holds lambdas/ and the stdlib-only shipped server modules; boto3 and the stdlib
    come with the runtime."""
    allowed = set(sys.stdlib_module_names) | {"boto3", "botocore", "lambdas", "__future__"}
    for name in ("control", "handlers", "sleep_policy", "local_gateway"):
        for module in imported_modules(ROOT / "lambdas" / f"{name}.py"):
            ok = module in SHIPPED_SERVER_MODULES or module.split(".")[0] in allowed
            assert ok, f"lambdas/{name}.py imports {module}, which the Lambda bundle does not carry"


def test_shipped_server_modules_need_only_the_standard_library() -> None:
    """What the zip ships from ``server`` imports nothing the Lambda runtime lacks (not even boto3)."""
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for shipped in SHIPPED_SERVER_MODULES:
        path = ROOT / (shipped.replace(".", "/") + ("/__init__.py" if shipped == "server" else ".py"))
        for module in imported_modules(path):
            ok = module in SHIPPED_SERVER_MODULES or module.split(".")[0] in allowed
            assert ok, f"{path.relative_to(ROOT)} imports {module}, which the Lambda bundle does not carry"
