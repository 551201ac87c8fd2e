"""Wire helpers only tests need: the product queues frames inside ``TunnelConnection``."""

from __future__ import annotations

from server.framing import HEADER, Frame


def encode_frame(frame: Frame) -> bytes:
    """One frame as bytes (header + payload), for tests that hand-craft what a peer sends."""
    return HEADER.pack(frame.type, frame.flags, frame.stream_id, len(frame.payload)) + frame.payload
