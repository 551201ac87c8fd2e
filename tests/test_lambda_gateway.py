"""The local API Gateway: real HTTP on loopback, API-key checks, the real handlers behind it."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from lambdas.local_gateway import GatewayLimits, LocalGateway
from lambdas.packaging import build_bundle
from server.framing import ControlPlaneError, ServerState, ServerStatus, parse_control_reply

if TYPE_CHECKING:
    from cloud_fixtures import FluidityCloud, MotoEndpoint


API_KEY = "k3y-0f-40-characters-like-api-gateway-ok"
ROOT = Path(__file__).resolve().parent.parent
#: Small bounds so a stalled client is cut quickly; each test's raw socket waits far longer.
FAST = GatewayLimits(read_timeout=0.5, max_head_bytes=2048, max_body_bytes=4096, max_connections=4)
WAIT = 10.0


@pytest.fixture
def gateway(moto_server: MotoEndpoint, cloud: FluidityCloud) -> Iterator[LocalGateway]:
    with LocalGateway(API_KEY, env=moto_server.env()) as running:
        yield running


@pytest.fixture
def fast_gateway(moto_server: MotoEndpoint, cloud: FluidityCloud) -> Iterator[LocalGateway]:
    with LocalGateway(API_KEY, env=moto_server.env(), limits=FAST) as running:
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
        [sys.executable, "-m", "lambdas.local_gateway", "--api-key", API_KEY, "--port", "0"]
        + ["--read-timeout", "0.5", "--max-connections", "4"],
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
        host, port = url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT) as stalled:
            stalled.sendall(b"POST /prod/wake HTTP/1.1\r\n")
            assert read_all(stalled).startswith(b"HTTP/1.1 408 ")  # --read-timeout took effect
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


# --------------------------------------------------------------------------- raw sockets and bounds


def address(gateway: LocalGateway) -> tuple[str, int]:
    host, port = gateway.url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (the test fails if it never does)."""
    sock.settimeout(WAIT)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(gateway: LocalGateway, raw: bytes) -> bytes:
    with socket.create_connection(address(gateway), timeout=WAIT) as sock:
        sock.sendall(raw)
        return read_all(sock)


def still_serves(gateway: LocalGateway) -> None:
    assert call("GET", f"{gateway.url}/status").status_code == 200


@pytest.mark.parametrize(
    ("sent", "what"),
    [
        (b"POST /prod/wake HTTP/1.1\r\nHost: x\r\nx-api-key: ", "head"),
        (b'POST /prod/wake HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"a"', "body"),
    ],
    ids=["partial-head", "short-body"],
)
def test_a_stalled_client_gets_408_and_is_closed_while_others_are_served(
    fast_gateway: LocalGateway, cloud: FluidityCloud, sent: bytes, what: str
) -> None:
    with socket.create_connection(address(fast_gateway), timeout=WAIT) as stalled:
        stalled.sendall(sent)
        still_serves(fast_gateway)  # while the stalled client holds its connection
        answer = read_all(stalled)  # returns only because the gateway closes it
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer
    assert f"the request {what} did not arrive within 0.5 s".encode() in answer
    still_serves(fast_gateway)
    assert cloud.describe_service()["desiredCount"] == 0


def test_a_client_dripping_its_head_is_cut_at_the_deadline(fast_gateway: LocalGateway) -> None:
    """The timeout bounds the whole head, not each read: one byte per 0.1 s gains nothing."""
    with socket.create_connection(address(fast_gateway), timeout=WAIT) as drip:
        drip.sendall(b"GET /prod/status HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        try:
            while time.monotonic() - started < WAIT:
                drip.sendall(b"a")
                time.sleep(0.1)
        except OSError:  # the gateway closed the connection
            pass
        answer = read_all(drip)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    still_serves(fast_gateway)


def test_an_idle_keep_alive_connection_is_closed_silently(fast_gateway: LocalGateway) -> None:
    with socket.create_connection(address(fast_gateway), timeout=WAIT) as idle:
        idle.sendall(f"GET /prod/status HTTP/1.1\r\nHost: x\r\nx-api-key: {API_KEY}\r\n\r\n".encode())
        answer = read_all(idle)  # the 200, then nothing more once the connection sat idle
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1, answer


@pytest.mark.parametrize(
    ("transfer_encoding", "status"),
    [("chunked", 411), ("gzip, chunked", 501), ("gzip", 400)],
)
def test_a_chunked_body_is_refused_with_one_clean_reply(
    fast_gateway: LocalGateway, cloud: FluidityCloud, transfer_encoding: str, status: int
) -> None:
    """Before, the chunk-size line was read as a second request and answered with stray HTML."""
    answer = exchange(
        fast_gateway,
        f"POST /prod/wake HTTP/1.1\r\nHost: x\r\nx-api-key: {API_KEY}\r\n"
        f"Transfer-Encoding: {transfer_encoding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert answer.count(b"HTTP/1.1 ") == 1 and b"<html" not in answer.lower()
    assert b"Connection: close" in head and b"Content-Type: application/json" in head
    assert b'"message"' in body
    if status == 411:
        assert b"send a Content-Length" in body
    assert cloud.describe_service()["desiredCount"] == 0
    still_serves(fast_gateway)


def test_transfer_encoding_with_content_length_is_refused(fast_gateway: LocalGateway) -> None:
    answer = exchange(
        fast_gateway,
        f"POST /prod/wake HTTP/1.1\r\nHost: x\r\nx-api-key: {API_KEY}\r\n"
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 400 ") and b"both Transfer-Encoding and Content-Length" in answer


def test_two_api_key_headers_are_a_400_not_last_one_wins(
    fast_gateway: LocalGateway, cloud: FluidityCloud
) -> None:
    for first, second in ((API_KEY, API_KEY), ("wrong", API_KEY), (API_KEY, "wrong")):
        answer = exchange(
            fast_gateway,
            f"POST /prod/wake HTTP/1.1\r\nHost: x\r\nx-api-key: {first}\r\nX-Api-Key: {second}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"x-amzn-ErrorType: BadRequestException" in answer
        assert b"the x-api-key header appears more than once" in answer
    assert cloud.describe_service()["desiredCount"] == 0


def test_an_oversized_head_is_refused_with_431(fast_gateway: LocalGateway) -> None:
    answer = exchange(fast_gateway, b"GET /prod/status HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    still_serves(fast_gateway)


def test_a_body_over_the_limit_is_refused_with_413(fast_gateway: LocalGateway) -> None:
    answer = exchange(
        fast_gateway,
        f"POST /prod/wake HTTP/1.1\r\nx-api-key: {API_KEY}\r\nContent-Length: 4097\r\n\r\n".encode()
        + b"x" * 4097,
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    still_serves(fast_gateway)


def test_pipelined_requests_and_an_expected_continue_are_answered_in_order(
    fast_gateway: LocalGateway,
) -> None:
    one = f"GET /prod/status HTTP/1.1\r\nHost: x\r\nx-api-key: {API_KEY}\r\n\r\n".encode()
    two = (
        f"POST /prod/nope HTTP/1.1\r\nx-api-key: {API_KEY}\r\nContent-Length: 2\r\n"
        "Connection: close\r\n\r\n{}"
    )
    answer = exchange(fast_gateway, one + two.encode())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 404 ") == 1
    with socket.create_connection(address(fast_gateway), timeout=WAIT) as sock:
        sock.sendall(
            f"POST /prod/kill HTTP/1.1\r\nx-api-key: {API_KEY}\r\nContent-Length: 2\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"{}")
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_connections_over_the_limit_get_503_and_the_listener_keeps_accepting(
    moto_server: MotoEndpoint, cloud: FluidityCloud
) -> None:
    limits = GatewayLimits(read_timeout=WAIT, max_connections=2)
    with LocalGateway(API_KEY, env=moto_server.env(), limits=limits) as gateway:
        holders = [socket.create_connection(address(gateway), timeout=WAIT) for _ in range(2)]
        try:
            for holder in holders:
                holder.sendall(b"GET /prod/status HTTP/1.1\r\n")  # partial heads hold both slots
            deadline = time.monotonic() + WAIT
            while gateway.open_connections < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            for _ in range(3):  # refused at once, again and again: the listener never stops
                answer = exchange(
                    gateway, f"GET /prod/status HTTP/1.1\r\nx-api-key: {API_KEY}\r\n\r\n".encode()
                )
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert b"Retry-After: 1" in answer and b"too many connections" in answer
        finally:
            holders.pop().close()
        deadline = time.monotonic() + WAIT
        while gateway.open_connections > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        still_serves(gateway)
        holders[0].close()


def test_the_lambda_zip_leaves_the_local_gateway_out() -> None:
    bundle = build_bundle(ROOT)
    assert "lambdas/local_gateway.py" not in bundle.members
    assert "lambdas/handlers.py" in bundle.members
    with zipfile.ZipFile(io.BytesIO(bundle.data)) as archive:
        assert not [name for name in archive.namelist() if "local_gateway" in name]
