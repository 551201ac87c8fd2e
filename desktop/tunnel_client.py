"""The agent's end of the tunnel: one long-lived mTLS link, kept alive and re-established.

Every proxied client connection becomes a stream on the current tunnel, so no request
pays for a TLS handshake. A supervisor task on the event loop connects, watches the
tunnel and reconnects with exponential backoff and jitter; requests that arrive while
it reconnects wait a bounded time, then fail with a clear reason.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from desktop.config import AgentConfig
from desktop.event_loop import LoopThread, shared_loop
from desktop.lifecycle.base import Endpoint
from server import __version__
from server.flow_control import stream_windows
from server.framing import FailReason, Role, TunnelConnection
from server.stream_api import DialError
from server.tls import TlsError, TlsSession, client_context
from server.tunnel_session import TunnelSession, TunnelStream

log = logging.getLogger("fluidity.agent")

INITIAL_BACKOFF = 0.5
#: Dial failures that mean "this tunnel is going away": the next tunnel may still serve the request.
_RETRY_ON_ANOTHER_TUNNEL = frozenset({FailReason.TUNNEL_DOWN, FailReason.SHUTTING_DOWN})
SAME_CA_HINT = (
    "; the agent and the server need certificates from the same CA (`fluidity-certs init` once, "
    "then `fluidity-certs bundle` / `import` for the other side), and server_name must be in the "
    "server certificate"
)


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
    permanent_error: str | None = None  # a refused certificate: retrying cannot help


class TunnelClient:
    """Implements the proxy's Dialer on top of a self-healing ``TunnelSession`` on the event loop.

    The control calls (start, stop, set_endpoint, wait_connected, stats) may come from any
    thread; ``dial`` is a coroutine on the loop.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        on_state: LinkObserver | None = None,
        loop_thread: LoopThread | None = None,
    ) -> None:
        self.config = config
        self.context: ssl.SSLContext | None = None  # loaded at start: the local lifecycle makes the files
        self.loop_thread = loop_thread or shared_loop()
        self._on_state = on_state
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._session: TunnelSession | None = None
        self._old_sessions: list[TunnelSession] = []
        self._endpoint: Endpoint | None = None
        self._state = LinkState.DISCONNECTED
        self._stopped = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()  # endpoint changed or stop: wake the supervisor
        self._usable = asyncio.Event()  # a session takes streams
        self._ever_connected = False
        self._permanent: str | None = None
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._last_connect_ms: float | None = None

    # ----- control (any thread) ---------------------------------------------

    def start(self, endpoint: Endpoint) -> None:
        """Connect in the background; raises TlsSetupError for unusable certificate files."""
        if self.context is None:
            self.context = client_context(self.config.ca_file, self.config.cert_file, self.config.key_file)
        self._endpoint = endpoint
        self._stopped.clear()
        self.loop_thread.run(self._start())

    async def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def set_endpoint(self, endpoint: Endpoint) -> None:
        """Point at a new server address (a woken Fargate task gets a new IP) and reconnect."""
        with self._lock:
            if endpoint == self._endpoint:
                return
            self._endpoint = endpoint
        self.loop_thread.call(self._move)

    def _move(self) -> None:
        self._kick.set()
        if self._session is not None:
            self._session.close("server moved")

    def stop(self) -> None:
        self._stopped.set()
        with self._changed:
            self._changed.notify_all()
        try:
            self.loop_thread.run(self._stop(), timeout=10.0)
        except TimeoutError:
            log.warning("tunnel client did not stop in time")
        self._set_state(LinkState.DISCONNECTED, None)

    async def _stop(self) -> None:
        self._kick.set()
        self._usable.set()  # requests waiting for a tunnel give up now
        sessions = [s for s in (self._session, *self._old_sessions) if s is not None]
        for session in sessions:
            session.close("agent stopped")
        if sessions:
            await asyncio.wait([session.closed for session in sessions], timeout=2.0)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._state is not LinkState.CONNECTED:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopped.is_set() or (cancel is not None and cancel.is_set()):
                    return False
                if self._permanent is not None:
                    return False
                self._changed.wait(min(remaining, 0.25))
            return True

    @property
    def state(self) -> LinkState:
        return self._state

    def stats(self) -> TunnelStats:
        sessions = [s for s in (self._session, *self._old_sessions) if s is not None]
        return TunnelStats(
            self._state,
            sum(session.stream_count for session in sessions),
            self._connected_since,
            self._last_error,
            self._failures,
            self._last_connect_ms,
            self._permanent,
        )

    # ----- Dialer (on the loop) ----------------------------------------------

    async def dial(self, host: str, port: int) -> TunnelStream:
        loop = asyncio.get_running_loop()
        # While the server is still being woken, a request waits as long as the wake may take.
        wait = self.config.request_wait if self._ever_connected else self.config.connection_timeout
        deadline = loop.time() + wait
        while True:
            session = await self._usable_session(deadline, wait)
            try:
                return await session.open_stream(
                    host, port, timeout=self.config.connect_timeout + 5.0, wait=False
                )
            except DialError as exc:
                # The tunnel died or was told to go away between our check and the OPEN:
                # try the next one while the request's waiting budget lasts.
                if exc.reason not in _RETRY_ON_ANOTHER_TUNNEL or loop.time() >= deadline:
                    raise

    async def _usable_session(self, deadline: float, wait: float) -> TunnelSession:
        loop = asyncio.get_running_loop()
        while True:
            session = self._session
            if session is not None and session.accepting_streams:
                return session
            if self._stopped.is_set():
                raise DialError(FailReason.TUNNEL_DOWN, "the agent is stopping")
            if self._permanent is not None:
                raise DialError(FailReason.TUNNEL_DOWN, self._permanent)
            remaining = deadline - loop.time()
            if remaining <= 0:
                why = self._last_error or "not connected yet"
                raise DialError(
                    FailReason.TUNNEL_DOWN, f"tunnel to the server is down ({why}); waited {wait:g} s"
                )
            self._usable.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.25)):
                    await self._usable.wait()
            except TimeoutError:
                pass

    # ----- supervisor (on the loop) ---------------------------------------------

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

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = INITIAL_BACKOFF
        first = True
        while not self._stopped.is_set():
            endpoint = self._endpoint
            assert endpoint is not None
            self._kick.clear()
            self._set_state(LinkState.CONNECTING if first else LinkState.RECONNECTING, None)
            started = loop.time()
            try:
                session = await self._connect(endpoint)
            except (OSError, ConnectionError) as exc:
                if isinstance(exc, TlsError) and exc.certificate:
                    # Not transient: the same certificates will be refused again. Say so now.
                    hint = "" if "same `fluidity-certs init`" in str(exc) else SAME_CA_HINT
                    self._permanent = f"{endpoint} refused the tunnel: {exc}{hint}"
                    self._failures += 1
                    log.error(
                        "certificate refused, not retrying",
                        extra={"server": str(endpoint), "reason": str(exc)},
                    )
                    self._set_state(LinkState.DISCONNECTED, self._permanent)
                    self._usable.set()
                    return
                reason = _describe_connect_error(exc, endpoint.port)
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
                try:
                    async with asyncio.timeout(delay):
                        await self._kick.wait()
                except TimeoutError:
                    pass
                continue
            first = False
            elapsed_ms = (loop.time() - started) * 1000
            log.info(
                f"Connected to server in {elapsed_ms:.0f}ms",
                extra={
                    "server": str(endpoint),
                    "connect_ms": round(elapsed_ms, 1),
                    "tls": session.tls.version,
                },
            )
            self._session = session
            self._failures = 0
            self._last_connect_ms = elapsed_ms
            self._connected_since = time.time()
            self._last_error = None
            backoff = INITIAL_BACKOFF
            self._ever_connected = True
            self._usable.set()
            self._set_state(LinkState.CONNECTED, None)
            await self._watch(session)
            if self._session is session:
                self._session = None
            self._connected_since = None
            if session.closed_reason is None:  # GOAWAY: keep it until its streams finish
                self._old_sessions.append(session)
            self._old_sessions = [old for old in self._old_sessions if old.closed_reason is None]
            if not self._stopped.is_set():
                reason = session.closed_reason or (
                    f"server sent GOAWAY: {session.goaway.message}" if session.goaway else ""
                )
                log.warning("tunnel lost, reconnecting", extra={"server": str(endpoint), "reason": reason})
                self._set_state(LinkState.RECONNECTING, f"tunnel lost: {reason}")

    async def _watch(self, session: TunnelSession) -> None:
        while not self._stopped.is_set() and session.closed_reason is None and session.goaway is None:
            if self._kick.is_set():
                return
            await asyncio.wait([session.closed], timeout=0.25)

    async def _connect(self, endpoint: Endpoint) -> TunnelSession:
        loop = asyncio.get_running_loop()
        timeout = self.config.connect_timeout
        window, tuner = stream_windows(self.config.initial_window, tuning=self.config.window_tuning)
        conn = TunnelConnection(
            Role.AGENT,
            f"fluidity-agent/{__version__}",
            max_payload=self.config.max_payload,
            initial_window=window,
            connection_window=self.config.connection_window,
        )
        ready = loop.create_future()
        # A connect that fails before the wait below also fails `ready`: that is no news.
        ready.add_done_callback(lambda done: done.cancelled() or done.exception())

        def on_ready(session: TunnelSession) -> None:
            if not ready.done():
                ready.set_result(None)

        def on_closed(session: TunnelSession, reason: str) -> None:
            if not ready.done():
                ready.set_exception(session.tls_failure or ConnectionError(reason))
            with self._changed:
                self._changed.notify_all()

        assert self.context is not None
        session = TunnelSession(
            TlsSession(self.context, server_side=False, server_hostname=self.config.server_name),
            conn,
            name=f"tunnel-{endpoint}",
            peer=str(endpoint),
            logger=log,
            handshake_timeout=timeout,
            dead_after=self.config.keepalive_timeout,
            keepalive_interval=self.config.keepalive_interval,
            window_tuner=tuner,
            on_ready=on_ready,
            on_closed=on_closed,
        )
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: session, endpoint.host, endpoint.port)
                # TLS 1.3 reports a rejected client certificate only on the first read,
                # so waiting for the server's HELLO is what proves the tunnel works.
                await ready
        except TimeoutError:
            session.abort("handshake timed out")
            raise TimeoutError("timed out") from None
        except BaseException:
            session.abort("handshake failed")
            raise
        return session


def _describe_connect_error(exc: BaseException, port: int) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused (is the server running and port {port} open?)"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed ({exc.strerror})"
    if isinstance(exc, TlsError) or type(exc) is ConnectionError:
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
