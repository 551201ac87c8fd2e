"""The local API Gateway: real HTTP on loopback, API-key checks, the real handlers behind it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from lambdas.local_gateway import LocalGateway
from server.framing import ControlPlaneError, ServerState, ServerStatus, parse_control_reply

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


API_KEY = "k3y-0f-40-characters-like-api-gateway-ok"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gateway(moto_server: MotoEndpoint, cloud: FluidityCloud) -> Iterator[LocalGateway]:
    with LocalGateway(API_KEY, env=moto_server.env()) as running:
        yield running


def call(method: str, url: str, key: str | None = API_KEY) -> requests.Response:
    headers = {"x-api-key": key} if key is not None else {}
    return requests.request(method, url, headers=headers, timeout=10, proxies={"http": "", "https": ""})


def parsed(reply: requests.Response) -> ServerStatus | ControlPlaneError:
    """What the desktop makes of the reply."""
    return parse_control_reply(reply.status_code, reply.content)


def test_url_has_a_stage_like_the_real_api(gateway: LocalGateway) -> None:
    assert gateway.url.startswith("http://127.0.0.1:")
    assert gateway.url.endswith("/prod")


def test_missing_or_wrong_api_key_is_forbidden_like_api_gateway(
    gateway: LocalGateway, cloud: FluidityCloud
) -> None:
    for key in (None, "", "wrong-key", API_KEY.upper()):
        reply = call("POST", f"{gateway.url}/wake", key)
        assert reply.status_code == 403
        assert reply.json() == {"message": "Forbidden"}
        assert reply.headers["x-amzn-ErrorType"] == "ForbiddenException"
        error = parsed(reply)
        assert isinstance(error, ControlPlaneError) and error.error == "forbidden"
        assert "check the API key" in error.message
    assert cloud.describe_service()["desiredCount"] == 0


def test_right_key_reaches_the_handlers(gateway: LocalGateway, cloud: FluidityCloud) -> None:
    woken = parsed(call("POST", f"{gateway.url}/wake"))
    assert isinstance(woken, ServerStatus)
    assert (woken.state, woken.desired_count) == (ServerState.STARTING, 1)
    task = cloud.seed_running_task()
    status = call("GET", f"{gateway.url}/status")
    assert status.status_code == 200
    assert status.headers["Content-Type"] == "application/json"
    running = parsed(status)
    assert isinstance(running, ServerStatus)
    assert (running.state, running.public_ip, running.port) == (ServerState.RUNNING, task.public_ip, 8443)
    killed = parsed(call("POST", f"{gateway.url}/kill"))
    assert isinstance(killed, ServerStatus) and killed.desired_count == 0
    assert cloud.describe_service()["desiredCount"] == 0


def test_route_errors_come_from_the_handlers(gateway: LocalGateway) -> None:
    missing = call("POST", f"{gateway.url}/reboot")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong = call("DELETE", f"{gateway.url}/wake")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    other_stage = call("POST", gateway.url.replace("/prod", "/dev") + "/wake")
    assert other_stage.status_code == 403 and other_stage.json() == {"message": "Forbidden"}


def test_bad_request_is_refused_and_the_gateway_keeps_serving(gateway: LocalGateway) -> None:
    host, port = gateway.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /prod/wake HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert call("GET", f"{gateway.url}/status").status_code == 200


def test_aws_errors_reach_the_client_as_json(moto_server: MotoEndpoint, cloud: FluidityCloud) -> None:
    env = {**moto_server.env(), "CLUSTER_NAME": "not-deployed"}
    with LocalGateway(API_KEY, env=env, stage=None) as gateway:
        reply = call("POST", f"{gateway.url}/wake")
    error = parsed(reply)
    assert reply.status_code == 404
    assert isinstance(error, ControlPlaneError) and error.error == "cluster_not_found"
    assert "'not-deployed'" in error.message


def test_an_empty_api_key_is_refused() -> None:
    with pytest.raises(ValueError, match="API key"):
        LocalGateway("")


def test_command_line_gateway_serves_until_stopped(moto_server: MotoEndpoint, cloud: FluidityCloud) -> None:
    env = {**os.environ, **moto_server.env(), "NO_PROXY": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lambdas.local_gateway", "--api-key", API_KEY, "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("control plane listening on http://127.0.0.1:"), banner
        url = banner.split()[4]
        assert url.endswith("/prod")
        assert call("POST", f"{url}/wake", "nope").status_code == 403
        status = parsed(call("POST", f"{url}/wake"))
        assert isinstance(status, ServerStatus) and status.desired_count == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert cloud.describe_service()["desiredCount"] == 1


def test_command_line_reports_a_busy_port(moto_server: MotoEndpoint) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "lambdas.local_gateway", "--api-key", API_KEY, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **moto_server.env()},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
