"""The operations runbook's commands (aws CLI, curl) against the control plane and moto.

Each script is the runbook's bash, run by bash, with ``aws`` (the real CLI) and ``curl``
talking to a moto server and the local API gateway on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tunnel_fixtures import free_port

from lambdas.local_gateway import LocalGateway
from server.metrics import MetricsPublisher, MetricsSnapshot

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


API_KEY = "runbook-test-key-0123456789abcdefghijklm"
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
#: docs/lambda.md's bash block for running the runbook's curl lines against the local gateway.
LOCAL_RUN = re.compile(r"^### The runbook's curl lines, locally$.*?^```bash$\n(.*?)^```$", re.M | re.S)
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


def json_replies(text: str) -> list[dict[str, object]]:
    """The JSON objects in a script's output, in order (curl prints them without newlines)."""
    decoder, found, position = json.JSONDecoder(), [], text.find("{")
    while position >= 0:
        reply, end = decoder.raw_decode(text, position)
        found.append(reply)
        position = text.find("{", end)
    return found


def test_the_documented_local_run_of_the_runbooks_curl_lines_works_as_written() -> None:
    """docs/lambda.md's block, run by bash: moto, the gateway's command line, then the runbook's lines."""
    match = LOCAL_RUN.search((ROOT / "docs" / "lambda.md").read_text(encoding="utf-8"))
    assert match is not None, "docs/lambda.md lost its local-run block"
    script = match.group(1)
    assert 'curl -X POST "$API_URL/wake" \\\n  -H "x-api-key: $API_KEY"' in script  # the runbook's spelling
    moto_port, gateway_port = free_port(), free_port()
    script = (
        script.replace("$PWD/.venv/bin", str(BIN))
        .replace("127.0.0.1:5000", f"127.0.0.1:{moto_port}")
        .replace("-p 5000", f"-p {moto_port}")
        .replace("8787", str(gateway_port))
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("AWS_")}
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hung run can be stopped with its background programs
    )
    try:
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, err
    woken, killed = [reply for reply in json_replies(out) if "logger" not in reply]  # not the handlers' logs
    assert (woken["state"], woken["desired_count"]) == ("starting", 1)
    assert "ACTIVE\t1\t1" in out
    assert (killed["state"], killed["desired_count"]) == ("stopped", 0)
