"""The operations runbook's commands (aws CLI, curl) against the control plane and moto.

Each script is the runbook's bash, run by bash, with ``aws`` (the real CLI) and ``curl``
talking to a moto server and the local API gateway on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lambdas.local_gateway import LocalGateway
from server.metrics import MetricsPublisher, MetricsSnapshot

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


API_KEY = "runbook-test-key-0123456789abcdefghijklm"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    shutil.which("aws", path=str(BIN)) is None or shutil.which("curl") is None,
    reason="needs the aws CLI (test extra) and curl",
)


@pytest.fixture
def gateway(moto_server: MotoEndpoint, cloud: FluidityCloud) -> Iterator[LocalGateway]:
    with LocalGateway(API_KEY, env=moto_server.env()) as running:
        yield running


def shell(script: str, moto: MotoEndpoint, **extra: str) -> str:
    """Run a bash script as an operator would, with the runbook's tools pointed at loopback."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("AWS_")}
    env.update(moto.env(), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def curl(moto: MotoEndpoint, gateway: LocalGateway, method: str, route: str) -> dict[str, object]:
    """The runbook's ``curl -X POST "$API_URL/wake" -H "x-api-key: $API_KEY"``, for any route."""
    script = f'curl -sS -X {method} "$API_URL/{route}" -H "x-api-key: $API_KEY"'
    reply: dict[str, object] = json.loads(shell(script, moto, API_URL=gateway.url, API_KEY=API_KEY))
    return reply


SERVICE_STATUS = (
    "aws ecs describe-services --cluster fluidity --services fluidity-server "
    "--query 'services[0].[status,runningCount,desiredCount]' --output text"
)

#: The runbook's "Starting Fluidity Server" bash, with the PowerShell variant's JMESPath literal.
FIND_PUBLIC_IP = """
        TASK_ARN=$(aws ecs list-tasks --cluster fluidity --service-name fluidity-server --query 'taskArns[0]' --output text)
        ENI_ID=$(aws ecs describe-tasks --cluster fluidity --tasks "$TASK_ARN" --query 'tasks[0].attachments[0].details[?name==`networkInterfaceId`].value' --output text)
        PUBLIC_IP=$(aws ec2 describe-network-interfaces --network-interface-ids "$ENI_ID" --query 'NetworkInterfaces[0].Association.PublicIp' --output text)
        aws ecs describe-tasks --cluster fluidity --tasks "$TASK_ARN" --query 'tasks[0].[lastStatus,desiredStatus]' --output text
        echo "Server IP: $PUBLIC_IP"
        """  # noqa: E501


def test_wake_status_kill_as_the_runbook_does_them(
    moto_server: MotoEndpoint, cloud: FluidityCloud, gateway: LocalGateway
) -> None:
    woken = curl(moto_server, gateway, "POST", "wake")
    assert woken["state"] == "starting"
    # moto reports the new desired count as running at once; ECS would count up as the task starts.
    assert shell(SERVICE_STATUS, moto_server).split() == ["ACTIVE", "1", "1"]

    task = cloud.seed_running_task()  # what ECS does for the service
    listed = json.loads(
        shell("aws ecs list-tasks --cluster fluidity --service-name fluidity-server", moto_server)
    )
    assert listed["taskArns"] == [task.task_arn]
    # "Starting Fluidity Server", manual path: task -> ENI -> public IP. The runbook's bash
    # query writes [?name==networkInterfaceId], which JMESPath reads as a field comparison
    # and matches nothing; the PowerShell variant's literal form is used here.
    found = shell(FIND_PUBLIC_IP, moto_server)
    assert found.splitlines() == ["RUNNING\tRUNNING", f"Server IP: {task.public_ip}"]
    status = curl(moto_server, gateway, "GET", "status")
    assert (status["state"], status["public_ip"], status["port"]) == ("running", task.public_ip, 8443)

    killed = curl(moto_server, gateway, "POST", "kill")
    assert killed["desired_count"] == 0
    assert shell(SERVICE_STATUS, moto_server).split() == ["ACTIVE", "0", "0"]


def test_curl_without_the_key_is_forbidden(moto_server: MotoEndpoint, gateway: LocalGateway) -> None:
    out = shell('curl -sS -w " %{http_code}" -X POST "$API_URL/wake"', moto_server, API_URL=gateway.url)
    assert out == '{"message": "Forbidden"} 403'


def test_manual_scaling_commands_are_what_the_control_plane_reports(
    moto_server: MotoEndpoint, cloud: FluidityCloud, gateway: LocalGateway
) -> None:
    """The runbook's manual path (no Lambda) and the API agree on the service's state."""
    shell(
        "aws ecs update-service --cluster fluidity --service fluidity-server --desired-count 1 > /dev/null",
        moto_server,
    )
    status = curl(moto_server, gateway, "GET", "status")
    assert (status["state"], status["desired_count"]) == ("starting", 1)
    shell(
        "aws ecs update-service --cluster fluidity --service fluidity-server --desired-count 0 > /dev/null",
        moto_server,
    )
    status = curl(moto_server, gateway, "GET", "status")
    assert (status["state"], status["desired_count"]) == ("stopped", 0)


def test_metrics_are_visible_to_the_runbooks_get_metric_statistics(moto_server: MotoEndpoint) -> None:
    moto_server.reset()
    publisher = MetricsPublisher(
        moto_server.client("cloudwatch"), snapshot=lambda: MetricsSnapshot(1, 3, time.time()), interval=60
    )
    assert publisher.publish_once()
    now = datetime.now(UTC)
    out = shell(
        "aws cloudwatch get-metric-statistics --namespace Fluidity --metric-name ActiveConnections "
        '--start-time "$START" --end-time "$END" --period 300 --statistics Average',
        moto_server,
        START=(now - timedelta(hours=1)).isoformat(),
        END=(now + timedelta(minutes=5)).isoformat(),
    )
    points = json.loads(out)["Datapoints"]
    assert [p["Average"] for p in points] == [1.0]
    with_dimension = shell(
        "aws cloudwatch get-metric-statistics --namespace Fluidity --metric-name ActiveStreams "
        "--dimensions Name=Service,Value=fluidity-server "
        '--start-time "$START" --end-time "$END" --period 60 --statistics Maximum '
        "--query 'Datapoints[0].Maximum' --output text",
        moto_server,
        START=(now - timedelta(hours=1)).isoformat(),
        END=(now + timedelta(minutes=5)).isoformat(),
    )
    assert with_dimension == "3.0"
