"""Traffic and server-time totals per day and month, and the short texts people read from them.

Why a file of daily sums rather than a log: the tray shows "230 MB today" and "$0.31 this
month" at every redraw and must survive restarts, so it keeps small per-day totals (bytes up
and down, server seconds, bytes per host) in one JSON file in the per-user data folder.

The proxy calls ``record_bytes`` for every transfer; that only adds to counters in memory,
so it is cheap on any thread. ``tick`` (about every second, from the usage watch) writes the
counters out at most every ``SAVE_INTERVAL`` seconds: to a temporary file that then replaces
the old one, so a crash loses seconds of counts and never the file. Counters are added to
whatever is on disk at each save, so a tray and a ``fluidity-agent`` running at the same
time add up instead of overwriting each other.

Server time is counted only between pieces of evidence that the server runs (a wake reply, a
connected tunnel, a status reply): a run Fluidity did not watch, for example after the
program was closed, counts up to the last moment it was seen running.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import platformdirs

from server.config_loader import APP_NAME

log = logging.getLogger("fluidity.usage")

#: The runbook's task (0.25 vCPU, 0.5 GB, Linux/x86) plus its public IPv4 address, in USD per
#: hour at the us-east-1 on-demand prices of June 2026: 0.25 x $0.04048 + 0.5 x $0.004445 + $0.005.
DEFAULT_PRICE_PER_HOUR = 0.0173
#: AWS data transfer out to the internet, us-east-1, first 10 TB a month (June 2026), per GB.
DEFAULT_PRICE_PER_GB_OUT = 0.09
#: Longest time counts stay only in memory (what a crash can lose).
SAVE_INTERVAL = 5.0
#: The ↓/↑ rates are averages over this many seconds.
RATE_WINDOW = 3.0
#: Hosts kept per day; the rest are summed under OTHER_HOSTS so the file stays small.
MAX_HOSTS_PER_DAY = 200
OTHER_HOSTS = "(other hosts)"
#: Days older than this are dropped from the file.
KEEP_DAYS = 400
FILE_VERSION = 1
#: Shortest time the server can be billed for: Fargate charges at least one minute per task.
MIN_BILLED_SECONDS = 60.0

Clock = Callable[[], float]


class Meter(Protocol):
    """What the proxy needs to count traffic (``UsageStore`` is one); cheap on any thread."""

    def record_bytes(self, up: int, down: int, host: str | None = None) -> None: ...

    def begin_session(self) -> None:
        """A new Connect: the session's totals start from zero."""


def default_usage_path() -> Path:
    """The usage file in the per-user data folder (next to the certificates)."""
    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "usage.json"


def day_key(moment: float) -> str:
    """Local calendar day of an epoch time, e.g. "2026-06-14"."""
    return _day_of_second(int(moment))


@functools.lru_cache(maxsize=4)
def _day_of_second(second: int) -> str:
    """The proxy counts every read: format the day once per second, not once per call."""
    return time.strftime("%Y-%m-%d", time.localtime(second))


def month_key(moment: float) -> str:
    """Local calendar month of an epoch time, e.g. "2026-06"."""
    return time.strftime("%Y-%m", time.localtime(moment))


def next_midnight(moment: float) -> float:
    """The epoch time of the local midnight after ``moment`` (daylight saving included)."""
    local = time.localtime(moment)
    return time.mktime((local.tm_year, local.tm_mon, local.tm_mday + 1, 0, 0, 0, 0, 0, -1))


# ----------------------------------------------------------------------------- totals


@dataclass
class Totals:
    """Bytes both ways, server seconds and bytes per host, for a day or a sum of days."""

    up: int = 0
    down: int = 0
    server_seconds: float = 0.0
    hosts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.up + self.down

    def add(self, other: Totals, *, host_limit: int | None = MAX_HOSTS_PER_DAY) -> None:
        self.up += other.up
        self.down += other.down
        self.server_seconds += other.server_seconds
        for host, (up, down) in other.hosts.items():
            self.add_host(host, up, down, host_limit)

    def add_host(self, host: str, up: int, down: int, limit: int | None = MAX_HOSTS_PER_DAY) -> None:
        if host not in self.hosts and limit is not None and len(self.hosts) >= limit:
            host = OTHER_HOSTS
        counts = self.hosts.setdefault(host, [0, 0])
        counts[0] += up
        counts[1] += down

    def top_hosts(self, count: int) -> list[tuple[str, int]]:
        """The hosts with the most bytes (both ways), most first."""
        ranked = sorted(self.hosts.items(), key=lambda item: (-(item[1][0] + item[1][1]), item[0]))
        return [(host, up + down) for host, (up, down) in ranked[:count]]

    def to_json(self) -> dict[str, object]:
        return {
            "up": self.up,
            "down": self.down,
            "server_seconds": round(self.server_seconds, 3),
            "hosts": self.hosts,
        }

    @classmethod
    def from_json(cls, data: object) -> Totals:
        if not isinstance(data, dict):
            raise ValueError("a day must be an object")
        hosts: dict[str, list[int]] = {}
        for host, counts in dict(data.get("hosts") or {}).items():
            if isinstance(counts, list) and len(counts) == 2:
                hosts[str(host)] = [_count(counts[0]), _count(counts[1])]
        seconds = data.get("server_seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"bad server_seconds {seconds!r}")
        return cls(_count(data.get("up", 0)), _count(data.get("down", 0)), float(seconds), hosts)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad byte count {value!r}")
    return value


def _add_days(into: dict[str, Totals], days: dict[str, Totals]) -> None:
    for key, totals in days.items():
        into.setdefault(key, Totals()).add(totals)


@dataclass(frozen=True)
class ServerRun:
    """One server run as Fluidity saw it: woken, perhaps running, not yet seen stopped."""

    woken_at: float
    #: Server time up to here is already in the day totals (the last evidence it ran).
    accrued_until: float
    running_at: float | None = None
    up: int = 0
    down: int = 0

    @property
    def seconds(self) -> float:
        return max(0.0, self.accrued_until - self.woken_at)

    def to_json(self) -> dict[str, object]:
        return {
            "woken_at": self.woken_at,
            "accrued_until": self.accrued_until,
            "running_at": self.running_at,
            "up": self.up,
            "down": self.down,
        }

    @classmethod
    def from_json(cls, data: object) -> ServerRun | None:
        if not isinstance(data, dict):
            return None
        woken, accrued, running = data.get("woken_at"), data.get("accrued_until"), data.get("running_at")
        if not isinstance(woken, int | float) or not isinstance(accrued, int | float):
            return None
        return cls(
            float(woken),
            float(accrued),
            float(running) if isinstance(running, int | float) else None,
            _count(data.get("up", 0)),
            _count(data.get("down", 0)),
        )


@dataclass(frozen=True)
class ServerStop:
    at: float
    reason: str


# ----------------------------------------------------------------------------- the store


class UsageStore:
    """Per-day totals on disk plus what is not saved yet; safe to call from any thread."""

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Clock = time.time,
        save_interval: float = SAVE_INTERVAL,
        rate_window: float = RATE_WINDOW,
    ) -> None:
        """``path`` None keeps everything in memory (nothing is read or written)."""
        self.path = path
        self._clock = clock
        self._save_interval = save_interval
        self._rate_window = rate_window
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._saved: dict[str, Totals] = {}  # as last read from or written to the file
        self._saving: dict[str, Totals] = {}  # taken for the save in progress
        self._pending: dict[str, Totals] = {}  # not saved yet
        self._run: ServerRun | None = None
        self._last_stop: ServerStop | None = None
        self._dirty = False
        self._last_save = clock()
        self._buckets: deque[list[float]] = deque()  # [second, up, down]
        self._warned_unwritable = False
        #: Whether anything counts traffic in this process (the proxy's first record_bytes).
        self.metering = False
        self._session = Totals()  # since the last Connect (in memory only)
        self._session_started = clock()
        if path is not None:
            self._load()

    # ----- reading the file ---------------------------------------------------

    def _read(self) -> tuple[dict[str, Totals], ServerRun | None, ServerStop | None]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}, None, None
        except (OSError, ValueError) as error:
            raise _Unreadable(str(error)) from None
        if not isinstance(data, dict) or not isinstance(data.get("days"), dict):
            raise _Unreadable("not a Fluidity usage file")
        try:
            days = {str(key): Totals.from_json(value) for key, value in data["days"].items()}
            run = ServerRun.from_json(data.get("run"))
        except ValueError as error:
            raise _Unreadable(str(error)) from None
        stop = data.get("last_stop")
        last_stop = None
        if isinstance(stop, dict) and isinstance(stop.get("at"), int | float):
            last_stop = ServerStop(float(stop["at"]), str(stop.get("reason", "")))
        return days, run, last_stop

    def _load(self) -> None:
        try:
            days, run, last_stop = self._read()
        except _Unreadable as error:
            assert self.path is not None
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.warning(
                "usage file unreadable, starting from zero",
                extra={"path": str(self.path), "problem": str(error), "kept_as": str(aside)},
            )
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            days, run, last_stop = {}, None, None
        self._saved, self._run, self._last_stop = days, run, last_stop

    # ----- recording ----------------------------------------------------------

    def begin_session(self) -> None:
        with self._lock:
            self._session = Totals()
            self._session_started = self._clock()

    def session(self) -> tuple[Totals, float]:
        """This session's totals (a copy) and when it began (epoch seconds)."""
        with self._lock:
            copy = Totals(self._session.up, self._session.down)
            copy.hosts = {host: list(counts) for host, counts in self._session.hosts.items()}
            return copy, self._session_started

    def record_bytes(self, up: int, down: int, host: str | None = None) -> None:
        """Count ``up`` bytes sent and ``down`` received for ``host`` (the proxy calls this)."""
        self.metering = True
        if up <= 0 and down <= 0:
            return
        up, down = max(up, 0), max(down, 0)
        now = self._clock()
        with self._lock:
            day = self._pending.setdefault(day_key(now), Totals())
            day.up += up
            day.down += down
            self._session.up += up
            self._session.down += down
            if host:
                day.add_host(host, up, down)
                self._session.add_host(host, up, down)
            if self._run is not None:
                self._run = replace(self._run, up=self._run.up + up, down=self._run.down + down)
            second = float(int(now))
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += up
                self._buckets[-1][2] += down
            else:
                self._buckets.append([second, float(up), float(down)])
                while self._buckets and self._buckets[0][0] < second - self._rate_window - 1:
                    self._buckets.popleft()
            self._dirty = True

    def _accrue(self, until: float) -> None:
        """Add server time from the run's last evidence up to ``until`` to the days it fell on."""
        run = self._run
        if run is None or until <= run.accrued_until:
            return
        start = run.accrued_until
        while start < until:
            end = min(until, next_midnight(start))
            self._pending.setdefault(day_key(start), Totals()).server_seconds += end - start
            start = end
        self._run = replace(run, accrued_until=until)
        self._dirty = True

    def server_woken(self, now: float | None = None) -> None:
        """A wake was requested: a run starts (unless one is believed to be going on)."""
        now = self._clock() if now is None else now
        with self._lock:
            if self._run is None:
                self._run = ServerRun(woken_at=now, accrued_until=now)
                self._dirty = True

    def server_running(self, now: float | None = None) -> None:
        """The server answered as running with an address."""
        now = self._clock() if now is None else now
        with self._lock:
            if self._run is None:
                self._run = ServerRun(woken_at=now, accrued_until=now)
            self._accrue(now)
            if self._run.running_at is None:
                self._run = replace(self._run, running_at=now)
            self._dirty = True

    def server_seen(self, now: float | None = None) -> None:
        """Evidence that the server still runs (a connected tunnel, a status reply)."""
        now = self._clock() if now is None else now
        with self._lock:
            self._accrue(now)

    def server_stopped(self, reason: str, now: float | None = None, *, at: float | None = None) -> None:
        """The run ended: at ``now`` (it ran until then), or at ``at`` when it ended unseen earlier."""
        now = self._clock() if now is None else now
        with self._lock:
            run = self._run
            if run is None:
                return
            if at is None:
                self._accrue(now)
                at = now
            ended = max(run.woken_at, at)
            self._run = None
            self._last_stop = ServerStop(ended, reason)
            self._dirty = True
        log.info("server run ended", extra={"reason": reason, "seconds": round(ended - run.woken_at, 1)})

    def server_found_stopped(self, reason: str = "found stopped") -> None:
        """A status reply says the server is not running: the run ended after its last evidence."""
        with self._lock:
            run = self._run
        if run is not None:
            self.server_stopped(reason, at=run.accrued_until)

    # ----- reading --------------------------------------------------------------

    def now(self) -> float:
        """The store's clock (tests pass a fake one)."""
        return self._clock()

    @property
    def run(self) -> ServerRun | None:
        with self._lock:
            return self._run

    @property
    def last_stop(self) -> ServerStop | None:
        with self._lock:
            return self._last_stop

    def _days(self) -> dict[str, Totals]:
        merged: dict[str, Totals] = {}
        for source in (self._saved, self._saving, self._pending):
            for key, totals in source.items():
                merged.setdefault(key, Totals()).add(totals, host_limit=None)
        return merged

    def day(self, moment: float | None = None) -> Totals:
        """The totals of the local day of ``moment`` (default: today)."""
        moment = self._clock() if moment is None else moment
        with self._lock:
            return self._days().get(day_key(moment), Totals())

    def month(self, moment: float | None = None) -> Totals:
        """The totals of the local month of ``moment`` (default: this month), hosts summed."""
        moment = self._clock() if moment is None else moment
        prefix = month_key(moment) + "-"
        total = Totals()
        with self._lock:
            for key, totals in self._days().items():
                if key.startswith(prefix):
                    total.add(totals, host_limit=None)
        return total

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(down, up) in bytes per second over the last ``RATE_WINDOW`` seconds."""
        now = self._clock() if now is None else now
        since = int(now) - self._rate_window + 1
        with self._lock:
            up = sum(bucket[1] for bucket in self._buckets if bucket[0] >= since and bucket[0] <= now)
            down = sum(bucket[2] for bucket in self._buckets if bucket[0] >= since and bucket[0] <= now)
        return down / self._rate_window, up / self._rate_window

    # ----- saving ---------------------------------------------------------------

    def tick(self, now: float | None = None) -> bool:
        """Save if something changed and the last save is ``SAVE_INTERVAL`` old; True if saved."""
        now = self._clock() if now is None else now
        with self._lock:
            due = self._dirty and now - self._last_save >= self._save_interval
        return self.save(now) if due else False

    def save(self, now: float | None = None) -> bool:
        """Add what is pending to the file's totals and replace the file atomically."""
        now = self._clock() if now is None else now
        if self.path is None:
            with self._lock:
                _add_days(self._saved, self._pending)
                self._pending, self._dirty, self._last_save = {}, False, now
            return True
        with self._save_lock:
            with self._lock:
                self._saving, self._pending = self._pending, {}
                run, last_stop = self._run, self._last_stop
                self._dirty, self._last_save = False, now
            try:
                try:
                    on_disk, _run, _stop = self._read()
                except _Unreadable:
                    on_disk = copy.deepcopy(self._saved)
                _add_days(on_disk, self._saving)
                cutoff = day_key(now - KEEP_DAYS * 86400.0)
                on_disk = {key: totals for key, totals in on_disk.items() if key >= cutoff}
                self._write(on_disk, run, last_stop)
            except OSError as error:
                with self._lock:
                    saving, self._saving = self._saving, {}
                    _add_days(saving, self._pending)
                    self._pending, self._dirty = saving, True
                if not self._warned_unwritable:
                    self._warned_unwritable = True
                    log.warning("cannot save usage", extra={"path": str(self.path), "error": str(error)})
                return False
            with self._lock:
                self._saved, self._saving = on_disk, {}
            return True

    def _write(self, days: dict[str, Totals], run: ServerRun | None, last_stop: ServerStop | None) -> None:
        assert self.path is not None
        data = {
            "version": FILE_VERSION,
            "days": {key: days[key].to_json() for key in sorted(days)},
            "run": run.to_json() if run is not None else None,
            "last_stop": {"at": last_stop.at, "reason": last_stop.reason} if last_stop else None,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def close(self) -> None:
        """Save what is pending (at exit)."""
        with self._lock:
            dirty = self._dirty
        if dirty:
            self.save()


class _Unreadable(Exception):
    pass


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Prices:
    """USD prices: the server per hour it runs, data per GB that leaves AWS."""

    per_hour: float = DEFAULT_PRICE_PER_HOUR
    per_gb_out: float = DEFAULT_PRICE_PER_GB_OUT

    def cost(self, server_seconds: float, bytes_out: int) -> float:
        """Both directions of proxied traffic leave AWS once: to this desktop, or to the site."""
        return server_seconds / 3600.0 * self.per_hour + bytes_out / 1e9 * self.per_gb_out


@dataclass(frozen=True)
class CostSummary:
    """What the tray's second line and ``fluidity usage`` say about money."""

    month: str
    month_seconds: float
    month_bytes: int
    month_cost: float
    run: ServerRun | None
    session_cost: float | None

    @property
    def running(self) -> bool:
        return self.run is not None


def summarise(store: UsageStore, prices: Prices, now: float | None = None) -> CostSummary:
    """This month's server time, traffic and cost, and the current run's."""
    moment = store.now() if now is None else now
    month = store.month(moment)
    run = store.run
    session = None
    if run is not None:
        session = prices.cost(max(run.seconds, MIN_BILLED_SECONDS), run.up + run.down)
    return CostSummary(
        month_key(moment),
        month.server_seconds,
        month.bytes,
        prices.cost(month.server_seconds, month.bytes),
        run,
        session,
    )


# ----------------------------------------------------------------------------- texts


def format_bytes(count: float) -> str:
    """Decimal units as network tools show them: "512 B", "40 kB", "1.2 MB", "230 MB"."""
    if count < 1000:
        return f"{max(0, int(count))} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        shown = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(shown) < 1000 or unit == "PB":
            return f"{shown} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def format_span(seconds: float) -> str:
    """ "45 s", "12 min", "1 h 12 min", "3 h" """
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def format_usd(amount: float) -> str:
    return f"${amount:,.2f}"


def traffic_text(store: UsageStore, now: float | None = None) -> str:
    """ "↓ 1.2 MB/s ↑ 40 kB/s · 230 MB today" """
    down, up = store.rates(now)
    today = store.day(now)
    return f"↓ {format_rate(down)} ↑ {format_rate(up)} · {format_bytes(today.bytes)} today"


def server_text(summary: CostSummary) -> str:
    """ "Server up 1 h 12 min · ≈ $0.02 this session · $0.31 this month" """
    month = f"{format_usd(summary.month_cost)} this month"
    if summary.run is None:
        return f"Server stopped · ≈ {month}"
    session = format_usd(summary.session_cost or 0.0)
    return f"Server up {format_span(summary.run.seconds)} · ≈ {session} this session · {month}"


def month_name(month: str) -> str:
    """ "2026-06" -> "June 2026" """
    year, number = month.split("-")
    return f"{time.strftime('%B', (int(year), int(number), 1, 0, 0, 0, 0, 1, -1))} {year}"


def report_lines(
    store: UsageStore,
    prices: Prices,
    *,
    budget: float | None,
    now: float | None = None,
    hosts: int = 5,
) -> list[str]:
    """The month's figures for ``fluidity usage``, one fact a line."""
    moment = store.now() if now is None else now
    summary = summarise(store, prices, moment)
    month = store.month(moment)
    today = store.day(moment)
    server_cost = prices.cost(summary.month_seconds, 0)
    data_cost = prices.cost(0.0, summary.month_bytes)

    def row(label: str, value: str, cost: float | None = None, note: str = "") -> str:
        shown = f"  {label:<13} {value:<18}"
        if cost is not None:
            shown += f" ≈ {format_usd(cost):<7}"
        return (shown + (f" {note}" if note else "")).rstrip()

    lines = [
        f"Fluidity usage in {month_name(summary.month)} "
        f"(until {time.strftime('%Y-%m-%d %H:%M', time.localtime(moment))})",
        row(
            "server time",
            format_span(summary.month_seconds),
            server_cost,
            f"at ${prices.per_hour:g}/h (price_per_hour)",
        ),
        row(
            "traffic",
            f"↓ {format_bytes(month.down)} ↑ {format_bytes(month.up)}",
            data_cost,
            f"at ${prices.per_gb_out:g}/GB leaving AWS (price_per_gb_out)",
        ),
        row("total", "", summary.month_cost, _budget_text(summary.month_cost, budget).strip()),
        row("today", f"{format_bytes(today.bytes)}, server {format_span(today.server_seconds)}"),
    ]
    if summary.run is not None:
        since = time.strftime("%H:%M", time.localtime(summary.run.woken_at))
        lines.append(
            row("server now", f"up {format_span(summary.run.seconds)}", summary.session_cost, "this session")
            + f" (woken at {since})"
        )
    else:
        stop = store.last_stop
        if stop is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stop.at))
            lines.append(row("server now", "stopped", note=f"({stop.reason}, {when})"))
        else:
            lines.append(row("server now", "stopped"))
    top = month.top_hosts(hosts)
    if top:
        lines.append(row("top hosts", ", ".join(f"{host} {format_bytes(count)}" for host, count in top)))
    return lines


def _budget_text(cost: float, budget: float | None) -> str:
    if not budget:
        return "(no monthly_budget set)"
    return f"of the {format_usd(budget)} monthly budget ({cost / budget:.0%})"


def host_of(target: str) -> str:
    """The host part of "host:port" or "[v6]:port" (what the proxy passes to record_bytes)."""
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    host, _, _port = target.rpartition(":")
    return host or target


def usage_lines(store: UsageStore, now: float | None = None, hosts: int = 5) -> list[str]:
    """The tray's Usage submenu: this session, today, this month, the session's busiest hosts."""
    session, _started = store.session()
    today, month = store.day(now), store.month(now)
    lines = [
        f"This session: ↓ {format_bytes(session.down)} ↑ {format_bytes(session.up)}",
        f"Today: ↓ {format_bytes(today.down)} ↑ {format_bytes(today.up)}",
        f"This month: ↓ {format_bytes(month.down)} ↑ {format_bytes(month.up)}",
    ]
    top = session.top_hosts(hosts)
    if top:
        lines.append("Busiest hosts this session:")
        lines += [f"  {host} · {format_bytes(count)}" for host, count in top]
    return lines


def session_summary(store: UsageStore, now: float | None = None) -> str:
    """One log line for the end of a session (and for ``stats_interval``)."""
    session, started = store.session()
    now = store.now() if now is None else now
    down, up = store.rates(now)
    top = session.top_hosts(1)
    busiest = f", busiest {top[0][0]} ({format_bytes(top[0][1])})" if top else ""
    return (
        f"session {format_span(max(0.0, now - started))}: ↓ {format_bytes(session.down)} "
        f"↑ {format_bytes(session.up)} (now ↓ {format_rate(down)} ↑ {format_rate(up)}), "
        f"today {format_bytes(store.day(now).bytes)}{busiest}"
    )
