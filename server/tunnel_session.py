"""One tunnel on an event loop: TLS over memory BIOs, the sans-I/O protocol, and its streams.

``TunnelSession`` is the asyncio protocol of the tunnel's TCP socket. It feeds what the
socket reads through ``TlsSession`` into ``TunnelConnection`` and turns the events into
calls on the streams; everything queued for the peer leaves in one TLS write per loop
iteration. ``StreamRelay`` is the asyncio protocol of the TCP socket at a stream's local
end (the target on the server). Nothing here blocks and nothing holds more than the
windows allow:

- a stream reads its socket only into what it may send now (stream and connection credit,
  and the tunnel's output budget), straight into the protocol's buffer, so no data waits
  in between; a stream that may not send stops reading its socket;
- data from the peer is written to the local socket at once and credited back to the
  peer only while that socket keeps up, so a slow consumer holds at most one window;
- the output to the peer is taken from the protocol only while the tunnel socket keeps
  up, so replies the peer does not read pile up (bounded) inside the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from server.flow_control import WindowTuner
from server.framing import (
    DATA_QUANTUM,
    DataReceived,
    Event,
    FailReason,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    PongReceived,
    ProtocolError,
    StreamEnded,
    StreamOpened,
    StreamOpenFailed,
    StreamOpenRequested,
    StreamReset,
    TunnelConnection,
    UsageError,
    WindowOpened,
)
from server.stream_api import DialError, StreamClosedError
from server.tls import TlsError, TlsSession

#: Protocol output encrypted and written at a time while the kernel takes it all: what it does
#: not take waits in the transport (and the tunnel writes no more until that is gone) ...
FLUSH_CHUNK = 64 * 1024
#: ... so once the kernel's queue was found full (a WAN link is the bottleneck), the chunks
#: are this small, and a reply queued meanwhile waits behind at most this much of them.
FLUSH_CHUNK_FULL = 16 * 1024
#: A busy stream's turn in the tunnel's output is this much link time (at the rate the tunnel
#: has been sending), within the bounds below: 16 KiB is 6.5 ms at 20 Mbit/s, while on loopback
#: or a LAN 64 KiB turns cost a quarter of the per-frame work.
QUANTUM_TIME = 0.002
MIN_QUANTUM = 4 * 1024
MAX_QUANTUM = 64 * 1024
#: How often the sending rate behind QUANTUM_TIME is measured.
RATE_INTERVAL = 0.1
#: Unsent bytes the kernel may hold for the tunnel socket (TCP_NOTSENT_LOWAT): the rest waits
#: in the protocol's per-stream queues, where the scheduler can still put a small reply first.
NOTSENT_LOWAT = 128 * 1024
#: Linux's value where the socket module lacks the name.
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform.startswith("linux") else None)
#: Protocol output (frames not yet encrypted) a stream may add to before it must wait.
OUTPUT_BUDGET = 1024 * 1024
#: Streams that waited for the budget read again once the output is below this (not at every
#: write: pausing and resuming 64 sockets per chunk would cost more than the data).
OUTPUT_LOW = OUTPUT_BUDGET // 2
#: Largest single read from a stream's socket (one shared buffer per loop).
READ_SIZE = 256 * 1024
#: A stream's socket buffer above which received data is no longer credited back.
STREAM_WRITE_HIGH = 256 * 1024
STREAM_WRITE_LOW = 64 * 1024

OpenRequestHandler = Callable[["TunnelSession", StreamOpenRequested], None]
#: ``(up, down)`` bytes a relay moved: sent into the tunnel, and delivered from it.
ByteCounter = Callable[[int, int], None]
SessionHandler = Callable[["TunnelSession"], None]
ClosedHandler = Callable[["TunnelSession", str], None]


#: The one read buffer of the loop: each read is framed (copied into the output) before the next.
_SCRATCH = memoryview(bytearray(READ_SIZE))


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class StreamRelay(asyncio.BufferedProtocol):
    """The TCP socket at one stream's local end, relayed to and from the tunnel."""

    def __init__(
        self, session: TunnelSession, stream_id: int, target: str, sock: socket.socket | None = None
    ) -> None:
        self.session = session
        self.stream_id = stream_id
        self.target = target
        self.sock = sock  # the raw socket, to read what is left after a failed write
        self.counter: ByteCounter | None = None  # the agent's traffic meter, once it takes over
        self.transport: asyncio.Transport | None = None
        self.last_activity = session.loop.time()
        self._pending = bytearray()  # read while the stream could not send (rare: see get_buffer)
        self._reading = True
        self._write_paused = False
        self._held = 0  # received bytes not yet credited back because the socket is behind
        self._local_eof = False  # the socket said EOF; FIN follows once _pending is sent
        self._fin_sent = False
        self._remote_eof = False
        self._done = False
        self._out: list[bytes] = []  # delivered during this read of the tunnel: one write at its end
        self.finished: asyncio.Future[None] = session.loop.create_future()

    def adopt(self, transport: asyncio.Transport, *, remote_eof: bool, fin_sent: bool) -> None:
        """Take over a connected socket whose stream was served by coroutine code until now
        (the agent after CONNECT), so the rest of its life costs no coroutine hops."""
        self._remote_eof = remote_eof
        self._fin_sent = self._local_eof = fin_sent
        transport.set_protocol(self)
        self.connection_made(transport)
        if remote_eof and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                transport.abort()
                return
        if not fin_sent:
            transport.resume_reading()
        self.unblock()

    def send_first(self, data: bytes) -> None:
        """Bytes the client already sent for this stream before the relay took over."""
        self._pending += data

    # ----- the local socket -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # another loop's transports need not subclass it
        set_nodelay(transport.get_extra_info("socket"))
        self.transport.set_write_buffer_limits(high=STREAM_WRITE_HIGH, low=STREAM_WRITE_LOW)
        if self.session.read_allowance(self.stream_id) <= 0:
            self._pause()

    def get_buffer(self, sizehint: int) -> memoryview:
        allowance = self.session.read_allowance(self.stream_id)
        if allowance <= 0:  # credit went to another stream since we were last told: spill
            return _SCRATCH[:4096]
        return _SCRATCH[: min(allowance, READ_SIZE)]

    def buffer_updated(self, nbytes: int) -> None:
        if self.counter is not None:
            self.counter(nbytes, 0)
        data = _SCRATCH[:nbytes]
        self.last_activity = self.session.loop.time()
        if self._pending:
            self._pending += data
        else:
            taken = self.session.send(self.stream_id, data)
            if taken < nbytes:
                self._pending += data[taken:]
        if self._pending or self.session.read_allowance(self.stream_id) <= 0:
            self._pause()

    def eof_received(self) -> bool:
        self._local_eof = True
        self._send_fin_when_drained()
        self._finish_if_done()
        return True  # keep the socket open for what the peer still sends

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        held, self._held = self._held, 0
        self.session.consumed(self.stream_id, held)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if not self.finished.done():
            self.finished.set_result(None)
        if isinstance(exc, BrokenPipeError | ConnectionResetError) and not self._local_eof:
            self._salvage()
        self.session.relay_lost(self, exc, clean=self._fin_sent and self._remote_eof)
        if self._held:
            self.session.consumed(self.stream_id, self._held)
            self._held = 0

    def _salvage(self) -> None:
        """A write failed because the peer closed (e.g. an origin that answered an upload early
        with 413): what it sent before is still readable and goes to the tunnel before the reset."""
        sock = self.sock
        if sock is None:
            return
        try:
            while self.session.read_allowance(self.stream_id) > 0:
                data = sock.recv(min(self.session.read_allowance(self.stream_id), READ_SIZE))
                if not data:
                    break
                self.session.send(self.stream_id, data)
        except OSError:
            pass

    # ----- the tunnel side ----------------------------------------------------

    def deliver(self, data: bytes) -> None:
        self.last_activity = self.session.loop.time()
        if not self._out:
            self.session.deliveries.append(self)
        self._out.append(data)

    def write_out(self) -> None:
        """Write what this read of the tunnel delivered, in one go (fewer, larger socket writes)."""
        if not self._out or self.transport is None:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        if self.counter is not None:
            self.counter(0, len(data))
        if self._done:
            self.session.consumed(self.stream_id, len(data))
            return
        self.transport.write(data)
        if self._write_paused:
            self._held += len(data)
        else:
            self.session.consumed(self.stream_id, len(data))

    def remote_eof(self) -> None:
        self._remote_eof = True
        assert self.transport is not None
        self.write_out()
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the socket's peer is already gone
                self.transport.abort()
                return
        self._finish_if_done()

    def abort(self, message: str = "", reason: FailReason = FailReason.CANCELLED) -> None:
        """The peer reset the stream or the tunnel died: drop the socket at once."""
        self._done = True
        self.write_out()  # credits the dropped bytes back
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._done = True
        if self.transport is not None:
            self.transport.close()

    def unblock(self) -> bool:
        """Credit or budget came back: send what waits and read on; True if no longer blocked."""
        if self._done:
            return True
        if self._pending:
            taken = self.session.send(self.stream_id, self._pending)
            del self._pending[:taken]
            if self._pending:
                return False
            self._send_fin_when_drained()
        if self._local_eof:
            return True
        if self.session.read_allowance(self.stream_id) <= 0:
            return False
        if not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()
        return True

    # ----- internals ------------------------------------------------------------

    def _pause(self) -> None:
        if self._reading and self.transport is not None and not self._local_eof:
            self._reading = False
            self.transport.pause_reading()
        self.session.block(self)

    def _send_fin_when_drained(self) -> None:
        if self._local_eof and not self._pending and not self._fin_sent:
            self._fin_sent = True
            self.session.end_stream(self.stream_id)

    def _finish_if_done(self) -> None:
        if self._fin_sent and self._remote_eof and self.transport is not None:
            self.transport.close()


class TunnelStream:
    """A stream for coroutine code (the agent's HTTP exchanges): ``await recv`` / ``await sendall``.

    What the peer sends waits here, bounded by the stream window, and is credited back as
    it is read; sending waits for credit. Implements the ``ByteStream`` protocol.
    """

    def __init__(self, session: TunnelSession, stream_id: int, host: str, port: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.host = host
        self.port = port
        self.last_activity = session.loop.time()
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: StreamClosedError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._fin_sent = False
        self._closed = False
        #: Resolved by OPEN_OK, failed by OPEN_FAIL (a DialError); None once known to be open.
        self.opened: asyncio.Future[None] | None = None

    # ----- what the session calls ---------------------------------------------

    def deliver(self, data: bytes) -> None:
        self.last_activity = self.session.loop.time()
        self._buffer.append(data)
        self._buffered += len(data)
        self._wake()

    def remote_eof(self) -> None:
        self._eof = True
        self._wake()

    def abort(self, message: str = "stream closed", reason: FailReason = FailReason.CANCELLED) -> None:
        """Reset by the peer or the tunnel: what arrived before stays readable (an early 413)."""
        if self._error is None:
            self._error = StreamClosedError(message, reason)
        self._wake()

    def unblock(self) -> bool:
        self._wake()
        return True

    def open_failed(self, error: DialError) -> None:
        """The server could not dial (after we already sent, 0-RTT): reads and writes say why."""
        self._open_error = error
        self._wake()

    _open_error: DialError | None = None

    async def wait_open(self) -> None:
        """Until the server has dialed the target (OPEN_OK); raises DialError if it could not."""
        if self.opened is not None:
            await self.opened

    @property
    def buffered(self) -> int:
        """Received bytes waiting for the reader (bounded by the stream window)."""
        return self._buffered

    # ----- ByteStream ----------------------------------------------------------

    async def recv(self, max_bytes: int) -> bytes:
        while not self._buffer:
            if self._open_error is not None:
                raise self._open_error
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
        first = self._buffer[0]
        if len(first) >= max_bytes:
            data = first[:max_bytes]
            self._buffer[0] = first[max_bytes:]
            if not self._buffer[0]:
                self._buffer.popleft()
        elif len(self._buffer) == 1:
            data = self._buffer.popleft()
        else:  # several frames waiting: one larger read saves writes downstream
            parts = []
            size = 0
            while self._buffer and size + len(self._buffer[0]) <= max_bytes:
                piece = self._buffer.popleft()
                parts.append(piece)
                size += len(piece)
            data = b"".join(parts)
        self._buffered -= len(data)
        self.session.consumed(self.stream_id, len(data))
        return data

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._open_error is not None:
                raise self._open_error
            if self._error is not None:
                raise self._error
            if self._fin_sent:
                raise StreamClosedError("stream already shut down for writing", FailReason.INTERNAL)
            allowance = self.session.read_allowance(self.stream_id)
            if allowance > 0:
                taken = self.session.send(self.stream_id, view[:allowance])
                view = view[taken:]
                self.last_activity = self.session.loop.time()
                continue
            self.session.block(self)
            await self._wait()

    def shutdown_write(self) -> None:
        if not self._fin_sent and self._error is None:
            self._fin_sent = True
            self.session.end_stream(self.stream_id)

    def close(self) -> None:
        """Release the stream; resets it if either direction is still open."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = StreamClosedError("stream closed by the application", FailReason.CANCELLED)
        self._drop_buffer()
        self.session.release(self)

    def take_over(
        self, transport: asyncio.Transport, target: str, first: bytes, counter: ByteCounter | None = None
    ) -> StreamRelay:
        """Hand the stream to a ``StreamRelay`` on the client's socket (after CONNECT or 101)."""
        relay = StreamRelay(self.session, self.stream_id, target)
        relay.counter = counter
        for chunk in self._buffer:
            transport.write(chunk)
            self.session.consumed(self.stream_id, len(chunk))
        self._buffer.clear()
        self._buffered = 0
        self._closed = True
        self.session.replace(self, relay)
        if first:
            relay.send_first(first)
        relay.adopt(transport, remote_eof=self._eof, fin_sent=self._fin_sent)
        return relay

    # ----- internals -------------------------------------------------------------

    def _drop_buffer(self) -> None:
        if self._buffered:
            self.session.consumed(self.stream_id, self._buffered)  # the connection's credit comes back
        self._buffer.clear()
        self._buffered = 0

    async def _wait(self) -> None:
        self._waiter = self.session.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


StreamEnd = StreamRelay | TunnelStream


class TunnelSession(asyncio.Protocol):
    """One mTLS tunnel: handshake with a deadline, the protocol, its streams and timers."""

    def __init__(
        self,
        tls: TlsSession,
        conn: TunnelConnection,
        *,
        name: str,
        peer: str,
        logger: logging.Logger,
        handshake_timeout: float,
        dead_after: float,
        keepalive_interval: float | None = None,
        stream_idle_timeout: float = 0.0,
        window_tuner: WindowTuner | None = None,
        on_ready: SessionHandler | None = None,
        on_open_request: OpenRequestHandler | None = None,
        on_closed: ClosedHandler | None = None,
    ) -> None:
        self.tls = tls
        self.conn = conn
        self.name = name
        self.peer = peer
        self.log = logger
        self.handshake_timeout = handshake_timeout
        self.dead_after = dead_after
        self.keepalive_interval = keepalive_interval
        self.stream_idle_timeout = stream_idle_timeout
        #: Sizes the streams' receive windows to the measured BDP (None: fixed initial_window).
        self.tuner = window_tuner
        self.on_ready = on_ready
        self.on_open_request = on_open_request
        self.on_closed = on_closed
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_hello: Hello | None = None
        self.goaway: GoAwayReceived | None = None
        self.closed_reason: str | None = None
        self.tls_failure: TlsError | None = None  # why TLS failed, when it did
        self.closed = self.loop.create_future()
        self.relays: dict[int, StreamEnd] = {}
        self._opening: dict[int, asyncio.Future[None]] = {}
        #: Server side: bytes (0-RTT) and FIN that came for a stream whose dial is still running.
        self._early: dict[int, list[bytes]] = {}
        self._early_fin: set[int] = set()
        #: Work started for a stream not yet relayed (the server's dial), cancelled on RESET.
        self.pending: dict[int, asyncio.Task[Any]] = {}
        self._blocked: set[StreamEnd] = set()
        self.deliveries: list[StreamRelay] = []  # relays with data from the current read
        self._write_paused = False
        self._kernel_full = False  # the last write left bytes the kernel would not take
        self._quantum = DATA_QUANTUM
        self._rate_mark = self.loop.time()
        self._rate_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._tls_up = False
        self._timer: asyncio.TimerHandle | None = None
        self._started = self.loop.time()
        self.last_received = self._started
        self._last_ping = self._started
        self.last_activity = self._started  # stream data either way (idle detection)

    # ----- the tunnel socket --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # another loop's transports need not subclass it
        sock = transport.get_extra_info("socket")
        set_nodelay(sock)
        if sock is not None and _TCP_NOTSENT_LOWAT is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            except OSError:  # not on this OS: the transport's own limit still applies
                pass
        # Paused as soon as the kernel leaves anything unsent, resumed once all of it is gone.
        self.transport.set_write_buffer_limits(high=0, low=0)
        self._arm_timer()
        self._drive_handshake()

    def data_received(self, data: bytes) -> None:
        if self.closed_reason is not None:
            return
        self.last_received = self.loop.time()
        self.tls.receive(data)
        self._process()

    def eof_received(self) -> bool:
        if self.closed_reason is None:
            self.tls.receive_eof()
            self._process()
        if self.closed_reason is None:
            self._finish(self._describe_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._finish(self._describe_eof())
        else:
            self._finish(f"connection lost: {getattr(exc, 'strerror', None) or exc}")

    def pause_writing(self) -> None:
        self._write_paused = True
        self._kernel_full = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    # ----- what streams call ----------------------------------------------------

    @property
    def authenticated(self) -> bool:
        """TLS with a verified certificate and the peer's HELLO: past every pre-auth bound."""
        return self.peer_hello is not None

    @property
    def accepting_streams(self) -> bool:
        return self.closed_reason is None and self.goaway is None and not self.conn.goaway_sent

    @property
    def stream_count(self) -> int:
        """Streams being relayed plus streams still being set up (pending dials count too)."""
        return len(self.relays) + len(self.pending)

    def read_allowance(self, stream_id: int) -> int:
        if self.closed_reason is not None:
            return 0
        return min(self.conn.send_credit(stream_id), OUTPUT_BUDGET - self.conn.pending_output)

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        if self.closed_reason is not None or not self.conn.is_open(stream_id):
            return len(data)  # nowhere to go: the stream is being torn down
        taken = self.conn.send_data(stream_id, data)
        if taken:
            self.last_activity = self.loop.time()
            self._schedule_flush()
        return taken

    def end_stream(self, stream_id: int) -> None:
        if self.closed_reason is None and self.conn.is_open(stream_id):
            self.conn.end_stream(stream_id)
            self._schedule_flush()

    def consumed(self, stream_id: int, size: int) -> None:
        if size and self.closed_reason is None:
            self.conn.acknowledge(stream_id, size)
            if self.conn.pending_output:
                self._schedule_flush()

    def block(self, relay: StreamEnd) -> None:
        self._blocked.add(relay)

    def relay_lost(self, relay: StreamEnd, exc: Exception | None, *, clean: bool) -> None:
        self._blocked.discard(relay)
        if self.relays.get(relay.stream_id) is relay:
            del self.relays[relay.stream_id]
        if self.closed_reason is None and self.conn.is_open(relay.stream_id):
            if clean:
                return
            detail = f"connection to {getattr(relay, 'target', '?')} lost"
            if exc is not None:
                detail += f": {getattr(exc, 'strerror', None) or exc}"
            # What the socket sent before it broke still reaches the peer, then the RESET.
            self.conn.reset_stream(relay.stream_id, FailReason.CANCELLED, detail, discard_queued=False)
            self._schedule_flush()

    async def open_stream(self, host: str, port: int, timeout: float, *, wait: bool = True) -> TunnelStream:
        """Agent side: ask the server to dial ``host:port``; raises DialError.

        With ``wait`` False the stream comes back at once (0-RTT): what is sent on it leaves
        right behind the OPEN, and a failed dial surfaces as DialError from recv/sendall
        (or ``wait_open``).
        """
        if not self.accepting_streams or not self.conn.can_open_streams:
            raise DialError(FailReason.TUNNEL_DOWN, f"tunnel not usable: {self.closed_reason or 'closing'}")
        try:
            sid = self.conn.open_stream(host, port)
        except UsageError as exc:
            raise DialError(FailReason.INTERNAL, str(exc)) from None
        stream = TunnelStream(self, sid, host, port)
        self.relays[sid] = stream
        opened = self.loop.create_future()
        self._opening[sid] = opened
        self._schedule_flush()
        if not wait:
            stream.opened = opened
            opened.add_done_callback(_retrieve)
            timer = self.loop.call_later(timeout, self._open_timed_out, sid, timeout)
            opened.add_done_callback(lambda _: timer.cancel())
            return stream
        try:
            async with asyncio.timeout(timeout):
                await opened
        except TimeoutError:
            self.reset_stream(sid, FailReason.TIMEOUT, "agent gave up waiting")
            raise DialError(
                FailReason.TIMEOUT, f"no answer from the tunnel server within {timeout:g} s"
            ) from None
        except BaseException:
            self.reset_stream(sid, FailReason.CANCELLED, "cancelled by the agent")
            raise
        finally:
            self._opening.pop(sid, None)
        return stream

    def _open_timed_out(self, sid: int, timeout: float) -> None:
        opened = self._opening.pop(sid, None)
        if opened is None or opened.done():
            return
        error = DialError(FailReason.TIMEOUT, f"no answer from the tunnel server within {timeout:g} s")
        opened.set_exception(error)
        stream = self.relays.get(sid)
        self.reset_stream(sid, FailReason.TIMEOUT, "agent gave up waiting")
        if isinstance(stream, TunnelStream):
            stream.open_failed(error)

    def release(self, stream: TunnelStream) -> None:
        """A coroutine stream is done with: forget it, resetting it if it is still open."""
        self._blocked.discard(stream)
        if self.relays.get(stream.stream_id) is stream:
            del self.relays[stream.stream_id]
        if self.closed_reason is None and self.conn.is_open(stream.stream_id):
            self.conn.reset_stream(stream.stream_id, FailReason.CANCELLED, "closed by the agent")
            self._schedule_flush()

    def replace(self, old: StreamEnd, new: StreamEnd) -> None:
        self._blocked.discard(old)
        self.relays[new.stream_id] = new

    def accept_stream(self, relay: StreamRelay) -> None:
        """Server side: the target is connected; OPEN_OK, and the relay may start reading."""
        self.relays[relay.stream_id] = relay
        self.conn.accept_stream(relay.stream_id)
        early = self._early.pop(relay.stream_id, None)
        if early:
            for chunk in early:
                relay.deliver(chunk)
            relay.write_out()
        if relay.stream_id in self._early_fin:
            self._early_fin.discard(relay.stream_id)
            relay.remote_eof()
        self._blocked.add(relay)  # flush() lets it read once OPEN_OK is on its way
        self._schedule_flush()

    def reject_stream(self, stream_id: int, reason: FailReason, message: str) -> None:
        """Server side: OPEN_FAIL for a stream that could not be set up."""
        self._drop_early(stream_id)
        if self.closed_reason is None and self.conn.is_open(stream_id):
            self.conn.reject_stream(stream_id, reason, message)
            self._schedule_flush()

    def reset_stream(self, stream_id: int, reason: FailReason, message: str) -> None:
        """Abort a stream from this side (a timeout, a failed dial) and tell the peer why."""
        relay = self.relays.pop(stream_id, None)
        if self.closed_reason is None and self.conn.is_open(stream_id):
            self.conn.reset_stream(stream_id, reason, message)
            self._schedule_flush()
        if relay is not None:
            relay.abort()

    def send_goaway(self, reason: GoAwayReason, message: str) -> None:
        if self.closed_reason is None:
            self.conn.goaway(reason, message)
            self.flush()

    def close(self, reason: str, *, goaway: GoAwayReason | None = GoAwayReason.NORMAL) -> None:
        """Flush what is queued (plus a GOAWAY and close_notify), then close; streams are failed."""
        if self.closed_reason is not None or self.transport is None:
            return
        if goaway is not None:
            self.conn.goaway(goaway, reason)
        self.flush(everything=True)  # last words go out whatever the kernel's queue
        self.tls.close()
        self._write_tls()
        self._finish(reason, graceful=True)

    def abort(self, reason: str) -> None:
        self._finish(reason)

    # ----- output -----------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self, *, everything: bool = False) -> None:
        """Encrypt and write the protocol's output while the kernel takes it (see NOTSENT_LOWAT).

        What the kernel does not take yet stays in the per-stream queues, where the scheduler
        can still put a small reply ahead of a download; ``everything`` writes it all anyway.
        """
        self._flush_handle = None
        if self.closed_reason is not None or not self._tls_up:
            return
        assert self.transport is not None
        while self.conn.pending_output and (everything or not self._write_paused):
            chunk = FLUSH_CHUNK_FULL if self._kernel_full else FLUSH_CHUNK
            try:
                out = self.conn.data_to_send(limit=None if everything else chunk, quantum=self._quantum)
                self._rate_bytes += len(out)
                self.tls.write(out)
            except TlsError as exc:
                self._finish(f"TLS error: {exc}")
                return
            self._write_tls()
            if not self._write_paused:
                self._kernel_full = False  # it took all of it: larger chunks again
        self._write_tls()
        if self._blocked and self.conn.pending_output <= OUTPUT_LOW:
            self._wake_all()
        self._measure_rate()

    def _measure_rate(self) -> None:
        now = self.loop.time()
        elapsed = now - self._rate_mark
        if elapsed >= RATE_INTERVAL:
            rate = self._rate_bytes / elapsed
            self._quantum = max(MIN_QUANTUM, min(MAX_QUANTUM, int(rate * QUANTUM_TIME)))
            self._rate_mark, self._rate_bytes = now, 0

    def _write_tls(self) -> None:
        out = self.tls.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    # ----- input -------------------------------------------------------------------

    def _drive_handshake(self) -> None:
        try:
            done = self.tls.handshake()
        except TlsError as exc:
            self._write_tls()  # the alert tells the peer why
            self.tls_failure = exc
            self._finish(str(exc))
            return
        self._write_tls()
        if done:
            self._tls_up = True
            self.conn.initiate()
            self.flush()

    def _process(self) -> None:
        if not self._tls_up:
            self._drive_handshake()
            if not self._tls_up:
                return
        try:
            chunks, ended = self.tls.read()
        except TlsError as exc:
            self.tls_failure = exc
            self._finish(f"TLS error: {exc}")
            return
        for chunk in chunks:
            try:
                events = self.conn.receive_data(chunk)
            except ProtocolError as exc:
                self.log.warning(
                    "protocol error from peer",
                    extra={"tunnel": self.name, "error": exc.message, "goaway": exc.reason.label},
                )
                self.close(f"protocol error: {exc.message}", goaway=exc.reason)
                return
            for event in events:
                try:
                    self._dispatch(event)
                except Exception:  # a bug at one stream's end must not take the tunnel down
                    self.log.exception("stream event failed", extra={"tunnel": self.name})
                    stream_id = getattr(event, "stream_id", 0)
                    if stream_id:
                        self.reset_stream(stream_id, FailReason.INTERNAL, "internal error at its end")
                if self.closed_reason is not None:
                    return
        self._write_out()
        self._write_tls()  # e.g. TLS 1.3 key updates
        if ended:
            self._finish(self._describe_eof())
            return
        if self.conn.pending_output:
            self.flush()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            relay = self.relays.get(event.stream_id)
            self.last_activity = now = self.loop.time()
            if self.tuner is not None:
                opaque = self.tuner.data_received(event.stream_id, len(event.data), now)
                if opaque is not None:
                    self.conn.ping(opaque)
            if relay is None and event.stream_id in self.pending:
                self._early.setdefault(event.stream_id, []).append(event.data)  # held: within the window
            elif relay is None:
                self.conn.acknowledge(event.stream_id, len(event.data))
            else:
                relay.deliver(event.data)
        elif isinstance(event, StreamEnded):
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.remote_eof()
            elif event.stream_id in self.pending:
                self._early_fin.add(event.stream_id)
        elif isinstance(event, StreamReset):
            relay = self.relays.pop(event.stream_id, None)
            if relay is not None:
                relay.abort(f"stream reset by peer ({event.reason.label}): {event.message}", event.reason)
            task = self.pending.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
            self._drop_early(event.stream_id)
        elif isinstance(event, WindowOpened):
            if event.stream_id == 0:
                self._wake_all()
            else:
                relay = self.relays.get(event.stream_id)
                if relay is not None and relay in self._blocked and relay.unblock():
                    self._blocked.discard(relay)
        elif isinstance(event, StreamOpened):
            opened = self._opening.pop(event.stream_id, None)
            if opened is not None and not opened.done():
                opened.set_result(None)
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.unblock()
        elif isinstance(event, StreamOpenFailed):
            relay = self.relays.pop(event.stream_id, None)
            error = DialError(event.reason, event.message)
            opened = self._opening.pop(event.stream_id, None)
            if opened is not None and not opened.done():
                opened.set_exception(error)
            if isinstance(relay, TunnelStream):
                relay.open_failed(error)
            elif relay is not None:  # an optimistic CONNECT already answered 200: close the client
                self.log.warning(
                    "optimistic CONNECT failed, closing the client connection",
                    extra={"target": relay.target, "reason": event.reason.label, "detail": event.message},
                )
                relay.abort()
        elif isinstance(event, StreamOpenRequested):
            if self.on_open_request is not None:
                self.on_open_request(self, event)
        elif isinstance(event, HelloReceived):
            self.peer_hello = event.hello
            if self.tuner is not None:  # the path's round trip while nothing else is queued
                self.conn.ping(self.tuner.ping(self.loop.time()))
            if self.on_ready is not None:
                self.on_ready(self)
        elif isinstance(event, PongReceived):
            if self.tuner is not None and self.tuner.pong_received(event.opaque, self.loop.time()):
                self.conn.set_stream_window(self.tuner.window)
                self.log.debug(
                    "stream window resized",
                    extra={"tunnel": self.name, "window": self.tuner.window, **self.tuner.estimate()},
                )
        elif isinstance(event, GoAwayReceived):
            self.goaway = event
            level = (
                logging.INFO
                if event.reason in (GoAwayReason.NORMAL, GoAwayReason.SHUTDOWN)
                else logging.WARNING
            )
            self.log.log(
                level,
                "peer sent GOAWAY",
                extra={"tunnel": self.name, "reason": event.reason.label, "detail": event.message},
            )

    def _drop_early(self, stream_id: int) -> None:
        """Early bytes that will never be relayed: their connection credit goes back."""
        early = self._early.pop(stream_id, None)
        self._early_fin.discard(stream_id)
        if early:
            self.conn.acknowledge(stream_id, sum(len(chunk) for chunk in early))

    def _write_out(self) -> None:
        deliveries, self.deliveries = self.deliveries, []
        for relay in deliveries:
            relay.write_out()

    def _wake_all(self) -> None:
        for relay in list(self._blocked):
            if relay.unblock():
                self._blocked.discard(relay)

    def _describe_eof(self) -> str:
        if self.goaway is not None and self.goaway.reason is not GoAwayReason.NORMAL:
            return f"peer closed the tunnel ({self.goaway.reason.label}: {self.goaway.message})"
        if not self._tls_up and not self.tls.received_any:
            return "closed before the TLS handshake"
        if not self._tls_up:
            return "connection closed during the TLS handshake"
        return "peer closed the connection"

    # ----- timers -------------------------------------------------------------------

    def _tick_interval(self) -> float:
        candidates = [self.dead_after, self.handshake_timeout]
        if self.keepalive_interval:
            candidates.append(self.keepalive_interval)
        if self.stream_idle_timeout > 0:
            candidates.append(self.stream_idle_timeout)
        return max(0.05, min(1.0, min(candidates) / 4))

    def _arm_timer(self) -> None:
        self._timer = self.loop.call_later(self._tick_interval(), self._tick)

    def _tick(self) -> None:
        if self.closed_reason is not None:
            return
        now = self.loop.time()
        if self.peer_hello is None and now - self._started >= self.handshake_timeout:
            self._finish(f"no TLS handshake and HELLO within {self.handshake_timeout:g} s")
            return
        if now - self.last_received >= self.dead_after:
            self._finish(f"no sign of life from the peer for {self.dead_after:g} s")
            return
        if self.keepalive_interval and self._tls_up and now - self._last_ping >= self.keepalive_interval:
            self._last_ping = now
            self.conn.ping(self.tuner.ping(now) if self.tuner is not None else os.urandom(8))
            self._schedule_flush()
        if self.stream_idle_timeout > 0:
            limit = self.stream_idle_timeout
            for relay in [r for r in self.relays.values() if now - r.last_activity >= limit]:
                self.reset_stream(relay.stream_id, FailReason.TIMEOUT, f"stream idle for {limit:g} s")
        self._arm_timer()

    # ----- teardown -------------------------------------------------------------------

    def _finish(self, reason: str, *, graceful: bool = False) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self.conn.close()
        if self._timer is not None:
            self._timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()
        for opened in self._opening.values():
            if not opened.done():
                opened.set_exception(DialError(FailReason.TUNNEL_DOWN, f"tunnel closed: {reason}"))
        relays = list(self.relays.values())
        self.relays.clear()
        self._blocked.clear()
        for relay in relays:
            relay.abort(f"tunnel closed: {reason}", FailReason.TUNNEL_DOWN)
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.on_closed is not None:
            try:
                self.on_closed(self, reason)
            except Exception:  # a callback bug must not break the loop's callback
                self.log.exception("tunnel close handler failed", extra={"tunnel": self.name})


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed open as seen: the failure reaches the stream's reader another way."""
    if not future.cancelled():
        future.exception()
