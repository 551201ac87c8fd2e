"""A TCP connection on the event loop, seen as an async byte stream.

The proxy reads its clients through this, and dialers that connect directly (tests, and
bypassed destinations) hand it out as the upstream. Reading stops while more than
``READ_LIMIT`` bytes wait unread, and ``sendall`` waits while the socket is behind, so a
slow peer holds a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from server.framing import FailReason
from server.stream_api import StreamClosedError

READ_LIMIT = 256 * 1024


class SocketStream(asyncio.Protocol):
    """``await recv`` / ``await sendall`` / ``shutdown_write`` / ``close`` over one transport."""

    def __init__(self, on_connected: Callable[[SocketStream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._buffer = bytearray()
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._reading_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sock: socket.socket | None = None  # ours (a dial), to read what is left after a reset
        #: Called once when the peer finishes or goes away (the proxy's "client left").
        self.on_eof: Callable[[], None] | None = None

    @classmethod
    async def connect(cls, sock: socket.socket) -> SocketStream:
        """Wrap an already connected (non-blocking) socket."""
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(cls, sock=sock)
        stream._sock = sock
        return stream

    # ----- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # another loop's transports need not subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > READ_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        _wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._read_waiter)
        self._tell_eof()
        return True  # keep the socket open for what we still send

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, BrokenPipeError | ConnectionResetError) and not self._eof:
            self._salvage()
        self._closed = True
        self._lost = exc or ConnectionResetError("connection closed")
        self._eof = True
        _wake(self._read_waiter)
        _wake(self._drain_waiter)
        self._tell_eof()

    def _salvage(self) -> None:
        """A write failed because the peer closed (an origin that answered an upload early with
        413): what it sent before the reset is still readable, and is the answer."""
        sock = self._sock
        if sock is None:
            return
        try:
            while len(self._buffer) <= READ_LIMIT:
                data = sock.recv(READ_LIMIT)
                if not data:
                    break
                self._buffer += data
        except OSError:
            pass

    def _tell_eof(self) -> None:
        callback, self.on_eof = self.on_eof, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # ----- ByteStream --------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> bytearray:
        """Bytes read but not yet taken (the caller may consume them in place)."""
        return self._buffer

    async def fill(self, timeout: float | None = None) -> bool:
        """Wait until more bytes arrive (True) or the peer has finished (False); raises TimeoutError."""
        before = len(self._buffer)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        while len(self._buffer) == before:
            if self._eof:
                return False
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout is None:
                    await self._read_waiter
                else:
                    async with asyncio.timeout(timeout):
                        await self._read_waiter
            finally:
                self._read_waiter = None
        return True

    async def recv(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self._buffer and not await self.fill(timeout):
            return b""
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        if self._reading_paused and len(self._buffer) <= READ_LIMIT and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def sendall(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise StreamClosedError(
                f"connection closed: {self._lost or 'by this side'}", FailReason.CANCELLED
            )
        self.transport.write(data)
        if not self._write_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._drain_waiter
        finally:
            self._drain_waiter = None
        if self._closed:
            raise StreamClosedError(f"connection closed: {self._lost}", FailReason.CANCELLED)

    async def wait_open(self) -> None:
        """A direct connection is open once connected."""

    def shutdown_write(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the peer is already gone
                self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> bytes:
        """Stop serving the transport (another protocol takes it over); returns unread bytes."""
        data = bytes(self._buffer)
        self._buffer.clear()
        if self.transport is not None:
            self.transport.pause_reading()
        return data


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
