"""Which destinations the tunnel server may connect to on behalf of the agent.

The server runs inside a VPC next to the cloud's metadata endpoints, so an open relay
would hand anyone holding an agent certificate the task's IAM credentials and the
private network. The policy refuses every address that is not plainly on the public
internet unless the operator allow-lists it, and it looks through IPv6 forms that
carry an IPv4 address (mapped, NAT64, 6to4, Teredo) so they cannot be used to sneak
past the IPv4 rules. Pure: it judges addresses and ports, it never resolves or dials.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LINK_LOCAL_LABEL = "a link-local / cloud metadata address"


@dataclass(frozen=True, slots=True)
class DenyRule:
    """A range refused by default and the words that tell the user why."""

    network: IPNetwork
    label: str


def _rules(*pairs: tuple[str, str]) -> tuple[DenyRule, ...]:
    return tuple(DenyRule(ipaddress.ip_network(cidr), label) for cidr, label in pairs)


#: Refused by default, most specific first: the first match supplies the reason.
DEFAULT_DENY_RULES: tuple[DenyRule, ...] = _rules(
    # IPv4
    ("0.0.0.0/32", "the unspecified address"),
    ("0.0.0.0/8", "a 'this network' (0.0.0.0/8) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("10.0.0.0/8", "a private (RFC 1918) address"),
    ("172.16.0.0/12", "a private (RFC 1918) address"),
    ("192.168.0.0/16", "a private (RFC 1918) address"),
    ("100.64.0.0/10", "a carrier-grade NAT (RFC 6598) address"),
    ("169.254.0.0/16", LINK_LOCAL_LABEL),
    ("192.0.0.0/24", "an IETF protocol assignment (192.0.0.0/24) address"),
    ("192.0.2.0/24", "a documentation (TEST-NET) address"),
    ("198.51.100.0/24", "a documentation (TEST-NET) address"),
    ("203.0.113.0/24", "a documentation (TEST-NET) address"),
    ("198.18.0.0/15", "a benchmarking (RFC 2544) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("240.0.0.0/4", "a reserved (240.0.0.0/4) address"),
    # IPv6
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("fd00:ec2::254/128", "the EC2 instance metadata (IPv6) address"),
    ("fc00::/7", "a unique local (private IPv6) address"),
    ("fe80::/10", LINK_LOCAL_LABEL),
    ("fec0::/10", "a site-local (deprecated private IPv6) address"),
    ("ff00::/8", "a multicast address"),
    ("64:ff9b:1::/48", "a local-use NAT64 (RFC 8215) address"),
    ("100::/64", "a discard-only (RFC 6666) address"),
    ("2001:2::/48", "a benchmarking (RFC 5180) address"),
    ("2001:10::/28", "a deprecated ORCHID address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("::/8", "a reserved IPv6 address"),
)

NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class EmbeddedAddress:
    """An IPv4 address carried inside an IPv6 one, and how it is carried.

    ``is_destination`` is true when the IPv6 form is only a way of writing the IPv4
    address (mapped, NAT64): the IPv4 address is then the whole story.
    """

    address: ipaddress.IPv4Address
    how: str
    is_destination: bool


def embedded_ipv4(address: IPAddress) -> Iterator[EmbeddedAddress]:
    """The IPv4 addresses an IPv6 address carries and that packets to it may end up at."""
    if isinstance(address, ipaddress.IPv4Address):
        return
    if address.ipv4_mapped is not None:
        yield EmbeddedAddress(address.ipv4_mapped, "an IPv4-mapped IPv6 address of", True)
    if address in NAT64_WELL_KNOWN:
        yield EmbeddedAddress(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "a NAT64 address of", True)
    if address.sixtofour is not None:
        yield EmbeddedAddress(address.sixtofour, "a 6to4 address of", False)
    if address.teredo is not None:
        server, client = address.teredo
        yield EmbeddedAddress(server, "a Teredo address via", False)
        yield EmbeddedAddress(client, "a Teredo address of", False)


def parse_address(address: str | IPAddress) -> IPAddress:
    """An address object from a literal; raises ValueError naming the bad input."""
    if isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return address
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address") from None


def _parse_network(text: str) -> IPNetwork:
    if not isinstance(text, str):
        raise ValueError(f"egress allow-list entry {text!r} is not a CIDR network string")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(f"egress allow-list entry {text!r} is not a CIDR network: {exc}") from None


def _parse_port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"egress port allow-list entry {value!r} is not a port number (1-65535)")
    return value


def _deny_label(address: IPAddress) -> str | None:
    for rule in DEFAULT_DENY_RULES:
        if rule.network.version == address.version and address in rule.network:
            return rule.label
    return None


class EgressPolicy:
    """Allow public destinations; refuse internal ones unless allow-listed.

    ``allow_networks`` (CIDRs or bare addresses) override the default refusals; the
    ``allow_ports`` list, when not empty, restricts every destination, allow-listed or not.
    """

    def __init__(self, allow_networks: Sequence[str] = (), allow_ports: Sequence[int] = ()) -> None:
        if isinstance(allow_networks, str) or isinstance(allow_ports, str | bytes):
            raise ValueError("egress allow-lists must be lists, not a single string")
        self.allow_networks: tuple[IPNetwork, ...] = tuple(_parse_network(n) for n in allow_networks)
        self.allow_ports: frozenset[int] = frozenset(_parse_port(p) for p in allow_ports)

    def check_port(self, port: int) -> str | None:
        """Why ``port`` is refused, or None; needs no address, so callers can check before DNS."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return f"port {port!r} is not a valid TCP port; refused by egress policy"
        if self.allow_ports and port not in self.allow_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allow_ports))
            return f"port {port} is not in the egress port allow-list ({allowed}); refused by egress policy"
        return None

    def is_allow_listed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow_networks)

    def check(self, address: str | IPAddress, port: int) -> str | None:
        """Why connecting to ``address:port`` is refused, or None when it is allowed."""
        port_refusal = self.check_port(port)
        if port_refusal is not None:
            return port_refusal
        ip = parse_address(address)
        shown = address if isinstance(address, str) else str(ip)
        embedded = list(embedded_ipv4(ip))
        destination = next((e for e in embedded if e.is_destination), None)
        if destination is not None:
            # ::ffff:a.b.c.d and 64:ff9b::a.b.c.d are only spellings of a.b.c.d: judge that
            # alone, so allow-listing "::/0" cannot open the IPv4 metadata endpoint.
            return self._refusal(destination.address, f"{shown} is {destination.how} {destination.address}, ")
        if self.is_allow_listed(ip):
            return None
        for inner in embedded:
            refusal = self._refusal(inner.address, f"{shown} is {inner.how} {inner.address}, ")
            if refusal is not None:
                return refusal
        return self._refusal(ip, f"{shown} is ")

    def _refusal(self, address: IPAddress, prefix: str) -> str | None:
        if self.is_allow_listed(address):
            return None
        label = _deny_label(address)
        return None if label is None else f"{prefix}{label}; refused by egress policy"
