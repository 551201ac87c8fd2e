"""The traffic meter's store, the texts the tray shows, the budget rule and the metered backend.

Everything runs on a fake clock: server time, day and month boundaries, save intervals and
the budget are fed recorded times, never waited for.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from desktop.budget import (
    BudgetAction,
    BudgetNotice,
    BudgetState,
    BudgetStop,
    check_budget,
    connect_refusal,
)
from desktop.lifecycle.base import Endpoint, ProgressCallback, WakeRefused
from desktop.lifecycle.metered import MeteredLifecycle
from desktop.usage import (
    DEFAULT_PRICE_PER_HOUR,
    Prices,
    UsageStore,
    day_key,
    format_bytes,
    format_rate,
    format_span,
    host_of,
    month_key,
    report_lines,
    server_text,
    session_summary,
    summarise,
    traffic_text,
    usage_lines,
)
from server.framing import ServerState, ServerStatus

HOUR = 3600.0
#: 2026-06-10 12:00 local time: mid-month, mid-day, whatever the machine's time zone.
NOON = time.mktime((2026, 6, 10, 12, 0, 0, 0, 0, -1))


class FakeClock:
    def __init__(self, start: float = NOON) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def store_at(path: Path | None, clock: FakeClock) -> UsageStore:
    return UsageStore(path, clock=clock)


# ----------------------------------------------------------------------------- texts


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (40_000, "40 kB"),
        (1_234_567, "1.2 MB"),
        (9_960_000, "10 MB"),
        (230_000_000, "230 MB"),
        (999_999, "1.0 MB"),
        (2_500_000_000, "2.5 GB"),
    ],
)
def test_bytes_read_as_network_tools_show_them(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_spans_and_rates() -> None:
    assert [format_span(s) for s in (0, 45, 60, 12 * 60 + 5, HOUR + 12 * 60, 3 * HOUR)] == [
        "0 s",
        "45 s",
        "1 min",
        "12 min",
        "1 h 12 min",
        "3 h",
    ]
    assert format_rate(1_200_000) == "1.2 MB/s"
    assert host_of("example.com:443") == "example.com" and host_of("[2001:db8::1]:443") == "2001:db8::1"


def test_the_traffic_text_the_tray_shows(clock: FakeClock) -> None:
    store = store_at(None, clock)
    clock.now = NOON - 600
    store.record_bytes(0, 226_400_000, "big.example")  # earlier today
    clock.now = NOON
    for _ in range(3):  # the last three seconds: 3.6 MB down, 120 kB up
        store.record_bytes(40_000, 1_200_000, "example.com")
        clock.advance(1)
    clock.advance(-1)
    assert traffic_text(store) == "↓ 1.2 MB/s ↑ 40 kB/s · 230 MB today"
    clock.advance(10)  # quiet since
    assert traffic_text(store) == "↓ 0 B/s ↑ 0 B/s · 230 MB today"


def test_the_usage_submenu_shows_session_today_month_and_the_busiest_hosts(clock: FakeClock) -> None:
    store = store_at(None, clock)
    store.record_bytes(0, 5_000_000, "before.example")  # an earlier session today
    store.begin_session()
    for index, size in enumerate((900, 7_000, 600, 50_000, 3_000, 120_000)):
        store.record_bytes(100, size, f"h{index}.example")
    lines = usage_lines(store)
    assert lines[:3] == [
        "This session: ↓ 182 kB ↑ 600 B",
        "Today: ↓ 5.2 MB ↑ 600 B",
        "This month: ↓ 5.2 MB ↑ 600 B",
    ]
    assert lines[3] == "Busiest hosts this session:"
    assert [line.split(" · ")[0].strip() for line in lines[4:]] == [
        "h5.example",
        "h3.example",
        "h1.example",
        "h4.example",
        "h0.example",
    ]


def test_the_agents_session_summary_line(clock: FakeClock) -> None:
    store = store_at(None, clock)
    store.begin_session()
    store.record_bytes(2_000, 3_000_000, "example.com")
    clock.advance(75)
    assert session_summary(store) == (
        "session 1 min: ↓ 3.0 MB ↑ 2.0 kB (now ↓ 0 B/s ↑ 0 B/s), today 3.0 MB, busiest example.com (3.0 MB)"
    )


def test_the_server_text_the_tray_shows(clock: FakeClock) -> None:
    store = store_at(None, clock)
    prices = Prices(per_hour=0.0173, per_gb_out=0.09)
    clock.now = NOON - 30 * HOUR  # yesterday: a 16 h 40 min run
    store.server_woken()
    store.server_running(clock.advance(60))
    store.server_stopped("stopped by Fluidity", clock.advance(16 * HOUR + 39 * 60))
    clock.now = NOON
    store.server_woken()
    store.server_running(clock.advance(45))
    store.server_seen(clock.advance(HOUR + 12 * 60 - 45))
    store.record_bytes(1_000_000, 9_000_000, "example.com")
    summary = summarise(store, prices)
    assert server_text(summary) == "Server up 1 h 12 min · ≈ $0.02 this session · $0.31 this month"
    store.server_stopped("stopped by Fluidity")
    assert server_text(summarise(store, prices)) == "Server stopped · ≈ $0.31 this month"


def test_the_default_price_is_the_runbooks_task_and_its_public_address() -> None:
    vcpu, memory, ipv4 = 0.04048, 0.004445, 0.005  # us-east-1, Linux/x86, per hour (June 2026)
    assert pytest.approx(0.25 * vcpu + 0.5 * memory + ipv4, abs=1e-4) == DEFAULT_PRICE_PER_HOUR


# ----------------------------------------------------------------------------- the store


def test_totals_per_day_and_month_and_per_host(clock: FakeClock) -> None:
    store = store_at(None, clock)
    store.record_bytes(100, 1000, "a.example")
    store.record_bytes(50, 500, "b.example")
    clock.advance(24 * HOUR)
    store.record_bytes(1, 2, "a.example")
    assert (store.day().up, store.day().down) == (1, 2)
    assert (store.day(NOON).up, store.day(NOON).down) == (150, 1500)
    month = store.month()
    assert (month.up, month.down) == (151, 1502)
    assert month.top_hosts(1) == [("a.example", 1103)]


def test_server_time_is_split_at_midnight_and_counted_up_to_the_last_evidence(clock: FakeClock) -> None:
    store = store_at(None, clock)
    clock.now = time.mktime((2026, 6, 10, 23, 0, 0, 0, 0, -1))
    store.server_woken()
    store.server_running(clock.advance(120))
    store.server_seen(clock.advance(2 * HOUR - 120))  # 01:00 the next day
    clock.advance(5 * HOUR)  # nothing heard for five hours, then found stopped
    store.server_found_stopped()
    assert store.day(time.mktime((2026, 6, 10, 12, 0, 0, 0, 0, -1))).server_seconds == pytest.approx(HOUR)
    assert store.day(time.mktime((2026, 6, 11, 12, 0, 0, 0, 0, -1))).server_seconds == pytest.approx(HOUR)
    assert store.run is None and store.last_stop is not None and store.last_stop.reason == "found stopped"


def test_counts_are_saved_atomically_and_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "data" / "usage.json"
    store = store_at(path, clock)
    store.server_woken()
    store.record_bytes(10, 20, "example.com")
    assert not store.tick(clock.advance(1))  # not due yet: nothing written
    assert not path.exists()
    assert store.tick(clock.advance(5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["usage.json"]  # no temporary left
    data = json.loads(path.read_text())
    assert data["days"][day_key(NOON)]["down"] == 20 and data["run"]["woken_at"] == NOON
    store.record_bytes(1, 1)  # lost if the process dies now: at most SAVE_INTERVAL of counts
    again = store_at(path, clock)
    assert again.day().bytes == 30 and again.run is not None and again.run.woken_at == NOON


def test_two_programs_writing_the_same_file_add_up(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "usage.json"
    tray, agent = store_at(path, clock), store_at(path, clock)
    tray.record_bytes(100, 0)
    agent.record_bytes(0, 7)
    tray.save()
    agent.save()
    tray.record_bytes(1, 0)
    tray.save()
    fresh = store_at(path, clock)
    assert (fresh.day().up, fresh.day().down) == (101, 7)


def test_an_unreadable_file_is_kept_aside_and_counting_starts_again(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "usage.json"
    path.write_text("{not json")
    store = store_at(path, clock)
    assert store.day().bytes == 0
    assert (tmp_path / "usage.json.unreadable").read_text() == "{not json"
    store.record_bytes(1, 1)
    assert store.save() and json.loads(path.read_text())["version"] == 1


def test_recording_from_many_threads_loses_nothing(clock: FakeClock) -> None:
    store = store_at(None, clock)

    def work() -> None:
        for _ in range(1000):
            store.record_bytes(1, 2, "example.com")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (store.day().up, store.day().down) == (8000, 16000)


def test_the_month_report(clock: FakeClock) -> None:
    store = store_at(None, clock)
    store.server_woken(clock.now - 2 * HOUR)
    store.server_running(clock.now - 2 * HOUR + 60)
    store.server_seen(clock.now)
    store.record_bytes(40_000_000, 1_200_000_000, "video.example")
    lines = report_lines(store, Prices(0.0173, 0.09), budget=5.0)
    text = "\n".join(lines)
    assert lines[0].startswith("Fluidity usage in June 2026 (until 2026-06-10 12:00)")
    assert "server time   2 h" in text and "at $0.0173/h (price_per_hour)" in text
    assert "↓ 1.2 GB ↑ 40 MB" in text and "≈ $0.11" in text
    assert "  total                            ≈ $0.15   of the $5.00 monthly budget (3%)" in lines
    assert "  server now    up 2 h             ≈ $0.15   this session (woken at 10:00)" in lines
    assert lines[-1] == "  top hosts     video.example 1.2 GB"


# ----------------------------------------------------------------------------- the budget rule


HOW = "raise it"


def run_budget(costs: list[tuple[float, bool, int]], budget: float | None = 5.0) -> list[BudgetAction]:
    """Feed (cost, busy, session) readings of one month; the actions, in order."""
    state, done = BudgetState(), list[BudgetAction]()
    for cost, busy, session in costs:
        state, actions = check_budget(
            state,
            month="2026-06",
            cost=cost,
            budget=budget,
            session=session,
            busy=busy,
            how_to_raise="raise it",
        )
        done += actions
    return done


def test_budget_warns_once_at_80_percent_and_stops_once_at_100() -> None:
    actions = run_budget([(1.0, True, 1), (4.0, True, 1), (4.2, True, 1), (5.01, True, 1), (5.2, True, 1)])
    assert [type(action) for action in actions] == [BudgetNotice, BudgetStop]
    assert actions[0].message.startswith("Fluidity has used 80% of this month's budget: ≈ $4.00 of $5.00.")
    assert actions[1].message == (
        "Monthly budget reached: ≈ $5.01 of $5.00 this month, so Fluidity disconnected and stopped the "
        "server. To go on this month, raise it."
    )


def test_budget_jumping_past_100_percent_stops_without_a_separate_warning() -> None:
    assert [type(a) for a in run_budget([(0.5, True, 1), (6.0, True, 1)])] == [BudgetStop]


def test_over_budget_while_idle_is_said_once_and_a_new_session_is_stopped_again() -> None:
    actions = run_budget([(5.5, False, 1), (5.5, False, 1), (5.6, True, 2), (5.7, True, 2), (5.8, True, 3)])
    assert [type(a) for a in actions] == [BudgetNotice, BudgetStop, BudgetStop]
    assert actions[0].message.startswith("Not connecting: this month's budget is used up")


def test_a_confirmed_session_runs_over_budget() -> None:
    state = BudgetState(month="2026-06", budget=5.0, warned=True, confirmed_session=2)
    state, actions = check_budget(
        state, month="2026-06", cost=6.0, budget=5.0, session=2, busy=True, how_to_raise="raise it"
    )
    assert actions == ()


def test_a_new_month_or_a_raised_budget_starts_again() -> None:
    state, _ = check_budget(
        BudgetState(), month="2026-06", cost=4.5, budget=5.0, session=1, busy=True, how_to_raise="x"
    )
    assert state.warned
    state, actions = check_budget(
        state, month="2026-06", cost=4.5, budget=20.0, session=1, busy=True, how_to_raise="x"
    )
    assert actions == () and not state.warned
    state, actions = check_budget(
        state, month="2026-07", cost=0.1, budget=20.0, session=1, busy=True, how_to_raise="x"
    )
    assert actions == () and state.month == "2026-07"


def test_no_budget_means_no_notices_and_no_refusal() -> None:
    assert run_budget([(100.0, True, 1)], budget=None) == []
    assert run_budget([(100.0, True, 1)], budget=0.0) == []
    assert connect_refusal(100.0, None, "x") is None
    assert connect_refusal(4.99, 5.0, "x") is None
    refusal = connect_refusal(5.0, 5.0, "raise monthly_budget in agent.yaml")
    assert refusal == (
        "Not connecting: this month's budget is used up (≈ $5.00 of $5.00). "
        "To go on, raise monthly_budget in agent.yaml."
    )


# ----------------------------------------------------------------------------- the metered backend


class FakeBackend:
    """A lambda-like backend: statuses come from a script, calls are recorded."""

    name = "lambda"

    def __init__(self, clock: FakeClock, first: ServerStatus, *, refuse: bool = False) -> None:
        self.clock = clock
        self.first = first
        self.refuse = refuse
        self.state = ServerState.RUNNING
        self.calls: list[str] = []

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        self.calls.append("wake")
        if self.refuse:
            raise WakeRefused("forbidden", "wake failed: Forbidden (check the API key) (HTTP 403, forbidden)")
        on_progress(self.first, 0.0)
        self.clock.advance(40)  # the task starts
        on_progress(ServerStatus(ServerState.RUNNING, 1, 1, 0, "203.0.113.7", 8443), 40.0)
        return Endpoint("203.0.113.7", 8443)

    def status(self) -> ServerStatus:
        self.calls.append("status")
        running = self.state is ServerState.RUNNING
        return ServerStatus(
            self.state, int(running), int(running), 0, "203.0.113.7" if running else None, 8443
        )

    def kill(self) -> ServerStatus:
        self.calls.append("kill")
        self.state = ServerState.STOPPED
        return self.status()

    def close(self) -> None:
        self.calls.append("close")


STARTING = ServerStatus(ServerState.STARTING, 1, 0, 1)
ALREADY_RUNNING = ServerStatus(ServerState.RUNNING, 1, 1, 0, "203.0.113.7", 8443)


def wake(backend: MeteredLifecycle) -> Endpoint:
    return backend.wake(timeout=90, cancel=threading.Event(), on_progress=lambda *_: None)


def test_metered_backend_records_wake_running_and_kill(clock: FakeClock) -> None:
    store = store_at(None, clock)
    backend = MeteredLifecycle(FakeBackend(clock, STARTING), store, clock=clock)
    wake(backend)
    run = store.run
    assert run is not None and run.woken_at == NOON and run.running_at == NOON + 40
    clock.advance(HOUR)
    backend.kill()
    assert store.run is None and store.month().server_seconds == pytest.approx(HOUR + 40)
    assert store.last_stop is not None and store.last_stop.reason == "stopped by Fluidity"


def test_a_refused_wake_counts_nothing(clock: FakeClock) -> None:
    store = store_at(None, clock)
    backend = MeteredLifecycle(FakeBackend(clock, STARTING, refuse=True), store, clock=clock)
    with pytest.raises(WakeRefused):
        wake(backend)
    assert store.run is None and store.month().server_seconds == 0


def test_a_rewake_after_the_sleep_lambda_closes_the_old_run_at_its_last_evidence(clock: FakeClock) -> None:
    store = store_at(None, clock)
    inner = FakeBackend(clock, STARTING)
    backend = MeteredLifecycle(inner, store, clock=clock)
    wake(backend)
    store.server_seen(clock.advance(20 * 60))  # connected for 20 min, then the tunnel dropped
    clock.advance(15 * 60)  # the Sleep Lambda scaled the service to zero meanwhile
    wake(backend)  # the rewake's first reply: starting, no task: the old run had ended
    assert store.last_stop is not None and "Sleep Lambda" in store.last_stop.reason
    run = store.run
    assert run is not None and run.woken_at == NOON + 40 + 35 * 60
    assert store.month().server_seconds == pytest.approx(40 + 20 * 60 + 40)


def test_a_rewake_of_a_server_that_still_runs_keeps_the_run(clock: FakeClock) -> None:
    store = store_at(None, clock)
    backend = MeteredLifecycle(FakeBackend(clock, ALREADY_RUNNING), store, clock=clock)
    wake(backend)
    clock.advance(600)
    wake(backend)  # a network blip: the task never stopped
    run = store.run
    assert run is not None and run.woken_at == NOON and store.last_stop is None
    assert store.month().server_seconds == pytest.approx(640 + 40)


def test_a_status_reply_is_evidence_either_way(clock: FakeClock) -> None:
    store = store_at(None, clock)
    inner = FakeBackend(clock, STARTING)
    backend = MeteredLifecycle(inner, store, clock=clock)
    wake(backend)
    clock.advance(300)
    backend.status()  # still running (disconnected, kill_on_disconnect off)
    inner.state = ServerState.STOPPED
    clock.advance(300)
    backend.status()  # the Sleep Lambda stopped it: counted up to the previous reply
    assert store.run is None and store.month().server_seconds == pytest.approx(340)
    assert month_key(NOON) == "2026-06"
