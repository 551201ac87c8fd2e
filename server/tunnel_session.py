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
from collections.abc import Callable
from typing import Any

from server.framing import (
    DataReceived,
    Event,
    FailReason,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    ProtocolError,
    StreamEnded,
    StreamOpenRequested,
    StreamReset,
    TunnelConnection,
    WindowOpened,
)
from server.tls import TlsError, TlsSession

#: Queued TLS output above which the tunnel stops taking more from its streams.
TUNNEL_WRITE_HIGH = 512 * 1024
TUNNEL_WRITE_LOW = 128 * 1024
#: Protocol output (frames not yet encrypted) a stream may add to before it must wait.
OUTPUT_BUDGET = 1024 * 1024
#: Largest single read from a stream's socket (one shared buffer per loop).
READ_SIZE = 64 * 1024
#: A stream's socket buffer above which received data is no longer credited back.
STREAM_WRITE_HIGH = 256 * 1024
STREAM_WRITE_LOW = 64 * 1024

OpenRequestHandler = Callable[["TunnelSession", StreamOpenRequested], None]
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

    # ----- the local socket -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=STREAM_WRITE_HIGH, low=STREAM_WRITE_LOW)
        if self.session.read_allowance(self.stream_id) <= 0:
            self._pause()

    def get_buffer(self, sizehint: int) -> memoryview:
        allowance = self.session.read_allowance(self.stream_id)
        if allowance <= 0:  # credit went to another stream since we were last told: spill
            return _SCRATCH[:4096]
        return _SCRATCH[: min(allowance, READ_SIZE)]

    def buffer_updated(self, nbytes: int) -> None:
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
        assert self.transport is not None
        self.last_activity = self.session.loop.time()
        self.transport.write(data)
        if self._write_paused:
            self._held += len(data)
        else:
            self.session.consumed(self.stream_id, len(data))

    def remote_eof(self) -> None:
        self._remote_eof = True
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._finish_if_done()

    def abort(self) -> None:
        """The peer reset the stream or the tunnel died: drop the socket at once."""
        self._done = True
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
        self.on_ready = on_ready
        self.on_open_request = on_open_request
        self.on_closed = on_closed
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_hello: Hello | None = None
        self.goaway: GoAwayReceived | None = None
        self.closed_reason: str | None = None
        self.closed = self.loop.create_future()
        self.relays: dict[int, StreamRelay] = {}
        #: Work started for a stream not yet relayed (the server's dial), cancelled on RESET.
        self.pending: dict[int, asyncio.Task[Any]] = {}
        self._blocked: set[StreamRelay] = set()
        self._write_paused = False
        self._flush_handle: asyncio.Handle | None = None
        self._tls_up = False
        self._timer: asyncio.TimerHandle | None = None
        self._started = self.loop.time()
        self.last_received = self._started
        self._last_ping = self._started
        self.last_activity = self._started  # stream data either way (idle detection)

    # ----- the tunnel socket --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))
        transport.set_write_buffer_limits(high=TUNNEL_WRITE_HIGH, low=TUNNEL_WRITE_LOW)
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
        if self._write_paused or self.closed_reason is not None:
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

    def block(self, relay: StreamRelay) -> None:
        self._blocked.add(relay)

    def relay_lost(self, relay: StreamRelay, exc: Exception | None, *, clean: bool) -> None:
        self._blocked.discard(relay)
        if self.relays.get(relay.stream_id) is relay:
            del self.relays[relay.stream_id]
        if self.closed_reason is None and self.conn.is_open(relay.stream_id):
            if clean:
                return
            detail = f"connection to {relay.target} lost"
            if exc is not None:
                detail += f": {getattr(exc, 'strerror', None) or exc}"
            self.conn.reset_stream(relay.stream_id, FailReason.CANCELLED, detail)
            self._schedule_flush()

    def accept_stream(self, relay: StreamRelay) -> None:
        """Server side: the target is connected; OPEN_OK, and the relay may start reading."""
        self.relays[relay.stream_id] = relay
        self.conn.accept_stream(relay.stream_id)
        self._blocked.add(relay)  # flush() lets it read once OPEN_OK is on its way
        self._schedule_flush()

    def reject_stream(self, stream_id: int, reason: FailReason, message: str) -> None:
        """Server side: OPEN_FAIL for a stream that could not be set up."""
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
        self._write_paused = False  # last words go out whatever the budget
        self.flush()
        self.tls.close()
        self._write_tls()
        self._finish(reason, graceful=True)

    def abort(self, reason: str) -> None:
        self._finish(reason)

    # ----- output -----------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Encrypt what the protocol queued (while the socket keeps up) and write it."""
        self._flush_handle = None
        if self.closed_reason is not None or not self._tls_up:
            return
        if not self._write_paused and self.conn.pending_output:
            try:
                self.tls.write(self.conn.data_to_send())
            except TlsError as exc:
                self._finish(f"TLS error: {exc}")
                return
        self._write_tls()
        if self._blocked and not self._write_paused:
            self._wake_all()
            if self.conn.pending_output and self._flush_handle is None:
                self._flush_handle = self.loop.call_soon(self.flush)

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
                self._dispatch(event)
                if self.closed_reason is not None:
                    return
        self._write_tls()  # e.g. TLS 1.3 key updates
        if ended:
            self._finish(self._describe_eof())
            return
        if self.conn.pending_output:
            self.flush()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            relay = self.relays.get(event.stream_id)
            self.last_activity = self.loop.time()
            if relay is None:
                self.conn.acknowledge(event.stream_id, len(event.data))
            else:
                relay.deliver(event.data)
        elif isinstance(event, StreamEnded):
            relay = self.relays.get(event.stream_id)
            if relay is not None:
                relay.remote_eof()
        elif isinstance(event, StreamReset):
            relay = self.relays.pop(event.stream_id, None)
            if relay is not None:
                relay.abort()
            task = self.pending.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(event, WindowOpened):
            if event.stream_id == 0:
                self._wake_all()
            else:
                relay = self.relays.get(event.stream_id)
                if relay is not None and relay in self._blocked and relay.unblock():
                    self._blocked.discard(relay)
        elif isinstance(event, StreamOpenRequested):
            if self.on_open_request is not None:
                self.on_open_request(self, event)
        elif isinstance(event, HelloReceived):
            self.peer_hello = event.hello
            if self.on_ready is not None:
                self.on_ready(self)
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
            self.conn.ping(os.urandom(8))
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
        relays = list(self.relays.values())
        self.relays.clear()
        self._blocked.clear()
        for relay in relays:
            relay.abort()
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
