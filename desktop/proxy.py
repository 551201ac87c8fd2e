"""The local forward proxy: HTTP, HTTPS via CONNECT and WebSocket, one thread per client.

Browsers and tools on this machine talk plain HTTP proxy protocol to 127.0.0.1; every
upstream connection is opened through an injected ``Dialer`` (in the product, a stream
on the multiplexed mTLS tunnel). The proxy never resolves or connects to targets
itself, so what may be reached is decided in one place: the tunnel server.

Bodies are relayed verbatim in large blocks; the proxy only tracks framing so one
client connection can carry many requests. Every failure the client can still be told
about becomes a real HTTP response naming the cause.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from desktop.dialing import ByteStream, Dialer, DialError, StreamClosedError
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
    request_body_framing,
    request_keeps_alive,
    response_body_framing,
    response_keeps_alive,
)
from server.relay import relay
from server.worker_pool import WorkerPool

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

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Dial failure label -> (HTTP status, RFC 9209 Proxy-Status error type).
_DIAL_FAILURE_RESPONSES = {
    "policy": (403, "http_request_denied"),
    "timeout": (504, "connection_timeout"),
    "dns": (502, "dns_error"),
    "refused": (502, "connection_refused"),
    "unreachable": (502, "destination_unavailable"),
    "limit": (502, "connection_limit_reached"),
    "tunnel_down": (502, "proxy_internal_error"),
    "shutting_down": (502, "destination_unavailable"),
    "cancelled": (502, "proxy_internal_error"),
    "internal": (502, "proxy_internal_error"),
}

_DIAL_FAILURE_TEXT = {
    "policy": "blocked by the tunnel's egress policy",
    "timeout": "timed out connecting to",
    "dns": "cannot resolve",
    "refused": "connection refused by",
    "unreachable": "cannot reach",
    "limit": "too many open connections to reach",
    "tunnel_down": "the tunnel is down; cannot reach",
    "shutting_down": "the tunnel server is shutting down; cannot reach",
    "cancelled": "connection attempt cancelled for",
    "internal": "tunnel error while connecting to",
}


class ProxyBindError(OSError):
    """The proxy could not listen on its address (typically: the port is in use)."""


def dial_failure_response(error: DialError, target: ProxyTarget) -> tuple[int, str, str]:
    """(status, message, Proxy-Status error type) for a failed dial."""
    status, proxy_status = _DIAL_FAILURE_RESPONSES.get(error.reason, (502, "proxy_internal_error"))
    if error.reason == "policy":
        message = f"{target.display} is {_DIAL_FAILURE_TEXT['policy']}: {error.message}"
    else:
        message = f"{_DIAL_FAILURE_TEXT.get(error.reason, 'cannot reach')} {target.display}: {error.message}"
    return status, f"{message} ({error.reason})", proxy_status


@dataclass(frozen=True)
class _Settings:
    max_header_bytes: int
    header_timeout: float
    idle_timeout: float
    max_header_count: int


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


class _ClientConnection:
    """Serves one accepted client socket until it closes, in its own thread."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        dialer: Dialer,
        settings: _Settings,
        logger: logging.Logger,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self._dialer = dialer
        self._settings = settings
        self._log = logger
        self._accepted_at = time.monotonic()
        self._pending = bytearray()
        self._block = bytearray(RELAY_BLOCK_BYTES)
        self._block_view = memoryview(self._block)
        self._upstream: _Upstream | None = None
        self._streams: set[ByteStream] = set()
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            self._serve()
        except _ClientGone:
            self._log.debug("%s: client went away", self.peer)
        except (OSError, StreamClosedError) as error:
            self._log.info("%s: connection ended: %s", self.peer, error)
        except Exception:
            self._log.exception("%s: unexpected proxy error", self.peer)
        finally:
            self.close()

    def close(self) -> None:
        """Close the client socket and every stream; safe from any thread, more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
            self._streams.clear()
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _dial(self, target: ProxyTarget) -> ByteStream:
        """Open a stream or raise DialError; a transport error escaping the dialer counts as internal."""
        try:
            stream = self._dialer.dial(target.host, target.port)
        except (OSError, StreamClosedError) as error:
            raise DialError("internal", str(error) or type(error).__name__) from None
        with self._lock:
            if not self._closed:
                self._streams.add(stream)
                return stream
        stream.close()
        raise _ClientGone()

    def _release(self, stream: ByteStream) -> None:
        with self._lock:
            self._streams.discard(stream)
        with contextlib.suppress(Exception):
            stream.close()

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._release(self._upstream.stream)
            self._upstream = None

    # ------------------------------------------------------------------ request loop

    def _serve(self) -> None:
        first = True
        while True:
            request: RequestHead | None = None
            try:
                raw = self._read_request_head(first)
                if raw is None:
                    return
                first = False
                request = parse_request_head(raw, max_header_count=self._settings.max_header_count)
                target = classify_target(request)
                if request.method == "CONNECT":
                    self._tunnel(target)
                    return
                if not self._exchange(request, target):
                    return
            except HttpHeadError as error:
                self._reject(
                    _RequestRejected(error.status, error.message, "http_request_error", "bad request"),
                    request,
                )
                return
            except _RequestRejected as rejection:
                self._reject(rejection, request)
                return

    def _read_request_head(self, first: bool) -> bytes | None:
        """Read one request head; None when the client closes or idles out between requests.

        The header timeout covers the whole head (from accept for the first request, from
        its first byte for later ones), so a client dripping bytes cannot hold a thread.
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
                self.sock.settimeout(wait)
                data = self.sock.recv(HEAD_READ_BYTES)
            except TimeoutError:
                if not self._pending:
                    return None
                raise _RequestRejected(
                    408,
                    f"the request head was not complete within {settings.header_timeout:g} s",
                    "http_request_error",
                    "header timeout",
                ) from None
            except OSError:
                return None
            if not data:
                return None
            self._pending += data

    # ------------------------------------------------------------------ plain HTTP

    def _exchange(self, request: RequestHead, target: ProxyTarget) -> bool:
        """Forward one request and relay its response; True if the client connection stays open."""
        framing = request_body_framing(request)
        client_keeps_alive = request_keeps_alive(request)
        upstream, raw_head, response, body_sent = self._send_request(
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
            self._send_to_client(raw_head)
            self._relay_raw(upstream.stream, bytes(upstream.pending))
            self._drop_upstream()
            return False
        try:
            response_framing = response_body_framing(request.method, response)
        except HttpHeadError as error:
            self._drop_upstream()
            raise _RequestRejected(
                502, error.message, "http_response_content_length", "bad response"
            ) from None
        self._send_to_client(relayable_response_head(raw_head, response))
        try:
            self._relay_response_body(response_framing, upstream)
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
            self._close_gracefully()
            return False
        keep_open = (
            client_keeps_alive and response_keeps_alive(response) and response_framing.kind != "until_close"
        )
        if not keep_open:
            self._drop_upstream()
        return keep_open

    def _send_request(
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
            upstream, reused = self._upstream_for(target, has_body=has_body)
            body_sent = True
            try:
                self._send_upstream(upstream.stream, forward)
                if has_body:
                    if expects_continue(request):
                        self._send_to_client(CONTINUE)
                    try:
                        self._relay_request_body(framing, upstream.stream)
                    except _UpstreamLost as lost:
                        self._log.debug("%s: upstream stopped taking the body: %s", self.peer, lost)
                        body_sent = False
                raw_head, response = self._read_final_response_head(
                    upstream, relay_interim=request.minor_version > 0
                )
                return upstream, raw_head, response, body_sent
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

    def _upstream_for(self, target: ProxyTarget, *, has_body: bool) -> tuple[_Upstream, bool]:
        """The kept-alive stream to this host:port if it is safe to reuse, else a new one."""
        key = (target.host.lower(), target.port)
        current = self._upstream
        if current is not None and current.key == key:
            fresh = time.monotonic() - current.last_used < REUSE_WITH_BODY_SECONDS
            if not has_body or fresh:
                return current, True
        self._drop_upstream()
        try:
            stream = self._dial(target)
        except DialError as error:
            status, message, proxy_status = dial_failure_response(error, target)
            raise _RequestRejected(status, message, proxy_status, f"dial failed: {error.reason}") from None
        self._upstream = _Upstream(key, stream)
        return self._upstream, False

    def _relay_request_body(self, framing: BodyFraming, stream: ByteStream) -> None:
        if framing.kind == "length":
            remaining = framing.length
            if self._pending:
                taken = min(remaining, len(self._pending))
                self._send_upstream(stream, bytes(self._pending[:taken]))
                del self._pending[:taken]
                remaining -= taken
            while remaining:
                received = self._recv_from_client(min(remaining, RELAY_BLOCK_BYTES))
                self._send_upstream(stream, self._block_view[:received])
                remaining -= received
            return
        scanner = ChunkedScanner()
        if self._pending:
            used = scanner.feed(self._pending)
            self._send_upstream(stream, bytes(self._pending[:used]))
            del self._pending[:used]
        while not scanner.done:
            received = self._recv_from_client(RELAY_BLOCK_BYTES)
            used = scanner.feed(self._block, 0, received)
            self._send_upstream(stream, self._block_view[:used])
            if used < received:
                self._pending += self._block_view[used:received]

    def _read_final_response_head(
        self, upstream: _Upstream, *, relay_interim: bool
    ) -> tuple[bytes, ResponseHead]:
        """Read response heads until the final (or 101) one, relaying interim 1xx heads.

        HTTP/1.0 defined no 1xx statuses, so an HTTP/1.0 client never gets one (RFC 9110 §15.2).
        """
        while True:
            raw = self._read_response_head(upstream)
            try:
                response = parse_response_head(raw, max_header_count=MAX_RESPONSE_HEADER_COUNT)
            except HttpHeadError as error:
                raise _RequestRejected(
                    502, error.message, "http_response_incomplete", "bad response"
                ) from None
            if response.status >= 200 or response.status == 101:
                return raw, response
            if relay_interim:
                self._send_to_client(raw)

    def _read_response_head(self, upstream: _Upstream) -> bytes:
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
            data = self._recv_upstream(upstream.stream, HEAD_READ_BYTES, responded=bool(pending))
            if not data:
                raise _UpstreamLost("upstream closed before sending a response", responded=bool(pending))
            pending += data

    def _relay_response_body(self, framing: BodyFraming, upstream: _Upstream) -> None:
        if framing == NO_BODY:
            return
        pending = upstream.pending
        stream = upstream.stream
        if framing.kind == "length":
            remaining = framing.length
            if pending:
                taken = min(remaining, len(pending))
                self._send_to_client(bytes(pending[:taken]))
                del pending[:taken]
                remaining -= taken
            while remaining:
                data = self._recv_upstream(stream, min(remaining, RELAY_BLOCK_BYTES))
                if not data:
                    raise _UpstreamLost(
                        f"upstream closed with {remaining} body bytes missing", responded=True
                    )
                self._send_to_client(data)
                remaining -= len(data)
        elif framing.kind == "chunked":
            scanner = ChunkedScanner()
            data = bytes(pending)
            pending.clear()
            while True:
                try:
                    used = scanner.feed(data)
                except HttpHeadError as error:
                    raise _UpstreamLost(
                        f"upstream sent a broken chunked body: {error.message}", responded=True
                    ) from None
                if used:
                    self._send_to_client(data[:used] if used < len(data) else data)
                if scanner.done:
                    pending += data[used:]
                    return
                data = self._recv_upstream(stream, RELAY_BLOCK_BYTES)
                if not data:
                    raise _UpstreamLost("upstream closed in the middle of a chunked body", responded=True)
        else:
            if pending:
                self._send_to_client(bytes(pending))
                pending.clear()
            while data := self._recv_upstream(stream, RELAY_BLOCK_BYTES):
                self._send_to_client(data)

    # ------------------------------------------------------------------ tunnels

    def _tunnel(self, target: ProxyTarget) -> None:
        self._drop_upstream()
        try:
            stream = self._dial(target)
        except DialError as error:
            status, message, proxy_status = dial_failure_response(error, target)
            raise _RequestRejected(status, message, proxy_status, f"dial failed: {error.reason}") from None
        try:
            self._send_to_client(CONNECT_ESTABLISHED)
            self._relay_raw(stream, b"")
        finally:
            self._release(stream)

    def _relay_raw(self, stream: ByteStream, to_client_first: bytes) -> None:
        """Pipe bytes both ways until both sides finish (half-closes propagated by ``relay``)."""
        if to_client_first:
            self._send_to_client(to_client_first)
        early = bytes(self._pending)
        self._pending.clear()
        self.sock.settimeout(None)
        if not relay(self.sock, stream, initial=early, chunk=RELAY_BLOCK_BYTES):
            self._log.debug("%s: tunnel ended with an error on one side", self.peer)

    # ------------------------------------------------------------------ socket and stream I/O

    def _recv_from_client(self, max_bytes: int) -> int:
        """Read request body bytes into the relay block; a stalled or vanished client ends the connection."""
        try:
            self.sock.settimeout(self._settings.idle_timeout)
            received = self.sock.recv_into(self._block_view, max_bytes)
        except OSError as error:
            raise _ClientGone() from error
        if not received:
            raise _ClientGone()
        return received

    def _send_to_client(self, data: bytes | memoryview) -> None:
        try:
            self.sock.settimeout(self._settings.idle_timeout)
            self.sock.sendall(data)
        except OSError as error:
            raise _ClientGone() from error

    @staticmethod
    def _send_upstream(stream: ByteStream, data: bytes | memoryview) -> None:
        try:
            stream.sendall(data)
        except (StreamClosedError, OSError) as error:
            raise _UpstreamLost(f"upstream stream failed while sending: {error}", responded=False) from None

    @staticmethod
    def _recv_upstream(stream: ByteStream, max_bytes: int, *, responded: bool = True) -> bytes:
        try:
            return stream.recv(max_bytes)
        except (StreamClosedError, OSError) as error:
            raise _UpstreamLost(f"upstream stream failed: {error}", responded=responded) from None

    # ------------------------------------------------------------------ errors

    def _reject(self, rejection: _RequestRejected, request: RequestHead | None) -> None:
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
            self.sock.settimeout(self._settings.idle_timeout)
            self.sock.sendall(response)
        except OSError:
            return
        self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Half-close, then drain the client briefly so unread input cannot turn the close into a reset."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        with contextlib.suppress(OSError):
            while drained < LINGER_MAX_BYTES:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                self.sock.settimeout(wait)
                received = self.sock.recv_into(self._block_view)
                if not received:
                    return
                drained += received


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
    """The local HTTP/HTTPS/WebSocket proxy; ``start()`` listens, ``stop()`` closes everything."""

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
        logger: logging.Logger | None = None,
    ) -> None:
        self._dialer = dialer
        self._listen = (listen_address, listen_port)
        self._settings = _Settings(max_header_bytes, header_timeout, idle_timeout, max_header_count)
        self._log = logger or logging.getLogger(LOGGER_NAME)
        self._listener: socket.socket | None = None
        self._waker: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[_ClientConnection, threading.Event] = {}
        self._workers = WorkerPool("proxy")
        self._lock = threading.Lock()
        self._stopping = threading.Event()

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
        with self._lock:
            return len(self._connections)

    @property
    def running(self) -> bool:
        return self._accept_thread is not None and self._accept_thread.is_alive()

    def start(self) -> None:
        """Bind and start accepting in a daemon thread; raises ProxyBindError if the port is taken."""
        if self._listener is not None:
            raise RuntimeError("the proxy is already started")
        host, port = self._listen
        listener = _bind_listener(host, port)
        listener.setblocking(False)
        self._listener = listener
        self._waker = socket.socketpair()
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._accept_thread.start()
        if not _is_loopback(self.address[0]):
            self._log.warning(
                "proxy listening on %s is reachable from other machines: "
                "anyone who can connect to it can use the tunnel",
                self.url,
            )
        self._log.debug("proxy listening on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every client connection and its streams, join the threads."""
        if self._listener is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        if self._waker is not None:
            with contextlib.suppress(OSError):
                self._waker[1].send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            connection.close()
        for done in connections.values():
            done.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._waker is not None:
            for end in self._waker:
                end.close()
        self._listener = None
        self._waker = None
        self._accept_thread = None
        self._log.debug("proxy stopped")

    def __enter__(self) -> LocalProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._waker is not None
        listener, waker = self._listener, self._waker[0]
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(waker, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is waker:
                        return
                    self._accept_one(listener)

    def _accept_one(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            # Out of file descriptors and the like: say so, and do not spin on it.
            self._log.warning("accept failed: %s", error)
            time.sleep(0.1)
            return
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = f"{address[0]}:{address[1]}"
        connection = _ClientConnection(sock, peer, self._dialer, self._settings, self._log)
        done = threading.Event()
        with self._lock:
            if self._stopping.is_set():
                connection.close()
                return
            self._connections[connection] = done
        self._workers.submit(self._run_connection, connection, done)

    def _run_connection(self, connection: _ClientConnection, done: threading.Event) -> None:
        try:
            connection.run()
        finally:
            with self._lock:
                self._connections.pop(connection, None)
            done.set()
