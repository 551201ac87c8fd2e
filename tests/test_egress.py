"""The egress policy: what the tunnel server refuses to connect to, and why it says so."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.egress import DEFAULT_DENY_RULES, DenyRule, EgressPolicy, embedded_ipv4

DEFAULT = EgressPolicy()


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("169.254.169.254", "link-local / cloud metadata"),
        ("169.254.170.2", "link-local / cloud metadata"),
        ("169.254.169.253", "link-local / cloud metadata"),
        ("10.0.0.1", "private (RFC 1918)"),
        ("172.16.0.1", "private (RFC 1918)"),
        ("172.31.255.254", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "'this network'"),
        ("240.0.0.1", "reserved (240.0.0.0/4)"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.1", "documentation"),
        ("203.0.113.7", "documentation"),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF protocol assignment"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("fd00:ec2::254", "EC2 instance metadata"),
        ("fe80::1", "link-local / cloud metadata"),
        ("fe80::1%eth0", "link-local / cloud metadata"),
        ("fec0::1", "site-local"),
        ("100::1", "discard-only"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("::a9fe:a9fe", "reserved IPv6"),
    ],
)
def test_default_policy_refuses_internal_addresses_with_a_precise_reason(address: str, label: str) -> None:
    reason = DEFAULT.check(address, 443)
    assert reason is not None
    assert reason.startswith(f"{address} is ")
    assert label in reason
    assert reason.endswith("; refused by egress policy")


def test_metadata_reason_reads_as_documented() -> None:
    assert (
        DEFAULT.check("169.254.169.254", 80)
        == "169.254.169.254 is a link-local / cloud metadata address; refused by egress policy"
    )


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "172.32.0.1",  # just outside 172.16/12
        "100.128.0.1",  # just outside 100.64/10
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_default_policy_allows_public_addresses(address: str) -> None:
    assert DEFAULT.check(address, 443) is None


@pytest.mark.parametrize(
    ("address", "how", "inner", "label"),
    [
        ("::ffff:169.254.169.254", "IPv4-mapped", "169.254.169.254", "link-local / cloud metadata"),
        ("::ffff:127.0.0.1", "IPv4-mapped", "127.0.0.1", "loopback"),
        ("::ffff:10.1.2.3", "IPv4-mapped", "10.1.2.3", "private"),
        ("64:ff9b::a9fe:a9fe", "NAT64", "169.254.169.254", "link-local / cloud metadata"),
        ("64:ff9b::127.0.0.1", "NAT64", "127.0.0.1", "loopback"),
        ("2002:a9fe:aa02::1", "6to4", "169.254.170.2", "link-local / cloud metadata"),
        ("2002:c0a8:0101::1", "6to4", "192.168.1.1", "private"),
        # Teredo client 10.0.0.1, obfuscated (bits inverted) in the last 32 bits.
        ("2001:0:808:808::f5ff:fffe", "Teredo", "10.0.0.1", "private"),
    ],
)
def test_ipv6_forms_carrying_an_internal_ipv4_address_are_refused(
    address: str, how: str, inner: str, label: str
) -> None:
    reason = DEFAULT.check(address, 443)
    assert reason is not None
    assert how in reason and inner in reason and label in reason
    assert reason.startswith(f"{address} is ")


def test_allow_list_overrides_the_default_refusals() -> None:
    policy = EgressPolicy(["169.254.169.254/32", "169.254.170.2", "10.0.0.0/8", "127.0.0.0/8", "fc00::/7"])
    for address in ("169.254.169.254", "169.254.170.2", "10.0.0.1", "10.255.0.9", "127.0.0.1", "fd00::5"):
        assert policy.check(address, 443) is None, address
    # Only what was listed: neighbours stay refused.
    assert policy.check("169.254.169.253", 443) is not None
    assert policy.check("192.168.1.1", 443) is not None
    assert policy.check("::1", 443) is not None


def test_allow_list_applies_to_the_ipv4_address_inside_a_mapped_one() -> None:
    policy = EgressPolicy(["10.0.0.0/8"])
    assert policy.check("::ffff:10.1.2.3", 80) is None
    assert policy.check("::ffff:192.168.0.1", 80) is not None


def test_port_allow_list_applies_to_every_destination() -> None:
    policy = EgressPolicy(["10.0.0.0/8"], allow_ports=[443, 80])
    assert policy.check("8.8.8.8", 443) is None
    assert policy.check("10.0.0.1", 80) is None
    for address in ("8.8.8.8", "10.0.0.1"):
        reason = policy.check(address, 22)
        assert reason == "port 22 is not in the egress port allow-list (80, 443); refused by egress policy"
    # An allowed port does not open a refused address.
    assert policy.check("169.254.169.254", 443) is not None


def test_empty_port_allow_list_means_any_port() -> None:
    for port in (1, 22, 443, 8443, 65535):
        assert DEFAULT.check("8.8.8.8", port) is None
        assert DEFAULT.check_port(port) is None


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_impossible_ports_are_refused(port: int) -> None:
    reason = DEFAULT.check("8.8.8.8", port)
    assert reason is not None and "not a valid TCP port" in reason


def test_check_accepts_address_objects() -> None:
    assert DEFAULT.check(ipaddress.IPv4Address("10.0.0.1"), 443) is not None
    assert DEFAULT.check(ipaddress.IPv6Address("2606:4700::1"), 443) is None


@pytest.mark.parametrize("bad", ["example.com", "", "10.0.0.1:80", "999.1.1.1"])
def test_check_rejects_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        DEFAULT.check(bad, 443)


@pytest.mark.parametrize(
    ("networks", "ports", "message"),
    [
        (["10.0.0.0/33"], [], "is not a CIDR network"),
        (["10.0.0.1/8"], [], "is not a CIDR network"),  # host bits set: almost surely a typo
        (["example.com"], [], "is not a CIDR network"),
        ([10], [], "is not a CIDR network"),
        ("10.0.0.0/8", [], "must be lists"),
        ([], [0], "is not a port number"),
        ([], [70000], "is not a port number"),
        ([], ["443"], "is not a port number"),
    ],
)
def test_bad_configuration_is_rejected_clearly(networks: list[str], ports: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EgressPolicy(networks, ports)


# ----------------------------------------------------------------------------- properties

NOT_GLOBAL_V4 = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
]
ipv4_anywhere = st.one_of(
    st.ip_addresses(v=4),
    *(st.ip_addresses(network=n) for n in NOT_GLOBAL_V4),
)


@settings(max_examples=300)
@given(ipv4_anywhere)
def test_every_non_global_ipv4_address_is_refused(address: ipaddress.IPv4Address) -> None:
    """The standard library's own notion of "global" is an independent oracle."""
    if not address.is_global or address.is_multicast:
        assert DEFAULT.check(address, 443) is not None


@settings(max_examples=300)
@given(ipv4_anywhere)
def test_ipv6_spellings_of_an_ipv4_address_are_judged_like_it(address: ipaddress.IPv4Address) -> None:
    refused = DEFAULT.check(address, 443) is not None
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    sixtofour = ipaddress.IPv6Address((0x2002 << 112) | (int(address) << 80) | 1)
    assert (DEFAULT.check(mapped, 443) is not None) == refused
    assert (DEFAULT.check(nat64, 443) is not None) == refused
    if refused:
        assert DEFAULT.check(sixtofour, 443) is not None


@settings(max_examples=200)
@given(st.sampled_from(DEFAULT_DENY_RULES), st.data())
def test_allow_listing_a_denied_range_allows_all_of_it(rule: DenyRule, data: st.DataObject) -> None:
    address = data.draw(st.ip_addresses(network=str(rule.network)))
    policy = EgressPolicy([str(rule.network)])
    if not any(e.is_destination for e in embedded_ipv4(address)):
        assert policy.check(address, 443) is None


def test_allow_listing_all_of_ipv6_does_not_open_ipv4_spelled_as_ipv6() -> None:
    policy = EgressPolicy(["::/0"])
    assert policy.check("2606:4700::1", 443) is None
    assert policy.check("fd00::1", 443) is None
    for address in ("::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"):
        reason = policy.check(address, 443)
        assert reason is not None and "169.254.169.254, a link-local / cloud metadata address" in reason
