"""Copy bytes between a TCP socket and a tunnel stream until both directions end.

Used by the server (stream <-> target) and the agent (client <-> stream after CONNECT
or a WebSocket upgrade). Half-closes are propagated, so protocols that rely on them
keep working; an error in either direction tears down both.
"""

from __future__ import annotations

import socket
import threading

from server.stream_api import ByteStream, StreamClosedError
from server.worker_pool import WorkerPool

CHUNK = 256 * 1024
#: Threads for the socket-to-stream direction, shared by every relay in the process.
_UPSTREAM_WORKERS = WorkerPool("relay-up")


def relay(sock: socket.socket, stream: ByteStream, *, initial: bytes = b"", chunk: int = CHUNK) -> bool:
    """Relay until both sides have finished; returns True when both ended cleanly.

    ``initial`` is data already read from the socket that belongs to the stream (e.g. bytes
    a client pipelined after its CONNECT). The caller still owns and closes both ends.
    """
    failed = threading.Event()
    upstream_done = threading.Event()

    def upstream() -> None:
        try:
            if initial:
                stream.sendall(initial)
            buf = bytearray(chunk)
            view = memoryview(buf)
            while True:
                n = sock.recv_into(buf)
                if n == 0:
                    stream.shutdown_write()
                    return
                stream.sendall(view[:n])
        except (OSError, StreamClosedError):
            _fail()
        finally:
            upstream_done.set()

    def _fail() -> None:
        if failed.is_set():
            return
        failed.set()
        # Unblock the other direction: closing the stream fails its recv, shutting the
        # socket fails its recv/send.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        stream.close()

    _UPSTREAM_WORKERS.submit(upstream)
    # Tunnel streams can write arriving data straight into the socket from their reader.
    deliver_to = getattr(stream, "deliver_to", None)
    delivered = getattr(stream, "delivered", None)
    if deliver_to is not None:
        deliver_to(sock)
    socket_refused_data = False
    try:
        while True:
            data = stream.recv(chunk)
            if not data:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                break
            try:
                sock.sendall(data)
                if delivered is not None:
                    delivered()
            except OSError:
                # The socket's peer stopped taking data (e.g. an origin that answered an upload
                # early and closed). What it sent before is still readable: let the other
                # direction relay it to the end, then tear down.
                socket_refused_data = True
                break
    except (OSError, StreamClosedError):
        _fail()
    upstream_done.wait()
    if socket_refused_data:
        _fail()
    return not failed.is_set()
