"""The tunnel server: accepts agents over mutual TLS and dials targets for their streams.

Everything runs on one asyncio event loop: the listener, every TLS handshake, every tunnel
(``TunnelSession``) and every target connection (``StreamRelay``). Only name resolution
runs on a small thread pool. Every resource an unauthenticated client can make us spend
is capped before anything is allocated for it (connections in handshake, per source
address, a deadline), and a failure to accept or to set up one connection never stops
the listener. The server keeps the counters the metrics publisher and the Sleep Lambda
read, and shuts down gracefully: GOAWAY, stop accepting, drain, exit.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from server import __version__
from server.config import ServerConfig
from server.egress import EgressPolicy
from server.flow_control import stream_windows
from server.framing import FailReason, GoAwayReason, Role, StreamOpenRequested, TunnelConnection
from server.target_dialer import TargetDialError, dial_target_async
from server.tls import TlsSession, server_context
from server.tunnel_session import StreamRelay, TunnelSession

log = logging.getLogger("fluidity.server")

#: Connections taken from the listener per wake-up, so one burst cannot starve the tunnels.
ACCEPT_BATCH = 64
#: After the system refused to give us a socket or memory, wait this long before accepting again.
ACCEPT_RETRY_DELAY = 1.0
#: A repeated warning (caps hit, accept failing) is logged at most once per this many seconds.
WARN_INTERVAL = 10.0
#: How often the loop refreshes the heartbeat file the container health check reads.
HEARTBEAT_INTERVAL = 5.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Acceptor = Callable[[socket.socket], tuple[socket.socket, tuple[str, int]]]


def _accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    sock, peer = listener.accept()
    return sock, (str(peer[0]), int(peer[1]))


@dataclass(frozen=True, slots=True)
class ServerStats:
    active_tunnels: int
    active_streams: int
    last_activity: float  # epoch seconds of the last stream data or tunnel change
    total_tunnels: int
    total_streams: int
    handshakes: int = 0


class ThrottledWarning:
    """A warning that repeats under attack is logged once per interval, with how often it happened."""

    def __init__(self, message: str, interval: float = WARN_INTERVAL) -> None:
        self.message = message
        self.interval = interval
        self._last = -float("inf")
        self._count = 0

    def __call__(self, **fields: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            log.warning(self.message, extra={**fields, "occurrences": self._count})
            self._last = now
            self._count = 0


class TunnelServer:
    """The listener and every tunnel, on the running event loop (create it inside the loop)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        context: ssl.SSLContext | None = None,
        acceptor: Acceptor = _accept,
    ) -> None:
        self.config = config
        self.context = context or server_context(config.ca_file, config.cert_file, config.key_file)
        self.policy = EgressPolicy(config.allow_networks, config.allow_ports)
        self._acceptor = acceptor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._accepting = False
        self._tunnels: dict[str, TunnelSession] = {}
        self._handshaking: set[TunnelSession] = set()
        self._per_source: Counter[str] = Counter()
        self._shutting_down = False
        self._last_activity = time.time()
        self._ids = itertools.count(1)
        self._total_tunnels = 0
        self._total_streams = 0
        self._resolver = ThreadPoolExecutor(
            max_workers=config.resolver_threads, thread_name_prefix="resolver"
        )
        self._heartbeat: asyncio.TimerHandle | None = None
        self._warn_accept = ThrottledWarning("cannot accept connections, backing off")
        self._warn_setup = ThrottledWarning("cannot set up a connection, closed it")
        self._warn_handshakes = ThrottledWarning("too many connections in handshake, closing new ones")
        self._warn_source = ThrottledWarning("too many connections in handshake from one address")

    # ----- lifecycle ------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.listen_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.config.listen_address, self.config.listen_port))
            listener.listen(1024)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._listener = listener
        self._resume_accepting()
        host, port = listener.getsockname()[:2]
        log.info("listening", extra={"address": f"{host}:{port}", "tls": "1.3", "client_cert": "required"})
        if self.config.heartbeat_file is not None:
            self._beat()
        return host, port

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "server not started"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def stats(self) -> ServerStats:
        """Safe to call from another thread (the metrics publisher)."""
        tunnels = list(self._tunnels.values())
        last = self._last_activity
        if tunnels:
            newest = max(session.last_activity for session in tunnels)
            last = max(last, time.time() - (time.monotonic() - newest))
        return ServerStats(
            active_tunnels=len(tunnels),
            active_streams=sum(session.stream_count for session in tunnels),
            last_activity=last,
            total_tunnels=self._total_tunnels,
            total_streams=self._total_streams,
            handshakes=len(self._handshaking),
        )

    async def shutdown(self, grace: float | None = None) -> bool:
        """GOAWAY to every agent, stop accepting, let streams drain; True if all drained in time."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._shutting_down:
            return True
        self._shutting_down = True
        self._close_listener()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for session in list(self._handshaking):
            session.abort("server is shutting down")
        tunnels = list(self._tunnels.values())
        for session in tunnels:
            session.send_goaway(GoAwayReason.SHUTDOWN, "server is shutting down")
        streams = self.stats().active_streams
        log.info("shutting down", extra={"tunnels": len(tunnels), "streams": streams, "grace_s": grace})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (left := self.stats().active_streams) > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        tunnels = list(self._tunnels.values())
        for session in tunnels:
            session.close("server shut down", goaway=None)
        if tunnels:
            await asyncio.wait([session.closed for session in tunnels], timeout=2.0)
        self._resolver.shutdown(wait=False, cancel_futures=True)
        drained = left == 0
        if not drained:
            log.warning("shutdown grace expired", extra={"streams_cut": left})
        log.info("stopped", extra={"drained": drained})
        return drained

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._pause_accepting()
            listener.close()

    # ----- accepting ------------------------------------------------------

    def _resume_accepting(self) -> None:
        if self._listener is not None and not self._accepting and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept_ready)
            self._accepting = True

    def _pause_accepting(self) -> None:
        if self._accepting and self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
        self._accepting = False

    def _accept_ready(self) -> None:
        listener = self._listener
        assert listener is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self._acceptor(listener)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, MemoryError) as exc:
                if isinstance(exc, OSError) and exc.errno not in _RESOURCE_ERRNOS:
                    continue  # e.g. ECONNABORTED: that one connection is gone, the next may be fine
                self._warn_accept(error=_describe(exc), retry_in_s=ACCEPT_RETRY_DELAY)
                self._pause_accepting()
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            try:
                self._admit(sock, peer)
            except Exception as exc:  # MemoryError included: drop this one, keep listening
                self._warn_setup(peer=peer[0], error=_describe(exc))
                sock.close()

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        source = peer[0]
        if self._shutting_down:
            sock.close()
            return
        if len(self._handshaking) >= self.config.max_handshakes:
            self._warn_handshakes(limit=self.config.max_handshakes, peer=source)
            sock.close()
            return
        per_source = self.config.max_handshakes_per_source
        if per_source and self._per_source[source] >= per_source:
            self._warn_source(limit=per_source, peer=source)
            sock.close()
            return
        sock.setblocking(False)
        window, tuner = stream_windows(self.config.initial_window, tuning=self.config.window_tuning)
        session = TunnelSession(
            TlsSession(self.context, server_side=True),
            TunnelConnection(
                Role.SERVER,
                f"fluidity-server/{__version__}",
                max_payload=self.config.max_payload,
                initial_window=window,
                connection_window=self.config.connection_window,
            ),
            name=f"tunnel-{next(self._ids)}",
            peer=f"{peer[0]}:{peer[1]}",
            logger=log,
            handshake_timeout=self.config.handshake_timeout,
            dead_after=self.config.agent_timeout,
            stream_idle_timeout=self.config.stream_idle_timeout,
            window_tuner=tuner,
            on_ready=self._on_ready,
            on_open_request=self._on_open_request,
            on_closed=self._on_closed,
        )
        self._handshaking.add(session)
        self._per_source[source] += 1
        assert self._loop is not None
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: session, sock))
        task.add_done_callback(lambda done: self._transport_made(done, session, sock))

    def _transport_made(
        self, task: asyncio.Task[object], session: TunnelSession, sock: socket.socket
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            error = "cancelled" if task.cancelled() else _describe(task.exception())
            self._warn_setup(peer=session.peer, error=error)
            sock.close()
            session.abort(f"cannot set up the connection: {error}")

    def _release_handshake(self, session: TunnelSession) -> None:
        if session in self._handshaking:
            self._handshaking.discard(session)
            source = session.peer.rsplit(":", 1)[0]
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def _on_ready(self, session: TunnelSession) -> None:
        self._release_handshake(session)
        hello = session.peer_hello
        assert hello is not None
        if len(self._tunnels) >= self.config.max_tunnels:
            session.close(f"more than {self.config.max_tunnels} tunnels", goaway=GoAwayReason.OVERLOAD)
            return
        self._tunnels[session.name] = session
        self._total_tunnels += 1
        self._last_activity = time.time()
        log.info(
            "tunnel connected",
            extra={
                "tunnel": session.name,
                "peer": session.peer,
                "subject": session.tls.peer_subject(),
                "agent": hello.software,
                "tls": session.tls.version,
            },
        )

    def _on_closed(self, session: TunnelSession, reason: str) -> None:
        self._release_handshake(session)
        if self._tunnels.pop(session.name, None) is not None:
            self._last_activity = time.time()
            log.info("tunnel disconnected", extra={"tunnel": session.name, "reason": reason})
        elif session.tls.received_any:
            log.warning("tunnel refused", extra={"peer": session.peer, "reason": reason})
        else:
            log.debug("connection closed before TLS (probe)", extra={"peer": session.peer})

    # ----- streams --------------------------------------------------------

    def _on_open_request(self, session: TunnelSession, request: StreamOpenRequested) -> None:
        if self._shutting_down:
            refusal: tuple[FailReason, str] | None = (FailReason.SHUTTING_DOWN, "server is shutting down")
        elif session.stream_count >= self.config.max_streams_per_tunnel:
            refusal = (
                FailReason.LIMIT,
                f"more than {self.config.max_streams_per_tunnel} streams on one tunnel",
            )
        else:
            refusal = None
        if refusal is not None:
            session.reject_stream(request.stream_id, *refusal)
            self._log_stream_failure(session, request, *refusal)
            return
        self._total_streams += 1
        assert self._loop is not None
        session.pending[request.stream_id] = self._loop.create_task(self._open_stream(session, request))

    async def _open_stream(self, session: TunnelSession, request: StreamOpenRequested) -> None:
        sid = request.stream_id
        try:
            try:
                sock = await dial_target_async(
                    request.host,
                    request.port,
                    policy=self.policy,
                    timeout=self.config.connect_timeout,
                    executor=self._resolver,
                )
            except TargetDialError as exc:
                session.reject_stream(sid, exc.reason, exc.message)
                self._log_stream_failure(session, request, exc.reason, exc.message)
                return
            relay = StreamRelay(session, sid, f"{request.host}:{request.port}", sock)
            try:
                assert self._loop is not None
                await self._loop.create_connection(lambda: relay, sock=sock)
            except OSError as exc:
                sock.close()
                session.reject_stream(sid, FailReason.INTERNAL, _describe(exc))
                return
            if session.pending.pop(sid, None) is None or not session.conn.is_open(sid):
                relay.abort()  # the agent gave up meanwhile
                return
            session.accept_stream(relay)
            self._last_activity = time.time()
        except asyncio.CancelledError:
            pass  # the agent reset the stream or the tunnel closed
        finally:
            session.pending.pop(sid, None)

    @staticmethod
    def _log_stream_failure(
        session: TunnelSession, request: StreamOpenRequested, reason: FailReason, message: str
    ) -> None:
        log.info(
            "stream failed",
            extra={
                "tunnel": session.name,
                "stream": request.stream_id,
                "target": f"{request.host}:{request.port}",
                "reason": reason.label,
                "detail": message,
            },
        )

    # ----- health -----------------------------------------------------------

    def _beat(self) -> None:
        """Refresh the heartbeat file: proves to the health check that the loop runs and accepts."""
        path = self.config.heartbeat_file
        assert path is not None and self._loop is not None
        stats = self.stats()
        body = json.dumps(
            {
                "time": time.time(),
                "accepting": self._accepting,
                "tunnels": stats.active_tunnels,
                "handshakes": stats.handshakes,
            }
        )
        self._loop.run_in_executor(self._resolver, _write_atomically, path, body)
        self._heartbeat = self._loop.call_later(HEARTBEAT_INTERVAL, self._beat)


def _write_atomically(path: Path, body: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(body, encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        log.warning("cannot write the heartbeat file", extra={"file": str(path), "error": _describe(exc)})


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
