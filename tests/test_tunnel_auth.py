"""Who may use the tunnel and where it may go: mutual TLS refusals and the egress policy.

Every refused certificate is refused with a reason on both sides (the agent's last_error,
the server's "tunnel refused" log line), and the good agent keeps working afterwards.
Egress tests only name addresses the policy refuses before dialing, so no packet leaves
loopback; a server started with a short connect timeout bounds the damage if it ever did.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from origin_fixtures import http_origin_fixture  # noqa: F401  (registers the http_origin fixture)
from proxy_fixtures import IO_TIMEOUT, OriginServer
from tunnel_fixtures import (  # noqa: F401  (the *_fixture imports register fixtures)
    AgentFactory,
    Pki,
    RunningAgent,
    ServerFactory,
    ServerProcess,
    agent_config,
    agent_factory_fixture,
    curl,
    proxy_session,
    server_factory_fixture,
    wait_until,
)

from desktop.agent import Agent
from desktop.certificates import (
    IssuedCertificate,
    generate_ca,
    issue_leaf,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
)
from desktop.lifecycle.base import Endpoint
from server.tls import TlsSetupError

pytestmark = pytest.mark.timeout(60)


def assert_serves(agent: RunningAgent, origin: OriginServer) -> None:
    result = curl(agent.proxy_url, origin.url("/echo/good-agent"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/echo/good-agent"


def write_leaf(directory: Path, name: str, leaf: IssuedCertificate) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    write_certificate(cert, leaf.certificate)
    write_private_key(key, leaf.private_key)
    return cert, key


def our_ca(pki: Pki) -> IssuedCertificate:
    return IssuedCertificate(load_certificate(pki.path("ca.crt")), load_private_key(pki.path("ca.key")))  # type: ignore[arg-type]


def refused_reasons(server: ServerProcess) -> list[str]:
    return [str(line.get("reason")) for line in server.messages("tunnel refused")]


# --------------------------------------------------------------------------- client certificates


LeafMaker = Callable[[Pki, Path], tuple[Path, Path]]


def _other_ca_leaf(pki: Pki, directory: Path) -> tuple[Path, Path]:
    return write_leaf(directory, "intruder", issue_leaf(generate_ca("Some Other CA"), "client", "intruder"))


def _expired_leaf(pki: Pki, directory: Path) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    leaf = issue_leaf(
        our_ca(pki),
        "client",
        "fluidity-agent",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    return write_leaf(directory, "expired", leaf)


@pytest.mark.parametrize(
    ("make_leaf", "agent_says", "server_says"),
    [
        (
            _other_ca_leaf,
            "the peer does not trust our certificate",
            "certificate verification failed (unable to get local issuer certificate)",
        ),
        (
            _expired_leaf,
            "the peer says our certificate has expired",
            "certificate verification failed (certificate has expired)",
        ),
    ],
    ids=["other-ca", "expired"],
)
def test_agent_with_a_bad_client_certificate_is_refused_with_a_reason(
    pki: Pki,
    tmp_path: Path,
    tunnel_server: ServerProcess,
    agent: RunningAgent,
    agent_factory: AgentFactory,
    http_origin: OriginServer,
    make_leaf: LeafMaker,
    agent_says: str,
    server_says: str,
) -> None:
    cert, key = make_leaf(pki, tmp_path)
    bad = agent_factory(tunnel_server.port, connected=False, cert_file=cert, key_file=key, request_wait=0.5)
    wait_until(lambda: bad.agent.stats().consecutive_failures >= 1, IO_TIMEOUT, "bad agent tried and failed")
    stats = bad.agent.stats()
    assert stats.active_streams == 0 and stats.last_error is not None
    assert agent_says in stats.last_error
    wait_until(lambda: server_says in refused_reasons(tunnel_server), IO_TIMEOUT, "server logged the refusal")
    # Its proxy answers, but no request gets through.
    with proxy_session(bad.proxy_url) as session:
        response = session.get(http_origin.url("/echo/bad"), timeout=IO_TIMEOUT)
    assert response.status_code == 502 and agent_says in response.text
    assert_serves(agent, http_origin)


def test_client_without_a_certificate_is_refused(
    pki: Pki, tunnel_server: ServerProcess, agent: RunningAgent, http_origin: OriginServer
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.path("ca.crt"))
    sock = socket.create_connection(("127.0.0.1", tunnel_server.port), timeout=IO_TIMEOUT)
    # TLS 1.3 finishes the client's side of the handshake first; the refusal arrives on read.
    with (
        context.wrap_socket(sock, server_hostname="fluidity-server") as session,
        pytest.raises(ssl.SSLError) as refused,
    ):
        session.recv(1024)
    assert refused.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    wait_until(
        lambda: any("the client sent no certificate" in reason for reason in refused_reasons(tunnel_server)),
        IO_TIMEOUT,
        "server logged the refusal",
    )
    assert_serves(agent, http_origin)


def test_agent_refuses_a_server_whose_certificate_it_does_not_trust(
    pki: Pki,
    tmp_path: Path,
    tunnel_server: ServerProcess,
    agent: RunningAgent,
    agent_factory: AgentFactory,
    http_origin: OriginServer,
) -> None:
    stranger_ca = tmp_path / "stranger-ca.crt"
    write_certificate(stranger_ca, generate_ca("Stranger CA").certificate)
    doubting = agent_factory(tunnel_server.port, connected=False, ca_file=stranger_ca)
    wait_until(
        lambda: doubting.agent.stats().consecutive_failures >= 1, IO_TIMEOUT, "agent refused the server"
    )
    assert "certificate verification failed (" in str(doubting.agent.stats().last_error)
    wait_until(
        lambda: any("the peer does not trust our certificate" in r for r in refused_reasons(tunnel_server)),
        IO_TIMEOUT,
        "server logged that the agent refused it",
    )
    assert_serves(agent, http_origin)


def test_a_refused_certificate_fails_the_connect_at_once_instead_of_retrying(
    pki: Pki, tmp_path: Path, tunnel_server: ServerProcess, agent_factory: AgentFactory
) -> None:
    """Retrying cannot help a certificate the other side refuses: say so now, not after 90 s."""
    stranger_ca = tmp_path / "stranger-ca.crt"
    write_certificate(stranger_ca, generate_ca("Stranger CA").certificate)
    doubting = agent_factory(tunnel_server.port, connected=False, ca_file=stranger_ca)
    started = time.monotonic()
    assert not doubting.agent.wait_connected(90.0)
    assert time.monotonic() - started < 30.0  # it gave up on the first refusal (about 10 ms here)
    stats = doubting.agent.stats()
    assert stats.permanent_error is not None and "same CA" in stats.permanent_error
    assert stats.consecutive_failures == 1


def test_agent_without_certificate_files_says_how_to_create_them(
    pki: Pki, tmp_path: Path, tunnel_server: ServerProcess
) -> None:
    missing = tmp_path / "client.crt"
    config = agent_config(pki, tunnel_server.port, cert_file=missing)
    agent = Agent(config)
    with pytest.raises(TlsSetupError, match="fluidity-certs init"):
        agent.start(Endpoint("127.0.0.1", tunnel_server.port))
    assert not agent.running


# --------------------------------------------------------------------------- egress policy


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("169.254.169.254", "169.254.169.254 is a link-local / cloud metadata address"),
        ("10.0.0.1", "10.0.0.1 is a private (RFC 1918) address"),
    ],
    ids=["metadata", "private"],
)
def test_egress_policy_refuses_non_public_targets_with_403(
    server_factory: ServerFactory, agent_factory: AgentFactory, target: str, why: str
) -> None:
    server = server_factory("--connect-timeout", "1s")
    agent = agent_factory(server.port)
    with proxy_session(agent.proxy_url) as session:
        plain = session.get(f"http://{target}/latest/meta-data/", timeout=IO_TIMEOUT)
    assert plain.status_code == 403
    assert why in plain.text and "refused by egress policy" in plain.text
    connect = curl(agent.proxy_url, "--write-out", "%{http_connect}", f"https://{target}/")
    assert connect.stdout == b"403", connect
    wait_until(lambda: len(server.messages("stream failed")) == 2, IO_TIMEOUT, "server logged both refusals")
    failures = server.messages("stream failed")
    assert [line["reason"] for line in failures] == ["policy", "policy"]
    assert all(why in str(line["detail"]) for line in failures)


def test_egress_policy_refuses_loopback_unless_allowed(
    server_factory: ServerFactory, agent_factory: AgentFactory, http_origin: OriginServer
) -> None:
    strict = server_factory("--connect-timeout", "1s", allow_loopback=False)
    agent = agent_factory(strict.port)
    with proxy_session(agent.proxy_url) as session:
        refused = session.get(http_origin.url("/echo/loopback"), timeout=IO_TIMEOUT)
    assert refused.status_code == 403
    assert "127.0.0.1 is a loopback address; refused by egress policy" in refused.text
    assert strict.wait_for("stream failed")["reason"] == "policy"
