"""``fluidity doctor``: each failure mode seeded for real, and the line (and fix) that catches it.

AWS is a moto server on loopback reached by real boto3 (one per module, reset per test);
the control plane is the local API gateway in front of the real handlers; the server is a
real ``fluidity-server`` process; certificates come from ``desktop.certificates``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cloud_fixtures import REGION
from tunnel_fixtures import REPO, Pki, ServerProcess, free_port, server_args, start_agent

from desktop import certificates
from desktop.config import AgentConfig
from desktop.doctor import DoctorOptions, Report, Status, diagnose, render_text, run_doctor
from desktop.doctor.cloud_checks import (
    AwsClients,
    diagnose_stopped_task,
    region_from_api_url,
    run_aws_checks,
)
from desktop.doctor.local_checks import (
    PLACEHOLDER_FIX,
    SystemProxySetting,
    check_proxy_port,
    check_system_proxy,
)
from desktop.doctor.runner import fixed_address, lookup_public_ip
from lambdas import deploy
from lambdas.local_gateway import LocalGateway
from server.config_loader import load

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint

API_KEY = "doctor-test-key-0123456789abcdefghijklmn"
MY_ADDRESS = "203.0.113.7"
BIN = Path(sys.executable).parent
FUNCTIONS = ("fluidity-wake", "fluidity-status", "fluidity-kill", "fluidity-sleep")


# ----------------------------------------------------------------------------- fixtures and seeding


@pytest.fixture(scope="module", autouse=True)
def leave_moto_empty(moto_server: MotoEndpoint) -> Iterator[None]:
    """moto keeps its state per process: leave nothing behind for the next module."""
    yield
    moto_server.reset()


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[ServerProcess]:
    """One real tunnel server for the module (the doctor only ever makes short probes)."""
    process = ServerProcess(server_args(pki), free_port())
    process.start()
    yield process
    process.stop()


def agent_settings(pki: Pki, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "ca_file": pki.path("ca.crt"),
        "cert_file": pki.path("client.crt"),
        "key_file": pki.path("client.key"),
        "listen_port": free_port(),
        "connect_timeout": 5.0,
        "lifecycle": "static",
        "server_address": "127.0.0.1",
        "server_port": free_port(),
    }
    values.update(overrides)
    return load(AgentConfig, None, env={}, overrides=values)


def clients_for(moto: MotoEndpoint) -> AwsClients:
    return AwsClients(
        sts=moto.client("sts"),
        cloudformation=moto.client("cloudformation"),
        ecs=moto.client("ecs"),
        ec2=moto.client("ec2"),
        events=moto.client("events"),
        lambda_=moto.client("lambda"),
        logs=moto.client("logs"),
        cloudwatch=moto.client("cloudwatch"),
        region=REGION,
    )


def later() -> datetime:
    """A clock five minutes ahead: a task seeded now has been running long enough to report metrics."""
    return datetime.now(UTC) + timedelta(minutes=5)


def options_for(moto: MotoEndpoint, *, address: str | None = MY_ADDRESS, **extra: Any) -> DoctorOptions:
    values: dict[str, Any] = {
        "aws": True,
        "public_address": fixed_address(address),
        "clock": later,
        "aws_clients": lambda _config: clients_for(moto),
        "server_timeout": 5.0,
    }
    values.update(extra)
    return DoctorOptions(**values)


def seed_stacks(moto: MotoEndpoint, cloud: FluidityCloud, *, api_url: str, api_key: str = API_KEY) -> None:
    """fluidity-fargate and fluidity-lambda stacks, complete, with the outputs the real ones have."""
    cfn = moto.client("cloudformation")
    fargate = {
        "Resources": {
            "ServerLogGroup": {
                "Type": "AWS::Logs::LogGroup",
                "Properties": {"LogGroupName": "/fluidity/server"},
            }
        },
        "Outputs": {
            "ClusterName": {"Value": cloud.cluster},
            "ServiceName": {"Value": cloud.service},
            "SecurityGroupId": {"Value": cloud.security_group_id},
            "LogGroupName": {"Value": "/fluidity/server"},
        },
    }
    control = {
        "Resources": {
            "SleepLogGroup": {
                "Type": "AWS::Logs::LogGroup",
                "Properties": {"LogGroupName": "/aws/lambda/fluidity-sleep"},
            }
        },
        "Outputs": {"ApiGatewayUrl": {"Value": api_url}, "ApiKeyId": {"Value": api_key}},
    }
    cfn.create_stack(StackName="fluidity-fargate", TemplateBody=json.dumps(fargate))
    cfn.create_stack(StackName="fluidity-lambda", TemplateBody=json.dumps(control))


def seed_control_plane(
    moto: MotoEndpoint, *, cluster: str = "fluidity", service: str = "fluidity-server"
) -> None:
    """The four Lambdas with their CLUSTER_NAME / SERVICE_NAME and the enabled Sleep schedule."""
    role = moto.client("iam").create_role(RoleName="fluidity-lambda-role", AssumeRolePolicyDocument="{}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("handler.py", "def handler(event, context):\n    return {}\n")
    for name in FUNCTIONS:
        moto.client("lambda").create_function(
            FunctionName=name,
            Runtime="python3.12",
            Role=role["Role"]["Arn"],
            Handler="handler.handler",
            Code={"ZipFile": buffer.getvalue()},
            Environment={"Variables": {"CLUSTER_NAME": cluster, "SERVICE_NAME": service}},
        )
    moto.client("events").put_rule(Name="fluidity-sleep-schedule", ScheduleExpression="rate(5 minutes)")


def allow_port(moto: MotoEndpoint, cloud: FluidityCloud, port: int, cidr: str = "203.0.113.0/24") -> None:
    moto.client("ec2").authorize_security_group_ingress(
        GroupId=cloud.security_group_id,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}
        ],
    )


def seed_task_on_loopback(moto: MotoEndpoint, cloud: FluidityCloud) -> str:
    """A running service task whose public IP is 127.0.0.1, so the doctor reaches the real local server."""
    cloud.set_desired_count(1)
    task = cloud.seed_running_task(public_ip=False)
    ec2 = moto.client("ec2")
    allocation = ec2.allocate_address(Domain="vpc", Address="127.0.0.1")
    ec2.associate_address(AllocationId=allocation["AllocationId"], NetworkInterfaceId=task.eni_id)
    return task.task_arn


def publish_connections(cloud: FluidityCloud, count: float = 1.0) -> None:
    cloud.put_metrics(at=time.time() - 30, connections=count)


@pytest.fixture
def healthy(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki, server: ServerProcess
) -> Iterator[tuple[AgentConfig, LocalGateway]]:
    """A complete, working deployment: stacks, Lambdas, schedule, a running task, metrics, the server."""
    env = {**moto_server.env(), "TUNNEL_PORT": str(server.port)}
    with LocalGateway(API_KEY, env=env) as gateway:
        seed_stacks(moto_server, cloud, api_url=gateway.url)
        seed_control_plane(moto_server)
        allow_port(moto_server, cloud, server.port)
        seed_task_on_loopback(moto_server, cloud)
        publish_connections(cloud)
        config = agent_settings(
            pki,
            lifecycle="lambda",
            api_url=gateway.url,
            api_key=API_KEY,
            server_address="",
            server_port=server.port,
        )
        yield config, gateway


def statuses(report: Report) -> dict[str, Status]:
    return {result.check: result.status for result in report.results}


# ----------------------------------------------------------------------------- the healthy set-up


def test_a_healthy_lambda_deployment_passes_every_check(
    healthy: tuple[AgentConfig, LocalGateway], moto_server: MotoEndpoint
) -> None:
    config, _gateway = healthy
    report = diagnose(config, options_for(moto_server), source="agent.yaml")
    text = render_text(report)
    assert report.ok and report.exit_code == 0, text
    assert [r.check for r in report.results if r.status is not Status.PASS] == ["local.system_proxy"], text
    hello = report.by_check("server.hello")
    assert (
        hello.finding.startswith("Connected to server in ")
        and "fluidity-server/0.1.0, protocol 1" in hello.finding
    )
    assert report.server_public_ip == "127.0.0.1"
    assert "Server public IP: 127.0.0.1" in text
    assert "includes 203.0.113.7" in report.by_check("aws.security_group").finding
    assert report.by_check("control_plane.reply").details["public_ip"] == "127.0.0.1"
    assert text.splitlines()[-1].startswith("Summary: ")


def test_the_status_call_never_wakes_a_stopped_server(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    with LocalGateway(API_KEY, env=moto_server.env()) as gateway:
        config = agent_settings(
            pki, lifecycle="lambda", api_url=gateway.url, api_key=API_KEY, server_address=""
        )
        report = diagnose(config, DoctorOptions())
    assert report.by_check("control_plane.api").status is Status.PASS
    assert report.by_check("control_plane.reply").finding.startswith("state stopped")
    assert report.by_check("server").status is Status.SKIP
    assert cloud.describe_service()["desiredCount"] == 0


# ----------------------------------------------------------------------------- settings


def test_the_shipped_agent_yaml_still_has_its_placeholders(tmp_path: Path) -> None:
    report = run_doctor(REPO / "configs" / "agent.yaml", env={})
    config = report.by_check("config")
    assert config.status is Status.FAIL and "api_url: is still the placeholder" in config.finding
    assert config.fix == PLACEHOLDER_FIX and "ApiKeyId" in config.fix
    assert report.exit_code == 1
    assert [r.check for r in report.results] == ["config", "doctor"]  # nothing else can run


def test_lifecycle_keys_that_would_be_ignored_are_named(pki: Pki) -> None:
    config = agent_settings(pki, lifecycle="static", api_url="https://x.example/prod", api_key="k" * 30)
    report = diagnose(config)
    result = report.by_check("config.lifecycle")
    assert result.status is Status.WARN and "api_url" in result.finding and "api_key" in result.finding


# ----------------------------------------------------------------------------- certificates


def test_expired_client_certificate(pki: Pki, tmp_path: Path) -> None:
    ca = certificates.IssuedCertificate(
        certificates.load_certificate(pki.path("ca.crt")), certificates.load_private_key(pki.path("ca.key"))
    )  # type: ignore[arg-type]
    now = datetime.now(UTC)
    old = certificates.issue_leaf(
        ca, "client", "fluidity-agent", not_before=now - timedelta(days=30), not_after=now - timedelta(days=2)
    )
    folder = tmp_path / "certs"
    folder.mkdir()
    shutil.copy(pki.path("ca.crt"), folder / "ca.crt")
    certificates.write_certificate(folder / "client.crt", old.certificate)
    certificates.write_private_key(folder / "client.key", old.private_key)
    config = agent_settings(
        pki, ca_file=folder / "ca.crt", cert_file=folder / "client.crt", key_file=folder / "client.key"
    )
    report = diagnose(config)
    expiry = report.by_check("certificates.expiry")
    assert expiry.status is Status.FAIL and "client.crt expired on" in expiry.finding
    assert "fluidity-certs renew" in expiry.fix
    assert expiry.details["days_to_expiry"]["client.crt"] < 0
    assert report.by_check("certificates.chain").status is Status.PASS
    assert report.by_check("certificates.keys").status is Status.PASS


def test_certificates_from_another_ca_and_a_mismatched_key(pki: Pki, tmp_path: Path) -> None:
    other = tmp_path / "other"
    certificates.ensure_certificates(other)
    config = agent_settings(pki, cert_file=other / "client.crt", key_file=pki.path("client.key"))
    report = diagnose(config)
    chain = report.by_check("certificates.chain")
    assert (
        chain.status is Status.FAIL and "another CA" in chain.finding and "fluidity-certs import" in chain.fix
    )
    keys = report.by_check("certificates.keys")
    assert keys.status is Status.FAIL and "client.key does not match client.crt" in keys.finding


def test_private_key_readable_by_others(pki: Pki, tmp_path: Path) -> None:
    folder = tmp_path / "certs"
    shutil.copytree(pki.dir, folder)
    os.chmod(folder / "client.key", 0o644)
    config = agent_settings(
        pki, ca_file=folder / "ca.crt", cert_file=folder / "client.crt", key_file=folder / "client.key"
    )
    result = diagnose(config).by_check("certificates.permissions")
    assert result.status is Status.FAIL
    assert "client.key can be read by other users (mode 0644)" in result.finding
    assert result.fix == f"chmod 600 {folder / 'client.key'}"


def test_wrong_server_name_offline_and_in_the_handshake(pki: Pki, server: ServerProcess) -> None:
    config = agent_settings(pki, server_name="fluidity-srv", server_port=server.port)
    report = diagnose(config)
    offline = report.by_check("certificates.server_name")
    assert offline.status is Status.FAIL and "mTLS certificate mismatch" in offline.finding
    assert "DNS:fluidity-server" in offline.finding and "server_name" in offline.fix
    assert report.by_check("server.tcp").status is Status.PASS
    handshake = report.by_check("server.tls")
    assert handshake.status is Status.FAIL and "does not name server_name 'fluidity-srv'" in handshake.finding
    assert "set server_name" in handshake.fix


def test_the_server_refuses_a_client_certificate_from_another_ca(
    pki: Pki, server: ServerProcess, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    certificates.ensure_certificates(other)
    # Trust the real server (our ca.crt) but present a client certificate the server never issued.
    config = agent_settings(
        pki, cert_file=other / "client.crt", key_file=other / "client.key", server_port=server.port
    )
    result = diagnose(config).by_check("server.hello")
    assert result.status is Status.FAIL and "refused this agent's certificate" in result.finding


# ----------------------------------------------------------------------------- local proxy


def test_proxy_port_taken_by_another_program() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as other:
        other.settimeout(0.1)
        result = check_proxy_port("127.0.0.1", port, probe_timeout=0.5)
    assert result.status is Status.FAIL and f"127.0.0.1:{port} is in use by another program" in result.finding
    assert "--listen-port" in result.fix


def test_proxy_port_held_by_a_running_fluidity(pki: Pki, server: ServerProcess) -> None:
    running = start_agent(pki, server.port)
    try:
        host, port = running.proxy_address
        result = check_proxy_port(host, port)
    finally:
        running.agent.stop()
    assert result.status is Status.PASS and "held by a running Fluidity proxy" in result.finding


def test_system_proxy_is_reported_not_configured_until_a_reader_exists(pki: Pki) -> None:
    config = agent_settings(pki, listen_port=8080)
    assert check_system_proxy(config).status is Status.INFO
    right = check_system_proxy(config, lambda: SystemProxySetting("GSettings", "127.0.0.1", 8080))
    assert right.status is Status.PASS
    wrong = check_system_proxy(config, lambda: SystemProxySetting("WinINet", "10.0.0.1", 3128))
    assert wrong.status is Status.WARN and "10.0.0.1:3128" in wrong.finding


# ----------------------------------------------------------------------------- control plane


def test_api_key_rejected_through_the_local_gateway(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    with LocalGateway(API_KEY, env=moto_server.env()) as gateway:
        config = agent_settings(
            pki,
            lifecycle="lambda",
            api_url=gateway.url,
            api_key="not-the-right-key-0123456789",
            server_address="",
        )
        report = diagnose(config)
    api = report.by_check("control_plane.api")
    assert api.status is Status.FAIL and "rejected the API key" in api.finding and "403" in api.finding
    assert "ApiKeyId output" in api.fix
    assert report.exit_code == 1


def test_control_plane_with_a_wrong_cluster_name(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    with LocalGateway(API_KEY, env={**moto_server.env(), "CLUSTER_NAME": "fluidity-old"}) as gateway:
        config = agent_settings(
            pki, lifecycle="lambda", api_url=gateway.url, api_key=API_KEY, server_address=""
        )
        report = diagnose(config)
    assert report.by_check("control_plane.api").status is Status.PASS
    reply = report.by_check("control_plane.reply")
    assert reply.status is Status.FAIL and "'fluidity-old' was not found" in reply.finding
    assert "CLUSTER_NAME" in reply.fix and "fluidity-deploy deploy" in reply.fix


# ----------------------------------------------------------------------------- AWS


def aws_report(moto: MotoEndpoint, config: AgentConfig, **extra: Any) -> Report:
    return diagnose(config, options_for(moto, **extra))


def ecs_settings(pki: Pki) -> AgentConfig:
    return agent_settings(pki, lifecycle="ecs", server_address="")


def test_missing_service(moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki) -> None:
    moto_server.client("ecs").delete_service(cluster=cloud.cluster, service=cloud.service, force=True)
    report = aws_report(moto_server, ecs_settings(pki))
    result = report.by_check("aws.service")
    assert (
        result.status is Status.FAIL
        and "'fluidity-server' does not exist in cluster 'fluidity'" in result.finding
    )
    assert "fluidity-deploy deploy" in result.fix
    assert "aws.task" not in statuses(report)  # nothing to look at without the service


def test_missing_stacks_and_cluster(moto_server: MotoEndpoint, pki: Pki) -> None:
    moto_server.reset()
    report = aws_report(moto_server, ecs_settings(pki))
    assert report.by_check("aws.stack.fluidity-fargate").status is Status.FAIL
    assert report.by_check("aws.stack.fluidity-lambda").status is Status.WARN  # ecs needs no control plane
    cluster = report.by_check("aws.cluster")
    assert cluster.status is Status.FAIL and "ECS cluster 'fluidity' does not exist" in cluster.finding
    assert report.by_check("aws.service").status is Status.SKIP


def test_sleep_schedule_disabled(moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki) -> None:
    seed_stacks(moto_server, cloud, api_url="https://abc.execute-api.us-east-1.amazonaws.com/prod")
    seed_control_plane(moto_server)
    moto_server.client("events").disable_rule(Name="fluidity-sleep-schedule")
    result = aws_report(moto_server, ecs_settings(pki)).by_check("aws.sleep_schedule")
    assert result.status is Status.FAIL and "DISABLED" in result.finding
    assert result.fix == "aws events enable-rule --name fluidity-sleep-schedule"


def test_lambdas_with_a_wrong_cluster_name(moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki) -> None:
    seed_stacks(moto_server, cloud, api_url="https://abc.execute-api.us-east-1.amazonaws.com/prod")
    seed_control_plane(moto_server, cluster="fluidity-old")
    result = aws_report(moto_server, ecs_settings(pki)).by_check("aws.lambda_env")
    assert result.status is Status.FAIL
    assert result.finding == (
        "fluidity-wake, fluidity-status, fluidity-kill, fluidity-sleep have CLUSTER_NAME=fluidity-old, "
        "the server's is fluidity"
    )
    assert "fluidity-deploy deploy" in result.fix


def test_task_stopped_because_the_image_cannot_be_pulled(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    reason = (
        "CannotPullContainerError: pull image manifest has been retried 5 time(s): "
        "fluidity-server:latest not found"
    )
    moto_server.client("ecs").stop_task(cluster=cloud.cluster, task=task.task_arn, reason=reason)
    report = aws_report(moto_server, ecs_settings(pki))
    result = report.by_check("aws.task")
    assert result.status is Status.FAIL and reason in result.finding
    assert "docker push" in result.fix and "RepositoryUri" in result.fix
    assert report.by_check("server").status is Status.SKIP


def test_task_stopped_at_startup_shows_the_server_log(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    seed_stacks(moto_server, cloud, api_url="https://abc.execute-api.us-east-1.amazonaws.com/prod")
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    task_id = task.task_arn.rsplit("/", 1)[1]
    logs = moto_server.client("logs")
    stream = f"server/fluidity-server/{task_id}"
    logs.create_log_stream(logGroupName="/fluidity/server", logStreamName=stream)
    line = {"level": "error", "message": "cannot start: ca_file /etc/fluidity/certs/ca.crt does not exist"}
    logs.put_log_events(
        logGroupName="/fluidity/server",
        logStreamName=stream,
        logEvents=[
            {
                "timestamp": int(time.time() * 1000) - 10,
                "message": json.dumps({"level": "info", "message": "starting"}),
            },
            {"timestamp": int(time.time() * 1000), "message": json.dumps(line)},
        ],
    )
    moto_server.client("ecs").stop_task(
        cluster=cloud.cluster, task=task.task_arn, reason="Essential container in task exited"
    )
    result = aws_report(moto_server, ecs_settings(pki)).by_check("aws.task")
    assert result.status is Status.FAIL
    assert "Essential container in task exited" in result.finding
    assert "error: cannot start: ca_file /etc/fluidity/certs/ca.crt does not exist" in result.finding
    assert "fluidity-deploy secrets --cert-dir certs" in result.fix


@pytest.mark.parametrize(
    ("task", "lines", "status", "fix_part"),
    [
        (
            {
                "stoppedReason": "Essential container in task exited",
                "containers": [{"name": "s", "exitCode": 1}],
            },
            ["error: Traceback (most recent call last): ValueError"],
            Status.FAIL,
            "aws logs tail /fluidity/server",
        ),
        (
            {"stoppedReason": "OutOfMemoryError: container killed", "containers": [{"exitCode": 137}]},
            [],
            Status.FAIL,
            "Memory",
        ),
        (
            {"stoppedReason": "Essential container in task exited", "containers": [{"exitCode": 1}]},
            ["exec /opt/venv/bin/fluidity-server: exec format error"],
            Status.FAIL,
            "linux/amd64",
        ),
        (
            {
                "stoppedReason": "ResourceInitializationError: unable to pull secrets or registry auth: "
                "ssm parameter /fluidity/tls/ca-cert not found"
            },
            [],
            Status.FAIL,
            "fluidity-deploy secrets",
        ),
        ({"stoppedReason": "Scaling activity initiated by (deployment ecs-svc/1)"}, [], Status.INFO, ""),
    ],
)
def test_stopped_task_diagnosis(
    task: dict[str, Any], lines: list[str], status: Status, fix_part: str
) -> None:
    result = diagnose_stopped_task({"taskArn": "arn:aws:ecs:r:1:task/fluidity/abc123", **task}, lines)
    assert result.status is status
    assert fix_part in result.fix
    exit_codes = [c["exitCode"] for c in task.get("containers", []) if "exitCode" in c]
    if exit_codes:
        assert f"container exit code {exit_codes[0]}" in result.finding


def test_security_group_without_this_machines_address(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    config = ecs_settings(pki)
    allow_port(moto_server, cloud, config.server_port, cidr="198.51.100.0/24")
    result = aws_report(moto_server, config).by_check("aws.security_group")
    assert result.status is Status.FAIL and "203.0.113.7 is not included" in result.finding
    assert "--allowed-cidr 203.0.113.7/32" in result.fix
    unknown = aws_report(moto_server, config, address=None).by_check("aws.security_group")
    assert unknown.status is Status.WARN and "--public-ip" in unknown.fix


def test_no_metrics_while_a_task_runs_and_an_alarm(
    moto_server: MotoEndpoint, cloud: FluidityCloud, pki: Pki
) -> None:
    seed_task_on_loopback(moto_server, cloud)
    cloudwatch = moto_server.client("cloudwatch")
    cloudwatch.put_metric_alarm(
        AlarmName="fluidity-WakeLambdaErrorAlarm",
        Namespace="AWS/Lambda",
        MetricName="Errors",
        Statistic="Sum",
        Period=300,
        EvaluationPeriods=1,
        Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold",
    )
    cloudwatch.set_alarm_state(
        AlarmName="fluidity-WakeLambdaErrorAlarm",
        StateValue="ALARM",
        StateReason="Threshold Crossed: 1 datapoint",
    )
    report = aws_report(moto_server, ecs_settings(pki))
    metrics = report.by_check("aws.metrics")
    assert metrics.status is Status.FAIL and "no ActiveConnections datapoints" in metrics.finding
    assert "emit_metrics: true" in metrics.fix
    alarms = report.by_check("aws.alarms")
    assert alarms.status is Status.WARN and "fluidity-WakeLambdaErrorAlarm" in alarms.finding
    assert "/aws/lambda/fluidity-wake" in alarms.fix
    assert report.by_check("aws.public_ip").details["public_ip"] == "127.0.0.1"


def test_aws_checks_stop_without_credentials(moto_server: MotoEndpoint, pki: Pki) -> None:
    moto_server.reset()
    moto_server.enforce_iam(True)
    try:
        bad = AwsClients(
            **{**clients_for(moto_server).__dict__, "sts": moto_server.client("sts", key_id="nobody")}
        )
        results = run_aws_checks(
            bad, ecs_settings(pki), now=later(), public_address=fixed_address(None)
        ).results
    finally:
        moto_server.enforce_iam(False)
    assert [r.check for r in results] == ["aws.credentials", "aws"]
    assert results[0].status is Status.FAIL and "aws configure" in results[0].fix


def test_region_comes_from_the_api_url() -> None:
    assert region_from_api_url("https://abc123.execute-api.eu-west-1.amazonaws.com/prod") == "eu-west-1"
    assert region_from_api_url("http://127.0.0.1:8080/prod") is None


# ----------------------------------------------------------------------------- the public address source


class _CheckIp(BaseHTTPRequestHandler):
    body = b"198.51.100.23\n"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


def test_public_address_lookup_reads_a_checkip_style_reply() -> None:
    with HTTPServer(("127.0.0.1", 0), _CheckIp) as http_server:
        thread = threading.Thread(target=http_server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{http_server.server_address[1]}/"
        try:
            assert lookup_public_ip(url) == "198.51.100.23"
            _CheckIp.body = b"<html>captive portal</html>"
            assert lookup_public_ip(url) is None
        finally:
            http_server.shutdown()
    assert lookup_public_ip(f"http://127.0.0.1:{free_port()}/", timeout=1) is None


# ----------------------------------------------------------------------------- the programs


def run_program(args: list[str], moto: MotoEndpoint) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLUIDITY_"))}
    env.update(moto.env())
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False, cwd=REPO)


def test_fluidity_doctor_and_agent_doctor_print_the_report(
    healthy: tuple[AgentConfig, LocalGateway], moto_server: MotoEndpoint, tmp_path: Path
) -> None:
    config, gateway = healthy
    settings = tmp_path / "agent.yaml"
    settings.write_text(
        "\n".join(
            [
                "lifecycle: lambda",
                f"api_url: {gateway.url}",
                f"api_key: {API_KEY}",
                f"server_port: {config.server_port}",
                f"listen_port: {config.listen_port}",
                f"ca_file: {config.ca_file}",
                f"cert_file: {config.cert_file}",
                f"key_file: {config.key_file}",
                "aws_region: us-east-1",
            ]
        )
        + "\n"
    )
    shown = run_program(
        [str(BIN / "fluidity"), "doctor", "--config", str(settings), "--aws", "--public-ip", MY_ADDRESS],
        moto_server,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"Fluidity doctor: {settings}"
    assert any(line.startswith("PASS  server.hello") and "Connected to server in" in line for line in lines)
    assert "Server public IP: 127.0.0.1" in lines
    as_json = run_program(
        [str(BIN / "fluidity-agent"), "--doctor", "--config", str(settings), "--json", "--no-ip-lookup"],
        moto_server,
    )
    report = json.loads(as_json.stdout)
    assert report["exit_code"] == as_json.returncode == 0, as_json.stdout
    assert {c["check"] for c in report["checks"]} >= {
        "config",
        "certificates.chain",
        "control_plane.api",
        "server.hello",
    }
    broken = run_program(
        [str(BIN / "fluidity"), "doctor", "--config", str(settings), "--api-key", "x" * 30], moto_server
    )
    assert broken.returncode == 1 and "FAIL  control_plane.api" in broken.stdout


def test_the_runbook_fixes_in_fargate_md_work_as_written(
    moto_server: MotoEndpoint, cloud: FluidityCloud, aws_env: dict[str, str]
) -> None:
    """docs/fargate.md's working forms of the runbook's broken lines, run by bash with the aws CLI (v1)."""
    if shutil.which("aws", path=str(BIN)) is None:
        pytest.skip("needs the aws CLI (test extra)")
    text = (REPO / "docs" / "fargate.md").read_text(encoding="utf-8")
    section = text.split("## The runbook's command lines that need a fix", 1)[1]
    script = section.split("```bash\n", 1)[1].split("```", 1)[0]
    seed_stacks(moto_server, cloud, api_url="https://abc.execute-api.us-east-1.amazonaws.com/prod")
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    stream = f"server/fluidity-server/{task.task_arn.rsplit('/', 1)[1]}"
    logs = moto_server.client("logs")
    logs.create_log_stream(logGroupName="/fluidity/server", logStreamName=stream)
    listening = json.dumps({"level": "info", "message": "listening", "address": "0.0.0.0:8443"})
    logs.put_log_events(
        logGroupName="/fluidity/server",
        logStreamName=stream,
        logEvents=[{"timestamp": int(time.time() * 1000), "message": listening}],
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Server public IP: {task.public_ip} (running, port 8443)"
    assert lines[1] == task.public_ip
    assert lines[2].startswith("RUNNING")
    assert '"message": "listening"' in lines[3]


def test_deploy_outputs_print_the_servers_public_ip(
    moto_server: MotoEndpoint, cloud: FluidityCloud, aws_env: dict[str, str]
) -> None:
    seed_stacks(moto_server, cloud, api_url="https://abc.execute-api.us-east-1.amazonaws.com/prod")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deploy.main(["outputs"]) == 0
    assert "Server: stopped, no public IP" in out.getvalue()
    cloud.set_desired_count(1)
    task = cloud.seed_running_task()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deploy.main(["outputs"]) == 0
    assert f"Server public IP: {task.public_ip} (running, port 8443)" in out.getvalue().splitlines()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deploy.main(["outputs", "--json"]) == 0
    shown = json.loads(out.getvalue())
    assert shown["server"]["public_ip"] == task.public_ip
    assert shown["fluidity-lambda"]["ApiKeyId"] == API_KEY
