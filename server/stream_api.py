"""What a tunnel stream looks like to its users, and the errors it reports.

Shared by the agent's proxy, its dialers and the tunnel, so every stream relays the same way.
"""

from __future__ import annotations

from typing import Protocol

from server.errors import FluidityError
from server.framing import FailReason


class DialError(FluidityError):
    """A stream could not be opened; ``reason`` says why, and the proxy answers according to it."""

    def __init__(self, reason: FailReason, message: str) -> None:
        super().__init__(f"{reason.label}: {message}")
        self.reason = reason
        self.message = message


class StreamClosedError(FluidityError, ConnectionError):
    """The stream was reset or the link under it died; ``reason`` says why when known."""

    def __init__(self, message: str, reason: FailReason = FailReason.INTERNAL) -> None:
        super().__init__(message)
        self.reason = reason


class ByteStream(Protocol):
    """A bidirectional, half-closable byte stream for coroutines on the event loop."""

    async def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send all bytes, waiting while the peer's window is full; raises StreamClosedError."""

    async def recv(self, max_bytes: int) -> bytes:
        """Wait for data; ``b""`` once the peer half-closed; raises StreamClosedError on reset."""

    async def wait_open(self) -> None:
        """Until the far end is connected; raises DialError if it could not be (0-RTT streams)."""

    def shutdown_write(self) -> None:
        """Half-close: tell the peer no more data follows."""

    def close(self) -> None:
        """Release the stream; resets it if either direction is still open."""
