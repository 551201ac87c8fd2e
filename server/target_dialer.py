"""Connect the tunnel server to the target an agent asked for, under the egress policy.

The name is resolved once and every resolved address is judged before any is dialled;
the socket then connects to exactly the address that passed. Resolving again at connect
time would let a DNS answer with a short TTL swap a public address for a metadata or
private one (DNS rebinding). Failures carry the protocol's FailReason so the agent can
tell the user whether the name, the network, the target or the policy said no.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from server.egress import EgressPolicy
from server.errors import FluidityError
from server.framing import FailReason

MAX_HOSTNAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
_LABEL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
#: When several addresses fail differently, the most telling reason wins.
_FAILURE_PRECEDENCE = (FailReason.REFUSED, FailReason.TIMEOUT, FailReason.UNREACHABLE)


class TargetDialError(FluidityError):
    """The target could not be reached; ``reason`` is what the agent is told in OPEN_FAIL."""

    def __init__(self, reason: FailReason, message: str) -> None:
        super().__init__(f"{reason.label}: {message}")
        self.reason = reason
        self.message = message

    @property
    def label(self) -> str:
        return self.reason.label


@dataclass(frozen=True, slots=True)
class ResolvedAddress:
    family: socket.AddressFamily
    proto: int
    sockaddr: tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)

    @property
    def host(self) -> str:
        return str(self.sockaddr[0])

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.sockaddr[1]}"
        return f"{self.host}:{self.sockaddr[1]}"


def normalize_host(host: str) -> tuple[str, bool]:
    """``(host, is_ip_literal)`` with IPv6 brackets removed; raises DNS for names no resolver accepts."""
    bracketed = host.startswith("[") and host.endswith("]")
    candidate = host[1:-1] if bracketed else host
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        pass
    else:
        return candidate, True
    if bracketed or not is_valid_hostname(candidate):
        raise TargetDialError(FailReason.DNS, f"{host!r} is not a valid host name or IP address")
    return candidate, False


def is_valid_hostname(name: str) -> bool:
    """DNS syntax only: ASCII letters, digits, '-' and '_' in 1-63 byte labels, 253 bytes in all."""
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > MAX_HOSTNAME_LENGTH:
        return False
    for label in bare.split("."):
        if not 1 <= len(label) <= MAX_LABEL_LENGTH or not set(label) <= _LABEL_CHARACTERS:
            return False
        if label.startswith("-") or label.endswith("-"):
            return False
    return True


#: The system resolver; injectable so tests can resolve names without sending DNS queries.
Resolver = Callable[..., list[tuple[Any, Any, Any, Any, Any]]]


def resolve(
    host: str, port: int, *, numeric: bool, resolver: Resolver = socket.getaddrinfo
) -> list[ResolvedAddress]:
    """Every TCP address of ``host`` in resolver order, duplicates dropped."""
    flags = socket.AI_NUMERICHOST if numeric else 0
    try:
        infos = resolver(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
    except socket.gaierror as exc:
        raise TargetDialError(FailReason.DNS, f"cannot resolve {host!r}: {exc.strerror}") from None
    except (OSError, UnicodeError) as exc:
        raise TargetDialError(FailReason.DNS, f"cannot resolve {host!r}: {exc}") from None
    seen: set[tuple[object, ...]] = set()
    addresses: list[ResolvedAddress] = []
    for family, _type, proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6) or sockaddr in seen:
            continue
        seen.add(sockaddr)
        addresses.append(ResolvedAddress(family, proto, sockaddr))
    if not addresses:
        raise TargetDialError(FailReason.DNS, f"{host!r} has no IPv4 or IPv6 address")
    return addresses


def classify_connect_error(exc: OSError) -> FailReason:
    """Map a failed connect() to the reason the agent shows."""
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return FailReason.TIMEOUT
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return FailReason.REFUSED
    return FailReason.UNREACHABLE


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def allowed_addresses(
    host: str, port: int, *, policy: EgressPolicy, resolver: Resolver = socket.getaddrinfo
) -> tuple[str, list[ResolvedAddress]]:
    """The name to report and every resolved address of ``host`` the policy allows, in order.

    Blocks in the resolver for a name (an event loop runs this on its executor).
    """
    port_refusal = policy.check_port(port)
    if port_refusal is not None:
        raise TargetDialError(FailReason.POLICY, port_refusal)
    name, numeric = normalize_host(host)
    addresses = resolve(name, port, numeric=numeric, resolver=resolver)
    allowed: list[ResolvedAddress] = []
    refusals: list[str] = []
    for address in addresses:
        refusal = policy.check(address.host, port)
        if refusal is None:
            allowed.append(address)
        elif refusal not in refusals:
            refusals.append(refusal)
    if not allowed:
        if numeric:
            raise TargetDialError(FailReason.POLICY, refusals[0])
        raise TargetDialError(
            FailReason.POLICY, f"{name} resolves only to refused addresses: {' / '.join(refusals)}"
        )
    return name, allowed


def _dial_failure(name: str, port: int, failures: list[tuple[FailReason, str]]) -> TargetDialError:
    reason = next(r for r in _FAILURE_PRECEDENCE if any(f[0] is r for f in failures))
    details = "; ".join(text for _, text in failures)
    return TargetDialError(reason, f"cannot connect to {name} port {port}: {details}")


def dial_target(
    host: str, port: int, *, policy: EgressPolicy, timeout: float, resolver: Resolver = socket.getaddrinfo
) -> socket.socket:
    """A connected, blocking TCP socket (TCP_NODELAY set) to ``host:port``; raises TargetDialError.

    ``timeout`` bounds the connection attempts after resolution, all addresses together;
    name resolution itself is bounded by the system resolver's own timeouts.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    deadline = time.monotonic() + timeout
    name, allowed = allowed_addresses(host, port, policy=policy, resolver=resolver)
    failures: list[tuple[FailReason, str]] = []
    for address in allowed:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            failures.append((FailReason.TIMEOUT, f"{address} not tried, time ran out"))
            break
        try:
            return _connect(address, remaining)
        except OSError as exc:
            failures.append((classify_connect_error(exc), f"{address} {_describe(exc)}"))
    raise _dial_failure(name, port, failures)


async def dial_target_async(
    host: str,
    port: int,
    *,
    policy: EgressPolicy,
    timeout: float,
    executor: Executor | None = None,
    resolver: Resolver = socket.getaddrinfo,
) -> socket.socket:
    """``dial_target`` for an event loop: a connected non-blocking socket; raises TargetDialError.

    A name is resolved on ``executor`` (the loop's bounded pool for blocking calls); the
    connection attempts never block the loop. ``timeout`` bounds the whole dial.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if not normalize_host(host)[1]:  # a name: resolving it may block
        try:
            async with asyncio.timeout(timeout):
                name, allowed = await loop.run_in_executor(
                    executor,
                    functools.partial(allowed_addresses, host, port, policy=policy, resolver=resolver),
                )
        except TimeoutError:
            raise TargetDialError(
                FailReason.DNS, f"resolving {host!r} took longer than {timeout:g} s"
            ) from None
    else:
        name, allowed = allowed_addresses(host, port, policy=policy, resolver=resolver)
    failures: list[tuple[FailReason, str]] = []
    for address in allowed:
        remaining = deadline - loop.time()
        if remaining <= 0:
            failures.append((FailReason.TIMEOUT, f"{address} not tried, time ran out"))
            break
        sock = socket.socket(address.family, socket.SOCK_STREAM, address.proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(remaining):
                await loop.sock_connect(sock, address.sockaddr)
        except (OSError, TimeoutError) as exc:
            sock.close()
            failures.append((classify_connect_error(exc), f"{address} {_describe(exc)}"))
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise _dial_failure(name, port, failures)


def _connect(address: ResolvedAddress, timeout: float) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM, address.proto)
    try:
        sock.settimeout(timeout)
        sock.connect(address.sockaddr)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock
