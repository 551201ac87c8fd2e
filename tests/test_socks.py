"""The SOCKS4/4a/5 handshake parser, byte for byte, and fuzzed: any bytes in any chunks."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desktop.socks import (
    AddressType,
    ConnectRequest,
    Phase,
    ProxyProtocol,
    Refusal,
    Refused,
    Reply,
    Send,
    SocksHandshake,
    detect_protocol,
    reply_for_failure,
)
from server.framing import FailReason

GREETING = b"\x05\x01\x00"


def feed(data: bytes, chunks: list[int] | None = None) -> tuple[SocksHandshake, list[object]]:
    """Run ``data`` through a fresh handshake, split at the given chunk sizes (rest at the end)."""
    handshake = SocksHandshake()
    events: list[object] = []
    position = 0
    for size in chunks or []:
        if handshake.phase in (Phase.ESTABLISHED,):
            break
        events += handshake.receive(data[position : position + size])
        position += size
    events += handshake.receive(data[position:])
    return handshake, events


def socks5_connect(kind: AddressType, address: bytes, port: int, command: int = 1) -> bytes:
    body = bytes([len(address)]) + address if kind is AddressType.DOMAIN else address
    return bytes((5, command, 0, kind)) + body + struct.pack("!H", port)


def test_first_byte_decides_the_protocol() -> None:
    assert detect_protocol(0x05) is ProxyProtocol.SOCKS5
    assert detect_protocol(0x04) is ProxyProtocol.SOCKS4
    for byte in (ord("G"), ord("C"), 0x16, 0x00, 0xFF):  # GET, CONNECT, a TLS ClientHello...
        assert detect_protocol(byte) is ProxyProtocol.HTTP


def test_socks5_domain_connect_is_handed_on_unresolved() -> None:
    handshake, events = feed(GREETING + socks5_connect(AddressType.DOMAIN, b"example.com", 443))
    assert events == [Send(b"\x05\x00"), ConnectRequest(5, "example.com", 443, AddressType.DOMAIN)]
    assert handshake.phase is Phase.DIALING
    assert handshake.succeeded() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert handshake.phase is Phase.ESTABLISHED


def test_socks5_ipv4_and_ipv6_connect() -> None:
    _, events = feed(GREETING + socks5_connect(AddressType.IPV4, bytes([93, 184, 216, 34]), 80))
    assert events[-1] == ConnectRequest(5, "93.184.216.34", 80, AddressType.IPV4)
    v6 = ipaddress.IPv6Address("2001:db8::1")
    _, events = feed(GREETING + socks5_connect(AddressType.IPV6, v6.packed, 8443))
    request = events[-1]
    assert request == ConnectRequest(5, "2001:db8::1", 8443, AddressType.IPV6)
    assert isinstance(request, ConnectRequest) and request.display == "[2001:db8::1]:8443"


def test_only_no_authentication_is_accepted() -> None:
    _, events = feed(b"\x05\x02\x01\x02")  # GSSAPI and username/password only
    assert events == [Refused(b"\x05\xff", Refusal.NO_ACCEPTABLE_METHOD, events[0].detail)]  # type: ignore[attr-defined]
    _, events = feed(b"\x05\x00")
    assert isinstance(events[0], Refused) and events[0].data == b"\x05\xff"
    _, events = feed(b"\x05\x03\x02\x01\x00")  # no-auth among others is chosen
    assert events == [Send(b"\x05\x00")]


@pytest.mark.parametrize("command", [2, 3, 9])
def test_bind_udp_associate_and_unknown_commands_are_not_supported(command: int) -> None:
    handshake, events = feed(GREETING + socks5_connect(AddressType.IPV4, bytes(4), 1, command=command))
    refused = events[-1]
    assert isinstance(refused, Refused) and refused.refusal is Refusal.COMMAND_NOT_SUPPORTED
    assert refused.data[:2] == b"\x05\x07"
    assert handshake.phase is Phase.CLOSED
    assert handshake.receive(b"more") == []


def test_unknown_address_type_and_malformed_headers() -> None:
    _, events = feed(GREETING + b"\x05\x01\x00\x02rest")
    assert isinstance(events[-1], Refused) and events[-1].data[:2] == b"\x05\x08"
    _, events = feed(GREETING + b"\x05\x01\x01\x01" + bytes(6))  # reserved byte not zero
    assert isinstance(events[-1], Refused) and events[-1].refusal is Refusal.MALFORMED
    _, events = feed(b"GET / HTTP/1.1\r\n")
    assert isinstance(events[-1], Refused) and events[-1].data == b""


def test_bad_domain_and_port_zero_are_refused() -> None:
    for host in (b"", b"exa mple.com", b"bad\x00host", "h\u00e9".encode()):
        _, events = feed(GREETING + socks5_connect(AddressType.DOMAIN, host, 80))
        assert isinstance(events[-1], Refused) and events[-1].refusal is Refusal.BAD_HOST, host
    _, events = feed(GREETING + socks5_connect(AddressType.DOMAIN, b"example.com", 0))
    assert isinstance(events[-1], Refused) and events[-1].refusal is Refusal.BAD_PORT


def test_optimistic_data_after_the_request_is_kept_for_the_stream() -> None:
    handshake, events = feed(GREETING + socks5_connect(AddressType.DOMAIN, b"example.com", 443) + b"\x16\x03")
    assert isinstance(events[-1], ConnectRequest)
    assert handshake.receive(b"\x01more") == []  # read while dialing: kept too
    assert handshake.take_leftover() == b"\x16\x03\x01more"
    assert handshake.take_leftover() == b""
    handshake.succeeded()
    with pytest.raises(RuntimeError):
        handshake.receive(b"x")


EXPECTED_REPLIES = {
    FailReason.POLICY: Reply.NOT_ALLOWED,
    FailReason.REFUSED: Reply.CONNECTION_REFUSED,
    FailReason.DNS: Reply.HOST_UNREACHABLE,
    FailReason.TIMEOUT: Reply.TTL_EXPIRED,
    FailReason.TUNNEL_DOWN: Reply.GENERAL_FAILURE,
    FailReason.LIMIT: Reply.GENERAL_FAILURE,
    FailReason.SHUTTING_DOWN: Reply.GENERAL_FAILURE,
    FailReason.INTERNAL: Reply.GENERAL_FAILURE,
    FailReason.CANCELLED: Reply.GENERAL_FAILURE,
}


def test_every_dial_failure_label_has_a_reply() -> None:
    assert set(EXPECTED_REPLIES) | {FailReason.UNREACHABLE} == set(FailReason)
    for reason, reply in EXPECTED_REPLIES.items():
        assert reply_for_failure(reason) is reply
    assert reply_for_failure(FailReason.POLICY) is Reply.NOT_ALLOWED
    assert reply_for_failure(FailReason.UNREACHABLE, AddressType.IPV4) is Reply.NETWORK_UNREACHABLE
    assert reply_for_failure(FailReason.UNREACHABLE, AddressType.IPV6) is Reply.NETWORK_UNREACHABLE
    assert reply_for_failure(FailReason.UNREACHABLE, AddressType.DOMAIN) is Reply.HOST_UNREACHABLE
    assert Reply.TTL_EXPIRED.label == "ttl_expired"


@pytest.mark.parametrize("reason", sorted(FailReason, key=lambda reason: reason.label))
def test_failed_dial_reply_bytes(reason: FailReason) -> None:
    handshake, _ = feed(GREETING + socks5_connect(AddressType.DOMAIN, b"example.com", 443))
    data, reply = handshake.failed(reason)
    assert data == bytes((5, reply, 0, 1)) + bytes(6)
    assert reply is reply_for_failure(reason, AddressType.DOMAIN)
    assert handshake.phase is Phase.CLOSED


def test_socks4_and_socks4a() -> None:
    handshake, events = feed(b"\x04\x01\x00\x50" + bytes([10, 1, 2, 3]) + b"user\x00")
    assert events == [ConnectRequest(4, "10.1.2.3", 80, AddressType.IPV4)]
    assert handshake.succeeded() == b"\x00\x5a\x00\x00\x00\x00\x00\x00"
    handshake, events = feed(b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00early")
    assert events == [ConnectRequest(4, "example.com", 443, AddressType.DOMAIN)]
    assert handshake.take_leftover() == b"early"
    data, reply = handshake.failed(FailReason.REFUSED)
    assert data == b"\x00\x5b" + bytes(6) and reply is Reply.CONNECTION_REFUSED


def test_socks4_refusals() -> None:
    cases = {
        b"\x04\x02\x00\x50\x01\x02\x03\x04\x00": Refusal.COMMAND_NOT_SUPPORTED,  # BIND
        b"\x04\x01\x00\x50\x00\x00\x00\x00\x00": Refusal.BAD_HOST,  # 0.0.0.0
        b"\x04\x01\x00\x00\x01\x02\x03\x04\x00": Refusal.BAD_PORT,
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad host\x00": Refusal.BAD_HOST,
        b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * 300: Refusal.MALFORMED,  # endless user id
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 300: Refusal.BAD_HOST,  # endless host
    }
    for data, refusal in cases.items():
        _, events = feed(data)
        assert len(events) == 1 and isinstance(events[0], Refused), data
        assert events[0].refusal is refusal and events[0].data == b"\x00\x5b" + bytes(6), data


def test_answers_out_of_turn_are_programming_errors() -> None:
    handshake = SocksHandshake()
    with pytest.raises(RuntimeError):
        handshake.succeeded()
    with pytest.raises(RuntimeError):
        handshake.failed(FailReason.DNS)


# ----------------------------------------------------------------------------- fuzzing

chunk_sizes = st.lists(st.integers(min_value=0, max_value=40), max_size=12)


def _terminal(events: list[object]) -> list[object]:
    return [event for event in events if isinstance(event, ConnectRequest | Refused)]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), chunks=chunk_sizes, first=st.sampled_from([b"", b"\x04", b"\x05"]))
def test_any_bytes_in_any_chunks_give_the_same_events(data: bytes, chunks: list[int], first: bytes) -> None:
    data = first + data
    whole, events = feed(data)
    split, split_events = feed(data, chunks)
    assert split_events == events
    assert whole.phase is split.phase
    assert len(_terminal(events)) <= 1
    if _terminal(events):
        assert events[-1] is _terminal(events)[-1]  # nothing follows the request or the refusal
    if whole.phase is Phase.DIALING:
        assert whole.leftover == split.leftover
    for event in events:
        if isinstance(event, ConnectRequest):
            assert 1 <= event.port <= 65535 and event.host
        if isinstance(event, Refused) and event.data:
            assert event.data[0] in (0, 5)


hosts = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (AddressType.IPV4, a.packed, str(a))),
    st.ip_addresses(v=6).map(lambda a: (AddressType.IPV6, a.packed, str(a))),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,60}", fullmatch=True).map(
        lambda name: (AddressType.DOMAIN, name.encode(), name)
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    target=hosts,
    port=st.integers(min_value=1, max_value=65535),
    methods=st.lists(st.integers(min_value=1, max_value=254), max_size=5),
    early=st.binary(max_size=50),
    chunks=chunk_sizes,
)
def test_a_valid_socks5_connect_round_trips(
    target: tuple[AddressType, bytes, str],
    port: int,
    methods: list[int],
    early: bytes,
    chunks: list[int],
) -> None:
    kind, raw, host = target
    offered = bytes([*methods, 0])
    data = bytes((5, len(offered))) + offered + socks5_connect(kind, raw, port) + early
    handshake, events = feed(data, chunks)
    assert events == [Send(b"\x05\x00"), ConnectRequest(5, host, port, kind)]
    assert handshake.take_leftover() == early


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,60}", fullmatch=True),
    user=st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")),
    port=st.integers(min_value=1, max_value=65535),
    chunks=chunk_sizes,
)
def test_a_valid_socks4a_connect_round_trips(name: str, user: bytes, port: int, chunks: list[int]) -> None:
    data = (
        b"\x04\x01" + struct.pack("!H", port) + b"\x00\x00\x00\x07" + user + b"\x00" + name.encode() + b"\x00"
    )
    _, events = feed(data, chunks)
    assert events == [ConnectRequest(4, name, port, AddressType.DOMAIN)]
