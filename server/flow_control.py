"""Stream receive windows sized to the path's bandwidth-delay product (sans-I/O).

A fixed window is wrong both ways: far above the BDP of a WAN path, a download keeps that
much data queued in front of every other reply (a click waits behind megabytes); below it,
one stream cannot fill the link. As gRPC's BDP estimator does, the receiver times a PING
while DATA flows: the bytes that arrive before its PONG are what the path carried in one
round trip. The window follows ``gain x best rate x shortest round trip``, shared out among
the streams that were busy, within a floor and a ceiling; a window that alone holds a stream
back on an empty path doubles each round trip, so a download reaches the link rate quickly.

The I/O layer feeds it DATA sizes and PONGs with the loop's clock and sends the PINGs it asks
for; :class:`server.framing.TunnelConnection` applies the result as it returns credit.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

#: Opaque PING payloads of the tuner start with this, so its PONGs are told apart.
PING_PREFIX = b"\x00bdp"
#: Data in flight beyond one BDP, so credit coming back in batches never leaves the link idle.
DEFAULT_GAIN = 1.2
#: Added to every window: the receiver returns credit in batches, and what it has consumed
#: but not yet returned is neither in flight nor queued (see framing's credit batches).
CREDIT_SLACK = 32 * 1024
#: The round trip the window covers at least: on loopback and LANs, the peer's own processing
#: delay (not the path) decides how much must be in flight, and a few ms of queue there is harmless.
DEFAULT_RTT_FLOOR = 0.01
#: The smallest window a stream is shrunk to (a few frames; small replies are never held up).
DEFAULT_MIN_WINDOW = 64 * 1024
#: The path's rate is the best sample of this many seconds (a slow moment does not shrink the
#: window, which would slow the next sample down: a spiral).
RATE_HORIZON = 10.0
#: A sample this much above the best rate so far means the path has more to give: slow start.
RATE_GROWTH = 1.05
#: At most one timing PING per this many seconds while data flows (about one per round trip on a WAN).
MIN_PING_SPACING = 0.01
#: A sample counts only if a stream used this share of its window in it (else the traffic was
#: too light to say anything about the path, and the window stays as it is) ...
WINDOW_LIMITED_USE = 0.5
#: ... or if the data came at this share of the best rate seen (the link was full, e.g. with
#: several downloads whose excess waits in the sender's queues, where a PONG does not see it).
LINK_FULL_RATE = 0.8
#: A stream that used this share of its window in one round trip, while that round trip was
#: within this factor of the shortest, was held back by the window alone: it doubles.
SLOW_START_USE = 0.75
SLOW_START_RTT = 1.1
#: A timing PING whose PONG has not come after this long is given up.
SAMPLE_TIMEOUT = 10.0
#: PINGs awaiting their PONG; the peer answers only the latest one it saw (PONGs are coalesced).
MAX_OUTSTANDING = 4


@dataclass
class WindowTuner:
    """The per-tunnel estimate of how large each stream's receive window should be."""

    window: int  # what streams get now; starts at the window the HELLO announced
    ceiling: int
    floor: int = DEFAULT_MIN_WINDOW
    gain: float = DEFAULT_GAIN
    rtt_floor: float = DEFAULT_RTT_FLOOR
    min_rtt: float = math.inf
    _rates: deque[tuple[float, float]] = field(default_factory=deque)  # (time, rate), rates falling
    _sent: dict[bytes, float] = field(default_factory=dict)  # opaque -> send time, oldest first
    _sample: bytes | None = None  # the PING whose round trip DATA bytes are counted against
    _bytes: int = 0
    _per_stream: dict[int, int] = field(default_factory=dict)
    _last_ping: float = -math.inf
    _last_rtt: float = 0.0
    _settling: bool = False  # the window just changed: the next sample still shows the old one
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.floor = min(self.floor, self.window, self.ceiling)
        self.ceiling = max(self.ceiling, self.floor)

    def estimate(self) -> dict[str, float]:
        """What the window is based on, for logs: best rate (bytes/s) and shortest round trip (ms)."""
        return {
            "rate": round(self.best_rate),
            "min_rtt_ms": round(self.min_rtt * 1000, 2) if self.min_rtt != math.inf else -1.0,
            "last_rtt_ms": round(self._last_rtt * 1000, 2),
        }

    @property
    def best_rate(self) -> float:
        """The best delivery rate (bytes/s) of the last RATE_HORIZON seconds of samples."""
        return self._rates[0][1] if self._rates else 0.0

    def _best_rate(self, now: float) -> float:
        while self._rates and now - self._rates[0][0] > RATE_HORIZON:
            self._rates.popleft()
        return self.best_rate

    def _add_rate(self, rate: float, now: float) -> None:
        """A running maximum: a sample makes every smaller, older one irrelevant."""
        while self._rates and self._rates[-1][1] <= rate:
            self._rates.pop()
        self._rates.append((now, rate))

    def ping(self, now: float) -> bytes:
        """An opaque for a PING to send now (the tunnel's first one, keepalives): times the path."""
        opaque = PING_PREFIX + next(self._counter).to_bytes(4, "big")
        if len(self._sent) >= MAX_OUTSTANDING:
            del self._sent[next(iter(self._sent))]
        self._sent[opaque] = now
        self._last_ping = now
        return opaque

    def data_received(self, stream_id: int, size: int, now: float) -> bytes | None:
        """DATA arrived; returns a PING opaque to send when a new round-trip sample starts."""
        if self._sample is not None and now - self._sent.get(self._sample, now) > SAMPLE_TIMEOUT:
            self._sample = None  # no PONG for it (never expected on TCP): do not stay stuck
        if self._sample is not None:
            self._bytes += size
            self._per_stream[stream_id] = self._per_stream.get(stream_id, 0) + size
            return None
        if now - self._last_ping < MIN_PING_SPACING:
            return None
        opaque = self.ping(now)
        self._sample, self._bytes, self._per_stream = opaque, 0, {}
        return opaque

    def pong_received(self, opaque: bytes, now: float) -> bool:
        """A PONG came back; True if the window changed (the caller applies ``window``)."""
        sent = self._sent.get(opaque)
        if sent is None:
            return False  # not ours, or already given up
        for earlier in list(self._sent):  # the peer answered only this one of those before it
            del self._sent[earlier]
            if earlier == opaque:
                break
        rtt = now - sent
        if rtt <= 0:
            return False
        self.min_rtt = min(self.min_rtt, rtt)
        self._last_rtt = rtt
        if opaque != self._sample:
            if self._sample is not None and self._sample not in self._sent:
                self._sample = None  # its PONG was coalesced away: start over
            return False
        self._sample = None
        busiest = max(self._per_stream.values(), default=0)
        rate = self._bytes / rtt
        held_back = busiest >= WINDOW_LIMITED_USE * self.window
        best = self._best_rate(now)
        # With no rate known yet, streams that together filled a window will do.
        link_full = rate >= LINK_FULL_RATE * best if best else self._bytes >= WINDOW_LIMITED_USE * self.window
        if not (held_back or link_full):
            return False  # light traffic: nothing learnt about the path, the window stays
        if self._settling:  # this round trip still ran on the window before the last change
            self._settling = False
            return False
        growing = rate >= RATE_GROWTH * best
        self._add_rate(rate, now)
        streams = max(1.0, self._bytes / busiest)  # equal shares count fully, a trickle barely
        rtt_used = max(self.min_rtt, self.rtt_floor)
        target = int(self.gain * self.best_rate * rtt_used / streams) + CREDIT_SLACK
        if growing and busiest >= SLOW_START_USE * self.window and rtt <= SLOW_START_RTT * rtt_used:
            target = max(target, 2 * self.window)  # held back by the window alone: double, as slow start
        target = max(self.floor, min(self.ceiling, target))
        if target == self.window:
            return False
        self.window = target
        self._settling = True
        return True


#: The window a new stream starts with when windows are tuned; it then follows the BDP.
TUNED_START_WINDOW = 256 * 1024


def stream_windows(largest: int, *, tuning: bool) -> tuple[int, WindowTuner | None]:
    """The window one tunnel's HELLO announces, and its tuner (None: a fixed ``largest``)."""
    if not tuning:
        return largest, None
    start = min(largest, TUNED_START_WINDOW)
    return start, WindowTuner(window=start, ceiling=largest)
