"""Fluidity wire protocol and control-plane messages, sans I/O.

One module shared by the agent, the tunnel server and the Lambda handlers. It turns
bytes into typed events and method calls into bytes, and keeps the per-connection and
per-stream state (handshake, stream lifecycle, credit-based flow control). It never
touches sockets, threads or clocks, so it can be fuzzed and reasoned about alone;
the event-loop I/O, shared by the agent and the server, lives in ``server.tunnel_session``.

Wire format: every frame is a 10-byte header ``type:u8 flags:u8 stream:u32 length:u32``
followed by ``length`` payload bytes. Stream 0 carries connection-level frames.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.errors import FluidityError

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_PAYLOAD = 64 * 1024
DEFAULT_INITIAL_WINDOW = 1024 * 1024
#: What a receiver lets all streams of one tunnel have in flight together (as HTTP/2's
#: connection window): the sum of stream buffers stays bounded whatever the stream count.
DEFAULT_CONNECTION_WINDOW = 16 * 1024 * 1024
#: DATA frames are cut to this size when several streams have output, so a stream with a few
#: bytes to send waits for at most one such frame per busy stream, not for a whole window.
DATA_QUANTUM = 16 * 1024
#: Smallest credit return worth a WINDOW frame (see ``_credit_batch``).
CREDIT_BATCH_MIN = 32 * 1024
#: Control frames the peer's input made us queue (OPEN_FAIL, RESET, WINDOW) may not pile up
#: beyond this while the peer does not read them; PONGs are coalesced and never pile up.
DEFAULT_MAX_CONTROL_BACKLOG = 256 * 1024
#: Hard ceiling for any negotiated payload size, so a hostile peer cannot make us allocate gigabytes.
MAX_PAYLOAD_LIMIT = 16 * 1024 * 1024
MIN_PAYLOAD_LIMIT = 1024
MAX_WINDOW = 2**31 - 1
MAX_HOST_LENGTH = 255
MAX_MESSAGE_LENGTH = 1000  # a GOAWAY (5 + 1000 bytes) still fits the smallest max_payload, 1024
PING_LENGTH = 8
#: A HELLO is small JSON; cap it separately so the handshake cannot be used to send huge blobs.
MAX_HELLO_LENGTH = 4096


class FrameType(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    OPEN_OK = 3
    OPEN_FAIL = 4
    DATA = 5
    FIN = 6
    RESET = 7
    WINDOW = 8
    PING = 9
    PONG = 10
    GOAWAY = 11


CONNECTION_FRAMES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GOAWAY})
#: Frames that may be sent on stream 0 (connection-level) as well as on a stream.
EITHER_LEVEL_FRAMES = frozenset({FrameType.WINDOW})


#: The largest reason code OPEN_FAIL and RESET can carry (one byte on the wire).
MAX_WIRE_REASON = 0xFF


class FailReason(enum.IntEnum):
    """Why a stream could not be opened or was reset; ``.label`` is the machine-readable name.

    One enum for every failure a stream can report, wherever it happened, so the proxy and
    the SOCKS handshake key their answers on it. Codes up to MAX_WIRE_REASON are wire
    codes; the codes above it are the agent's own findings (no server sent them) and can
    never be encoded: the encoder refuses them, and a one-byte decoder cannot produce them.
    """

    DNS = 1
    REFUSED = 2
    TIMEOUT = 3
    UNREACHABLE = 4
    POLICY = 5
    LIMIT = 6
    SHUTTING_DOWN = 7
    INTERNAL = 8
    CANCELLED = 9
    #: Agent side only: there is no usable tunnel to send the OPEN on. Never on the wire.
    TUNNEL_DOWN = 0x100

    @property
    def label(self) -> str:
        """The name logs, error pages and SOCKS diagnostics show, e.g. ``shutting_down``."""
        return self.name.lower()

    @property
    def on_wire(self) -> bool:
        """True for the codes a peer may send: the only ones OPEN_FAIL and RESET can carry."""
        return self.value <= MAX_WIRE_REASON


class GoAwayReason(enum.IntEnum):
    NORMAL = 0
    SHUTDOWN = 1
    PROTOCOL_ERROR = 2
    VERSION_MISMATCH = 3
    INTERNAL = 4
    KEEPALIVE_TIMEOUT = 5
    OVERLOAD = 6  # the peer made us queue more replies than it read

    @property
    def label(self) -> str:
        return self.name.lower()


class ProtocolError(FluidityError):
    """The one error a peer's bytes can raise; the I/O layer answers it with GOAWAY and closes."""

    def __init__(self, message: str, reason: GoAwayReason = GoAwayReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class UsageError(FluidityError):
    """Raised when the local program misuses the state machine (a bug here, not the peer's fault)."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    stream_id: int
    payload: bytes = b""
    flags: int = 0


class FrameDecoder:
    """Incremental byte-to-frame decoder; enforces the header-level rules only."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= HEADER_SIZE:
            ftype, flags, stream_id, length = HEADER.unpack_from(buf, offset)
            try:
                kind = FrameType(ftype)
            except ValueError:
                raise ProtocolError(f"unknown frame type {ftype}") from None
            limit = MAX_HELLO_LENGTH if kind is FrameType.HELLO else self.max_payload
            if length > limit:
                raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {limit}")
            if len(buf) - offset - HEADER_SIZE < length:
                break
            start = offset + HEADER_SIZE
            with memoryview(buf) as view:
                payload = bytes(view[start : start + length])
            frames.append(Frame(kind, stream_id, payload, flags))
            offset = start + length
        if offset:
            del buf[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --------------------------------------------------------------------------- payload codecs

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_REASON = struct.Struct(">B")
_GOAWAY = struct.Struct(">BI")


@dataclass(frozen=True, slots=True)
class Hello:
    peer: str
    software: str
    protocol: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = ()
    max_payload: int = DEFAULT_MAX_PAYLOAD
    initial_window: int = DEFAULT_INITIAL_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW

    def encode(self) -> bytes:
        body = {
            "protocol": self.protocol,
            "peer": self.peer,
            "software": self.software,
            "capabilities": list(self.capabilities),
            "max_payload": self.max_payload,
            "initial_window": self.initial_window,
            "connection_window": self.connection_window,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError("HELLO payload is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError("HELLO payload is not a JSON object")
        protocol = body.get("protocol")
        if not isinstance(protocol, int) or isinstance(protocol, bool):
            raise ProtocolError("HELLO has no protocol version")
        if protocol != PROTOCOL_VERSION:
            # Judged before any other field: a newer HELLO may have changed them all.
            raise ProtocolError(
                f"peer speaks Fluidity protocol {protocol} "
                f"({body.get('peer')} {body.get('software')}); "
                f"this side speaks {PROTOCOL_VERSION}: upgrade the older side",
                GoAwayReason.VERSION_MISMATCH,
            )
        peer = body.get("peer")
        software = body.get("software", "")
        caps = body.get("capabilities", [])
        max_payload = body.get("max_payload", DEFAULT_MAX_PAYLOAD)
        window = body.get("initial_window", DEFAULT_INITIAL_WINDOW)
        connection_window = body.get("connection_window", MAX_WINDOW)
        if not isinstance(peer, str) or not isinstance(software, str):
            raise ProtocolError("HELLO peer and software must be strings")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ProtocolError("HELLO capabilities must be a list of strings")
        if not _is_int_in(max_payload, MIN_PAYLOAD_LIMIT, MAX_PAYLOAD_LIMIT):
            raise ProtocolError(f"HELLO max_payload {max_payload!r} is out of range")
        if not _is_int_in(window, 1, MAX_WINDOW):
            raise ProtocolError(f"HELLO initial_window {window!r} is out of range")
        if not _is_int_in(connection_window, 1, MAX_WINDOW):
            raise ProtocolError(f"HELLO connection_window {connection_window!r} is out of range")
        return cls(peer, software, protocol, tuple(caps), max_payload, window, connection_window)


def _is_int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def encode_open(host: str, port: int) -> bytes:
    try:
        raw = host.encode("idna") if not host.isascii() else host.encode("ascii")
    except UnicodeError:
        raise UsageError(f"host name {host!r} cannot be IDNA-encoded") from None
    if not raw or len(raw) > MAX_HOST_LENGTH:
        raise UsageError(f"host name must be 1..{MAX_HOST_LENGTH} bytes")
    if not _is_clean_host(raw.decode("ascii")):
        raise UsageError(f"host name {host!r} has control or space characters")
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} out of range")
    return _U16.pack(port) + raw


def decode_open(payload: bytes) -> tuple[str, int]:
    if len(payload) < 3 or len(payload) > 2 + MAX_HOST_LENGTH:
        raise ProtocolError("OPEN payload has a bad length")
    (port,) = _U16.unpack_from(payload)
    if port == 0:
        raise ProtocolError("OPEN names port 0")
    try:
        host = payload[2:].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("OPEN host is not ASCII") from None
    if not _is_clean_host(host):
        raise ProtocolError("OPEN host has control or space characters")
    return host, port


def _is_clean_host(host: str) -> bool:
    """The one rule both ends apply, so the agent never sends an OPEN the server must reject."""
    return host.isprintable() and not any(c.isspace() for c in host)


def _encode_reason(reason: FailReason, message: str) -> bytes:
    """An OPEN_FAIL or RESET payload; an agent-side reason (not ``on_wire``) is a caller bug."""
    if not reason.on_wire:
        raise UsageError(f"fail reason {reason.label} is the agent's own and never goes on the wire")
    return _REASON.pack(reason) + message.encode("utf-8", "replace")[:MAX_MESSAGE_LENGTH]


def _decode_reason(payload: bytes, what: str) -> tuple[FailReason, str]:
    if not payload or len(payload) > 1 + MAX_MESSAGE_LENGTH:
        raise ProtocolError(f"{what} payload has a bad length")
    try:  # one byte: only wire codes (<= MAX_WIRE_REASON) can come out of it
        reason = FailReason(payload[0])
    except ValueError:
        raise ProtocolError(f"{what} has unknown reason {payload[0]}") from None
    return reason, payload[1:].decode("utf-8", "replace")


def _decode_goaway(payload: bytes) -> tuple[GoAwayReason, int, str]:
    if len(payload) < _GOAWAY.size or len(payload) > _GOAWAY.size + MAX_MESSAGE_LENGTH:
        raise ProtocolError("GOAWAY payload has a bad length")
    code, last = _GOAWAY.unpack_from(payload)
    try:
        reason = GoAwayReason(code)
    except ValueError:
        raise ProtocolError(f"GOAWAY has unknown reason {code}") from None
    return reason, last, payload[_GOAWAY.size :].decode("utf-8", "replace")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HelloReceived:
    hello: Hello


@dataclass(frozen=True, slots=True)
class StreamOpenRequested:
    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamOpenFailed:
    stream_id: int
    reason: FailReason
    message: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream: no more DATA will come from it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    reason: FailReason
    message: str


@dataclass(frozen=True, slots=True)
class WindowOpened:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    reason: GoAwayReason
    last_stream_id: int
    message: str


Event = (
    HelloReceived
    | StreamOpenRequested
    | StreamOpened
    | StreamOpenFailed
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingReceived
    | PongReceived
    | GoAwayReceived
)


# --------------------------------------------------------------------------- state machine


class Role(enum.Enum):
    AGENT = "agent"
    SERVER = "server"


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # a GOAWAY went one way or the other: no new streams
    CLOSED = "closed"


class StreamState(enum.Enum):
    OPENING = "opening"
    OPEN = "open"


@dataclass(slots=True)
class _Outgoing:
    """DATA (and a FIN after it) queued for one stream, waiting for its turn on the tunnel."""

    chunks: deque[bytes | memoryview] = field(default_factory=deque)  # a cut head is a view: no copy
    size: int = 0
    fin: bool = False
    reset: bytes | None = None  # a RESET payload to send once the data is out


@dataclass(slots=True)
class _Stream:
    state: StreamState
    send_credit: int
    recv_remaining: int  # bytes the peer may still send before we grant more
    window: int  # credit granted in all: recv_remaining + unread + unacked (negative unacked: a shrink)
    unacked: int = 0  # bytes consumed locally but not yet returned to the peer as credit
    local_fin: bool = False
    remote_fin: bool = False


@dataclass(slots=True)
class TunnelConnection:
    """The per-tunnel protocol state of one side; call methods, then send ``data_to_send()``."""

    role: Role
    software: str
    max_payload: int = DEFAULT_MAX_PAYLOAD
    initial_window: int = DEFAULT_INITIAL_WINDOW
    capabilities: tuple[str, ...] = ()
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_control_backlog: int = DEFAULT_MAX_CONTROL_BACKLOG
    state: ConnectionState = ConnectionState.HANDSHAKE
    peer_hello: Hello | None = None
    _out: bytearray = field(default_factory=bytearray)  # control frames: they always go first
    _outgoing: dict[int, _Outgoing] = field(default_factory=dict)
    _ready: deque[int] = field(default_factory=deque)  # streams with output, in round-robin order
    _queued_data: int = 0
    _pong: bytes | None = None  # the one PONG owed to the peer (later PINGs replace it)
    _control_backlog: int = 0  # bytes of non-DATA frames queued since the last data_to_send()
    _conn_send_credit: int = 0  # connection-level DATA bytes we may still send
    _conn_recv_remaining: int = 0  # connection-level DATA bytes the peer may still send
    _conn_unacked: int = 0
    _stream_window: int = 0  # 0: initial_window (see set_stream_window)
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _decoder: FrameDecoder | None = None
    _next_stream_id: int = 1
    _highest_peer_stream: int = 0
    _hello_sent: bool = False
    goaway_sent: bool = False
    goaway_received: bool = False

    def __post_init__(self) -> None:
        if not MIN_PAYLOAD_LIMIT <= self.max_payload <= MAX_PAYLOAD_LIMIT:
            raise UsageError(f"max_payload must be {MIN_PAYLOAD_LIMIT}..{MAX_PAYLOAD_LIMIT}")
        if not 1 <= self.initial_window <= MAX_WINDOW:
            raise UsageError("initial_window out of range")
        if not 1 <= self.connection_window <= MAX_WINDOW:
            raise UsageError("connection_window out of range")
        self._decoder = FrameDecoder(self.max_payload)
        self._conn_recv_remaining = self.connection_window

    # ----- outbound -------------------------------------------------------

    def initiate(self) -> None:
        """Queue our HELLO; both sides send one first thing."""
        if self._hello_sent:
            raise UsageError("HELLO already sent")
        hello = Hello(
            self.role.value,
            self.software,
            PROTOCOL_VERSION,
            self.capabilities,
            self.max_payload,
            self.initial_window,
            self.connection_window,
        )
        self._emit(FrameType.HELLO, 0, hello.encode())
        self._hello_sent = True

    def data_to_send(self, limit: int | None = None, quantum: int = DATA_QUANTUM) -> bytearray:
        """Frames for the peer: every control frame, then DATA round-robin across streams.

        ``limit`` (bytes, roughly) bounds the DATA taken now, so what has not left yet can
        still be reordered: a stream that queues a little goes out in the next turn instead
        of behind megabytes of another stream's data. Without a limit, everything queued.
        ``quantum`` is each busy stream's turn (the I/O layer may size it to the link: a
        turn is a wait for the others, so a few ms of link time, not a fixed byte count).
        """
        if self._pong is not None:
            self._out += HEADER.pack(FrameType.PONG, 0, 0, PING_LENGTH)
            self._out += self._pong
            self._pong = None
        out = self._out
        self._out = bytearray()
        self._control_backlog = 0
        ready = self._ready
        if ready:
            budget = self._queued_data if limit is None else limit
            if len(ready) == 1:
                quantum = budget  # alone, a stream takes whole frames
            while ready and budget > 0:
                sid = ready.popleft()
                queue = self._outgoing[sid]
                budget -= self._take(queue, sid, min(quantum, budget), out)
                if queue.size:
                    ready.append(sid)
                else:
                    if queue.fin:
                        out += HEADER.pack(FrameType.FIN, 0, sid, 0)
                    if queue.reset is not None:
                        out += HEADER.pack(FrameType.RESET, 0, sid, len(queue.reset))
                        out += queue.reset
                    del self._outgoing[sid]
        return out

    def _take(self, queue: _Outgoing, sid: int, amount: int, out: bytearray) -> int:
        """Move up to ``amount`` bytes of ``queue`` into ``out`` as DATA frames of max_payload."""
        assert self.peer_hello is not None
        frame = self.peer_hello.max_payload
        taken = 0
        chunks = queue.chunks
        while chunks and taken < amount:
            chunk = chunks[0]
            size = min(len(chunk), amount - taken, frame)
            out += HEADER.pack(FrameType.DATA, 0, sid, size)
            if size == len(chunk):
                out += chunk
                chunks.popleft()
            else:  # the rest stays a view of the same bytes (a copy per cut would be quadratic)
                view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                out += view[:size]
                chunks[0] = view[size:]
            taken += size
        queue.size -= taken
        self._queued_data -= taken
        return taken

    @property
    def pending_output(self) -> int:
        """Bytes waiting to leave: control frames, the owed PONG and queued DATA."""
        pong = HEADER_SIZE + PING_LENGTH if self._pong is not None else 0
        return len(self._out) + pong + self._queued_data

    def queued(self, stream_id: int) -> int:
        """DATA bytes of this stream that have not left yet."""
        queue = self._outgoing.get(stream_id)
        return queue.size if queue is not None else 0

    @property
    def connection_send_credit(self) -> int:
        """DATA bytes all streams together may still send before the peer's connection window."""
        return self._conn_send_credit

    @property
    def can_open_streams(self) -> bool:
        return self.state is ConnectionState.OPEN and self.role is Role.AGENT

    def open_stream(self, host: str, port: int) -> int:
        if self.role is not Role.AGENT:
            raise UsageError("only the agent opens streams")
        if self.state is not ConnectionState.OPEN:
            raise UsageError(f"cannot open a stream while the connection is {self.state.value}")
        payload = encode_open(host, port)
        stream_id = self._next_stream_id
        if stream_id > 2**32 - 2:
            raise UsageError("stream ids exhausted; open a new connection")
        self._next_stream_id += 2
        assert self.peer_hello is not None
        self._streams[stream_id] = _Stream(
            StreamState.OPENING, self.peer_hello.initial_window, self.initial_window, self.initial_window
        )
        self._emit(FrameType.OPEN, stream_id, payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        stream = self._require(stream_id)
        if self.role is not Role.SERVER or stream.state is not StreamState.OPENING:
            raise UsageError(f"stream {stream_id} is not waiting to be accepted")
        stream.state = StreamState.OPEN
        self._emit(FrameType.OPEN_OK, stream_id)

    def reject_stream(self, stream_id: int, reason: FailReason, message: str) -> None:
        stream = self._require(stream_id)
        if self.role is not Role.SERVER or stream.state is not StreamState.OPENING:
            raise UsageError(f"stream {stream_id} is not waiting to be accepted")
        payload = _encode_reason(reason, message)  # before the stream is forgotten: it may refuse
        del self._streams[stream_id]
        self._emit(FrameType.OPEN_FAIL, stream_id, payload)

    def send_credit(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on the stream now (0 if closed or blocked)."""
        stream = self._streams.get(stream_id)
        if stream is None or not self._may_send(stream):
            return 0
        return min(stream.send_credit, self._conn_send_credit)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the stream's credit allows; returns the bytes taken.

        The agent may send on a stream it is still opening (0-RTT): the server holds the
        bytes, within the window, until its dial completes.
        """
        stream = self._require(stream_id)
        if not self._may_send(stream):
            raise UsageError(f"stream {stream_id} is not open for sending")
        taken = min(len(data), stream.send_credit, self._conn_send_credit)
        if taken:
            queue = self._outgoing.get(stream_id)
            if queue is None:
                queue = self._outgoing[stream_id] = _Outgoing()
                self._ready.append(stream_id)
            queue.chunks.append(bytes(data[:taken]))
            queue.size += taken
            self._queued_data += taken
            stream.send_credit -= taken
            self._conn_send_credit -= taken
        return taken

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (after what is queued for it)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_fin:
            return
        if not self._may_send(stream):
            raise UsageError(f"stream {stream_id} is not open")
        stream.local_fin = True
        queue = self._outgoing.get(stream_id)
        if queue is not None:
            queue.fin = True
        else:
            self._emit(FrameType.FIN, stream_id)
        self._maybe_forget(stream_id, stream)

    def reset_stream(
        self, stream_id: int, reason: FailReason, message: str = "", *, discard_queued: bool = True
    ) -> None:
        """Abort the stream. What it still had queued never leaves (and costs no link time),
        unless ``discard_queued`` is False: then the RESET follows that data (a target that
        answered and then broke: its answer still counts)."""
        payload = _encode_reason(reason, message)  # before the stream is forgotten: it may refuse
        if self._streams.pop(stream_id, None) is None:
            return
        queue = self._outgoing.get(stream_id)
        if queue is not None and not discard_queued:
            queue.reset = payload
            return
        self._drop_outgoing(stream_id)
        self._emit(FrameType.RESET, stream_id, payload)

    def _may_send(self, stream: _Stream) -> bool:
        if stream.local_fin:
            return False
        return stream.state is StreamState.OPEN or self.role is Role.AGENT

    def _drop_outgoing(self, stream_id: int) -> None:
        queue = self._outgoing.pop(stream_id, None)
        if queue is None:
            return
        self._queued_data -= queue.size
        self._conn_send_credit += queue.size  # never sent: the peer's window never saw it
        try:
            self._ready.remove(stream_id)
        except ValueError:
            pass

    def acknowledge(self, stream_id: int, consumed: int) -> None:
        """The application has consumed (or discarded) ``consumed`` received bytes: return credit.

        The connection-level credit always comes back, also for a stream that is gone (its
        buffered data was dropped), or the tunnel's window would leak shut. Credit is
        returned in batches of an eighth of the window so WINDOW frames stay rare; a stream
        whose window was resized (``set_stream_window``) gets the difference here.
        """
        if consumed <= 0:
            return
        self._return_connection_credit(consumed)
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin:
            return
        stream.unacked += consumed
        target = self._stream_window or self.initial_window
        if target != stream.window:
            stream.unacked += target - stream.window
            stream.window = target
        if stream.unacked >= _credit_batch(stream.window) and stream.state is StreamState.OPEN:
            self._emit(FrameType.WINDOW, stream_id, _U32.pack(stream.unacked))
            stream.recv_remaining += stream.unacked
            stream.unacked = 0

    def set_stream_window(self, size: int) -> None:
        """Resize every stream's receive window (e.g. to the measured bandwidth-delay product).

        It takes effect as credit is returned: a larger window is granted with the next
        WINDOW frame, a smaller one by holding back returns, never by taking credit back.
        """
        if not 1 <= size <= MAX_WINDOW:
            raise UsageError(f"stream window {size} out of range")
        self._stream_window = size

    @property
    def stream_window(self) -> int:
        """The receive window streams are sized to now."""
        return self._stream_window or self.initial_window

    def _return_connection_credit(self, consumed: int) -> None:
        self._conn_unacked += consumed
        if self._conn_unacked >= max(1, self.connection_window // 4) and self.state is not (
            ConnectionState.CLOSED
        ):
            self._emit(FrameType.WINDOW, 0, _U32.pack(self._conn_unacked))
            self._conn_recv_remaining += self._conn_unacked
            self._conn_unacked = 0

    def ping(self, opaque: bytes) -> None:
        if len(opaque) != PING_LENGTH:
            raise UsageError("ping payload must be 8 bytes")
        self._emit(FrameType.PING, 0, opaque)

    def goaway(self, reason: GoAwayReason, message: str = "") -> None:
        if self.goaway_sent:
            return
        self.goaway_sent = True
        payload = (
            _GOAWAY.pack(reason, self._highest_peer_stream)
            + message.encode("utf-8", "replace")[:MAX_MESSAGE_LENGTH]
        )
        self._emit(FrameType.GOAWAY, 0, payload)
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.CLOSING

    def close(self) -> None:
        self.state = ConnectionState.CLOSED
        self._streams.clear()
        self._outgoing.clear()
        self._ready.clear()
        self._queued_data = 0

    # ----- inbound --------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; returns the events they carry, in order."""
        if self.state is ConnectionState.CLOSED:
            return []
        assert self._decoder is not None
        events: list[Event] = []
        for frame in self._decoder.feed(data):
            event = self._handle(frame)
            if event is not None:
                events.append(event)
        if self._control_backlog > self.max_control_backlog:
            raise ProtocolError(
                f"peer left {self._control_backlog} bytes of our replies unread", GoAwayReason.OVERLOAD
            )
        return events

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # ----- internals ------------------------------------------------------

    def _emit(self, ftype: FrameType, stream_id: int, payload: bytes | memoryview = b"") -> None:
        self._out += HEADER.pack(ftype, 0, stream_id, len(payload))
        self._out += payload
        self._control_backlog += HEADER_SIZE + len(payload)

    def _require(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise UsageError(f"stream {stream_id} is not open")
        return stream

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_fin and stream.remote_fin:
            del self._streams[stream_id]

    def _handle(self, frame: Frame) -> Event | None:
        ftype = frame.type
        if self.peer_hello is None:
            if ftype is not FrameType.HELLO:
                raise ProtocolError(f"expected HELLO first, got {ftype.name}")
            return self._on_hello(frame)
        if ftype in CONNECTION_FRAMES:
            if frame.stream_id != 0:
                raise ProtocolError(f"{ftype.name} must be on stream 0")
        elif frame.stream_id == 0:
            if ftype in EITHER_LEVEL_FRAMES:
                return self._on_connection_window(frame)
            raise ProtocolError(f"{ftype.name} must not be on stream 0")
        if ftype is FrameType.HELLO:
            raise ProtocolError("second HELLO")
        if ftype is FrameType.PING:
            if len(frame.payload) != PING_LENGTH:
                raise ProtocolError("PING payload must be 8 bytes")
            self._pong = frame.payload  # coalesced: a PING flood owes one PONG, not thousands
            return PingReceived(frame.payload)
        if ftype is FrameType.PONG:
            if len(frame.payload) != PING_LENGTH:
                raise ProtocolError("PONG payload must be 8 bytes")
            return PongReceived(frame.payload)
        if ftype is FrameType.GOAWAY:
            reason, last, message = _decode_goaway(frame.payload)
            self.goaway_received = True
            if self.state is ConnectionState.OPEN:
                self.state = ConnectionState.CLOSING
            return GoAwayReceived(reason, last, message)
        if ftype is FrameType.OPEN:
            return self._on_open(frame)
        return self._on_stream_frame(frame)

    def _on_hello(self, frame: Frame) -> Event:
        if frame.stream_id != 0:
            raise ProtocolError("HELLO must be on stream 0")
        hello = Hello.decode(frame.payload)  # refuses another protocol version itself
        expected = Role.SERVER if self.role is Role.AGENT else Role.AGENT
        if hello.peer != expected.value:
            raise ProtocolError(f"peer says it is {hello.peer!r}, expected {expected.value!r}")
        self.peer_hello = hello
        self._conn_send_credit = hello.connection_window
        if self.state is ConnectionState.HANDSHAKE:
            self.state = ConnectionState.OPEN
        return HelloReceived(hello)

    def _on_open(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        if self.role is not Role.SERVER:
            raise ProtocolError("server must not open streams")
        if sid % 2 == 0 or sid <= self._highest_peer_stream:
            raise ProtocolError(f"OPEN with invalid stream id {sid}")
        host, port = decode_open(frame.payload)
        self._highest_peer_stream = sid
        assert self.peer_hello is not None
        self._streams[sid] = _Stream(
            StreamState.OPENING, self.peer_hello.initial_window, self.initial_window, self.initial_window
        )
        if self.goaway_sent:
            self.reject_stream(sid, FailReason.SHUTTING_DOWN, "server is shutting down")
            return None
        return StreamOpenRequested(sid, host, port)

    def _on_connection_window(self, frame: Frame) -> Event:
        increment = _decode_window(frame.payload, self._conn_send_credit)
        self._conn_send_credit += increment
        return WindowOpened(0, increment)

    def _consume_connection_window(self, sid: int, size: int) -> None:
        if size > self._conn_recv_remaining:
            raise ProtocolError(
                f"stream {sid} sent {size} bytes with only {self._conn_recv_remaining} connection credit"
            )
        self._conn_recv_remaining -= size

    def _known_closed(self, sid: int) -> bool:
        """A frame for a stream that existed but is gone (reset race): drop it quietly."""
        if self.role is Role.SERVER:
            return sid % 2 == 1 and sid <= self._highest_peer_stream
        return sid % 2 == 1 and sid < self._next_stream_id

    def _on_stream_frame(self, frame: Frame) -> Event | None:
        sid = frame.stream_id
        ftype = frame.type
        stream = self._streams.get(sid)
        if stream is None:
            if self._known_closed(sid):
                if ftype is FrameType.OPEN_FAIL:
                    _decode_reason(frame.payload, "OPEN_FAIL")
                elif ftype is FrameType.DATA:  # in flight when we reset it: the credit comes back
                    self._consume_connection_window(sid, len(frame.payload))
                    self._return_connection_credit(len(frame.payload))
                return None
            raise ProtocolError(f"{ftype.name} for unknown stream {sid}")
        if ftype is FrameType.OPEN_OK or ftype is FrameType.OPEN_FAIL:
            if self.role is not Role.AGENT or stream.state is not StreamState.OPENING:
                raise ProtocolError(f"unexpected {ftype.name} on stream {sid}")
            if ftype is FrameType.OPEN_OK:
                if frame.payload:
                    raise ProtocolError("OPEN_OK carries no payload")
                stream.state = StreamState.OPEN
                return StreamOpened(sid)
            reason, message = _decode_reason(frame.payload, "OPEN_FAIL")
            del self._streams[sid]
            self._drop_outgoing(sid)
            return StreamOpenFailed(sid, reason, message)
        if ftype is FrameType.RESET:
            reason, message = _decode_reason(frame.payload, "RESET")
            del self._streams[sid]
            self._drop_outgoing(sid)
            return StreamReset(sid, reason, message)
        if stream.state is not StreamState.OPEN and self.role is Role.AGENT:
            raise ProtocolError(f"{ftype.name} on stream {sid} before it was opened")
        if ftype is FrameType.DATA:
            if stream.remote_fin:
                raise ProtocolError(f"DATA on stream {sid} after FIN")
            size = len(frame.payload)
            if size > stream.recv_remaining:
                raise ProtocolError(
                    f"stream {sid} sent {size} bytes with only {stream.recv_remaining} credit"
                )
            self._consume_connection_window(sid, size)
            stream.recv_remaining -= size
            return DataReceived(sid, frame.payload) if size else None
        if ftype is FrameType.FIN:
            if frame.payload:
                raise ProtocolError("FIN carries no payload")
            if stream.remote_fin:
                raise ProtocolError(f"second FIN on stream {sid}")
            stream.remote_fin = True
            self._maybe_forget(sid, stream)
            return StreamEnded(sid)
        if ftype is FrameType.WINDOW:
            increment = _decode_window(frame.payload, stream.send_credit)
            stream.send_credit += increment
            return WindowOpened(sid, increment)
        raise ProtocolError(f"unexpected {ftype.name}")  # pragma: no cover - all types handled above


def _credit_batch(window: int) -> int:
    """Consumed bytes returned in one WINDOW frame: an eighth of the window, but not so little
    that small windows (many streams sharing one BDP) send a WINDOW per few kilobytes."""
    return max(1, min(window // 2, max(window // 8, CREDIT_BATCH_MIN)))


def _decode_window(payload: bytes, credit: int) -> int:
    if len(payload) != 4:
        raise ProtocolError("WINDOW payload must be 4 bytes")
    (increment,) = _U32.unpack(payload)
    if increment == 0 or credit + increment > MAX_WINDOW:
        raise ProtocolError(f"WINDOW increment {increment} is invalid")
    return increment


# --------------------------------------------------------------------------- control plane
# Replies of the Lambda control plane (Wake / Status / Kill / Sleep), built by the handlers
# and parsed by the desktop. JSON bodies; field names are the public contract.

TUNNEL_PORT = 8443


class ServerState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class ControlPlaneFormatError(FluidityError, ValueError):
    """A control-plane reply did not have the documented shape."""


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What Wake, Status and Kill answer: the service's state and, once running, where to connect."""

    state: ServerState
    desired_count: int
    running_count: int
    pending_count: int
    public_ip: str | None = None
    port: int = TUNNEL_PORT
    retry_after: int | None = None
    task_arn: str | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "desired_count": self.desired_count,
            "running_count": self.running_count,
            "pending_count": self.pending_count,
            "public_ip": self.public_ip,
            "port": self.port,
            "retry_after": self.retry_after,
            "task_arn": self.task_arn,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, body: object) -> ServerStatus:
        if not isinstance(body, dict):
            raise ControlPlaneFormatError("status reply is not a JSON object")
        try:
            state = ServerState(body["state"])
        except (KeyError, ValueError):
            raise ControlPlaneFormatError(f"status reply has no valid state: {body.get('state')!r}") from None
        counts: list[int] = []
        for key in ("desired_count", "running_count", "pending_count"):
            value = body.get(key)
            if not isinstance(value, int) or not _is_int_in(value, 0, 10_000):
                raise ControlPlaneFormatError(f"status reply field {key} is not a count: {value!r}")
            counts.append(value)
        ip = body.get("public_ip")
        port = body.get("port", TUNNEL_PORT)
        retry = body.get("retry_after")
        task = body.get("task_arn")
        message = body.get("message", "")
        if ip is not None and not isinstance(ip, str):
            raise ControlPlaneFormatError("status reply public_ip is not a string")
        if not _is_int_in(port, 1, 65535):
            raise ControlPlaneFormatError(f"status reply port {port!r} is invalid")
        if retry is not None and not _is_int_in(retry, 0, 3600):
            raise ControlPlaneFormatError(f"status reply retry_after {retry!r} is invalid")
        if task is not None and not isinstance(task, str):
            raise ControlPlaneFormatError("status reply task_arn is not a string")
        if not isinstance(message, str):
            raise ControlPlaneFormatError("status reply message is not a string")
        return cls(state, counts[0], counts[1], counts[2], ip, port, retry, task, message)


@dataclass(frozen=True, slots=True)
class ControlPlaneError:
    """An error reply: ``error`` is a stable code, ``message`` says what to do about it."""

    error: str
    message: str
    http_status: int
    retry_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body

    @classmethod
    def from_json(cls, body: object, http_status: int) -> ControlPlaneError:
        if not isinstance(body, dict) or not isinstance(body.get("error"), str):
            raise ControlPlaneFormatError("error reply has no error code")
        message = body.get("message", "")
        retry = body.get("retry_after")
        return cls(
            body["error"],
            message if isinstance(message, str) else str(message),
            http_status,
            retry if _is_int_in(retry, 0, 3600) else None,
        )


_HTML_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.I | re.S)
_HTML_TAG = re.compile(r"<[^>]*>")
#: Longest piece of a non-JSON reply quoted in an error message.
REPLY_QUOTE_LIMIT = 120


def summarise_reply_body(body: bytes) -> str:
    """A non-JSON reply in a few words: an HTML page by its title, other text by its start.

    A proxy, a captive portal or a wrong api_url answers with a whole web page; quoting it
    would bury the one useful fact (which page it is) in markup.
    """
    head = body[:65536]
    if re.search(rb"<(!doctype\s+html|html|head|body)\b", head, re.I):
        title = _HTML_TITLE.search(head)
        text = title.group(1) if title else head
        words = " ".join(_HTML_TAG.sub(" ", text.decode("utf-8", "replace")).split())
        return f"an HTML page ({_clip(words)})" if words else "an HTML page"
    words = " ".join(head[:1024].decode("utf-8", "replace").split())
    return repr(_clip(words)) if words else "an empty body"


def _clip(text: str) -> str:
    return text if len(text) <= REPLY_QUOTE_LIMIT else text[: REPLY_QUOTE_LIMIT - 1] + "…"


def parse_control_reply(http_status: int, body: bytes) -> ServerStatus | ControlPlaneError:
    """Parse an HTTP reply of the control plane (API Gateway adds its own ``{"message": ...}`` errors)."""
    try:
        parsed = json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ControlPlaneError(
            "bad_reply",
            f"control plane answered HTTP {http_status} with {summarise_reply_body(body)}, not JSON",
            http_status,
        )
    if 200 <= http_status < 300:
        return ServerStatus.from_json(parsed)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return ControlPlaneError.from_json(parsed, http_status)
    message = parsed.get("message") if isinstance(parsed, dict) else None
    code = "forbidden" if http_status == 403 else f"http_{http_status}"
    if isinstance(message, str) and message:
        text = message
    elif parsed:
        text = str(parsed)[:200]
    elif http_status == 403:
        text = "Forbidden"
    else:
        text = f"control plane answered HTTP {http_status} with an empty body"
    if http_status == 403:
        text = f"{text} (check the API key)"
    return ControlPlaneError(code, text, http_status)


# --------------------------------------------------------------------------- server metrics
# The tunnel server publishes these to CloudWatch and the Sleep Lambda reads them back;
# both take the names from here so the two sides cannot drift apart.

METRICS_NAMESPACE = "Fluidity"
METRIC_ACTIVE_CONNECTIONS = "ActiveConnections"
METRIC_ACTIVE_STREAMS = "ActiveStreams"
METRIC_LAST_ACTIVITY = "LastActivityTimestamp"
METRIC_SERVICE_DIMENSION = "Service"
DEFAULT_CLUSTER_NAME = "fluidity"
DEFAULT_SERVICE_NAME = "fluidity-server"


def metric_dimensions(service_name: str) -> list[dict[str, str]]:
    """The CloudWatch dimensions that tie a datapoint to one ECS service."""
    return [{"Name": METRIC_SERVICE_DIMENSION, "Value": service_name}]
