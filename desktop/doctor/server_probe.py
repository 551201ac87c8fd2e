"""Reach the running tunnel server as the agent does: TCP, mutual TLS 1.3, then HELLO.

One short connection, timed step by step, closed with a GOAWAY. It uses the agent's TLS
context (``server.tls.client_context``) and the shared protocol (``server.framing``), so a
PASS here means the agent's own connection would succeed, and each failure names the step.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from desktop.config import AgentConfig
from desktop.doctor.model import CheckResult, failed, passed, warned
from desktop.lifecycle.base import Endpoint
from server import __version__
from server.framing import (
    PROTOCOL_VERSION,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    ProtocolError,
    Role,
    TunnelConnection,
)
from server.tls import BlockingTls, SilentClose, TlsError, TlsSetupError, client_context

Clock = Callable[[], float]

_SECURITY_GROUP_FIX = (
    "the security group must allow TCP {port} from this machine's public address "
    "(`fluidity-deploy deploy --allowed-cidr YOUR.IP/32`, or the default 0.0.0.0/0), and the task needs "
    "a public IP; a network that blocks outgoing port {port} looks the same"
)


@dataclass(frozen=True)
class ProbeOutcome:
    """What the probe learnt: the results, and the server's HELLO when it got that far."""

    results: list[CheckResult]
    hello: Hello | None = None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def probe_server(
    endpoint: Endpoint, config: AgentConfig, *, timeout: float | None = None, clock: Clock = time.monotonic
) -> ProbeOutcome:
    """Connect, handshake and exchange HELLOs with the server at ``endpoint``; never opens a stream."""
    budget = timeout if timeout is not None else config.connect_timeout
    try:
        context = client_context(config.ca_file, config.cert_file, config.key_file)
    except TlsSetupError as error:
        return ProbeOutcome(
            [failed("server.tls", str(error), "see the certificates lines above; re-import the bundle")]
        )
    started = clock()
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=budget)
    except OSError as error:
        return ProbeOutcome([_tcp_failure(error, endpoint, budget)])
    tcp_done = clock()
    results = [passed("server.tcp", f"TCP connect to {endpoint} in {_ms(tcp_done - started)}ms")]
    channel = BlockingTls(sock, context, server_hostname=config.server_name)
    try:
        try:
            channel.handshake(max(0.1, budget - (tcp_done - started)))
        except (TlsError, TimeoutError, OSError) as error:
            results.append(_tls_failure(error, config, endpoint))
            channel.abort()
            return ProbeOutcome(results)
        tls_done = clock()
        results.append(
            passed(
                "server.tls",
                f"{channel.version or 'TLS'} handshake in {_ms(tls_done - tcp_done)}ms; the server's "
                f"certificate names {config.server_name} and chains to {config.ca_file.name}",
            )
        )
        conn = TunnelConnection(
            Role.AGENT,
            f"fluidity-agent/{__version__}",
            max_payload=config.max_payload,
            initial_window=config.initial_window,
        )
        hello, problem = _exchange_hello(channel, conn, config, deadline=started + budget, clock=clock)
        if problem is not None:
            results.append(problem)
            channel.abort()
            return ProbeOutcome(results)
        assert hello is not None
        total = _ms(clock() - started)
        results.append(_hello_result(hello, total, endpoint))
        _say_goodbye(channel, conn)
        return ProbeOutcome(results, hello)
    finally:
        channel.abort()


def _tcp_failure(error: OSError, endpoint: Endpoint, budget: float) -> CheckResult:
    port = endpoint.port
    if isinstance(error, ConnectionRefusedError):
        return failed(
            "server.tcp",
            f"{endpoint} refused the connection: nothing listens on port {port}",
            "the server is not running or failed to start: see the aws.task line, or the "
            "`listening` / `cannot start` lines in the /fluidity/server log",
        )
    if isinstance(error, TimeoutError | socket.timeout):
        return failed(
            "server.tcp",
            f"no answer from {endpoint} within {budget:g} s",
            _SECURITY_GROUP_FIX.format(port=port),
        )
    if isinstance(error, socket.gaierror):
        return failed(
            "server.tcp",
            f"cannot resolve {endpoint.host}: {error.strerror or error}",
            "check server_address",
        )
    return failed(
        "server.tcp",
        f"cannot connect to {endpoint}: {error.strerror or error}",
        _SECURITY_GROUP_FIX.format(port=port),
    )


def _tls_failure(error: BaseException, config: AgentConfig, endpoint: Endpoint) -> CheckResult:
    text = str(error) or type(error).__name__
    if isinstance(error, SilentClose):
        return failed(
            "server.tls",
            f"{endpoint} closed the connection before the TLS handshake",
            "something other than the Fluidity server answers on that port; check server_address/server_port",
        )
    if isinstance(error, TimeoutError):
        return failed(
            "server.tls",
            f"the TLS handshake with {endpoint} timed out",
            "the server is overloaded or something in between holds the connection; try again, "
            "and raise connect_timeout on slow links",
        )
    lowered = text.lower()
    if "hostname mismatch" in lowered or "ip address mismatch" in lowered or "not valid for" in lowered:
        return failed(
            "server.tls",
            f"mTLS certificate mismatch: the server's certificate does not name server_name "
            f"{config.server_name!r} ({text})",
            "set server_name to the DNS name in the server certificate (fluidity-server), never the IP",
        )
    if "expired" in lowered:
        return failed(
            "server.tls",
            f"a certificate has expired ({text})",
            "renew with `fluidity-certs renew`, then `fluidity-deploy secrets --cert-dir certs` and restart "
            "the service (`aws ecs update-service --cluster fluidity --service fluidity-server "
            "--force-new-deployment`)",
        )
    return failed(
        "server.tls",
        f"mTLS certificate mismatch: {text}",
        "the server and this agent must use certificates from the same `fluidity-certs init`: store that "
        "set on the server (`fluidity-deploy secrets --cert-dir certs`, then "
        "`aws ecs update-service --cluster fluidity --service fluidity-server --force-new-deployment`) "
        "and import its client bundle here (`fluidity-certs import`)",
    )


def _exchange_hello(
    channel: BlockingTls, conn: TunnelConnection, config: AgentConfig, *, deadline: float, clock: Clock
) -> tuple[Hello | None, CheckResult | None]:
    """Send our HELLO, wait for the server's; TLS 1.3 reports a refused client certificate here."""
    conn.initiate()
    try:
        channel.sendall(conn.data_to_send())
        while True:
            remaining = deadline - clock()
            if remaining <= 0:
                raise TimeoutError
            channel.sock.settimeout(remaining)
            data = channel.recv()
            if not data:
                return None, failed(
                    "server.hello",
                    "the server closed the tunnel before sending its HELLO",
                    "see the server's `tunnel refused` log line (/fluidity/server) for the reason",
                )
            for event in conn.receive_data(data):
                if isinstance(event, HelloReceived):
                    return event.hello, None
                if isinstance(event, GoAwayReceived):
                    return None, failed(
                        "server.hello",
                        f"the server sent GOAWAY ({event.reason.label}): {event.message}",
                        "upgrade the older side" if event.reason is GoAwayReason.VERSION_MISMATCH else "",
                    )
    except ProtocolError as error:
        fix = "upgrade the older side" if error.reason is GoAwayReason.VERSION_MISMATCH else ""
        return None, failed("server.hello", f"the server's HELLO is not usable: {error.message}", fix)
    except TlsError as error:
        return None, failed(
            "server.hello",
            f"the server refused this agent's certificate: {error}",
            f"{config.cert_file.name} must be issued by the CA the server trusts: import the client bundle "
            "made with the server's CA (`fluidity-certs import BUNDLE`), or store this set on the server "
            "(`fluidity-deploy secrets --cert-dir certs`)",
        )
    except (TimeoutError, OSError):
        return None, failed(
            "server.hello",
            "the server sent no HELLO in time",
            "the port answers TLS but not the Fluidity protocol: check server_port, and the server's log",
        )
    finally:
        channel.sock.settimeout(None)


def _hello_result(hello: Hello, total_ms: int, endpoint: Endpoint) -> CheckResult:
    ours = f"fluidity-agent/{__version__}"
    finding = (
        f"Connected to server in {total_ms}ms at {endpoint}: {hello.software or 'unnamed server'}, "
        f"protocol {hello.protocol} (this agent: {ours}, protocol {PROTOCOL_VERSION})"
    )
    details = {"software": hello.software, "protocol": hello.protocol, "connect_ms": total_ms}
    theirs = hello.software.partition("/")[2]
    if theirs and theirs != __version__:
        return warned(
            "server.hello",
            finding,
            "the server runs another release: push the current image (`make docker-build-server`, "
            "docker push) and force a new deployment",
            **details,
        )
    return passed("server.hello", finding, **details)


def _say_goodbye(channel: BlockingTls, conn: TunnelConnection) -> None:
    """A GOAWAY so the server logs a normal close instead of a dead tunnel."""
    conn.goaway(GoAwayReason.NORMAL, "fluidity doctor check")
    try:
        channel.sendall(conn.data_to_send())
        channel.close()
    except (TlsError, OSError):
        pass
