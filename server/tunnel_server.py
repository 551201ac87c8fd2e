"""The tunnel server: accepts agents over mutual TLS and dials targets for their streams.

Threaded: one accept thread, one handshake thread per new connection, a reader and a
writer thread per tunnel, and two relay threads per stream. The server keeps the
counters the metrics publisher and the Sleep Lambda read (tunnels, streams, last
activity), and shuts down gracefully: GOAWAY, stop accepting, drain, exit.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from server import __version__
from server.config import ServerConfig
from server.egress import EgressPolicy
from server.framing import FailReason, GoAwayReason, Role, StreamOpenRequested, TunnelConnection
from server.relay import relay
from server.target_dialer import TargetDialError, dial_target
from server.tls import SilentClose, TlsChannel, TlsError, server_context
from server.tunnel_link import TunnelLink, set_nodelay
from server.worker_pool import WorkerPool

HANDSHAKE_TIMEOUT = 10.0

log = logging.getLogger("fluidity.server")


@dataclass(frozen=True, slots=True)
class ServerStats:
    active_tunnels: int
    active_streams: int
    last_activity: float  # epoch seconds of the last stream data or tunnel change
    total_tunnels: int
    total_streams: int


class TunnelServer:
    def __init__(self, config: ServerConfig, *, context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.context = context or server_context(config.ca_file, config.cert_file, config.key_file)
        self.policy = EgressPolicy(config.allow_networks, config.allow_ports)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._links: dict[str, TunnelLink] = {}
        self._pending_streams = 0  # OPENs being dialed or relayed
        self._drained = threading.Condition(self._lock)
        self._shutting_down = False
        self._last_activity = time.time()
        self._ids = itertools.count(1)
        self._total_tunnels = 0
        self._total_streams = 0
        self._accept_thread: threading.Thread | None = None
        self._stream_workers = WorkerPool("stream")

    # ----- lifecycle ------------------------------------------------------

    def start(self) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in self.config.listen_address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.listen_address, self.config.listen_port))
        listener.listen(128)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        log.info("listening", extra={"address": f"{host}:{port}", "tls": "1.3", "client_cert": "required"})
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accept_thread.start()
        return host, port

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "server not started"
        host, port = self._listener.getsockname()[:2]
        return host, port

    def stats(self) -> ServerStats:
        with self._lock:
            links = list(self._links.values())
            last = max([self._last_activity, *(link.last_activity for link in links)])
            return ServerStats(
                active_tunnels=len(links),
                active_streams=self._pending_streams,
                last_activity=last,
                total_tunnels=self._total_tunnels,
                total_streams=self._total_streams,
            )

    def shutdown(self, grace: float | None = None) -> bool:
        """GOAWAY to every agent, stop accepting, let streams drain; True if all drained in time."""
        grace = self.config.shutdown_grace if grace is None else grace
        with self._lock:
            if self._shutting_down:
                return True
            self._shutting_down = True
            links = list(self._links.values())
        self._close_listener()
        for link in links:
            link.send_goaway(GoAwayReason.SHUTDOWN, "server is shutting down")
        log.info(
            "shutting down", extra={"tunnels": len(links), "streams": self._pending_streams, "grace_s": grace}
        )
        deadline = time.monotonic() + grace
        with self._drained:
            while self._pending_streams > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._drained.wait(remaining)
            drained = self._pending_streams == 0
            left = self._pending_streams
            links = list(self._links.values())
        for link in links:
            link.close("server shut down", goaway=None)
        for link in links:
            link.wait_closed(2.0)
        if not drained:
            log.warning("shutdown grace expired", extra={"streams_cut": left})
        log.info("stopped", extra={"drained": drained})
        return drained

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    # ----- accepting ------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                return  # listener closed
            if self._shutting_down:
                sock.close()
                continue
            threading.Thread(
                target=self._handshake, args=(sock, peer), name=f"handshake-{peer[1]}", daemon=True
            ).start()

    def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        peer_text = f"{peer[0]}:{peer[1]}"
        set_nodelay(sock)
        channel = TlsChannel(sock, self.context, server_side=True)
        try:
            channel.handshake(HANDSHAKE_TIMEOUT)
        except SilentClose:
            log.debug("connection closed before TLS (probe)", extra={"peer": peer_text})
            channel.abort()
            return
        except (TlsError, OSError) as exc:
            log.warning("tunnel refused", extra={"peer": peer_text, "reason": str(exc) or type(exc).__name__})
            channel.abort()
            return
        subject = channel.peer_subject()
        name = f"tunnel-{next(self._ids)}"
        conn = TunnelConnection(
            Role.SERVER,
            f"fluidity-server/{__version__}",
            max_payload=self.config.max_payload,
            initial_window=self.config.initial_window,
        )
        link = TunnelLink(
            channel,
            conn,
            name=name,
            logger=log,
            dead_after=self.config.agent_timeout,
            on_open_request=self._on_open_request,
            on_closed=self._on_link_closed,
        )
        with self._lock:
            if self._shutting_down:
                channel.abort()
                return
            self._links[name] = link
            self._total_tunnels += 1
            self._last_activity = time.time()
        link.start()
        try:
            hello = link.wait_hello(HANDSHAKE_TIMEOUT)
        except ConnectionError as exc:
            log.warning("tunnel refused", extra={"peer": peer_text, "subject": subject, "reason": str(exc)})
            link.close(str(exc), goaway=None)
            return
        log.info(
            "tunnel connected",
            extra={
                "tunnel": name,
                "peer": peer_text,
                "subject": subject,
                "agent": hello.software,
                "tls": channel.version,
            },
        )

    def _on_link_closed(self, link: TunnelLink, reason: str) -> None:
        with self._lock:
            self._links.pop(link.name, None)
            self._last_activity = time.time()
        log.info("tunnel disconnected", extra={"tunnel": link.name, "reason": reason})

    # ----- streams --------------------------------------------------------

    def _on_open_request(self, link: TunnelLink, request: StreamOpenRequested) -> None:
        with self._lock:
            if self._shutting_down:
                refuse: tuple[FailReason, str] | None = (FailReason.SHUTTING_DOWN, "server is shutting down")
            elif link.active_streams >= self.config.max_streams_per_tunnel:
                refuse = (
                    FailReason.LIMIT,
                    f"more than {self.config.max_streams_per_tunnel} streams on one tunnel",
                )
            else:
                refuse = None
                self._pending_streams += 1
                self._total_streams += 1
        if refuse is not None:
            link.reject_stream(request, *refuse)
            self._log_stream_failure(link, request, refuse[0], refuse[1])
            return
        self._stream_workers.submit(self._serve_stream, link, request)

    def _serve_stream(self, link: TunnelLink, request: StreamOpenRequested) -> None:
        try:
            try:
                target = dial_target(
                    request.host, request.port, policy=self.policy, timeout=self.config.connect_timeout
                )
            except TargetDialError as exc:
                link.reject_stream(request, exc.reason, exc.message)
                self._log_stream_failure(link, request, exc.reason, exc.message)
                return
            stream = link.accept_stream(request)
            if stream is None:
                target.close()
                return
            try:
                relay(target, stream)
            finally:
                stream.close()
                target.close()
        finally:
            with self._drained:
                self._pending_streams -= 1
                self._last_activity = time.time()
                self._drained.notify_all()

    @staticmethod
    def _log_stream_failure(
        link: TunnelLink, request: StreamOpenRequested, reason: FailReason, message: str
    ) -> None:
        log.info(
            "stream failed",
            extra={
                "tunnel": link.name,
                "stream": request.stream_id,
                "target": f"{request.host}:{request.port}",
                "reason": reason.label,
                "detail": message,
            },
        )
