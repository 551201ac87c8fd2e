"""One proxy port for HTTP, SOCKS5 and SOCKS4a; bypass rules; the PAC file — with real clients.

curl, PySocks, a WebSocket client and headless Chromium talk to a real agent whose tunnel
goes to a real server process; origins are on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import socks  # PySocks
from origin_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    http_origin_fixture,
    tls_material_fixture,
    tls_origin_fixture,
    ws_origin_fixture,
)
from proxy_fixtures import IO_TIMEOUT, OriginServer, TlsMaterial, WebSocketEchoServer, closed_port
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    AgentFactory,
    RunningAgent,
    ServerFactory,
    agent_factory_fixture,
    clean_env,
    server_factory_fixture,
)
from websockets.sync.client import connect as ws_connect

from desktop.pac import PAC_CONTENT_TYPE


def socks_url(agent: RunningAgent, scheme: str = "socks5h") -> str:
    host, port = agent.proxy_address
    return f"{scheme}://{host}:{port}"


def curl_via(proxy_option: str, proxy: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", proxy_option, proxy, *args],
        capture_output=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )


def socks5_connect(agent: RunningAgent, host: str, port: int) -> tuple[socket.socket, int]:
    """A raw SOCKS5 CONNECT by domain name: the socket and the reply code."""
    sock = socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    name = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
    reply = sock.recv(10)
    assert reply[:1] == b"\x05" and len(reply) == 10, reply
    return sock, reply[1]


@pytest.fixture
def agent(server_factory: ServerFactory, agent_factory: AgentFactory) -> RunningAgent:
    return agent_factory(server_factory().port)


# --------------------------------------------------------------------------- SOCKS with real clients


@pytest.mark.parametrize(
    ("option", "scheme"),
    [("--socks5-hostname", "socks5h"), ("--socks5", "socks5"), ("--socks4a", "socks4a")],
)
def test_curl_over_socks_reaches_an_http_origin(
    agent: RunningAgent, http_origin: OriginServer, option: str, scheme: str
) -> None:
    host, port = agent.proxy_address
    result = curl_via(option, f"{host}:{port}", http_origin.url("/echo/socks"))
    assert result.returncode == 0, result.stderr
    assert b'"/echo/socks"' in result.stdout


def test_curl_over_socks5h_reaches_an_https_origin_by_name(
    agent: RunningAgent, tls_origin: OriginServer, tls_material: TlsMaterial
) -> None:
    result = curl_via(
        "--proxy",
        socks_url(agent),
        "--cacert",
        str(tls_material.ca_path),
        tls_origin.url("/echo/secure", "localhost"),
    )
    assert result.returncode == 0, result.stderr
    assert b'"/echo/secure"' in result.stdout


def test_a_python_socks_library_and_pipelined_data(agent: RunningAgent, http_origin: OriginServer) -> None:
    host, port = agent.proxy_address
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, host, port, rdns=True)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(("localhost", http_origin.port))
    sock.sendall(b"GET /echo/lib HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.") and b'"/echo/lib"' in reply


def test_a_websocket_over_socks(agent: RunningAgent, ws_origin: WebSocketEchoServer) -> None:
    host, port = agent.proxy_address
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, host, port, rdns=True)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(("127.0.0.1", ws_origin.port))
    with ws_connect(f"ws://127.0.0.1:{ws_origin.port}/", sock=sock) as websocket:
        websocket.send("over socks")
        assert websocket.recv(timeout=IO_TIMEOUT) == "over socks"


# --------------------------------------------------------------------------- the real outcome in the reply


def test_each_dial_failure_reaches_the_socks_client_as_its_reply_code(
    server_factory: ServerFactory, agent_factory: AgentFactory
) -> None:
    strict = agent_factory(server_factory(allow_loopback=False).port)
    _, code = socks5_connect(strict, "127.0.0.1", 80)
    assert code == 0x02  # policy: connection not allowed by ruleset

    loose = agent_factory(server_factory("--connect-timeout", "1s").port)
    _, code = socks5_connect(loose, "127.0.0.1", closed_port())
    assert code == 0x05  # refused
    _, code = socks5_connect(loose, "no-such-host.invalid", 80)
    assert code == 0x04  # dns: host unreachable
    hole = socket.socket()  # a full accept queue drops SYNs: the dial times out
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname(), timeout=IO_TIMEOUT)
    try:
        _, code = socks5_connect(loose, "127.0.0.1", hole.getsockname()[1])
        assert code == 0x06  # timeout: TTL expired
    finally:
        filler.close()
        hole.close()


def test_a_tunnel_that_is_down_is_a_general_failure(
    server_factory: ServerFactory, agent_factory: AgentFactory
) -> None:
    server = server_factory()
    agent = agent_factory(server.port, request_wait=1.0)
    server.stop()
    _, code = socks5_connect(agent, "127.0.0.1", 80)
    assert code == 0x01


def test_bind_and_udp_associate_are_not_supported(agent: RunningAgent) -> None:
    for command in (2, 3):
        sock = socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT)
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(bytes([5, command, 0, 1, 127, 0, 0, 1, 0, 80]))
        assert sock.recv(10)[1] == 0x07
        sock.close()


# --------------------------------------------------------------------------- bypass rules


def test_bypassed_destinations_are_dialed_directly_and_the_rest_through_the_tunnel(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    """The server refuses loopback targets: only a request that never went through it succeeds."""
    strict = server_factory(allow_loopback=False).port
    bypassing = agent_factory(strict, bypass=["127.0.0.0/8"])
    tunnelling = agent_factory(strict, bypass=["*.example"])
    url = http_origin.url("/echo/where")
    direct = curl_via("--proxy", bypassing.proxy_url, url)
    assert direct.returncode == 0 and b'"/echo/where"' in direct.stdout
    refused = curl_via("--proxy", tunnelling.proxy_url, "--include", url)
    assert refused.stdout.startswith(b"HTTP/1.1 403 ")  # the tunnel server's egress policy said no
    _, code = socks5_connect(bypassing, "127.0.0.1", http_origin.port)
    assert code == 0x00


# --------------------------------------------------------------------------- PAC


def test_the_pac_file_is_served_from_the_bypass_rules(
    server_factory: ServerFactory, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(server_factory().port, bypass=["*.corp.example", "10.0.0.0/8", "<local>"])
    host, port = agent.proxy_address
    result = subprocess.run(
        ["curl", "--silent", "--include", "--noproxy", "*", f"http://{host}:{port}/proxy.pac"],
        capture_output=True,
        env=clean_env(),
        timeout=30,
        check=False,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Type: {PAC_CONTENT_TYPE}".encode() in head
    assert b"FindProxyForURL" in body and f"PROXY {host}:{port}; SOCKS5 {host}:{port}".encode() in body
    assert b"corp.example" in body and b"DIRECT" in body


# --------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_dump(tmp_path: Path, url: str, *flags: str) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}", "--proxy-bypass-list=<-loopback>",
            "--ignore-certificate-errors", *flags, "--dump-dom", url,
        ],
        capture_output=True, text=True, env=clean_env(), timeout=90, check=False,
    )  # fmt: skip
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_chromium_loads_an_https_page_through_socks5(
    agent: RunningAgent, tls_origin: OriginServer, tmp_path: Path
) -> None:
    page = chromium_dump(
        tmp_path, tls_origin.url("/echo/browser", "localhost"), f"--proxy-server={socks_url(agent, 'socks5')}"
    )
    assert "/echo/browser" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_chromium_with_the_pac_url_reaches_an_https_origin_through_the_tunnel(
    agent: RunningAgent, tls_origin: OriginServer, tmp_path: Path
) -> None:
    host, port = agent.proxy_address
    page = chromium_dump(
        tmp_path, tls_origin.url("/echo/pac", "localhost"), f"--proxy-pac-url=http://{host}:{port}/proxy.pac"
    )
    assert "/echo/pac" in page


# --------------------------------------------------------------------------- 0-RTT and the optimistic CONNECT


def test_an_optimistic_connect_answers_at_once_and_a_failed_dial_closes_the_connection(
    server_factory: ServerFactory, agent_factory: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    agent = agent_factory(server_factory().port, optimistic_connect=True)
    port = closed_port()
    with socket.create_connection(agent.proxy_address, timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")  # before the server has dialed
        sock.sendall(b"\x16\x03\x01 a client hello would ride here")
        assert sock.recv(100) == b""  # the dial failed: the connection is closed
    assert any(
        "optimistic CONNECT failed" in record.getMessage() and getattr(record, "reason", "") == "refused"
        for record in caplog.records
    )


def test_an_optimistic_connect_carries_a_real_https_exchange(
    server_factory: ServerFactory,
    agent_factory: AgentFactory,
    tls_origin: OriginServer,
    tls_material: TlsMaterial,
) -> None:
    agent = agent_factory(server_factory().port, optimistic_connect=True)
    result = curl_via(
        "--proxy",
        agent.proxy_url,
        "--cacert",
        str(tls_material.ca_path),
        tls_origin.url("/echo/fast", "localhost"),
    )
    assert result.returncode == 0, result.stderr
    assert b'"/echo/fast"' in result.stdout


def test_a_plain_request_rides_behind_the_open_and_a_failed_dial_is_still_a_502(
    agent: RunningAgent, http_origin: OriginServer
) -> None:
    """0-RTT: the request leaves with the OPEN; a refused dial reaches the client as the same 502."""
    ok = curl_via("--proxy", agent.proxy_url, http_origin.url("/echo/zero"))
    assert ok.returncode == 0 and b'"/echo/zero"' in ok.stdout
    refused = curl_via("--proxy", agent.proxy_url, "--include", f"http://127.0.0.1:{closed_port()}/")
    assert refused.stdout.startswith(b"HTTP/1.1 502 ") and b"(refused)" in refused.stdout
