"""Which destinations the agent dials directly instead of through the tunnel (setting ``bypass``).

A LAN printer or a NAS must keep working while everything else goes through the tunnel, so
a short list of patterns says what stays local. The same rules feed the PAC file
(``desktop.pac``) and the OS ignore lists (``desktop.system_proxy``), so a browser, the OS
and the agent agree on what is direct.

Patterns:

- ``localhost``: that exact name;
- ``*.corp.example``: every name under ``corp.example`` (not ``corp.example`` itself);
- ``.lan``: ``lan`` and every name under it;
- ``192.168.0.0/16``, ``fd00::/8``, ``10.1.2.3``: IP literals in that network;
- ``<local>``: plain names without a dot (``printer``, ``nas``).

Names are never resolved here: a network pattern matches only a destination written as an
IP address, because looking a name up locally would leak it to the local network's DNS.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import FluidityError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOCAL_TOKEN = "<local>"

#: Loopback, link-local, the RFC 1918 and ULA ranges and plain names: LAN devices keep working.
DEFAULT_BYPASS: tuple[str, ...] = (
    "localhost",
    "127.0.0.0/8",
    "::1/128",
    "169.254.0.0/16",
    "fe80::/10",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    LOCAL_TOKEN,
)

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_MAX_NAME_LENGTH = 253


class Route(enum.StrEnum):
    """Where a connection to a destination goes."""

    DIRECT = "direct"
    TUNNEL = "tunnel"


class PatternKind(enum.StrEnum):
    HOST = "host"  # localhost
    SUBDOMAINS = "subdomains"  # *.corp.example
    DOMAIN = "domain"  # .lan
    NETWORK = "network"  # 192.168.0.0/16
    LOCAL = "local"  # <local>


class BypassRuleError(FluidityError, ValueError):
    """A bypass pattern that cannot be understood; the message says how to write it."""

    def __init__(self, pattern: str, detail: str) -> None:
        super().__init__(f"{pattern!r}: {detail}")
        self.pattern = pattern
        self.detail = detail


@dataclass(frozen=True)
class BypassPattern:
    """One parsed pattern: ``name`` for name kinds, ``network`` for NETWORK."""

    kind: PatternKind
    name: str = ""
    network: IPNetwork | None = None

    @property
    def text(self) -> str:
        """The canonical spelling (what the settings file would say)."""
        if self.kind is PatternKind.SUBDOMAINS:
            return f"*.{self.name}"
        if self.kind is PatternKind.DOMAIN:
            return f".{self.name}"
        if self.kind is PatternKind.NETWORK:
            return str(self.network)
        if self.kind is PatternKind.LOCAL:
            return LOCAL_TOKEN
        return self.name

    @property
    def short_text(self) -> str:
        """``text``, but a one-address network as the bare address (how OS ignore lists write it)."""
        network = self.network
        if network is not None and network.prefixlen == network.max_prefixlen:
            return str(network.network_address)
        return self.text


def _check_name(pattern: str, name: str) -> str:
    name = name.lower()
    if not name or len(name) > _MAX_NAME_LENGTH:
        raise BypassRuleError(pattern, "expected a host name such as localhost, *.corp.example or .lan")
    if not name.isascii():
        raise BypassRuleError(pattern, "write internationalized names in their xn-- (punycode) form")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            hint = " (use a network such as 192.168.0.0/16 instead of a wildcard)" if "*" in name else ""
            raise BypassRuleError(
                pattern, f"{label!r} is not a valid name label; expected letters, digits and '-'{hint}"
            )
    return name


def parse_pattern(text: str) -> BypassPattern:
    """One pattern from the settings file; BypassRuleError says what is wrong with it."""
    pattern = text.strip()
    if pattern.lower() == LOCAL_TOKEN:
        return BypassPattern(PatternKind.LOCAL)
    if "/" in pattern or ":" in pattern or _looks_numeric(pattern):
        try:
            network = ipaddress.ip_network(pattern.strip("[]"), strict=False)
        except ValueError:
            raise BypassRuleError(
                pattern, "expected an IP address or a network such as 192.168.0.0/16 or fd00::/8"
            ) from None
        return BypassPattern(PatternKind.NETWORK, network=network)
    if pattern.startswith("*."):
        return BypassPattern(PatternKind.SUBDOMAINS, _check_name(pattern, pattern[2:].rstrip(".")))
    if pattern.startswith("."):
        return BypassPattern(PatternKind.DOMAIN, _check_name(pattern, pattern[1:].rstrip(".")))
    return BypassPattern(PatternKind.HOST, _check_name(pattern, pattern.rstrip(".")))


def _looks_numeric(pattern: str) -> bool:
    """Digits and dots only: meant as an IPv4 address (a name label may not be all digits here)."""
    return (
        bool(pattern) and all(c.isdigit() or c == "." for c in pattern) and any(c.isdigit() for c in pattern)
    )


def normalize_host(host: str) -> str:
    """A destination as the rules compare it: lower case, no [brackets], no trailing dot."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


def host_address(host: str) -> IPAddress | None:
    """The IP address ``host`` spells (after normalize_host), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class BypassRules:
    """The parsed ``bypass`` setting: ``route(host)`` says DIRECT or TUNNEL."""

    patterns: tuple[BypassPattern, ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> BypassRules:
        """Rules from the setting's list; the first bad pattern raises BypassRuleError."""
        parsed: list[BypassPattern] = []
        for text in texts:
            pattern = parse_pattern(text)
            if pattern not in parsed:
                parsed.append(pattern)
        return cls(tuple(parsed))

    @classmethod
    def default(cls) -> BypassRules:
        return cls.parse(DEFAULT_BYPASS)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(pattern.text for pattern in self.patterns)

    def of_kind(self, *kinds: PatternKind) -> tuple[BypassPattern, ...]:
        return tuple(pattern for pattern in self.patterns if pattern.kind in kinds)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(p.network for p in self.patterns if p.network is not None)

    @property
    def has_local(self) -> bool:
        return any(pattern.kind is PatternKind.LOCAL for pattern in self.patterns)

    def matches(self, host: str) -> bool:
        """True when a connection to ``host`` (a name or an IP literal) is dialed directly."""
        host = normalize_host(host)
        if not host:
            return False
        address = host_address(host)
        if address is not None:
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            return any(
                address in network or (mapped is not None and mapped in network) for network in self.networks
            )
        for pattern in self.patterns:
            kind = pattern.kind
            if kind is PatternKind.LOCAL and "." not in host:
                return True
            if kind is PatternKind.HOST and host == pattern.name:
                return True
            if kind is PatternKind.SUBDOMAINS and host.endswith("." + pattern.name):
                return True
            if kind is PatternKind.DOMAIN and (host == pattern.name or host.endswith("." + pattern.name)):
                return True
        return False

    def route(self, host: str) -> Route:
        return Route.DIRECT if self.matches(host) else Route.TUNNEL
