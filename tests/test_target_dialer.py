"""Dialling targets for the tunnel server: real sockets, loopback only.

Addresses outside 127.0.0.0/8 and ::1 are only ever judged by the policy, never dialled;
the one exception is a multicast address, which Linux refuses to connect TCP to before
any packet is built.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Iterator

import pytest

from server.egress import EgressPolicy
from server.framing import FailReason
from server.target_dialer import (
    TargetDialError,
    classify_connect_error,
    dial_target,
    is_valid_hostname,
)

LOOPBACK = EgressPolicy(["127.0.0.0/8", "::1/128"])
DEFAULT = EgressPolicy()
TIMEOUT = 5.0


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(TIMEOUT)
    yield server
    server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but not listening: connect gets RST."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    yield holder.getsockname()[1]
    holder.close()


def _exchange(client: socket.socket, listener: socket.socket) -> None:
    accepted, _ = listener.accept()
    with accepted:
        accepted.settimeout(TIMEOUT)
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"
        accepted.sendall(b"pong")
        client.settimeout(TIMEOUT)
        assert client.recv(4) == b"pong"


def _dial_error(
    host: str, port: int, policy: EgressPolicy = DEFAULT, timeout: float = TIMEOUT
) -> TargetDialError:
    with pytest.raises(TargetDialError) as caught:
        dial_target(host, port, policy=policy, timeout=timeout)
    return caught.value


def _nothing_arrived(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(TIMEOUT)
    return False


# ----------------------------------------------------------------------------- success


def test_dials_an_allow_listed_loopback_listener(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with dial_target("127.0.0.1", port, policy=EgressPolicy(["127.0.0.0/8"]), timeout=TIMEOUT) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.gettimeout() is None  # blocking: the caller picks its own I/O timeouts
        _exchange(sock, listener)


def test_dials_a_name_through_the_resolved_address(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    # "localhost" may also resolve to ::1 where nothing listens; the dialer then moves on.
    with dial_target("localhost", port, policy=LOOPBACK, timeout=TIMEOUT) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
        _exchange(sock, listener)


def test_dials_a_bracketed_ipv6_literal() -> None:
    try:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with server:
        server.listen(1)
        server.settimeout(TIMEOUT)
        port = server.getsockname()[1]
        with dial_target("[::1]", port, policy=LOOPBACK, timeout=TIMEOUT) as sock:
            assert sock.getpeername()[:2] == ("::1", port)
            _exchange(sock, server)


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("host", "label"),
    [
        ("169.254.169.254", "link-local / cloud metadata"),
        ("169.254.170.2", "link-local / cloud metadata"),
        ("10.0.0.1", "private (RFC 1918)"),
        ("192.168.0.1", "private (RFC 1918)"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("127.0.0.1", "loopback"),
        ("[::1]", "loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped"),
        ("fd00:ec2::254", "EC2 instance metadata"),
        ("0.0.0.0", "unspecified"),
    ],
)
def test_refused_literals_are_never_dialled(host: str, label: str) -> None:
    error = _dial_error(host, 80)
    assert error.reason is FailReason.POLICY and error.label == "policy"
    assert label in error.message and "refused by egress policy" in error.message


def test_loopback_listener_is_refused_without_an_allow_list(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    error = _dial_error("127.0.0.1", port)
    assert error.reason is FailReason.POLICY
    assert _nothing_arrived(listener)


def test_name_resolving_to_loopback_is_judged_by_its_address(listener: socket.socket) -> None:
    """The resolved address is checked, not the name: no DNS-rebinding way around the policy."""
    port = listener.getsockname()[1]
    error = _dial_error("localhost", port)
    assert error.reason is FailReason.POLICY
    assert error.message.startswith("localhost resolves only to refused addresses: ")
    assert "127.0.0.1 is a loopback address" in error.message
    assert _nothing_arrived(listener)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001"])
def test_numeric_spellings_of_loopback_are_refused(host: str, listener: socket.socket) -> None:
    error = _dial_error(host, listener.getsockname()[1])
    assert error.reason is FailReason.POLICY and "127.0.0.1 is a loopback address" in error.message
    assert _nothing_arrived(listener)


def test_port_allow_list_is_enforced_before_resolving(listener: socket.socket) -> None:
    policy = EgressPolicy(["127.0.0.0/8"], allow_ports=[443])
    error = _dial_error("127.0.0.1", listener.getsockname()[1], policy)
    assert error.reason is FailReason.POLICY and "port allow-list (443)" in error.message
    # A name that would not even resolve is refused for its port first, without a lookup.
    assert _dial_error("unresolvable.test", 25, policy).reason is FailReason.POLICY
    assert _nothing_arrived(listener)


@pytest.mark.parametrize("port", [0, 65536, -5])
def test_impossible_ports_are_refused(port: int) -> None:
    error = _dial_error("127.0.0.1", port, LOOPBACK)
    assert error.reason is FailReason.POLICY and "not a valid TCP port" in error.message


# ----------------------------------------------------------------------------- failures


def test_closed_port_is_refused(closed_port: int) -> None:
    error = _dial_error("127.0.0.1", closed_port, LOOPBACK)
    assert error.reason is FailReason.REFUSED and error.label == "refused"
    assert f"127.0.0.1:{closed_port}" in error.message


def _hosts_file_resolver(table: dict[str, str]):  # type: ignore[no-untyped-def]
    """A real getaddrinfo restricted to a fixed table: unknown names fail like NXDOMAIN,
    and no DNS query ever leaves the machine."""

    def lookup(host: str, port: int, *args: object):  # type: ignore[no-untyped-def]
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo(table[host], port, *args)

    return lookup


def test_unresolvable_name_is_a_dns_failure() -> None:
    resolver = _hosts_file_resolver({"known.test": "127.0.0.1"})
    with pytest.raises(TargetDialError) as caught:
        dial_target("no-such-host.invalid", 443, policy=LOOPBACK, timeout=2.0, resolver=resolver)
    error = caught.value
    assert error.reason is FailReason.DNS and error.label == "dns"
    assert "no-such-host.invalid" in error.message


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "a b.com",
        "tab\there.com",
        "-leading.example",
        "trailing-.example",
        "a..b",
        "x" * 64 + ".com",
        ("a" * 60 + ".") * 5 + "com",
        "ünicode.example",
        "host/path",
        "user@host",
        "host:443",
        "[not-an-ip]",
        "[127.0.0.1",
    ],
)
def test_invalid_host_strings_fail_without_a_lookup(host: str) -> None:
    error = _dial_error(host, 443, LOOPBACK)
    assert error.reason is FailReason.DNS
    assert "is not a valid host name or IP address" in error.message


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full backlog")
def test_unanswered_connect_times_out() -> None:
    """A listener whose accept queue is full lets SYNs go unanswered: a real timeout, on loopback."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(3):  # fill the accept queue; later attempts hang or fail
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(("127.0.0.1", port))
        error = _dial_error("127.0.0.1", port, LOOPBACK, timeout=0.5)
        assert error.reason is FailReason.TIMEOUT and error.label == "timeout"
        assert "timed out" in error.message
    finally:
        for filler in fillers:
            filler.close()
        server.close()


@pytest.mark.parametrize("err", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES])
def test_routing_failures_are_unreachable(err: int) -> None:
    # Built from the errno, not provoked: tests never aim a packet off loopback.
    assert classify_connect_error(OSError(err, "no route")) is FailReason.UNREACHABLE


def test_non_positive_timeout_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        dial_target("127.0.0.1", 80, policy=LOOPBACK, timeout=0)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), FailReason.REFUSED),
        (TimeoutError("timed out"), FailReason.TIMEOUT),
        (OSError(errno.ETIMEDOUT, "Connection timed out"), FailReason.TIMEOUT),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), FailReason.UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "No route to host"), FailReason.UNREACHABLE),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), FailReason.UNREACHABLE),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), FailReason.UNREACHABLE),
    ],
)
def test_connect_errors_map_to_fail_reasons(error: OSError, reason: FailReason) -> None:
    assert classify_connect_error(error) is reason


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("example.com", True),
        ("example.com.", True),
        ("_dmarc.example.com", True),
        ("xn--bcher-kva.example", True),
        ("a" * 63 + ".com", True),
        ("a" * 64 + ".com", False),
        ("", False),
        ("example..com", False),
        ("exa mple.com", False),
    ],
)
def test_hostname_syntax(name: str, valid: bool) -> None:
    assert is_valid_hostname(name) is valid
