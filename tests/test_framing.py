"""The sans-I/O protocol core: frames, the tunnel state machine, control-plane replies.

Everything runs in memory: two TunnelConnection objects (agent and server) hand each
other the bytes they produce, exactly as the socket layer would.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

import pytest
from frame_helpers import encode_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.framing import (
    DATA_QUANTUM,
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAX_HELLO_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_PAYLOAD_LIMIT,
    MAX_WINDOW,
    MIN_PAYLOAD_LIMIT,
    PROTOCOL_VERSION,
    TUNNEL_PORT,
    ConnectionState,
    ControlPlaneError,
    ControlPlaneFormatError,
    DataReceived,
    Event,
    FailReason,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    PingReceived,
    PongReceived,
    ProtocolError,
    Role,
    ServerState,
    ServerStatus,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
    TunnelConnection,
    UsageError,
    WindowOpened,
    decode_open,
    encode_open,
    parse_control_reply,
)

HEAVY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------- helpers


def connect(
    agent_window: int = 256 * 1024,
    server_window: int = 256 * 1024,
    agent_payload: int = DEFAULT_MAX_PAYLOAD,
    server_payload: int = DEFAULT_MAX_PAYLOAD,
) -> tuple[TunnelConnection, TunnelConnection]:
    """An agent and a server that have exchanged HELLOs."""
    agent = TunnelConnection(
        Role.AGENT, "fluidity-agent 0.1.0", max_payload=agent_payload, initial_window=agent_window
    )
    server = TunnelConnection(
        Role.SERVER, "fluidity-server 0.1.0", max_payload=server_payload, initial_window=server_window
    )
    agent.initiate()
    server.initiate()
    assert [type(e) for e in deliver(agent, server)] == [HelloReceived]
    assert [type(e) for e in deliver(server, agent)] == [HelloReceived]
    return agent, server


def iter_frames(frames: Iterable[Frame]) -> bytes:
    """Several frames encoded into one buffer."""
    return b"".join(encode_frame(f) for f in frames)


def deliver(source: TunnelConnection, target: TunnelConnection) -> list[Event]:
    return target.receive_data(bytes(source.data_to_send()))


def sent_frames(conn: TunnelConnection) -> list[Frame]:
    """Decode (and drain) what a connection queued, to look at it frame by frame."""
    decoder = FrameDecoder(MAX_PAYLOAD_LIMIT)
    frames = decoder.feed(bytes(conn.data_to_send()))
    assert decoder.buffered == 0
    return frames


def raw(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0, length: int | None = None) -> bytes:
    """A frame built by hand, so a test can send what a correct peer never would."""
    return HEADER.pack(ftype, flags, stream_id, len(payload) if length is None else length) + payload


def hello_bytes(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "peer": "agent",
        "software": "fluidity-agent 9.9",
        "capabilities": [],
        "max_payload": DEFAULT_MAX_PAYLOAD,
        "initial_window": 256 * 1024,
    }
    body.update(fields)
    return raw(FrameType.HELLO, 0, json.dumps(body).encode())


def open_accepted(agent: TunnelConnection, server: TunnelConnection, host: str = "example.com") -> int:
    sid = agent.open_stream(host, 443)
    assert deliver(agent, server) == [StreamOpenRequested(sid, host, 443)]
    server.accept_stream(sid)
    assert deliver(server, agent) == [StreamOpened(sid)]
    return sid


def reason_payload(reason: int, message: bytes = b"") -> bytes:
    return bytes([reason]) + message


def split_points(data: st.DataObject, size: int) -> list[int]:
    cuts = data.draw(st.lists(st.integers(0, size), max_size=12))
    return sorted(set(cuts))


def chunks(blob: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in zip(edges, edges[1:], strict=False)]


# ----------------------------------------------------------------------------- frame codec

frame_types = st.sampled_from(list(FrameType))
stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    kind = draw(frame_types)
    size = draw(st.sampled_from([0, 1, 8, 64, 300, MAX_HELLO_LENGTH if kind is FrameType.HELLO else 5000]))
    payload = draw(st.binary(min_size=0, max_size=size))
    return Frame(kind, draw(stream_ids), payload, draw(st.integers(0, 255)))


@HEAVY
@given(st.lists(valid_frames(), max_size=20), st.data())
def test_frames_round_trip_whatever_the_split_points(frames: list[Frame], data: st.DataObject) -> None:
    blob = iter_frames(frames)
    assert blob == b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for piece in chunks(blob, split_points(data, len(blob))):
        decoded += decoder.feed(piece)
    assert decoded == frames
    assert decoder.buffered == 0


def test_byte_at_a_time_feeding_decodes_every_frame() -> None:
    frames = [
        Frame(FrameType.DATA, 1, b"hello"),
        Frame(FrameType.PING, 0, b"12345678"),
        Frame(FrameType.FIN, 1),
    ]
    decoder = FrameDecoder()
    out: list[Frame] = []
    for byte in iter_frames(frames):
        out += decoder.feed(bytes([byte]))
    assert out == frames


def test_partial_frame_stays_buffered() -> None:
    decoder = FrameDecoder()
    blob = encode_frame(Frame(FrameType.DATA, 1, b"abcdef"))
    assert decoder.feed(blob[:-1]) == []
    assert decoder.buffered == len(blob) - 1
    assert decoder.feed(blob[-1:]) == [Frame(FrameType.DATA, 1, b"abcdef")]


@pytest.mark.parametrize("ftype", [0, 12, 200, 255])
def test_unknown_frame_type_is_a_protocol_error(ftype: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown frame type {ftype}"):
        FrameDecoder().feed(raw(ftype, 0))


def test_oversize_frames_are_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_payload=2048)
    # Only the header is needed: a hostile length is refused before any payload is buffered.
    with pytest.raises(ProtocolError, match="DATA frame of 2049 bytes exceeds the limit of 2048"):
        decoder.feed(raw(FrameType.DATA, 1, length=2049))
    assert FrameDecoder(2048).feed(raw(FrameType.DATA, 1, b"x" * 2048)) == [
        Frame(FrameType.DATA, 1, b"x" * 2048)
    ]
    with pytest.raises(ProtocolError, match=f"HELLO frame of {MAX_HELLO_LENGTH + 1} bytes"):
        FrameDecoder(MAX_PAYLOAD_LIMIT).feed(raw(FrameType.HELLO, 0, length=MAX_HELLO_LENGTH + 1))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder().feed(raw(FrameType.DATA, 1, length=2**32 - 1))


# ----------------------------------------------------------------------------- fuzzing: only ProtocolError


@HEAVY
@given(st.binary(max_size=600), st.data())
def test_arbitrary_bytes_give_frames_or_protocol_error(blob: bytes, data: st.DataObject) -> None:
    decoder = FrameDecoder(MIN_PAYLOAD_LIMIT)
    try:
        for piece in chunks(blob, split_points(data, len(blob))):
            for frame in decoder.feed(piece):
                assert isinstance(frame, Frame)
    except ProtocolError:
        pass


@HEAVY
@given(st.sampled_from([Role.AGENT, Role.SERVER]), st.binary(max_size=600))
def test_arbitrary_bytes_before_hello_give_events_or_protocol_error(role: Role, blob: bytes) -> None:
    conn = TunnelConnection(role, "fuzz")
    conn.initiate()
    try:
        conn.receive_data(blob)
    except ProtocolError as error:
        assert isinstance(error.reason, GoAwayReason) and error.message


hello_payloads = st.builds(
    lambda protocol, peer, software, caps, max_payload, window: json.dumps(
        {
            "protocol": protocol,
            "peer": peer,
            "software": software,
            "capabilities": caps,
            "max_payload": max_payload,
            "initial_window": window,
        }
    ).encode(),
    st.one_of(st.just(PROTOCOL_VERSION), st.integers(-1, 3), st.booleans(), st.none(), st.text(max_size=3)),
    st.sampled_from(["agent", "server", "", None, 1]),
    st.one_of(st.text(max_size=20), st.none()),
    st.one_of(st.lists(st.text(max_size=5), max_size=3), st.lists(st.integers(), max_size=2), st.text()),
    st.one_of(st.integers(-1, MAX_PAYLOAD_LIMIT + 1), st.floats(allow_nan=False), st.booleans()),
    st.one_of(st.integers(-1, MAX_WINDOW + 1), st.none()),
)
json_blobs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
).map(lambda value: json.dumps(value).encode())


@HEAVY
@given(
    st.sampled_from([Role.AGENT, Role.SERVER]), st.one_of(hello_payloads, json_blobs, st.binary(max_size=80))
)
def test_any_hello_payload_gives_hello_or_protocol_error(role: Role, payload: bytes) -> None:
    conn = TunnelConnection(role, "fuzz")
    try:
        events = conn.receive_data(raw(FrameType.HELLO, 0, payload))
    except ProtocolError:
        assert conn.peer_hello is None
    else:
        assert events == [HelloReceived(conn.peer_hello)] if conn.peer_hello else events == []


fuzz_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(reason_payload, st.integers(0, 12), st.binary(max_size=20)),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    st.sampled_from([1, 8, 1024]).map(lambda n: struct.pack(">I", n)),
    st.builds(
        lambda port, host: struct.pack(">H", port) + host,
        st.integers(0, 65535),
        st.one_of(st.just(b"example.com"), st.binary(min_size=0, max_size=10)),
    ),
    st.binary(min_size=8, max_size=8),
    st.builds(
        lambda code, last, msg: struct.pack(">BI", code, last) + msg,
        st.integers(0, 7),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=10),
    ),
    hello_payloads,
)
fuzz_stream_ids = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11, 2**32 - 1]), st.integers(0, 2**32 - 1))
fuzz_types = st.one_of(st.sampled_from(list(FrameType)), st.sampled_from([FrameType.DATA, FrameType.WINDOW]))
fuzz_frames = st.lists(
    st.builds(
        lambda t, s, p, f: raw(t, s, p, f), fuzz_types, fuzz_stream_ids, fuzz_payloads, st.integers(0, 255)
    ),
    max_size=15,
)


def busy_pair() -> tuple[TunnelConnection, TunnelConnection]:
    """A connection pair with streams in every state, so fuzzed frames reach every path.

    Agent view: 1 open, 3 rejected (closed), 5 open with the server's FIN received,
    7 waiting for OPEN_OK. Server view: 1 open, 5 open (server sent FIN), 7 waiting.
    """
    agent, server = connect(agent_window=4096, server_window=4096)
    open_accepted(agent, server)  # 1
    s3 = agent.open_stream("rejected.example", 80)
    deliver(agent, server)
    server.reject_stream(s3, FailReason.DNS, "no such host")
    deliver(server, agent)
    s5 = open_accepted(agent, server)
    server.end_stream(s5)
    deliver(server, agent)
    agent.open_stream("pending.example", 443)  # 7
    deliver(agent, server)
    return agent, server


@HEAVY
@given(fuzz_frames)
def test_random_frames_after_handshake_give_events_or_protocol_error(frames: list[bytes]) -> None:
    for receiver in busy_pair():
        try:
            for frame in frames:
                receiver.receive_data(frame)
        except ProtocolError as error:
            assert error.message
        # Whatever it answered (PONGs, OPEN_FAILs) is well-formed.
        for out in sent_frames(receiver):
            assert isinstance(out.type, FrameType)


# ----------------------------------------------------------------------------- a full conversation


def test_hello_exchange_reports_each_peer() -> None:
    agent = TunnelConnection(Role.AGENT, "fluidity-agent 0.1.0", capabilities=("x-test",))
    server = TunnelConnection(Role.SERVER, "fluidity-server 0.1.0", max_payload=32 * 1024)
    assert agent.state is ConnectionState.HANDSHAKE and not agent.can_open_streams
    agent.initiate()
    server.initiate()
    [to_server] = deliver(agent, server)
    [to_agent] = deliver(server, agent)
    assert isinstance(to_server, HelloReceived) and isinstance(to_agent, HelloReceived)
    assert to_server.hello == Hello("agent", "fluidity-agent 0.1.0", PROTOCOL_VERSION, ("x-test",))
    assert to_agent.hello.peer == "server" and to_agent.hello.max_payload == 32 * 1024
    assert agent.state is ConnectionState.OPEN and server.state is ConnectionState.OPEN
    assert agent.can_open_streams and not server.can_open_streams


def test_full_conversation_data_both_ways_and_half_close_each_way() -> None:
    agent, server = connect()
    sid = agent.open_stream("example.com", 443)
    assert sid == 1
    assert server.send_credit(sid) == 0
    # 0-RTT: the request leaves right behind the OPEN; the server holds it until its dial is done.
    assert agent.send_data(sid, b"GET / HTTP/1.1\r\n\r\n") == 18
    assert deliver(agent, server) == [
        StreamOpenRequested(1, "example.com", 443),
        DataReceived(1, b"GET / HTTP/1.1\r\n\r\n"),
    ]
    server.accept_stream(sid)
    assert deliver(server, agent) == [StreamOpened(1)]
    server.send_data(sid, memoryview(b"HTTP/1.1 200 OK\r\n\r\nhi"))
    assert deliver(server, agent) == [DataReceived(1, b"HTTP/1.1 200 OK\r\n\r\nhi")]

    # The agent is done sending; the server keeps answering on the same stream.
    agent.end_stream(sid)
    assert deliver(agent, server) == [StreamEnded(1)]
    assert agent.send_credit(sid) == 0
    with pytest.raises(UsageError):
        agent.send_data(sid, b"late")
    server.send_data(sid, b"more")
    assert deliver(server, agent) == [DataReceived(1, b"more")]
    server.end_stream(sid)
    assert deliver(server, agent) == [StreamEnded(1)]
    assert not agent.is_open(sid) and not server.is_open(sid)
    assert agent.active_streams == 0 and server.active_streams == 0

    # Second stream: the server half-closes first; the agent keeps uploading.
    sid2 = open_accepted(agent, server, "upload.example")
    assert sid2 == 3 and server.stream_ids() == [3]
    server.end_stream(sid2)
    assert deliver(server, agent) == [StreamEnded(3)]
    agent.send_data(sid2, b"x" * 1000)
    assert deliver(agent, server) == [DataReceived(3, b"x" * 1000)]
    agent.end_stream(sid2)
    agent.end_stream(sid2)  # idempotent: nothing more is sent
    assert deliver(agent, server) == [StreamEnded(3)]
    assert agent.active_streams == 0 and server.active_streams == 0


@pytest.mark.parametrize("reason", [r for r in FailReason if r.on_wire])
def test_open_fail_carries_each_reason_label(reason: FailReason) -> None:
    agent, server = connect()
    sid = agent.open_stream("target.example", 8080)
    deliver(agent, server)
    server.reject_stream(sid, reason, f"because {reason.label}")
    assert deliver(server, agent) == [StreamOpenFailed(sid, reason, f"because {reason.label}")]
    assert reason.label == reason.name.lower()
    assert not agent.is_open(sid) and not server.is_open(sid)


def test_fail_reason_labels_are_the_public_names() -> None:
    assert [r.label for r in FailReason] == [
        "dns",
        "refused",
        "timeout",
        "unreachable",
        "policy",
        "limit",
        "shutting_down",
        "internal",
        "cancelled",
        "tunnel_down",
    ]
    assert [r for r in FailReason if not r.on_wire] == [FailReason.TUNNEL_DOWN]


def test_agent_side_reasons_never_go_on_the_wire() -> None:
    """TUNNEL_DOWN is the agent's own finding: encoding it is refused, before any state changes."""
    agent, server = connect()
    sid = agent.open_stream("target.example", 8080)
    deliver(agent, server)
    with pytest.raises(UsageError, match="never goes on the wire"):
        server.reject_stream(sid, FailReason.TUNNEL_DOWN, "no tunnel")
    with pytest.raises(UsageError, match="never goes on the wire"):
        agent.reset_stream(sid, FailReason.TUNNEL_DOWN, "no tunnel")
    assert server.is_open(sid) and agent.is_open(sid) and server.pending_output == 0
    server.reject_stream(sid, FailReason.DNS, "no such host")
    assert deliver(server, agent) == [StreamOpenFailed(sid, FailReason.DNS, "no such host")]


def test_reset_closes_the_stream_and_late_frames_are_ignored() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    server.send_data(sid, b"in flight")  # crosses the RESET on the wire
    agent.reset_stream(sid, FailReason.CANCELLED, "tab closed")
    agent.reset_stream(sid, FailReason.CANCELLED)  # second reset: a no-op
    assert deliver(agent, server) == [StreamReset(sid, FailReason.CANCELLED, "tab closed")]
    assert deliver(server, agent) == []  # the late DATA is dropped, not an error
    # Anything else still in flight for that stream is dropped too.
    assert agent.receive_data(raw(FrameType.WINDOW, sid, struct.pack(">I", 10))) == []
    assert agent.receive_data(raw(FrameType.FIN, sid)) == []
    assert agent.receive_data(raw(FrameType.OPEN_OK, sid)) == []
    assert server.receive_data(raw(FrameType.DATA, sid, b"late")) == []
    assert server.receive_data(raw(FrameType.RESET, sid, reason_payload(FailReason.CANCELLED))) == []


def test_server_reset_reaches_the_agent() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    server.reset_stream(sid, FailReason.INTERNAL, "target closed abruptly")
    assert deliver(server, agent) == [StreamReset(sid, FailReason.INTERNAL, "target closed abruptly")]
    assert agent.receive_data(raw(FrameType.DATA, sid, b"late")) == []


def test_agent_may_cancel_an_open_before_the_answer() -> None:
    agent, server = connect()
    sid = agent.open_stream("slow.example", 443)
    deliver(agent, server)
    agent.reset_stream(sid, FailReason.CANCELLED)
    assert deliver(agent, server) == [StreamReset(sid, FailReason.CANCELLED, "")]
    # The server's answer crosses the RESET; either answer is dropped by the agent.
    assert agent.receive_data(raw(FrameType.OPEN_OK, sid)) == []
    assert agent.receive_data(raw(FrameType.OPEN_FAIL, sid, reason_payload(FailReason.TIMEOUT))) == []
    with pytest.raises(UsageError):
        server.accept_stream(sid)


def test_ping_is_answered_with_pong_automatically() -> None:
    agent, server = connect()
    agent.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert deliver(agent, server) == [PingReceived(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    assert deliver(server, agent) == [PongReceived(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    server.ping(b"servping")
    assert deliver(server, agent) == [PingReceived(b"servping")]
    assert deliver(agent, server) == [PongReceived(b"servping")]


def test_goaway_refuses_new_streams_and_lets_existing_ones_finish() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    crossing = agent.open_stream("crossing.example", 443)  # sent before the GOAWAY arrives
    server.goaway(GoAwayReason.SHUTDOWN, "task is stopping")
    server.goaway(GoAwayReason.SHUTDOWN, "again")  # only one GOAWAY is ever sent
    assert server.state is ConnectionState.CLOSING

    assert deliver(agent, server) == []  # refused automatically, not offered to the application
    events = deliver(server, agent)
    assert events == [
        GoAwayReceived(GoAwayReason.SHUTDOWN, sid, "task is stopping"),
        StreamOpenFailed(crossing, FailReason.SHUTTING_DOWN, "server is shutting down"),
    ]
    assert agent.state is ConnectionState.CLOSING and agent.goaway_received
    assert not agent.can_open_streams
    with pytest.raises(UsageError, match="closing"):
        agent.open_stream("new.example", 443)

    # The stream opened before the GOAWAY carries on normally, both ways.
    agent.send_data(sid, b"request")
    assert deliver(agent, server) == [DataReceived(sid, b"request")]
    server.send_data(sid, b"response")
    server.end_stream(sid)
    assert deliver(server, agent) == [DataReceived(sid, b"response"), StreamEnded(sid)]
    agent.end_stream(sid)
    assert deliver(agent, server) == [StreamEnded(sid)]
    assert server.active_streams == 0


def test_goaway_from_the_agent_and_close() -> None:
    agent, server = connect()
    agent.goaway(GoAwayReason.NORMAL, "user quit")
    assert deliver(agent, server) == [GoAwayReceived(GoAwayReason.NORMAL, 0, "user quit")]
    assert server.goaway_received and server.state is ConnectionState.CLOSING
    server.close()
    assert server.state is ConnectionState.CLOSED
    assert server.receive_data(raw(FrameType.PING, 0, b"12345678")) == []  # a closed tunnel hears nothing


def test_goaway_with_a_long_message_fits_the_smallest_allowed_payload() -> None:
    """A peer may advertise the minimum max_payload; our GOAWAY/OPEN_FAIL/RESET must still fit it."""
    agent, server = connect(agent_payload=MIN_PAYLOAD_LIMIT)
    sid = agent.open_stream("a.example", 443)
    deliver(agent, server)
    server.reject_stream(sid, FailReason.POLICY, "p" * 5000)
    sid2 = agent.open_stream("b.example", 443)
    deliver(agent, server)
    server.accept_stream(sid2)
    server.reset_stream(sid2, FailReason.INTERNAL, "r" * 5000)
    server.goaway(GoAwayReason.SHUTDOWN, "g" * 5000)
    events = deliver(server, agent)
    assert [type(e) for e in events] == [StreamOpenFailed, StreamOpened, StreamReset, GoAwayReceived]


def test_goaway_message_that_is_not_valid_unicode_is_still_sent() -> None:
    """Error text can echo a peer's HELLO, which may carry lone surrogates; GOAWAY must not crash on it."""
    agent, server = connect()
    server.goaway(GoAwayReason.PROTOCOL_ERROR, "peer said \ud800")
    [event] = deliver(server, agent)
    assert isinstance(event, GoAwayReceived) and event.message.startswith("peer said ")


# ----------------------------------------------------------------------------- flow control


def test_sender_never_exceeds_the_peer_window_until_window_arrives() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    assert server.send_credit(sid) == 4096
    assert server.send_data(sid, b"d" * 10_000) == 4096
    assert server.send_credit(sid) == 0
    assert server.send_data(sid, b"more") == 0
    received = deliver(server, agent)
    assert sum(len(e.data) for e in received if isinstance(e, DataReceived)) == 4096
    assert server.pending_output == 0

    agent.acknowledge(sid, 4096)
    assert deliver(agent, server) == [WindowOpened(sid, 4096)]
    assert server.send_credit(sid) == 4096


def test_data_is_cut_to_the_peer_max_payload() -> None:
    agent, server = connect(agent_payload=MIN_PAYLOAD_LIMIT)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"z" * 3000)
    frames = sent_frames(server)
    assert [len(f.payload) for f in frames] == [1024, 1024, 952]
    assert agent.receive_data(iter_frames(frames)) == [
        DataReceived(sid, b"z" * 1024),
        DataReceived(sid, b"z" * 1024),
        DataReceived(sid, b"z" * 952),
    ]


def test_a_stalled_stream_does_not_block_another() -> None:
    agent, server = connect(agent_window=4096)
    fast = open_accepted(agent, server, "fast.example")
    slow = open_accepted(agent, server, "slow.example")
    delivered = {fast: 0, slow: 0}
    for _ in range(10):
        server.send_data(fast, b"f" * 4096)
        server.send_data(slow, b"s" * 4096)
        for event in deliver(server, agent):
            assert isinstance(event, DataReceived)
            delivered[event.stream_id] += len(event.data)
        agent.acknowledge(fast, 4096)  # the fast reader consumes; the slow one never does
        deliver(agent, server)
    assert delivered[fast] == 10 * 4096
    assert delivered[slow] == 4096
    assert server.send_credit(slow) == 0 and server.send_credit(fast) == 4096


def test_overrunning_the_credit_is_a_protocol_error() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    assert agent.receive_data(raw(FrameType.DATA, sid, b"a" * 4000)) == [DataReceived(sid, b"a" * 4000)]
    with pytest.raises(ProtocolError, match=f"stream {sid} sent 97 bytes with only 96 credit"):
        agent.receive_data(raw(FrameType.DATA, sid, b"a" * 97))


def test_acknowledge_returns_credit_in_eighth_window_batches() -> None:
    agent, server = connect(agent_window=512 * 1024)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 200_000)
    deliver(server, agent)
    agent.acknowledge(sid, 65535)
    assert agent.pending_output == 0  # below an eighth of the window: nothing sent yet
    agent.acknowledge(sid, 0)
    agent.acknowledge(sid, -5)
    assert agent.pending_output == 0
    agent.acknowledge(sid, 1)
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, sid, struct.pack(">I", 65536))]
    agent.acknowledge(sid, 70000)
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, sid, struct.pack(">I", 70000))]


def test_small_windows_return_credit_in_batches_of_at_least_32_kib_or_half() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 4096)
    deliver(server, agent)
    agent.acknowledge(sid, 2047)
    assert agent.pending_output == 0  # a WINDOW per few hundred bytes would cost more than the data
    agent.acknowledge(sid, 1)
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, sid, struct.pack(">I", 2048))]


def test_a_larger_stream_window_is_granted_with_the_next_credit() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 4096)
    deliver(server, agent)
    agent.set_stream_window(8192)
    assert agent.stream_window == 8192
    agent.acknowledge(sid, 100)
    deliver(agent, server)
    assert server.send_credit(sid) == 4196
    # a stream opened later starts at the HELLO's window and grows on its first return
    later = open_accepted(agent, server)
    assert server.send_credit(later) == 4096
    server.send_data(later, b"y" * 10)
    deliver(server, agent)
    agent.acknowledge(later, 10)
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, later, struct.pack(">I", 4106))]


def test_a_smaller_stream_window_holds_back_credit_instead_of_taking_it() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 4096)
    deliver(server, agent)
    agent.set_stream_window(1024)
    agent.acknowledge(sid, 3000)  # 3000 consumed, 3072 owed back: nothing returned yet
    assert agent.pending_output == 0
    agent.acknowledge(sid, 1096)  # all 4096 consumed: the peer may have 1024 in flight again
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, sid, struct.pack(">I", 1024))]
    with pytest.raises(UsageError):
        agent.set_stream_window(0)


def test_no_credit_is_returned_after_the_peer_finished() -> None:
    agent, server = connect(agent_window=4096)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 2048)
    server.end_stream(sid)
    deliver(server, agent)
    agent.acknowledge(sid, 2048)
    assert agent.pending_output == 0


flow_ops = st.lists(
    st.tuples(
        st.sampled_from(["send", "to_agent", "ack", "to_server"]), st.integers(0, 3), st.integers(1, 9000)
    ),
    max_size=60,
)


@HEAVY
@given(flow_ops, st.data())
def test_flow_control_model(ops: list[tuple[str, int, int]], data: st.DataObject) -> None:
    """Random sends, partial deliveries and acknowledgements on two streams never break the credit rules."""
    window = 4096
    agent, server = connect(agent_window=window)
    sids = [open_accepted(agent, server, f"s{i}.example") for i in range(2)]
    sent = dict.fromkeys(sids, 0)
    received = dict.fromkeys(sids, 0)
    consumed = dict.fromkeys(sids, 0)
    returned = dict.fromkeys(sids, 0)  # credit the server has got back through WINDOW
    wire_to_agent = b""
    wire_to_server = b""
    for op, which, size in ops:
        sid = sids[which % 2]
        if op == "send":
            taken = server.send_data(sid, b"q" * size)
            assert taken == min(size, window - (sent[sid] - returned[sid]))
            sent[sid] += taken
            wire_to_agent += server.data_to_send()
        elif op == "to_agent":
            cut = data.draw(st.integers(0, len(wire_to_agent)))
            for event in agent.receive_data(wire_to_agent[:cut]):
                assert isinstance(event, DataReceived)
                received[event.stream_id] += len(event.data)
            wire_to_agent = wire_to_agent[cut:]
        elif op == "ack":
            amount = min(size, received[sid] - consumed[sid])
            agent.acknowledge(sid, amount)
            consumed[sid] += max(amount, 0)
            wire_to_server += agent.data_to_send()
        else:
            for event in server.receive_data(wire_to_server):
                assert isinstance(event, WindowOpened)
                returned[event.stream_id] += event.increment
            wire_to_server = b""
        for s in sids:
            in_flight = sent[s] - returned[s]
            assert 0 <= in_flight <= window
            assert server.send_credit(s) == window - in_flight
            assert returned[s] <= consumed[s] <= received[s] <= sent[s]
            assert consumed[s] - returned[s] <= window // 2 or wire_to_server


# ----------------------------------------------------------------------------- peer errors


def test_version_mismatch_names_both_versions() -> None:
    server = TunnelConnection(Role.SERVER, "fluidity-server 0.1.0")
    with pytest.raises(ProtocolError) as caught:
        server.receive_data(hello_bytes(protocol=2, software="fluidity-agent 2.0"))
    assert caught.value.reason is GoAwayReason.VERSION_MISMATCH
    assert "protocol 2" in caught.value.message and f"speaks {PROTOCOL_VERSION}" in caught.value.message
    assert "fluidity-agent 2.0" in caught.value.message
    assert server.peer_hello is None and server.state is ConnectionState.HANDSHAKE


def test_version_mismatch_is_reported_whatever_else_the_newer_hello_changed() -> None:
    """A future HELLO may widen other fields; the version must be judged before them."""
    server = TunnelConnection(Role.SERVER, "fluidity-server 0.1.0")
    with pytest.raises(ProtocolError) as caught:
        server.receive_data(hello_bytes(protocol=2, max_payload=MAX_PAYLOAD_LIMIT * 2, capabilities="all"))
    assert caught.value.reason is GoAwayReason.VERSION_MISMATCH
    assert "protocol 2" in caught.value.message


@pytest.mark.parametrize(
    ("role", "peer"),
    [(Role.SERVER, "server"), (Role.AGENT, "agent"), (Role.SERVER, "proxy"), (Role.AGENT, "")],
)
def test_wrong_peer_role_is_refused(role: Role, peer: str) -> None:
    conn = TunnelConnection(role, "test")
    with pytest.raises(ProtocolError, match="peer says it is") as caught:
        conn.receive_data(hello_bytes(peer=peer))
    assert caught.value.reason is GoAwayReason.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "blob",
    [
        raw(FrameType.PING, 0, b"12345678"),
        raw(FrameType.OPEN, 1, encode_open("example.com", 443)),
        raw(FrameType.DATA, 1, b"x"),
        raw(FrameType.GOAWAY, 0, struct.pack(">BI", 0, 0)),
    ],
)
def test_frames_before_hello_are_refused(blob: bytes) -> None:
    with pytest.raises(ProtocolError, match="expected HELLO first"):
        TunnelConnection(Role.SERVER, "test").receive_data(blob)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (raw(FrameType.HELLO, 1, b"{}"), "HELLO must be on stream 0"),
        (raw(FrameType.HELLO, 0, b"\xff\xfe"), "not JSON"),
        (raw(FrameType.HELLO, 0, b"[1]"), "not a JSON object"),
        (raw(FrameType.HELLO, 0, b"[" * 4000), "not JSON"),
        (hello_bytes(protocol=True), "no protocol version"),
        (hello_bytes(protocol="1"), "no protocol version"),
        (hello_bytes(software=5), "must be strings"),
        (hello_bytes(capabilities=[1]), "capabilities"),
        (hello_bytes(max_payload=MIN_PAYLOAD_LIMIT - 1), "max_payload"),
        (hello_bytes(max_payload=MAX_PAYLOAD_LIMIT + 1), "max_payload"),
        (hello_bytes(max_payload=65536.0), "max_payload"),
        (hello_bytes(initial_window=0), "initial_window"),
        (hello_bytes(initial_window=MAX_WINDOW + 1), "initial_window"),
    ],
)
def test_bad_hellos_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TunnelConnection(Role.SERVER, "test").receive_data(blob)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "bad length"),
        (b"\x01\xbb", "bad length"),
        (struct.pack(">H", 443) + b"a" * 256, "bad length"),
        (struct.pack(">H", 0) + b"example.com", "port 0"),
        (struct.pack(">H", 443) + "bücher.de".encode(), "not ASCII"),
        (struct.pack(">H", 443) + b"exa mple.com", "control or space"),
        (struct.pack(">H", 443) + b"example.com\n", "control or space"),
        (struct.pack(">H", 443) + b"a\x00b", "control or space"),
    ],
)
def test_bad_open_payloads_are_refused(payload: bytes, message: str) -> None:
    agent, server = connect()
    with pytest.raises(ProtocolError, match=message):
        server.receive_data(raw(FrameType.OPEN, 1, payload))


def test_open_payload_codec() -> None:
    assert decode_open(encode_open("example.com", 443)) == ("example.com", 443)
    assert decode_open(encode_open("bücher.de", 80)) == ("xn--bcher-kva.de", 80)
    assert decode_open(encode_open("a" * 255, 65535)) == ("a" * 255, 65535)
    for host, port in [("", 80), ("a" * 256, 80), ("example.com", 0), ("example.com", 65536)]:
        with pytest.raises(UsageError):
            encode_open(host, port)


@settings(max_examples=300)
@given(st.text(max_size=30), st.integers(-1, 65536))
def test_every_open_the_agent_can_encode_the_server_can_decode(host: str, port: int) -> None:
    """Otherwise one odd host name from a browser would tear down the whole tunnel."""
    try:
        payload = encode_open(host, port)
    except UsageError:
        return
    decoded_host, decoded_port = decode_open(payload)
    assert decoded_port == port
    assert decoded_host.lower() == (host if host.isascii() else host.encode("idna").decode()).lower()


def test_agent_refuses_a_host_the_server_would_reject_without_dropping_the_tunnel() -> None:
    agent, server = connect()
    good = open_accepted(agent, server)
    for bad in ("exa mple.com", "tab\there", "del\x7f.com", "ü..com"):
        with pytest.raises(UsageError):
            agent.open_stream(bad, 443)
    agent.send_data(good, b"still fine")
    assert deliver(agent, server) == [DataReceived(good, b"still fine")]


@pytest.mark.parametrize(
    ("receiver", "blob", "message"),
    [
        # connection frames must be on stream 0, stream frames must not
        ("server", raw(FrameType.PING, 1, b"12345678"), "PING must be on stream 0"),
        ("agent", raw(FrameType.GOAWAY, 3, struct.pack(">BI", 0, 0)), "GOAWAY must be on stream 0"),
        ("server", raw(FrameType.DATA, 0, b"x"), "DATA must not be on stream 0"),
        ("server", hello_bytes(), "second HELLO"),
        ("server", raw(FrameType.PING, 0, b"1234567"), "PING payload must be 8 bytes"),
        ("agent", raw(FrameType.PONG, 0, b"123456789"), "PONG payload must be 8 bytes"),
        ("agent", raw(FrameType.GOAWAY, 0, b"\x00"), "GOAWAY payload has a bad length"),
        ("agent", raw(FrameType.GOAWAY, 0, struct.pack(">BI", 99, 0)), "GOAWAY has unknown reason 99"),
        # stream ids
        ("agent", raw(FrameType.OPEN, 2, encode_open("x.example", 1)), "server must not open streams"),
        ("server", raw(FrameType.OPEN, 2, encode_open("x.example", 1)), "invalid stream id 2"),
        ("server", raw(FrameType.OPEN, 1, encode_open("x.example", 1)), "invalid stream id 1"),
        ("agent", raw(FrameType.DATA, 99, b"x"), "DATA for unknown stream 99"),
        ("agent", raw(FrameType.DATA, 2, b"x"), "DATA for unknown stream 2"),
        ("server", raw(FrameType.DATA, 7, b"x"), "DATA for unknown stream 7"),
        ("server", raw(FrameType.WINDOW, 4, struct.pack(">I", 1)), "WINDOW for unknown stream 4"),
        # per-stream rules (stream 1 is open on both sides)
        ("server", raw(FrameType.OPEN_OK, 1), "unexpected OPEN_OK"),
        ("agent", raw(FrameType.OPEN_OK, 1), "unexpected OPEN_OK"),
        ("agent", raw(FrameType.OPEN_FAIL, 1, reason_payload(1)), "unexpected OPEN_FAIL"),
        ("agent", raw(FrameType.RESET, 1), "RESET payload has a bad length"),
        ("agent", raw(FrameType.RESET, 1, reason_payload(0)), "RESET has unknown reason 0"),
        ("agent", raw(FrameType.RESET, 1, reason_payload(1, b"m" * (MAX_MESSAGE_LENGTH + 1))), "bad length"),
        ("agent", raw(FrameType.FIN, 1, b"x"), "FIN carries no payload"),
        ("agent", raw(FrameType.WINDOW, 1, b"\x00\x01"), "WINDOW payload must be 4 bytes"),
        ("agent", raw(FrameType.WINDOW, 1, struct.pack(">I", 0)), "WINDOW increment 0 is invalid"),
        ("agent", raw(FrameType.WINDOW, 1, struct.pack(">I", MAX_WINDOW)), "is invalid"),
        # stream 3 is waiting for OPEN_OK on both sides
        ("agent", raw(FrameType.DATA, 3, b"x"), "DATA on stream 3 before it was opened"),
        ("agent", raw(FrameType.FIN, 3), "FIN on stream 3 before it was opened"),
        ("agent", raw(FrameType.OPEN_OK, 3, b"x"), "OPEN_OK carries no payload"),
        ("agent", raw(FrameType.OPEN_FAIL, 3, reason_payload(42)), "OPEN_FAIL has unknown reason 42"),
    ],
)
def test_peer_protocol_violations(receiver: str, blob: bytes, message: str) -> None:
    agent, server = connect()
    open_accepted(agent, server)  # 1
    agent.open_stream("waiting.example", 443)  # 3
    deliver(agent, server)
    conn = agent if receiver == "agent" else server
    with pytest.raises(ProtocolError, match=message) as caught:
        conn.receive_data(blob)
    assert caught.value.reason is GoAwayReason.PROTOCOL_ERROR


def test_data_after_fin_is_a_protocol_error() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    server.end_stream(sid)
    deliver(server, agent)
    with pytest.raises(ProtocolError, match=f"DATA on stream {sid} after FIN"):
        agent.receive_data(raw(FrameType.DATA, sid, b"late"))


def test_second_fin_is_a_protocol_error() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    agent.end_stream(sid)
    deliver(agent, server)
    with pytest.raises(ProtocolError, match="second FIN"):
        server.receive_data(raw(FrameType.FIN, sid))


def test_open_fail_for_a_closed_stream_is_still_checked() -> None:
    agent, server = connect()
    sid = agent.open_stream("x.example", 443)
    agent.reset_stream(sid, FailReason.CANCELLED)
    with pytest.raises(ProtocolError, match="OPEN_FAIL"):
        agent.receive_data(raw(FrameType.OPEN_FAIL, sid, b""))


# ----------------------------------------------------------------------------- local misuse


def test_local_misuse_raises_usage_error() -> None:
    with pytest.raises(UsageError):
        TunnelConnection(Role.AGENT, "x", max_payload=MIN_PAYLOAD_LIMIT - 1)
    with pytest.raises(UsageError):
        TunnelConnection(Role.AGENT, "x", initial_window=0)
    agent, server = connect()
    with pytest.raises(UsageError, match="HELLO already sent"):
        agent.initiate()
    with pytest.raises(UsageError, match="only the agent opens streams"):
        server.open_stream("x.example", 443)
    with pytest.raises(UsageError, match="8 bytes"):
        agent.ping(b"short")
    with pytest.raises(UsageError):
        agent.send_data(99, b"x")
    sid = agent.open_stream("x.example", 443)
    with pytest.raises(UsageError, match="not waiting to be accepted"):
        agent.accept_stream(sid)
    with pytest.raises(UsageError, match="not waiting to be accepted"):
        agent.reject_stream(sid, FailReason.POLICY, "agents do not reject")
    with pytest.raises(UsageError):
        server.accept_stream(sid)  # the OPEN has not arrived yet
    deliver(agent, server)
    with pytest.raises(UsageError, match="not open for sending"):
        server.send_data(sid, b"x")  # the agent may send while opening (0-RTT), the server may not
    with pytest.raises(UsageError):
        server.end_stream(sid)
    lone = TunnelConnection(Role.AGENT, "x")
    with pytest.raises(UsageError, match="handshake"):
        lone.open_stream("x.example", 443)


def test_stream_ids_run_out_with_a_usage_error_not_a_struct_error() -> None:
    agent, _server = connect()
    agent._next_stream_id = 2**32 - 1  # as if four billion streams had been opened
    with pytest.raises(UsageError, match="stream ids exhausted"):
        agent.open_stream("x.example", 443)


def test_goaway_during_the_handshake_keeps_the_connection_closing() -> None:
    agent = TunnelConnection(Role.AGENT, "x")
    agent.initiate()
    agent.goaway(GoAwayReason.SHUTDOWN, "quitting")
    server = TunnelConnection(Role.SERVER, "y")
    server.initiate()
    deliver(server, agent)
    assert agent.state is ConnectionState.CLOSING and not agent.can_open_streams
    events = deliver(agent, server)
    assert [type(e) for e in events] == [HelloReceived, GoAwayReceived]
    agent.close()
    agent.goaway(GoAwayReason.NORMAL)  # already sent: nothing more
    assert agent.state is ConnectionState.CLOSED and agent.pending_output == 0


def test_goaway_reason_labels() -> None:
    assert [r.label for r in GoAwayReason] == [
        "normal",
        "shutdown",
        "protocol_error",
        "version_mismatch",
        "internal",
        "keepalive_timeout",
        "overload",
    ]


# ----------------------------------------------------------------------------- control plane

optional_text = st.one_of(st.none(), st.text(max_size=40))
statuses = st.builds(
    ServerStatus,
    state=st.sampled_from(list(ServerState)),
    desired_count=st.integers(0, 10_000),
    running_count=st.integers(0, 10_000),
    pending_count=st.integers(0, 10_000),
    public_ip=st.one_of(st.none(), st.ip_addresses().map(str)),
    port=st.integers(1, 65535),
    retry_after=st.one_of(st.none(), st.integers(0, 3600)),
    task_arn=optional_text,
    message=st.text(max_size=80),
)


@settings(max_examples=200)
@given(statuses)
def test_server_status_round_trips_through_json(status: ServerStatus) -> None:
    body = status.to_json()
    assert ServerStatus.from_json(body) == status
    wire = json.dumps(body).encode()
    assert ServerStatus.from_json(json.loads(wire)) == status
    assert parse_control_reply(200, wire) == status


def test_server_status_defaults() -> None:
    status = ServerStatus.from_json(
        {
            "state": "running",
            "desired_count": 1,
            "running_count": 1,
            "pending_count": 0,
            "public_ip": "203.0.113.9",
        }
    )
    assert status.port == TUNNEL_PORT == 8443
    assert status.retry_after is None and status.task_arn is None and status.message == ""


GOOD_STATUS: dict[str, Any] = {"state": "stopped", "desired_count": 0, "running_count": 0, "pending_count": 0}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "not a JSON object"),
        ("running", "not a JSON object"),
        ({}, "no valid state"),
        ({**GOOD_STATUS, "state": "sleeping"}, "no valid state: 'sleeping'"),
        ({**GOOD_STATUS, "state": ["running"]}, "no valid state"),
        ({**GOOD_STATUS, "desired_count": -1}, "desired_count is not a count"),
        ({**GOOD_STATUS, "running_count": True}, "running_count is not a count"),
        ({**GOOD_STATUS, "pending_count": "0"}, "pending_count is not a count"),
        ({k: v for k, v in GOOD_STATUS.items() if k != "pending_count"}, "pending_count is not a count"),
        ({**GOOD_STATUS, "desired_count": 10_001}, "desired_count"),
        ({**GOOD_STATUS, "public_ip": 1234}, "public_ip is not a string"),
        ({**GOOD_STATUS, "port": 0}, "port 0 is invalid"),
        ({**GOOD_STATUS, "port": 70000}, "port 70000 is invalid"),
        ({**GOOD_STATUS, "port": "8443"}, "port '8443' is invalid"),
        ({**GOOD_STATUS, "retry_after": 3601}, "retry_after 3601 is invalid"),
        ({**GOOD_STATUS, "retry_after": -1}, "retry_after"),
        ({**GOOD_STATUS, "task_arn": 5}, "task_arn is not a string"),
        ({**GOOD_STATUS, "message": None}, "message is not a string"),
    ],
)
def test_server_status_rejects_bad_shapes(body: object, message: str) -> None:
    with pytest.raises(ControlPlaneFormatError, match=message):
        ServerStatus.from_json(body)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.text(max_size=8)
    | st.sampled_from(list(ServerState)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
status_like = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        for key in (
            "state",
            "desired_count",
            "running_count",
            "pending_count",
            "public_ip",
            "port",
            "retry_after",
            "task_arn",
            "message",
        )
    },
)


@settings(max_examples=200)
@given(st.one_of(json_values, status_like))
def test_server_status_from_any_json_is_a_status_or_format_error(body: object) -> None:
    try:
        status = ServerStatus.from_json(body)
    except ControlPlaneFormatError as error:
        assert str(error)
    else:
        assert ServerStatus.from_json(status.to_json()) == status


def test_control_plane_error_round_trip() -> None:
    error = ControlPlaneError("throttled", "slow down", 429, retry_after=5)
    assert error.to_json() == {"error": "throttled", "message": "slow down", "retry_after": 5}
    assert ControlPlaneError.from_json(error.to_json(), 429) == error
    plain = ControlPlaneError("not_found", "no such service", 404)
    assert "retry_after" not in plain.to_json()
    with pytest.raises(ControlPlaneFormatError):
        ControlPlaneError.from_json({"message": "no code"}, 500)


def test_parse_control_reply_success() -> None:
    status = ServerStatus(ServerState.STARTING, 1, 0, 1, retry_after=10, message="starting up")
    assert parse_control_reply(200, json.dumps(status.to_json()).encode()) == status
    assert parse_control_reply(202, json.dumps(status.to_json()).encode()) == status


def test_parse_control_reply_error_json() -> None:
    body = json.dumps({"error": "ecs_unavailable", "message": "try again", "retry_after": 30}).encode()
    assert parse_control_reply(503, body) == ControlPlaneError("ecs_unavailable", "try again", 503, 30)
    odd = json.dumps({"error": "x", "message": 7, "retry_after": "soon"}).encode()
    assert parse_control_reply(500, odd) == ControlPlaneError("x", "7", 500, None)


def test_parse_control_reply_api_gateway_forbidden() -> None:
    reply = parse_control_reply(403, b'{"message":"Forbidden"}')
    assert reply == ControlPlaneError("forbidden", "Forbidden (check the API key)", 403)


def test_parse_control_reply_api_gateway_other_errors() -> None:
    reply = parse_control_reply(502, b'{"message": "Internal server error"}')
    assert reply == ControlPlaneError("http_502", "Internal server error", 502)
    reply = parse_control_reply(429, b'{"message":"Too Many Requests"}')
    assert isinstance(reply, ControlPlaneError) and reply.error == "http_429"


def test_parse_control_reply_non_json() -> None:
    reply = parse_control_reply(504, b"<html>Gateway Timeout</html>")
    assert reply == ControlPlaneError(
        "bad_reply", "control plane answered HTTP 504 with an HTML page (Gateway Timeout), not JSON", 504
    )
    page = b"<!DOCTYPE html>\n<html><head><title>502 Bad\n Gateway</title><style>" + b"x" * 5000
    reply = parse_control_reply(502, page + b"</style></head><body><h1>oops</h1></body></html>")
    assert isinstance(reply, ControlPlaneError)
    assert reply.message == "control plane answered HTTP 502 with an HTML page (502 Bad Gateway), not JSON"
    reply = parse_control_reply(200, b"\xff\xfe not utf-8")
    assert isinstance(reply, ControlPlaneError) and reply.error == "bad_reply"
    reply = parse_control_reply(500, b"x" * 1000)
    assert isinstance(reply, ControlPlaneError) and len(reply.message) < 300


def test_parse_control_reply_bad_success_shape_raises_format_error() -> None:
    with pytest.raises(ControlPlaneFormatError):
        parse_control_reply(200, b'{"state": "exploded"}')
    with pytest.raises(ControlPlaneFormatError):
        parse_control_reply(200, b"")


def test_parse_control_reply_deeply_nested_json_is_a_bad_reply() -> None:
    reply = parse_control_reply(500, b"[" * 100_000)
    assert isinstance(reply, ControlPlaneError) and reply.error == "bad_reply"


@pytest.mark.parametrize(("status", "code"), [(403, "forbidden"), (500, "http_500")])
def test_parse_control_reply_empty_error_body_reads_well(status: int, code: str) -> None:
    reply = parse_control_reply(status, b"")
    assert isinstance(reply, ControlPlaneError) and reply.error == code
    assert "{}" not in reply.message
    if status == 403:
        assert reply.message == "Forbidden (check the API key)"
    else:
        assert f"HTTP {status}" in reply.message


@settings(max_examples=200)
@given(
    st.integers(100, 599),
    st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())),
)
def test_parse_control_reply_never_raises_anything_but_format_error(status: int, body: bytes) -> None:
    try:
        reply = parse_control_reply(status, body)
    except ControlPlaneFormatError:
        assert 200 <= status < 300
    else:
        assert isinstance(reply, ServerStatus | ControlPlaneError)
        if isinstance(reply, ControlPlaneError):
            assert reply.http_status == status and reply.error


# ----------------------------------------------------------------------------- connection-level bounds


def connect_with_connection_window(window: int) -> tuple[TunnelConnection, TunnelConnection]:
    agent = TunnelConnection(Role.AGENT, "a", initial_window=window * 4, connection_window=window)
    server = TunnelConnection(Role.SERVER, "s", initial_window=window * 4, connection_window=window)
    agent.initiate()
    server.initiate()
    deliver(agent, server)
    deliver(server, agent)
    return agent, server


def test_the_connection_window_bounds_all_streams_together() -> None:
    agent, server = connect_with_connection_window(8192)
    first = open_accepted(agent, server, "one.example")
    second = open_accepted(agent, server, "two.example")
    assert server.send_data(first, b"a" * 6000) == 6000
    assert server.send_credit(second) == 2192  # the stream window is 32768, the tunnel's is the limit
    assert server.send_data(second, b"b" * 6000) == 2192
    assert server.send_credit(first) == 0
    deliver(server, agent)
    agent.acknowledge(first, 2048)  # a quarter of the connection window: it comes back at once
    events = deliver(agent, server)
    assert WindowOpened(0, 2048) in events
    assert server.connection_send_credit == 2048


def test_overrunning_the_connection_window_is_a_protocol_error() -> None:
    agent, server = connect_with_connection_window(4096)
    first = open_accepted(agent, server, "one.example")
    second = open_accepted(agent, server, "two.example")
    agent.receive_data(raw(FrameType.DATA, first, b"a" * 4000))
    with pytest.raises(ProtocolError, match="only 96 connection credit"):
        agent.receive_data(raw(FrameType.DATA, second, b"b" * 97))


def test_credit_of_a_dropped_stream_returns_to_the_connection() -> None:
    agent, server = connect_with_connection_window(4096)
    sid = open_accepted(agent, server)
    server.send_data(sid, b"x" * 4096)
    deliver(server, agent)
    agent.reset_stream(sid, FailReason.CANCELLED)
    agent.acknowledge(sid, 4096)  # the buffered bytes were thrown away with the stream
    frames = sent_frames(agent)
    assert Frame(FrameType.WINDOW, 0, struct.pack(">I", 4096)) in frames


def test_data_in_flight_for_a_reset_stream_gives_its_credit_back() -> None:
    agent, server = connect_with_connection_window(4096)
    sid = open_accepted(agent, server)
    agent.reset_stream(sid, FailReason.CANCELLED)
    agent.data_to_send()
    assert agent.receive_data(raw(FrameType.DATA, sid, b"z" * 1024)) == []
    assert sent_frames(agent) == [Frame(FrameType.WINDOW, 0, struct.pack(">I", 1024))]


def test_a_ping_flood_owes_one_pong() -> None:
    agent, server = connect()
    flood = b"".join(raw(FrameType.PING, 0, i.to_bytes(8, "big")) for i in range(5000))
    events = server.receive_data(flood)
    assert len(events) == 5000
    assert server.pending_output == HEADER_SIZE + 8
    assert sent_frames(server) == [Frame(FrameType.PONG, 0, (4999).to_bytes(8, "big"))]


def test_replies_the_peer_never_reads_are_bounded() -> None:
    agent, server = connect()
    server.max_control_backlog = 4096
    opens = []
    sid = 1
    for _ in range(400):
        opens.append(raw(FrameType.OPEN, sid, encode_open("example.com", 443)))
        sid += 2
    with pytest.raises(ProtocolError) as caught:
        for frame in opens:
            for event in server.receive_data(frame):
                assert isinstance(event, StreamOpenRequested)
                server.reject_stream(event.stream_id, FailReason.LIMIT, "too many streams")
    assert caught.value.reason is GoAwayReason.OVERLOAD


def test_hello_without_a_connection_window_means_no_connection_limit() -> None:
    body = json.dumps({"protocol": 1, "peer": "agent", "software": "old"}).encode()
    assert Hello.decode(body).connection_window == MAX_WINDOW


# ----------------------------------------------------------------------------- the output scheduler


def test_a_small_stream_goes_out_before_the_rest_of_a_bulk_stream() -> None:
    agent, server = connect(agent_window=8 * 1024 * 1024)
    bulk = open_accepted(agent, server, "bulk.example")
    small = open_accepted(agent, server, "small.example")
    server.send_data(bulk, b"b" * (1024 * 1024))
    server.send_data(small, b"tiny reply")
    first = FrameDecoder(MAX_PAYLOAD_LIMIT).feed(bytes(server.data_to_send(limit=2 * DATA_QUANTUM)))
    order = [frame.stream_id for frame in first]
    assert order.index(small) <= 1  # behind at most one quantum of the bulk stream
    ahead = first[: order.index(small)]
    assert sum(len(frame.payload) for frame in ahead) <= DATA_QUANTUM
    assert server.queued(bulk) >= 1024 * 1024 - 2 * DATA_QUANTUM and server.queued(small) == 0


def test_parallel_streams_share_the_output_evenly() -> None:
    agent, server = connect(agent_window=8 * 1024 * 1024)
    sids = [open_accepted(agent, server, f"s{i}.example") for i in range(4)]
    for sid in sids:
        server.send_data(sid, b"x" * (512 * 1024))
    sent = dict.fromkeys(sids, 0)
    for frame in FrameDecoder(MAX_PAYLOAD_LIMIT).feed(bytes(server.data_to_send(limit=512 * 1024))):
        sent[frame.stream_id] += len(frame.payload)
    assert max(sent.values()) - min(sent.values()) <= DATA_QUANTUM


def test_a_reset_stream_drops_its_queued_output_and_gets_the_credit_back() -> None:
    agent, server = connect(agent_window=8 * 1024 * 1024)
    sid = open_accepted(agent, server)
    credit = server.connection_send_credit
    server.send_data(sid, b"d" * 300_000)
    server.data_to_send(limit=16 * 1024)
    server.reset_stream(sid, FailReason.CANCELLED, "client went away")
    frames = FrameDecoder(MAX_PAYLOAD_LIMIT).feed(bytes(server.data_to_send()))
    assert [frame.type for frame in frames] == [FrameType.RESET]
    assert server.pending_output == 0
    assert server.connection_send_credit == credit - 16 * 1024  # only what left costs credit


def test_fin_follows_the_queued_data() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    server.send_data(sid, b"z" * 40_000)
    server.end_stream(sid)
    events = agent.receive_data(bytes(server.data_to_send(limit=20_000)))
    assert not any(isinstance(event, StreamEnded) for event in events)
    events = agent.receive_data(bytes(server.data_to_send()))
    assert isinstance(events[-1], StreamEnded)


def test_a_reset_can_follow_the_data_a_broken_target_sent_first() -> None:
    agent, server = connect()
    sid = open_accepted(agent, server)
    server.send_data(sid, b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
    server.reset_stream(sid, FailReason.CANCELLED, "target reset", discard_queued=False)
    events = agent.receive_data(bytes(server.data_to_send()))
    assert [type(event) for event in events] == [DataReceived, StreamReset]
