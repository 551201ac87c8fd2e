"""The agent's end of the tunnel: one long-lived mTLS link, kept alive and re-established.

Every proxied client connection becomes a stream on the current link, so no request
pays for a TLS handshake. A supervisor thread connects, watches the link and reconnects
with exponential backoff and jitter; requests that arrive while it reconnects wait a
bounded time, then fail with a clear reason.
"""

from __future__ import annotations

import enum
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint
from server import __version__
from server.framing import Role, TunnelConnection
from server.stream_api import DialError
from server.tls import TlsChannel, TlsError, client_context
from server.tunnel_link import LinkClosed, LinkStream, TunnelLink, set_nodelay

log = logging.getLogger("fluidity.agent")

INITIAL_BACKOFF = 0.5


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"


LinkObserver = Callable[[LinkState, "str | None"], None]


@dataclass(frozen=True, slots=True)
class TunnelStats:
    state: LinkState
    active_streams: int
    connected_since: float | None  # epoch seconds
    last_error: str | None
    consecutive_failures: int
    last_connect_ms: float | None


class TunnelClient:
    """Implements the proxy's Dialer on top of a self-healing TunnelLink."""

    def __init__(self, config: AgentConfig, *, on_state: LinkObserver | None = None) -> None:
        self.config = config
        self.context = client_context(config.ca_file, config.cert_file, config.key_file)
        self._on_state = on_state
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._link: TunnelLink | None = None
        self._old_links: list[TunnelLink] = []
        self._endpoint: Endpoint | None = None
        self._state = LinkState.DISCONNECTED
        self._stopped = threading.Event()
        self._kick = threading.Event()  # endpoint changed or stop: wake the supervisor
        self._thread: threading.Thread | None = None
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._last_connect_ms: float | None = None

    # ----- control --------------------------------------------------------

    def start(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._stopped.clear()
        self._thread = threading.Thread(target=self._supervise, name="tunnel-supervisor", daemon=True)
        self._thread.start()

    def set_endpoint(self, endpoint: Endpoint) -> None:
        """Point at a new server address (a woken Fargate task gets a new IP) and reconnect."""
        with self._lock:
            if endpoint == self._endpoint:
                return
            self._endpoint = endpoint
            link = self._link
        self._kick.set()
        if link is not None:
            link.close("server moved")

    def stop(self) -> None:
        self._stopped.set()
        self._kick.set()
        with self._lock:
            links = [link for link in (self._link, *self._old_links) if link is not None]
            self._changed.notify_all()
        for link in links:
            link.close("agent stopped")
        for link in links:
            link.wait_closed(2.0)
        if self._thread is not None:
            self._thread.join(5.0)
        self._set_state(LinkState.DISCONNECTED, None)

    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._state is not LinkState.CONNECTED:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped.is_set() or (cancel is not None and cancel.is_set()):
                    return False
                self._changed.wait(min(remaining, 0.25))
            return True

    @property
    def state(self) -> LinkState:
        return self._state

    def stats(self) -> TunnelStats:
        with self._lock:
            links = [link for link in (self._link, *self._old_links) if link is not None]
            return TunnelStats(
                self._state,
                sum(link.active_streams for link in links),
                self._connected_since,
                self._last_error,
                self._failures,
                self._last_connect_ms,
            )

    # ----- Dialer ---------------------------------------------------------

    def dial(self, host: str, port: int) -> LinkStream:
        deadline = time.monotonic() + self.config.request_wait
        while True:
            link = self._usable_link(deadline)
            try:
                return link.open_stream(host, port, timeout=self.config.connect_timeout + 5.0)
            except DialError as exc:
                # The link died or was told to go away between our check and the OPEN:
                # try the next link while the request's waiting budget lasts.
                if exc.reason not in ("tunnel_down", "shutting_down") or time.monotonic() >= deadline:
                    raise

    def _usable_link(self, deadline: float) -> TunnelLink:
        with self._changed:
            while True:
                link = self._link
                if link is not None and link.accepting_streams:
                    return link
                if self._stopped.is_set():
                    raise DialError("tunnel_down", "the agent is stopping")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = self._last_error or "not connected yet"
                    raise DialError(
                        "tunnel_down",
                        f"tunnel to the server is down ({why}); waited {self.config.request_wait:g} s",
                    )
                self._changed.wait(min(remaining, 0.25))

    # ----- supervisor -----------------------------------------------------

    def _set_state(self, state: LinkState, error: str | None) -> None:
        with self._changed:
            changed = state is not self._state
            self._state = state
            if error is not None:
                self._last_error = error
            self._changed.notify_all()
        if changed and self._on_state is not None:
            try:
                self._on_state(state, error)
            except Exception:
                log.exception("link state observer failed")

    def _supervise(self) -> None:
        backoff = INITIAL_BACKOFF
        first = True
        while not self._stopped.is_set():
            endpoint = self._endpoint
            assert endpoint is not None
            self._kick.clear()
            self._set_state(LinkState.CONNECTING if first else LinkState.RECONNECTING, None)
            started = time.monotonic()
            try:
                link = self._connect(endpoint)
            except (OSError, LinkClosed, TlsError) as exc:
                reason = _describe_connect_error(exc)
                with self._lock:
                    self._failures += 1
                    self._last_error = f"cannot reach {endpoint}: {reason}"
                log.warning(
                    "connect failed",
                    extra={"server": str(endpoint), "reason": reason, "attempt": self._failures},
                )
                self._set_state(
                    LinkState.RECONNECTING if not first else LinkState.CONNECTING, self._last_error
                )
                delay = backoff * (0.5 + random.random())  # jitter: agents don't reconnect in lockstep
                backoff = min(backoff * 2, self.config.reconnect_backoff_max)
                self._kick.wait(delay)
                continue
            first = False
            elapsed_ms = (time.monotonic() - started) * 1000
            log.info(
                f"Connected to server in {elapsed_ms:.0f}ms",
                extra={
                    "server": str(endpoint),
                    "connect_ms": round(elapsed_ms, 1),
                    "tls": link.channel.version,
                },
            )
            with self._lock:
                self._link = link
                self._failures = 0
                self._last_connect_ms = elapsed_ms
                self._connected_since = time.time()
                self._last_error = None
            backoff = INITIAL_BACKOFF
            self._set_state(LinkState.CONNECTED, None)
            self._watch(link)
            with self._lock:
                if self._link is link:
                    self._link = None
                self._connected_since = None
                if not link.closed:  # GOAWAY: keep it until its streams finish
                    self._old_links.append(link)
                self._old_links = [old for old in self._old_links if not old.closed]
            if not self._stopped.is_set():
                reason = link.close_reason or (
                    f"server sent GOAWAY: {link.goaway.message}" if link.goaway else ""
                )
                log.warning("tunnel lost, reconnecting", extra={"server": str(endpoint), "reason": reason})
                self._set_state(LinkState.RECONNECTING, f"tunnel lost: {reason}")

    def _watch(self, link: TunnelLink) -> None:
        while not self._stopped.is_set():
            if link.closed or link.goaway is not None or self._kick.is_set():
                return
            link.wait_closed(0.25)

    def _connect(self, endpoint: Endpoint) -> TunnelLink:
        timeout = self.config.connect_timeout
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            sock.settimeout(None)
            set_nodelay(sock)
            channel = TlsChannel(
                sock, self.context, server_side=False, server_hostname=self.config.server_name
            )
            channel.handshake(max(0.1, deadline - time.monotonic()))
        except BaseException:
            sock.close()
            raise
        conn = TunnelConnection(
            Role.AGENT,
            f"fluidity-agent/{__version__}",
            max_payload=self.config.max_payload,
            initial_window=self.config.initial_window,
        )
        link = TunnelLink(
            channel,
            conn,
            name=f"tunnel-{endpoint}",
            logger=log,
            dead_after=self.config.keepalive_timeout,
            keepalive_interval=self.config.keepalive_interval,
            on_closed=self._on_link_closed,
        )
        link.start()
        try:
            # TLS 1.3 reports a rejected client certificate only on the first read,
            # so waiting for the server's HELLO is what proves the tunnel works.
            link.wait_hello(max(0.1, deadline - time.monotonic()))
        except LinkClosed:
            link.close("handshake failed", goaway=None)
            link.wait_closed(1.0)
            raise
        return link

    def _on_link_closed(self, link: TunnelLink, reason: str) -> None:
        with self._changed:
            self._changed.notify_all()


def _describe_connect_error(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running and port 8443 open?)"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed ({exc.strerror})"
    if isinstance(exc, LinkClosed | TlsError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
