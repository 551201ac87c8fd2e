"""What the local proxy needs from whatever carries its connections.

The proxy only knows "open a byte stream to host:port"; the tunnel client provides it
over the multiplexed mTLS link. Keeping the contract here lets the proxy be read and
tested without knowing how streams are carried.
"""

from __future__ import annotations

from typing import Protocol

from server.stream_api import ByteStream, DialError, StreamClosedError

__all__ = ["ByteStream", "DialError", "Dialer", "StreamClosedError"]


class Dialer(Protocol):
    async def dial(self, host: str, port: int) -> ByteStream:
        """Open a stream to ``host:port`` (on the event loop) or raise DialError."""
