"""The local forward proxy: HTTP, HTTPS via CONNECT and WebSocket, on the agent's event loop.

Browsers and tools on this machine talk plain HTTP proxy protocol to 127.0.0.1; every
upstream connection is opened through an injected ``Dialer`` (in the product, a stream
on the multiplexed mTLS tunnel). The proxy never resolves or connects to targets
itself, so what may be reached is decided in one place: the tunnel server.

Each client connection is one ``ClientExchange`` coroutine; bodies are relayed verbatim
in large blocks and the proxy only tracks framing, so one client connection can carry
many requests. After CONNECT or a WebSocket upgrade over the tunnel, the client socket
is handed to a ``StreamRelay`` and costs no coroutine hops. Every failure the client can
still be told about becomes a real HTTP response naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from desktop.bypass import BypassRules
from desktop.dialing import ByteStream, Dialer, DialError, StreamClosedError
from desktop.event_loop import LoopThread, shared_loop
from desktop.http_head import (
    DEFAULT_MAX_HEAD_BYTES,
    DEFAULT_MAX_HEADER_COUNT,
    NO_BODY,
    BodyFraming,
    ChunkedScanner,
    HttpHeadError,
    ProxyTarget,
    RequestHead,
    ResponseHead,
    build_forward_head,
    check_request_prefix,
    classify_target,
    expects_continue,
    find_head_end,
    is_websocket_upgrade,
    leading_empty_line_bytes,
    oversized_request_head,
    parse_request_head,
    parse_response_head,
    relayable_response_head,
    render_error_response,
    render_file_response,
    request_body_framing,
    request_keeps_alive,
    response_body_framing,
    response_keeps_alive,
)
from desktop.pac import PAC_CONTENT_TYPE, PAC_PATH, render_pac
from desktop.socket_stream import SocketStream
from desktop.socks import ConnectRequest, ProxyProtocol, Refused, Send, SocksHandshake, detect_protocol
from desktop.usage import Meter
from server.errors import FluidityError
from server.framing import FailReason
from server.tunnel_session import StreamRelay, TunnelStream

LOGGER_NAME = "fluidity.proxy"
#: Block size for relaying bodies and tunnels: large enough that Python overhead per block is noise.
RELAY_BLOCK_BYTES = 256 * 1024
HEAD_READ_BYTES = 64 * 1024
MAX_RESPONSE_HEAD_BYTES = 256 * 1024
MAX_RESPONSE_HEADER_COUNT = 512
LISTEN_BACKLOG = 512
#: After an error reply, keep reading (and discarding) briefly so the client sees the reply
#: instead of a reset caused by closing a socket with unread input.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024
#: A kept-alive upstream idle longer than this may have been closed by the origin; a request
#: whose body cannot be replayed gets a fresh stream instead of risking a failed exchange.
REUSE_WITH_BODY_SECONDS = 2.0
#: Client connections served at once; more are closed at once (a runaway local client).
DEFAULT_MAX_CONNECTIONS = 4096

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Dial failure -> (HTTP status, RFC 9209 Proxy-Status error type, what the error page says).
#: Every FailReason has a row: the page names the cause, and its label closes the message.
_DIAL_FAILURES: dict[FailReason, tuple[int, str, str]] = {
    FailReason.POLICY: (403, "http_request_denied", "blocked by the tunnel's egress policy"),
    FailReason.TIMEOUT: (504, "connection_timeout", "timed out connecting to"),
    FailReason.DNS: (502, "dns_error", "cannot resolve"),
    FailReason.REFUSED: (502, "connection_refused", "connection refused by"),
    FailReason.UNREACHABLE: (502, "destination_unavailable", "cannot reach"),
    FailReason.LIMIT: (502, "connection_limit_reached", "too many open connections to reach"),
    FailReason.TUNNEL_DOWN: (502, "proxy_internal_error", "the tunnel is down; cannot reach"),
    FailReason.SHUTTING_DOWN: (
        502,
        "destination_unavailable",
        "the tunnel server is shutting down; cannot reach",
    ),
    FailReason.CANCELLED: (502, "proxy_internal_error", "connection attempt cancelled for"),
    FailReason.INTERNAL: (502, "proxy_internal_error", "tunnel error while connecting to"),
}


class ProxyBindError(FluidityError, OSError):
    """The proxy could not listen on its address (typically: the port is in use)."""


def dial_failure_response(error: DialError, target: ProxyTarget) -> tuple[int, str, str]:
    """(status, message, Proxy-Status error type) for a failed dial."""
    status, proxy_status, text = _DIAL_FAILURES[error.reason]
    if error.reason is FailReason.POLICY:
        message = f"{target.display} is {text}: {error.message}"
    else:
        message = f"{text} {target.display}: {error.message}"
    return status, f"{message} ({error.reason.label})", proxy_status


@dataclass(frozen=True)
class _Settings:
    max_header_bytes: int
    header_timeout: float
    idle_timeout: float
    max_header_count: int
    pac_file: bytes | None = None  # served at /proxy.pac, rendered for the address listened on
    optimistic_connect: bool = False  # answer CONNECT at once; the TLS hello rides behind the OPEN


class _ClientGone(Exception):
    """The client closed, reset or stalled; nobody is left to answer."""


class _UpstreamLost(Exception):
    """The upstream stream ended or broke; ``responded`` says whether any response byte came."""

    def __init__(self, message: str, *, responded: bool) -> None:
        super().__init__(message)
        self.responded = responded


class _RequestRejected(Exception):
    """Answer the client with ``status`` and close; raised where the failure is detected."""

    def __init__(self, status: int, message: str, proxy_status: str, log_reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.proxy_status = proxy_status
        self.log_reason = log_reason


class _Upstream:
    """One dialled stream plus response bytes read past the current message."""

    def __init__(self, key: tuple[str, int], stream: ByteStream) -> None:
        self.key = key
        self.stream = stream
        self.pending = bytearray()
        self.last_used = time.monotonic()


class ClientExchange:
    """Serves one accepted client connection until it closes: the proxy's per-connection state."""

    def __init__(
        self,
        client: SocketStream,
        peer: str,
        dialer: Dialer,
        settings: _Settings,
        logger: logging.Logger,
        meter: Meter | None = None,
    ) -> None:
        self.client = client
        self._meter = meter
        self._host = ""  # the destination the bytes being relayed belong to (for the meter)
        self.peer = peer
        self._dialer = dialer
        self._settings = settings
        self._log = logger
        self._accepted_at = time.monotonic()
        self._pending = client.buffered  # read from the client, not yet consumed
        self._upstream: _Upstream | None = None
        self._streams: set[ByteStream] = set()
        self._relay: StreamRelay | None = None  # owns the client socket after CONNECT over the tunnel
        self._closed = False
        self.task: asyncio.Task[None] | None = None
        self._waiting_upstream = False  # a client leaving now cancels the request (no hung origin)
        client.on_eof = self._client_left

    def _client_left(self) -> None:
        if self._waiting_upstream and self.task is not None:
            self._log.info("%s: client left while waiting for the upstream; cancelling", self.peer)
            self.task.cancel()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._serve()
        except _ClientGone:
            self._log.debug("%s: client went away", self.peer)
        except (OSError, StreamClosedError) as error:
            self._log.info("%s: connection ended: %s", self.peer, error)
        except asyncio.CancelledError:
            pass
        except Exception:
            self._log.exception("%s: unexpected proxy error", self.peer)
        finally:
            self.close()

    def close(self) -> None:
        """Close the client connection and every stream; safe more than once."""
        if self._closed:
            return
        self._closed = True
        if self._relay is not None:
            self._relay.abort()
            return
        streams = list(self._streams)
        self._streams.clear()
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.close()
        self.client.close()

    async def _dial(self, target: ProxyTarget) -> ByteStream:
        """Open a stream or raise DialError; a transport error escaping the dialer counts as internal."""
        self._host = target.host
        self._waiting_upstream = True
        try:
            stream = await self._dialer.dial(target.host, target.port)
        except (OSError, StreamClosedError) as error:
            raise DialError(FailReason.INTERNAL, str(error) or type(error).__name__) from None
        finally:
            self._waiting_upstream = False
        if self._closed:
            stream.close()
            raise _ClientGone()
        self._streams.add(stream)
        return stream

    def _release(self, stream: ByteStream) -> None:
        self._streams.discard(stream)
        with contextlib.suppress(Exception):
            stream.close()

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._release(self._upstream.stream)
            self._upstream = None

    # ------------------------------------------------------------------ request loop

    async def _serve(self) -> None:
        """HTTP requests, or one SOCKS connection: the first byte decides (one "mixed" port)."""
        if not self._pending and not await self._wait_first_byte():
            return
        if detect_protocol(self._pending[0]) is not ProxyProtocol.HTTP:
            await self._socks()
            return
        first = True
        while True:
            request: RequestHead | None = None
            try:
                raw = await self._read_request_head(first)
                if raw is None:
                    return
                first = False
                request = parse_request_head(raw, max_header_count=self._settings.max_header_count)
                if self._is_pac_request(request):
                    if not await self._serve_pac(request):
                        return
                    continue
                target = classify_target(request)
                if request.method == "CONNECT":
                    await self._tunnel(target)
                    return
                if not await self._exchange(request, target):
                    return
            except HttpHeadError as error:
                await self._reject(
                    _RequestRejected(error.status, error.message, "http_request_error", "bad request"),
                    request,
                )
                return
            except _RequestRejected as rejection:
                await self._reject(rejection, request)
                return

    async def _wait_first_byte(self) -> bool:
        wait = self._accepted_at + self._settings.header_timeout - time.monotonic()
        try:
            return wait > 0 and await self.client.fill(wait)
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ the proxy's own files

    def _is_pac_request(self, request: RequestHead) -> bool:
        path = request.target.partition("?")[0]
        return self._settings.pac_file is not None and path == PAC_PATH and request.method in ("GET", "HEAD")

    async def _serve_pac(self, request: RequestHead) -> bool:
        """Answer GET /proxy.pac; True if the client connection stays open."""
        assert self._settings.pac_file is not None
        keep_alive = request_keeps_alive(request)
        await self._send_to_client(
            render_file_response(
                self._settings.pac_file,
                PAC_CONTENT_TYPE,
                keep_alive=keep_alive,
                include_body=request.method == "GET",
            )
        )
        self._log.debug("%s: served %s", self.peer, PAC_PATH)
        return keep_alive

    # ------------------------------------------------------------------ SOCKS

    async def _socks(self) -> None:
        """A SOCKS5 or SOCKS4/4a CONNECT: names are resolved on the far side, never here."""
        handshake = SocksHandshake()
        deadline = self._accepted_at + self._settings.header_timeout
        request: ConnectRequest | None = None
        while request is None:
            data = bytes(self._pending)
            self._pending.clear()
            for event in handshake.receive(data):
                if isinstance(event, Send):
                    await self._send_to_client(event.data)
                elif isinstance(event, Refused):
                    self._log.warning("%s: SOCKS refused (%s): %s", self.peer, event.refusal, event.detail)
                    if event.data:
                        await self._send_to_client(event.data)
                    await self._close_gracefully()
                    return
                else:
                    request = event
            if request is None:
                try:
                    wait = deadline - time.monotonic()
                    if wait <= 0 or not await self.client.fill(wait):
                        return
                except TimeoutError:
                    self._log.info("%s: SOCKS handshake not complete within the header timeout", self.peer)
                    return
        target = ProxyTarget("authority", request.host, request.port, request.display, "")
        try:
            stream = await self._dial(target)
            await stream.wait_open()  # SOCKS clients act on the reply code: tell them the real outcome
        except DialError as error:
            answer, reply = handshake.failed(error.reason)
            self._log.warning(
                "%s: SOCKS%d CONNECT %s -> %s (dial failed: %s): %s",
                self.peer,
                request.version,
                target.display,
                reply.label,
                error.reason.label,
                error.message,
            )
            await self._send_to_client(answer)
            await self._close_gracefully()
            return
        await self._send_to_client(handshake.succeeded())
        self._pending[:0] = handshake.take_leftover()  # optimistic data goes up first
        await self._relay_raw(stream, b"", target)

    # ------------------------------------------------------------------ HTTP heads

    async def _read_request_head(self, first: bool) -> bytes | None:
        """Read one request head; None when the client closes or idles out between requests.

        The header timeout covers the whole head (from accept for the first request, from
        its first byte for later ones), so a client dripping bytes cannot hold it open.
        """
        settings = self._settings
        deadline = self._accepted_at + settings.header_timeout if first else None
        scan_from = 0
        while True:
            skip = leading_empty_line_bytes(self._pending)
            if skip:
                del self._pending[:skip]
                scan_from = 0
            if self._pending:
                if deadline is None:
                    deadline = time.monotonic() + settings.header_timeout
                check_request_prefix(self._pending[:64])
                end = find_head_end(self._pending, scan_from)
                if end is not None:
                    if end > settings.max_header_bytes:
                        raise _too_large(self._pending, settings.max_header_bytes)
                    raw = bytes(self._pending[:end])
                    del self._pending[:end]
                    return raw
                if len(self._pending) > settings.max_header_bytes:
                    raise _too_large(self._pending, settings.max_header_bytes)
                scan_from = max(0, len(self._pending) - 3)
            wait = settings.idle_timeout if deadline is None else deadline - time.monotonic()
            try:
                if wait <= 0:
                    raise TimeoutError
                more = await self.client.fill(wait)
            except TimeoutError:
                if not self._pending:
                    return None
                raise _RequestRejected(
                    408,
                    f"the request head was not complete within {settings.header_timeout:g} s",
                    "http_request_error",
                    "header timeout",
                ) from None
            if not more:
                return None

    # ------------------------------------------------------------------ plain HTTP

    async def _exchange(self, request: RequestHead, target: ProxyTarget) -> bool:
        """Forward one request and relay its response; True if the client connection stays open."""
        framing = request_body_framing(request)
        client_keeps_alive = request_keeps_alive(request)
        upstream, raw_head, response, body_sent = await self._send_request(
            request, target, framing, client_keeps_alive
        )
        if response.status == 101:
            if not is_websocket_upgrade(request):
                self._drop_upstream()
                raise _RequestRejected(
                    502,
                    "upstream switched protocols without being asked to",
                    "http_protocol_error",
                    "bad response",
                )
            await self._send_to_client(raw_head)
            self._upstream = None
            await self._relay_raw(upstream.stream, bytes(upstream.pending), target)
            return False
        try:
            response_framing = response_body_framing(request.method, response)
        except HttpHeadError as error:
            self._drop_upstream()
            raise _RequestRejected(
                502, error.message, "http_response_content_length", "bad response"
            ) from None
        try:
            await self._relay_response_body(
                response_framing, upstream, relayable_response_head(raw_head, response)
            )
        except _UpstreamLost as lost:
            self._log.warning(
                "%s: %s %s: upstream failed mid-response, closing the client connection: %s",
                self.peer,
                request.method,
                target.display,
                lost,
            )
            self._drop_upstream()
            return False
        upstream.last_used = time.monotonic()
        if not body_sent:
            # The rest of the client's body is still arriving; read it off so closing
            # does not reset the connection and destroy the response just sent.
            await self._close_gracefully()
            return False
        keep_open = (
            client_keeps_alive and response_keeps_alive(response) and response_framing.kind != "until_close"
        )
        if not keep_open:
            self._drop_upstream()
        return keep_open

    async def _send_request(
        self, request: RequestHead, target: ProxyTarget, framing: BodyFraming, client_keeps_alive: bool
    ) -> tuple[_Upstream, bytes, ResponseHead, bool]:
        """Send head and body upstream and read the final response head.

        Returns (upstream, raw head, parsed head, whether the whole body went up). A
        kept-alive upstream that turns out to be closed is replaced once when nothing of
        the request has been consumed from the client yet; an origin that answers before
        taking the whole body (413, 401) still has its answer relayed.
        """
        forward = build_forward_head(request, target, client_keeps_alive=client_keeps_alive)
        has_body = framing.kind != "none"
        for attempt in (1, 2):
            upstream, reused = await self._upstream_for(target, has_body=has_body)
            body_sent = True
            try:
                await self._send_upstream(upstream.stream, forward)
                if has_body:
                    if expects_continue(request):
                        await self._send_to_client(CONTINUE)
                    try:
                        await self._relay_request_body(framing, upstream.stream)
                    except _UpstreamLost as lost:
                        self._log.debug("%s: upstream stopped taking the body: %s", self.peer, lost)
                        body_sent = False
                raw_head, response = await self._read_final_response_head(
                    upstream, relay_interim=request.minor_version > 0
                )
                return upstream, raw_head, response, body_sent
            except DialError as error:  # a 0-RTT stream whose dial failed: the same answer as before
                self._drop_upstream()
                status, message, proxy_status = dial_failure_response(error, target)
                raise _RequestRejected(
                    status, message, proxy_status, f"dial failed: {error.reason.label}"
                ) from None
            except _UpstreamLost as lost:
                self._drop_upstream()
                if reused and not lost.responded and not has_body and attempt == 1:
                    self._log.debug(
                        "%s: kept-alive upstream %s was closed; redialling", self.peer, target.display
                    )
                    continue
                raise _RequestRejected(
                    502,
                    f"{target.display} closed the connection without a response",
                    "http_response_incomplete",
                    str(lost),
                ) from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _upstream_for(self, target: ProxyTarget, *, has_body: bool) -> tuple[_Upstream, bool]:
        """The kept-alive stream to this host:port if it is safe to reuse, else a new one."""
        key = (target.host.lower(), target.port)
        current = self._upstream
        if current is not None and current.key == key and not current.pending:
            fresh = time.monotonic() - current.last_used < REUSE_WITH_BODY_SECONDS
            if not has_body or fresh:
                return current, True
        self._drop_upstream()
        try:
            stream = await self._dial(target)
        except DialError as error:
            status, message, proxy_status = dial_failure_response(error, target)
            raise _RequestRejected(
                status, message, proxy_status, f"dial failed: {error.reason.label}"
            ) from None
        self._upstream = _Upstream(key, stream)
        return self._upstream, False

    async def _relay_request_body(self, framing: BodyFraming, stream: ByteStream) -> None:
        if framing.kind == "length":
            remaining = framing.length
            while remaining:
                if not self._pending:
                    await self._fill_from_client()
                taken = min(remaining, len(self._pending))
                await self._send_upstream(stream, bytes(self._pending[:taken]))
                del self._pending[:taken]
                remaining -= taken
            return
        scanner = ChunkedScanner()
        while True:
            if self._pending:
                used = scanner.feed(self._pending)
                await self._send_upstream(stream, bytes(self._pending[:used]))
                del self._pending[:used]
                if not scanner.done:
                    continue  # what came in while that waited for the tunnel's credit goes first
            if scanner.done:
                return
            await self._fill_from_client()

    async def _read_final_response_head(
        self, upstream: _Upstream, *, relay_interim: bool
    ) -> tuple[bytes, ResponseHead]:
        """Read response heads until the final (or 101) one, relaying interim 1xx heads.

        HTTP/1.0 defined no 1xx statuses, so an HTTP/1.0 client never gets one (RFC 9110 §15.2).
        """
        while True:
            self._waiting_upstream = True
            try:
                raw = await self._read_response_head(upstream)
            finally:
                self._waiting_upstream = False
            try:
                response = parse_response_head(raw, max_header_count=MAX_RESPONSE_HEADER_COUNT)
            except HttpHeadError as error:
                raise _RequestRejected(
                    502, error.message, "http_response_incomplete", "bad response"
                ) from None
            if response.status >= 200 or response.status == 101:
                return raw, response
            if relay_interim:
                await self._send_to_client(raw)

    async def _read_response_head(self, upstream: _Upstream) -> bytes:
        pending = upstream.pending
        scan_from = 0
        while True:
            skip = leading_empty_line_bytes(pending)
            if skip:
                del pending[:skip]
                scan_from = 0
            end = find_head_end(pending, scan_from)
            if end is not None:
                raw = bytes(pending[:end])
                del pending[:end]
                return raw
            if len(pending) > MAX_RESPONSE_HEAD_BYTES:
                raise _RequestRejected(
                    502, "upstream response head too large", "http_response_header_size", "bad response"
                )
            scan_from = max(0, len(pending) - 3)
            data = await self._recv_upstream(upstream.stream, HEAD_READ_BYTES, responded=bool(pending))
            if not data:
                raise _UpstreamLost("upstream closed before sending a response", responded=bool(pending))
            pending += data

    async def _relay_response_body(self, framing: BodyFraming, upstream: _Upstream, head: bytes) -> None:
        """Send ``head`` and relay the body; the head leaves with the first body bytes (one write)."""
        if framing == NO_BODY:
            await self._send_to_client(head)
            return
        pending = upstream.pending
        stream = upstream.stream
        if framing.kind == "length":
            remaining = framing.length
            taken = min(remaining, len(pending))
            await self._send_to_client(head + pending[:taken])
            del pending[:taken]
            remaining -= taken
            while remaining:
                data = await self._recv_upstream(stream, min(remaining, RELAY_BLOCK_BYTES))
                if not data:
                    raise _UpstreamLost(
                        f"upstream closed with {remaining} body bytes missing", responded=True
                    )
                if len(data) > remaining:  # bytes past the response: keep them with the upstream
                    pending += data[remaining:]
                    data = data[:remaining]
                await self._send_to_client(data)
                remaining -= len(data)
        elif framing.kind == "chunked":
            scanner = ChunkedScanner()
            data = bytes(pending)
            pending.clear()
            first = head
            while True:
                try:
                    used = scanner.feed(data)
                except HttpHeadError as error:
                    raise _UpstreamLost(
                        f"upstream sent a broken chunked body: {error.message}", responded=True
                    ) from None
                if used or first:
                    await self._send_to_client(first + (data[:used] if used < len(data) else data))
                    first = b""
                if scanner.done:
                    pending += data[used:]
                    return
                data = await self._recv_upstream(stream, RELAY_BLOCK_BYTES)
                if not data:
                    raise _UpstreamLost("upstream closed in the middle of a chunked body", responded=True)
        else:
            await self._send_to_client(head + pending)
            pending.clear()
            while data := await self._recv_upstream(stream, RELAY_BLOCK_BYTES):
                await self._send_to_client(data)

    # ------------------------------------------------------------------ tunnels

    async def _tunnel(self, target: ProxyTarget) -> None:
        self._drop_upstream()
        try:
            stream = await self._dial(target)
            if not self._settings.optimistic_connect:
                await stream.wait_open()
        except DialError as error:
            status, message, proxy_status = dial_failure_response(error, target)
            raise _RequestRejected(
                status, message, proxy_status, f"dial failed: {error.reason.label}"
            ) from None
        await self._send_to_client(CONNECT_ESTABLISHED)
        await self._relay_raw(stream, b"", target)

    async def _relay_raw(self, stream: ByteStream, to_client_first: bytes, target: ProxyTarget) -> None:
        """Pipe bytes both ways until both sides finish, half-closes included."""
        try:
            if to_client_first:
                await self._send_to_client(to_client_first)
            transport = self.client.transport
            if isinstance(stream, TunnelStream) and transport is not None and not transport.is_closing():
                # The client socket and the tunnel stream meet directly from here on.
                early = self.client.detach()
                if self.client.at_eof:
                    stream.shutdown_write()
                self._streams.discard(stream)
                self._relay = stream.take_over(transport, target.display, early, self._count)
                await self._relay.finished
                return
            await _pump_both_ways(self.client, stream, self._count)  # early bytes: in the client buffer
        finally:
            self._release(stream)

    # ------------------------------------------------------------------ client and stream I/O

    async def _fill_from_client(self) -> None:
        """Wait for more request body bytes; a stalled or vanished client ends the connection."""
        try:
            more = await self.client.fill(self._settings.idle_timeout)
        except TimeoutError:
            raise _ClientGone() from None
        if not more:
            raise _ClientGone()

    async def _send_to_client(self, data: bytes | memoryview) -> None:
        try:
            await self.client.sendall(data, self._settings.idle_timeout)
        except (OSError, StreamClosedError, TimeoutError) as error:
            raise _ClientGone() from error

    def _count(self, up: int, down: int) -> None:
        if self._meter is not None:
            self._meter.record_bytes(up, down, self._host)

    async def _send_upstream(self, stream: ByteStream, data: bytes | memoryview) -> None:
        try:
            await stream.sendall(data)
        except (StreamClosedError, OSError) as error:
            raise _UpstreamLost(f"upstream stream failed while sending: {error}", responded=False) from None
        self._count(len(data), 0)

    async def _recv_upstream(self, stream: ByteStream, max_bytes: int, *, responded: bool = True) -> bytes:
        try:
            data = await stream.recv(max_bytes)
        except (StreamClosedError, OSError) as error:
            raise _UpstreamLost(f"upstream stream failed: {error}", responded=responded) from None
        self._count(0, len(data))
        return data

    # ------------------------------------------------------------------ errors

    async def _reject(self, rejection: _RequestRejected, request: RequestHead | None) -> None:
        """Log one line, send the error response, and close gracefully."""
        what = "-"
        if request is not None:
            what = f"{request.method} {request.target if request.method == 'CONNECT' else _origin(request)}"
        self._log.warning(
            "%s: %s -> %d (%s): %s",
            self.peer,
            what,
            rejection.status,
            rejection.log_reason,
            rejection.message,
        )
        response = render_error_response(
            rejection.status,
            rejection.message,
            include_body=request is None or request.method != "HEAD",
            proxy_status_error=rejection.proxy_status,
        )
        try:
            await self._send_to_client(response)
        except _ClientGone:
            return
        await self._close_gracefully()

    async def _close_gracefully(self) -> None:
        """Half-close, then drain the client briefly so unread input cannot turn the close into a reset."""
        self.client.shutdown_write()
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        with contextlib.suppress(OSError, TimeoutError, StreamClosedError):
            while drained < LINGER_MAX_BYTES:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                data = await self.client.recv(RELAY_BLOCK_BYTES, wait)
                if not data:
                    return
                drained += len(data)


async def _pump_both_ways(
    client: SocketStream, stream: ByteStream, count: Callable[[int, int], None]
) -> None:
    """Relay between two coroutine streams (a direct upstream), half-closes propagated."""

    async def up() -> None:
        while data := await client.recv(RELAY_BLOCK_BYTES):
            await stream.sendall(data)
            count(len(data), 0)
        stream.shutdown_write()

    async def down() -> None:
        while data := await stream.recv(RELAY_BLOCK_BYTES):
            await client.sendall(data)
            count(0, len(data))
        client.shutdown_write()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished  # an error in either direction tears down both
    except (OSError, StreamClosedError):
        pass
    finally:
        for task in tasks:
            task.cancel()


def _origin(request: RequestHead) -> str:
    """host:port of an absolute-form target for logs (no path or query: they may be private)."""
    try:
        return classify_target(request).display
    except HttpHeadError:
        return "(invalid target)"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket; the address is reusable at once after a restart, but never shared."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:
        raise ProxyBindError(
            error.errno, f"cannot listen on {host}:{port}: {error.strerror or error}"
        ) from error
    try:
        if os.name == "nt":  # pragma: no cover - Windows: SO_REUSEADDR there would let others steal the port
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise ProxyBindError(
            error.errno, f"cannot listen on {host}:{port}: {error.strerror or error}"
        ) from error
    return listener


def _too_large(head: bytes | bytearray, limit: int) -> _RequestRejected:
    """414 when the request line alone is over the limit, else 431 (see ``oversized_request_head``)."""
    error = oversized_request_head(head, limit)
    proxy_status = "http_request_error" if error.status == 414 else "http_request_header_size"
    return _RequestRejected(error.status, error.message, proxy_status, "head too large")


class LocalProxy:
    """The local HTTP/HTTPS/WebSocket proxy; ``start()`` listens, ``stop()`` closes everything.

    Runs on the process's event loop thread (or the one given), so callers on other threads
    (the tray, tests) never wait on client I/O.
    """

    def __init__(
        self,
        dialer: Dialer,
        listen_address: str = "127.0.0.1",
        listen_port: int = 8080,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        header_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pac_rules: BypassRules | None = None,
        pac_fallback_direct: bool = False,
        optimistic_connect: bool = False,
        meter: Meter | None = None,
        logger: logging.Logger | None = None,
        loop_thread: LoopThread | None = None,
    ) -> None:
        self._dialer = dialer
        self._listen = (listen_address, listen_port)
        self._settings = _Settings(
            max_header_bytes, header_timeout, idle_timeout, max_header_count, None, optimistic_connect
        )
        self._max_connections = max_connections
        self._pac_rules = pac_rules  # serve /proxy.pac from these rules (None: no PAC file)
        self._pac_fallback_direct = pac_fallback_direct
        self._meter = meter  # counts the bytes relayed, per destination host
        self._log = logger or logging.getLogger(LOGGER_NAME)
        self._loop_thread = loop_thread or shared_loop()
        self._listener: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[ClientExchange, asyncio.Task[None]] = {}
        self._refused_warned = 0.0

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually listened on; the port is real even when 0 was asked for."""
        if self._listener is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        """``http://host:port`` to hand to clients as their proxy setting."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def active_connections(self) -> int:
        """Client connections being served right now, open CONNECT/WebSocket tunnels included."""
        return len(self._connections)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Bind and start accepting on the loop; raises ProxyBindError if the port is taken."""
        if self._listener is not None:
            raise RuntimeError("the proxy is already started")
        host, port = self._listen
        listener = _bind_listener(host, port)
        listener.setblocking(False)
        self._listener = listener
        if self._pac_rules is not None:
            host, port = self.address
            pac = render_pac(self._pac_rules, host, port, fallback_direct=self._pac_fallback_direct)
            self._settings = dataclasses.replace(self._settings, pac_file=pac.encode())
        try:
            self._server = self._loop_thread.run(self._serve_on_loop(listener))
        except BaseException:
            listener.close()
            self._listener = None
            raise
        if not _is_loopback(self.address[0]):
            self._log.warning(
                "proxy listening on %s is reachable from other machines: "
                "anyone who can connect to it can use the tunnel",
                self.url,
            )
        self._log.debug("proxy listening on %s", self.url)

    async def _serve_on_loop(self, listener: socket.socket) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: SocketStream(self._connected), sock=listener, backlog=LISTEN_BACKLOG
        )

    def _connected(self, client: SocketStream) -> None:
        assert client.transport is not None
        address = client.transport.get_extra_info("peername") or ("?", 0)
        peer = f"{address[0]}:{address[1]}"
        if len(self._connections) >= self._max_connections:
            now = time.monotonic()
            if now - self._refused_warned > 10.0:
                self._refused_warned = now
                self._log.warning(
                    "%s: more than %d client connections, closing new ones", peer, self._max_connections
                )
            client.abort()
            return
        exchange = ClientExchange(client, peer, self._dialer, self._settings, self._log, self._meter)
        task = asyncio.get_running_loop().create_task(exchange.run())
        exchange.task = task
        self._connections[exchange] = task
        task.add_done_callback(lambda _: self._connections.pop(exchange, None))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every client connection and its streams."""
        if self._listener is None:
            return
        try:
            self._loop_thread.run(self._stop_on_loop(timeout), timeout=timeout + 1.0)
        finally:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
            self._server = None
        self._log.debug("proxy stopped")

    async def _stop_on_loop(self, timeout: float) -> None:
        if self._server is not None:
            self._server.close()
        connections = dict(self._connections)
        for exchange, task in connections.items():
            exchange.close()
            task.cancel()
        if connections:
            await asyncio.wait(list(connections.values()), timeout=timeout)

    def __enter__(self) -> LocalProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
