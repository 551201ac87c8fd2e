"""Threaded I/O for one tunnel: runs the sans-I/O ``TunnelConnection`` over a TLS channel.

Each link has exactly one reader thread and one writer thread. The reader never blocks
on anything but the socket: received data is parked in per-stream buffers that flow
control keeps below one window, so a stalled stream cannot stop the others. Everything
that wants to send (streams, PONGs, WINDOW credit) appends to the connection's output
buffer and wakes the writer, which batches it into few large TLS writes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from server.framing import (
    DataReceived,
    Event,
    FailReason,
    GoAwayReason,
    GoAwayReceived,
    Hello,
    HelloReceived,
    PingReceived,
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
from server.tls import TlsChannel, TlsError

#: Largest slice handed to one TLS write, so a send timeout means "no progress", not "slow link".
WRITE_SLICE = 256 * 1024
_DONTWAIT: int = getattr(socket, "MSG_DONTWAIT", 0)
#: Streams stop queueing once this much output waits for the TLS writer (bounds memory
#: to about twice this per tunnel, whatever the windows and the number of streams).
MAX_QUEUED_OUTPUT = 2 * 1024 * 1024
#: Up to this many open streams, a stream's thread sends its own output (no writer hop).
WRITE_THROUGH_MAX_STREAMS = 4
#: ... and with more streams, only bulk output of at least this size is sent by its own thread.
WRITE_THROUGH_MIN_BYTES = 64 * 1024

OpenRequestHandler = Callable[["TunnelLink", StreamOpenRequested], None]
ClosedHandler = Callable[["TunnelLink", str], None]


class LinkClosed(ConnectionError):
    """The tunnel is gone; the message says why."""


class LinkStream:
    """One multiplexed stream with blocking, socket-like calls (implements ByteStream)."""

    def __init__(self, link: TunnelLink, stream_id: int, host: str, port: int) -> None:
        self.link = link
        self.stream_id = stream_id
        self.host = host
        self.port = port
        self._cond = threading.Condition(link._lock)
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._local_fin = False
        self._error: StreamClosedError | None = None
        self._opened = False
        self._open_failure: DialError | None = None
        self._closed = False
        # Direct delivery: the reader thread may write arriving data straight into this
        # socket (never blocking) while no consumer holds data, saving a thread hand-off.
        self._sink: socket.socket | None = None
        self._sink_busy = False

    # Calls below run in the stream's own threads.

    def deliver_to(self, sock: socket.socket) -> None:
        """Let the reader write data straight to ``sock`` while the consumer is idle.

        Only for blocking sockets without a timeout (a non-blocking send must fail at once)
        and where the platform has MSG_DONTWAIT. The consumer calls ``delivered()`` after
        writing what ``recv`` gave it, so bytes keep their order.
        """
        if _DONTWAIT and sock.gettimeout() is None:
            with self._cond:
                self._sink = sock

    def delivered(self) -> None:
        with self._cond:
            self._sink_busy = False

    def recv(self, max_bytes: int) -> bytes:
        link = self.link
        with self._cond:
            while not self._buffer:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise StreamClosedError("stream closed by the application", "cancelled")
                if self._eof:
                    return b""
                if link._closed_reason is not None:
                    raise StreamClosedError(f"tunnel closed: {link._closed_reason}", "tunnel_down")
                self._cond.wait()
            first = self._buffer[0]
            if len(first) > max_bytes:
                data = first[:max_bytes]
                self._buffer[0] = first[max_bytes:]
            elif len(self._buffer) == 1 or len(first) + len(self._buffer[1]) > max_bytes:
                data = self._buffer.popleft()
            else:
                parts = []
                size = 0
                while self._buffer and size + len(self._buffer[0]) <= max_bytes:
                    piece = self._buffer.popleft()
                    parts.append(piece)
                    size += len(piece)
                data = b"".join(parts)
            self._buffered -= len(data)
            if self._sink is not None:
                self._sink_busy = True
            link._conn.acknowledge(self.stream_id, len(data))
            flush = link._conn.pending_output > 0
        if flush:
            link._flush_from_caller()
        return data

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        total = len(view)
        offset = 0
        link = self.link
        conn = link._conn
        while offset < total:
            with self._cond:
                while True:
                    if self._error is not None:
                        raise self._error
                    if link._closed_reason is not None:
                        raise StreamClosedError(f"tunnel closed: {link._closed_reason}", "tunnel_down")
                    if self._closed:
                        raise StreamClosedError("stream closed by the application", "cancelled")
                    if self._local_fin:
                        raise StreamClosedError("stream already shut down for writing", "internal")
                    credit = conn.send_credit(self.stream_id)
                    if credit > 0 and conn.pending_output < MAX_QUEUED_OUTPUT:
                        break
                    if not conn.is_open(self.stream_id):
                        raise StreamClosedError("stream closed by the peer", "cancelled")
                    if credit > 0:
                        # The link is the bottleneck: wait for the writer instead of queueing
                        # every stream's whole window in memory.
                        link._drain_waiters += 1
                        try:
                            link._drained.wait()
                        finally:
                            link._drain_waiters -= 1
                    else:
                        self._cond.wait()
                offset += conn.send_data(self.stream_id, view[offset : offset + credit])
                link.last_activity = time.time()
            link._flush_from_caller()

    def shutdown_write(self) -> None:
        with self._cond:
            if self._local_fin or self._closed or self._error is not None:
                return
            self._local_fin = True
            if not self.link._conn.is_open(self.stream_id):
                return
            self.link._conn.end_stream(self.stream_id)
        self.link._flush_from_caller()

    def close(self) -> None:
        self.link._release_stream(self, FailReason.CANCELLED, "closed by the application")

    def reset(self, reason: FailReason, message: str) -> None:
        """Abort the stream and tell the peer why (e.g. the target connection failed)."""
        self.link._release_stream(self, reason, message)

    @property
    def buffered(self) -> int:
        """Received bytes waiting for the application (bounded by the window)."""
        return self._buffered


class TunnelLink:
    """One mTLS tunnel carrying many streams; shared by the agent and the server."""

    def __init__(
        self,
        channel: TlsChannel,
        conn: TunnelConnection,
        *,
        name: str,
        logger: logging.Logger,
        dead_after: float,
        keepalive_interval: float | None = None,
        on_open_request: OpenRequestHandler | None = None,
        on_closed: ClosedHandler | None = None,
    ) -> None:
        self.channel = channel
        self.name = name
        self.log = logger
        self.dead_after = dead_after
        self.keepalive_interval = keepalive_interval
        self.on_open_request = on_open_request
        self.on_closed = on_closed
        self._conn = conn
        self._lock = threading.Lock()
        self._writer_cond = threading.Condition(self._lock)
        self._state_cond = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)  # the output queue was taken by a sender
        self._drain_waiters = 0
        self._streams: dict[int, LinkStream] = {}
        # Held by whoever moves queued output to the TLS channel (the writer thread or a stream
        # thread writing through), so output leaves in the order it was queued.
        self._flush_lock = threading.Lock()
        self._closing: str | None = None  # graceful close requested: flush, then close
        self._closed_reason: str | None = None
        self._closed_event = threading.Event()
        self.goaway: GoAwayReceived | None = None
        self.peer_hello: Hello | None = None
        self.last_received = time.monotonic()
        self.last_activity = time.time()
        self._threads: list[threading.Thread] = []

    # ----- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self.channel.sock.settimeout(self.dead_after)
        with self._lock:
            self._conn.initiate()
        for target, role in ((self._read_loop, "reader"), (self._write_loop, "writer")):
            thread = threading.Thread(target=target, name=f"{self.name}-{role}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_hello(self, timeout: float) -> Hello:
        deadline = time.monotonic() + timeout
        with self._state_cond:
            while self.peer_hello is None:
                if self._closed_reason is not None:
                    raise LinkClosed(self._closed_reason)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LinkClosed("the peer sent no HELLO in time")
                self._state_cond.wait(remaining)
            return self.peer_hello

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._closed_reason

    @property
    def accepting_streams(self) -> bool:
        return self._closed_reason is None and self._closing is None and self.goaway is None

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._closed_event.wait(timeout)

    def send_goaway(self, reason: GoAwayReason, message: str) -> None:
        """Tell the peer to open no more streams here; existing streams carry on."""
        with self._lock:
            if self._closed_reason is None:
                self._conn.goaway(reason, message)
                self._writer_cond.notify()

    def close(self, reason: str, *, goaway: GoAwayReason | None = GoAwayReason.NORMAL) -> None:
        """Flush what is queued (plus a GOAWAY) and close; streams still open are failed."""
        with self._lock:
            if self._closed_reason is not None or self._closing is not None:
                return
            if goaway is not None:
                self._conn.goaway(goaway, reason)
            self._closing = reason
            self._writer_cond.notify()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # ----- streams --------------------------------------------------------

    def open_stream(self, host: str, port: int, timeout: float) -> LinkStream:
        """Agent side: ask the server to dial host:port; raises DialError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self.accepting_streams or not self._conn.can_open_streams:
                raise DialError("tunnel_down", f"tunnel not usable: {self._closed_reason or 'closing'}")
            try:
                sid = self._conn.open_stream(host, port)
            except UsageError as exc:
                raise DialError("internal", str(exc)) from None
            stream = LinkStream(self, sid, host, port)
            self._streams[sid] = stream
        self._flush_from_caller()
        with self._lock:
            while not stream._opened:
                if stream._open_failure is not None:
                    raise stream._open_failure
                if self._closed_reason is not None:
                    self._streams.pop(sid, None)
                    raise DialError("tunnel_down", f"tunnel closed: {self._closed_reason}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._streams.pop(sid, None)
                    self._conn.reset_stream(sid, FailReason.TIMEOUT, "agent gave up waiting")
                    self._writer_cond.notify()
                    raise DialError("timeout", f"no answer from the tunnel server within {timeout:g} s")
                stream._cond.wait(remaining)
            return stream

    def accept_stream(self, request: StreamOpenRequested) -> LinkStream | None:
        """Server side: the target is connected; None if the agent cancelled meanwhile."""
        with self._lock:
            if self._closed_reason is not None or not self._conn.is_open(request.stream_id):
                return None
            self._conn.accept_stream(request.stream_id)
            stream = LinkStream(self, request.stream_id, request.host, request.port)
            stream._opened = True
            self._streams[request.stream_id] = stream
        self._flush_from_caller()
        return stream

    def reject_stream(self, request: StreamOpenRequested, reason: FailReason, message: str) -> None:
        with self._lock:
            if self._closed_reason is None and self._conn.is_open(request.stream_id):
                self._conn.reject_stream(request.stream_id, reason, message)
                self._writer_cond.notify()

    def _release_stream(self, stream: LinkStream, reason: FailReason, message: str) -> None:
        with self._lock:
            if stream._closed:
                return
            stream._closed = True
            self._streams.pop(stream.stream_id, None)
            if self._closed_reason is None and self._conn.is_open(stream.stream_id):
                self._conn.reset_stream(stream.stream_id, reason, message)
                self._writer_cond.notify()
            if stream._buffered and self._closed_reason is None:
                # Dropped unread: the tunnel's connection-level credit must still come back.
                self._conn.acknowledge(stream.stream_id, stream._buffered)
                self._writer_cond.notify()
            stream._buffer.clear()
            stream._buffered = 0
            if stream._error is None:  # wake any thread still blocked in recv/sendall
                stream._error = StreamClosedError("stream closed locally", "cancelled")
            stream._cond.notify_all()
            # Another thread may be blocked in recv or sendall on this stream (a relay's
            # other direction): wake it so it fails now instead of waiting for the peer.
            stream._cond.notify_all()

    # ----- reader ---------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "closed"
        try:
            while True:
                try:
                    data = self.channel.recv()
                except TimeoutError:
                    reason = f"no sign of life from the peer for {self.dead_after:g} s"
                    break
                if not data:
                    reason = self._describe_eof()
                    break
                self.last_received = time.monotonic()
                open_requests: list[StreamOpenRequested] = []
                with self._lock:
                    try:
                        events = self._conn.receive_data(data)
                    except ProtocolError as exc:
                        self.log.warning(
                            "protocol error from peer",
                            extra={"tunnel": self.name, "error": exc.message, "goaway": exc.reason.label},
                        )
                        self._conn.goaway(exc.reason, exc.message)
                        self._closing = f"protocol error: {exc.message}"
                        self._writer_cond.notify()
                        return
                    for event in events:
                        self._dispatch(event, open_requests)
                    if self._conn.pending_output:
                        self._writer_cond.notify()
                for request in open_requests:
                    if self.on_open_request is not None:
                        self.on_open_request(self, request)
        except TlsError as exc:
            reason = f"TLS error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        self._finish(reason)

    def _describe_eof(self) -> str:
        if self.goaway is not None and self.goaway.reason is not GoAwayReason.NORMAL:
            return f"peer closed the tunnel ({self.goaway.reason.label}: {self.goaway.message})"
        return "peer closed the connection"

    def _dispatch(self, event: Event, open_requests: list[StreamOpenRequested]) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                return
            self.last_activity = time.time()
            data = event.data
            if stream._sink is not None and not stream._buffer and not stream._sink_busy:
                try:
                    sent = stream._sink.send(data, _DONTWAIT)
                except OSError:  # full, or broken: the consumer thread finds out and reports
                    sent = 0
                if sent:
                    self._conn.acknowledge(event.stream_id, sent)
                    if sent == len(data):
                        return
                    data = data[sent:]
            stream._buffer.append(data)
            stream._buffered += len(data)
            stream._cond.notify_all()
        elif isinstance(event, WindowOpened) and event.stream_id == 0:
            for stream in self._streams.values():  # connection credit: any stream may go on
                stream._cond.notify_all()
        elif isinstance(event, WindowOpened | StreamOpened | StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                return
            if isinstance(event, StreamOpened):
                stream._opened = True
            elif isinstance(event, StreamEnded):
                stream._eof = True
            stream._cond.notify_all()
        elif isinstance(event, StreamOpenFailed | StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            if stream is None:
                return
            if isinstance(event, StreamOpenFailed):
                stream._open_failure = DialError(event.reason.label, event.message)
            else:
                stream._error = StreamClosedError(
                    f"stream reset by peer ({event.reason.label}): {event.message}", event.reason.label
                )
            stream._cond.notify_all()
        elif isinstance(event, StreamOpenRequested):
            open_requests.append(event)
        elif isinstance(event, HelloReceived):
            self.peer_hello = event.hello
            self._state_cond.notify_all()
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
            self._state_cond.notify_all()
            for stream in list(self._streams.values()):
                if not stream._opened:
                    stream._cond.notify_all()
        elif isinstance(event, PingReceived | PongReceived):
            pass

    # ----- writer ---------------------------------------------------------

    def _write_loop(self) -> None:
        interval = self.keepalive_interval
        next_ping = time.monotonic() + interval if interval else None
        reason = "closed"
        try:
            while True:
                with self._lock:
                    while not self._conn.pending_output and self._closing is None:
                        if self._closed_reason is not None:
                            return
                        if next_ping is None:
                            self._writer_cond.wait()
                            continue
                        now = time.monotonic()
                        if now >= next_ping:
                            self._conn.ping(os.urandom(8))
                            next_ping = now + (interval or 0)
                            break
                        self._writer_cond.wait(next_ping - now)
                    if self._closed_reason is not None:
                        return
                with self._flush_lock:
                    with self._lock:
                        data = self._take_output()
                        closing = self._closing
                        if self._closed_reason is not None:
                            return
                    self._send(data)
                if closing is not None:
                    reason = closing
                    break
        except TimeoutError:
            reason = f"peer stopped reading for {self.dead_after:g} s"
        except TlsError as exc:
            reason = f"TLS error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        self._finish(reason, graceful=(reason == self._closing))

    def _take_output(self) -> bytearray:
        """Everything queued for the peer (call with the lock held); wakes throttled streams."""
        data = self._conn.data_to_send()
        if self._drain_waiters:
            self._drained.notify_all()
        return data

    def _send(self, data: bytearray) -> None:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SLICE):
            self.channel.sendall(view[start : start + WRITE_SLICE])

    def _flush_from_caller(self) -> None:
        """Send queued output on the calling (stream) thread unless someone is already sending.

        Saves a wake-up of the writer thread per message. Never called by the reader: a reader
        blocked in send could deadlock with a peer doing the same.
        """
        small = self._conn.pending_output < WRITE_THROUGH_MIN_BYTES
        if (small and len(self._streams) > WRITE_THROUGH_MAX_STREAMS) or not self._flush_lock.acquire(
            blocking=False
        ):
            # Small messages on a busy link: the writer's batching saves more than the handoff
            # costs. Or someone is sending and may already have taken its batch: wake the writer.
            with self._lock:
                self._writer_cond.notify()
            return
        reason = None
        try:
            for _ in range(2):  # bounded: a busy link must not keep one stream's thread here
                with self._lock:
                    if self._closed_reason is not None or self._closing is not None:
                        self._writer_cond.notify()
                        return
                    data = self._take_output()
                if not data:
                    return
                self._send(data)
            with self._lock:
                if self._conn.pending_output:
                    self._writer_cond.notify()
        except TimeoutError:
            reason = f"peer stopped reading for {self.dead_after:g} s"
        except TlsError as exc:
            reason = f"TLS error: {exc}"
        except OSError as exc:
            reason = f"connection lost: {exc.strerror or exc}"
        finally:
            self._flush_lock.release()
        if reason is not None:
            self._finish(reason)

    # ----- teardown -------------------------------------------------------

    def _finish(self, reason: str, *, graceful: bool = False) -> None:
        with self._lock:
            if self._closed_reason is not None:
                return
            self._closed_reason = reason
            self._conn.close()
            streams = list(self._streams.values())
            self._streams.clear()
            for stream in streams:
                if stream._error is None:
                    stream._error = StreamClosedError(f"tunnel closed: {reason}", "tunnel_down")
                stream._cond.notify_all()
            self._state_cond.notify_all()
            self._writer_cond.notify_all()
            self._drained.notify_all()
        if graceful:
            self.channel.close()
        else:
            self.channel.abort()
        self._closed_event.set()
        if self.on_closed is not None:
            try:
                self.on_closed(self, reason)
            except Exception:  # a callback bug must not kill the I/O thread silently
                self.log.exception("tunnel close handler failed", extra={"tunnel": self.name})


def set_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
