"""The receive-window tuner, fed by a simulated path: DATA arrives at the path's rate, each
PONG one round trip (plus the queue the window built) after its PING."""

from __future__ import annotations

import pytest

from server.flow_control import (
    MIN_PING_SPACING,
    PING_PREFIX,
    TUNED_START_WINDOW,
    WindowTuner,
    stream_windows,
)
from server.framing import PING_LENGTH

KIB = 1024


def run_path(tuner: WindowTuner, *, rate: float, rtt: float, rounds: int, streams: int = 1) -> None:
    """Each round: the sender has min(window x streams, what the link carries) in flight.

    A window above the BDP builds a queue, so the round trip the PING sees grows with it and
    the bytes counted are the window: the tuner must not take that queue for more bandwidth.
    """
    now = 100.0
    for _ in range(rounds):
        in_flight = tuner.window * streams
        measured_rtt = max(rtt, in_flight / rate)  # the queue's wait on top of the path
        opaque = tuner.data_received(1, 1, now)
        assert opaque is not None  # one timing PING per round
        for i in range(16 * streams):  # what the path delivers until its PONG is back
            tuner.data_received(1 + 2 * (i % streams), int(in_flight / 16 / streams), now + measured_rtt / 2)
        now += measured_rtt
        tuner.pong_received(opaque, now)
        now += MIN_PING_SPACING


def test_the_window_grows_to_the_bdp_of_a_fast_long_path_and_stops_there() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=16 * 1024 * KIB)
    tuner.min_rtt = 0.040
    rate = 100e6 / 8  # 40 ms, 100 Mbit/s: BDP 500 kB
    run_path(tuner, rate=rate, rtt=0.040, rounds=30)
    bdp = rate * 0.040
    assert 1.1 * bdp <= tuner.window <= 1.6 * bdp


def test_a_download_on_a_fresh_tunnel_reaches_the_bdp_within_a_few_round_trips() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=16 * 1024 * KIB)
    tuner.min_rtt = 0.040
    run_path(tuner, rate=100e6 / 8, rtt=0.040, rounds=2)
    assert tuner.window >= 100e6 / 8 * 0.040


def test_a_slow_path_shrinks_a_large_window_to_about_one_bdp() -> None:
    tuner = WindowTuner(window=4 * 1024 * KIB, ceiling=4 * 1024 * KIB)
    tuner.min_rtt = 0.080
    rate = 20e6 / 8  # 80 ms, 20 Mbit/s: BDP 200 kB
    run_path(tuner, rate=rate, rtt=0.080, rounds=5)
    assert tuner.window <= 1.6 * rate * 0.080


def test_busy_streams_share_one_bdp() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=16 * 1024 * KIB)
    tuner.min_rtt = 0.040
    rate = 100e6 / 8
    run_path(tuner, rate=rate, rtt=0.040, rounds=30, streams=4)
    assert 4 * tuner.window <= 1.8 * rate * 0.040


def test_loopback_uses_the_rtt_floor_and_the_ceiling_bounds_it() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=4 * 1024 * KIB)
    run_path(tuner, rate=1e9, rtt=0.0001, rounds=40)
    assert tuner.window == 4 * 1024 * KIB


def test_the_floor_keeps_a_few_frames_in_flight() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=4 * 1024 * KIB)
    tuner.min_rtt = 0.001
    run_path(tuner, rate=1e5, rtt=0.001, rounds=20)  # 800 kbit/s on a LAN
    assert tuner.window == tuner.floor == 64 * KIB


def test_pings_are_spaced_and_tagged() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=1024 * KIB)
    first = tuner.data_received(1, 100, 10.0)
    assert first is not None and first.startswith(PING_PREFIX) and len(first) == PING_LENGTH
    assert tuner.data_received(1, 100, 10.001) is None  # one sample at a time
    assert tuner.pong_received(b"\x01" * 8, 10.002) is False  # a PONG that is not ours
    tuner.pong_received(first, 10.003)
    assert tuner.data_received(1, 100, 10.004) is None  # too soon after the last PING
    assert tuner.data_received(1, 100, 10.003 + MIN_PING_SPACING) is not None


def test_a_pong_coalesced_away_starts_a_new_sample() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=1024 * KIB)
    sample = tuner.data_received(1, 100, 10.0)
    keepalive = tuner.ping(10.5)  # sent after it: the peer may answer only this one
    assert sample is not None
    tuner.pong_received(keepalive, 10.6)
    assert tuner.min_rtt == pytest.approx(0.1)
    assert tuner.data_received(1, 100, 10.7) is not None  # the lost sample does not block tuning


def test_a_sample_never_answered_is_given_up() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=1024 * KIB)
    assert tuner.data_received(1, 100, 10.0) is not None
    assert tuner.data_received(1, 100, 15.0) is None
    assert tuner.data_received(1, 100, 21.0) is not None


def test_stream_windows_start_small_only_when_tuning() -> None:
    window, tuner = stream_windows(4 * 1024 * KIB, tuning=True)
    assert window == TUNED_START_WINDOW and tuner is not None and tuner.ceiling == 4 * 1024 * KIB
    assert stream_windows(4 * 1024 * KIB, tuning=False) == (4 * 1024 * KIB, None)
    small, small_tuner = stream_windows(128 * KIB, tuning=True)
    assert small == 128 * KIB and small_tuner is not None and small_tuner.floor == 64 * KIB


def test_light_traffic_leaves_the_window_for_the_next_download() -> None:
    tuner = WindowTuner(window=TUNED_START_WINDOW, ceiling=4 * 1024 * KIB)
    for round_ in range(20):  # tiny replies: a few hundred bytes per round trip
        now = 10.0 + round_ * 0.1
        opaque = tuner.data_received(1, 300, now)
        tuner.data_received(3, 300, now + 0.02)
        assert opaque is not None
        assert tuner.pong_received(opaque, now + 0.04) is False
    assert tuner.window == TUNED_START_WINDOW
    assert tuner.min_rtt == pytest.approx(0.04)


def test_downloads_whose_excess_waits_in_the_senders_queue_still_shrink_to_their_share() -> None:
    """The sender's own queue is scheduled (a PONG skips it), so the round trip stops growing
    once the link's queue is full: the link being full is what tells the tuner."""
    tuner = WindowTuner(window=1024 * KIB, ceiling=16 * 1024 * KIB)
    tuner.min_rtt = 0.040
    rate, now = 100e6 / 8, 10.0
    for _ in range(12):
        measured_rtt = 0.040 + 0.045  # at most the link's queue: the rest waits unseen
        opaque = tuner.data_received(1, 1, now)
        assert opaque is not None
        for sid in (1, 3, 5, 7):  # each stream gets a quarter of the link
            tuner.data_received(sid, int(rate * measured_rtt / 4), now + 0.01)
        now += measured_rtt
        tuner.pong_received(opaque, now)
        now += MIN_PING_SPACING
    assert 4 * tuner.window <= 1.5 * rate * 0.040
