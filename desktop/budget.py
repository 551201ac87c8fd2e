"""The monthly budget (a notice at 80 %, at 100 % disconnect and stop the server) and its driver.

``check_budget`` is the rule: (state, this month's cost, the budget, the session) -> (next
state, what to do), a pure function tested by feeding recorded costs. ``UsageWatch`` is the
thin driver that runs it about once a second beside the controller: it also keeps the usage
store saved, counts server time while the tunnel is up, and now and then asks the backend
whether a server Fluidity is not connected to still runs (the Sleep Lambda may have stopped it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from desktop.config import ON_DEMAND_LIFECYCLES
from desktop.controller import Controller, SessionFailed, State
from desktop.lifecycle.base import LifecycleError
from desktop.usage import Clock, CostSummary, Prices, UsageStore, format_usd, summarise

log = logging.getLogger("fluidity.usage")

#: Share of the budget at which the one warning of the month is given.
WARN_SHARE = 0.8
#: How often the watch runs.
WATCH_INTERVAL = 1.0
#: How often a server that runs without a tunnel to it is asked about (status call).
STATUS_POLL_INTERVAL = 60.0

#: Called with a message for the user and whether it is a warning.
NoticeSink = Callable[[str, bool], None]


@dataclass(frozen=True)
class BudgetState:
    """What has been said and done about this month's budget."""

    month: str = ""
    budget: float = 0.0
    warned: bool = False
    stopped_session: int | None = None
    #: The session the user chose to run over budget ("Connect anyway").
    confirmed_session: int | None = None


@dataclass(frozen=True)
class BudgetNotice:
    message: str


@dataclass(frozen=True)
class BudgetStop:
    """Disconnect and stop the server: the budget is used up."""

    message: str


BudgetAction = BudgetNotice | BudgetStop


def effective_budget(value: float | None) -> float:
    """The budget in USD; 0 means none (unset, zero or negative)."""
    return value if value is not None and math.isfinite(value) and value > 0 else 0.0


def warning_message(cost: float, budget: float) -> str:
    return (
        f"Fluidity has used {cost / budget:.0%} of this month's budget: ≈ {format_usd(cost)} of "
        f"{format_usd(budget)}. At {format_usd(budget)} it disconnects and stops the server."
    )


def stop_message(cost: float, budget: float, how_to_raise: str) -> str:
    return (
        f"Monthly budget reached: ≈ {format_usd(cost)} of {format_usd(budget)} this month, so Fluidity "
        f"disconnected and stopped the server. To go on this month, {how_to_raise}."
    )


def refusal_message(cost: float, budget: float, how_to_raise: str) -> str:
    return (
        f"Not connecting: this month's budget is used up (≈ {format_usd(cost)} of "
        f"{format_usd(budget)}). To go on, {how_to_raise}."
    )


def check_budget(
    state: BudgetState,
    *,
    month: str,
    cost: float,
    budget: float | None,
    session: int,
    busy: bool,
    how_to_raise: str,
) -> tuple[BudgetState, tuple[BudgetAction, ...]]:
    """The budget rule for one reading of this month's ``cost``.

    One notice a month at 80 %; at 100 % a running session is stopped once, unless the user
    confirmed it over budget. A new month, or a changed budget, starts the count again.
    """
    limit = effective_budget(budget)
    confirmed = state.confirmed_session  # "Connect anyway" holds whatever the month or budget
    if limit == 0.0:
        return BudgetState(month=month, confirmed_session=confirmed), ()
    if state.month != month:
        state = BudgetState(month=month, budget=limit, confirmed_session=confirmed)
    elif state.budget != limit:
        state = replace(state, budget=limit, warned=False, stopped_session=None)
    share = cost / limit
    if share >= 1.0:
        if busy and session not in (state.stopped_session, state.confirmed_session):
            return (
                replace(state, warned=True, stopped_session=session),
                (BudgetStop(stop_message(cost, limit, how_to_raise)),),
            )
        if not state.warned:
            return replace(state, warned=True), (BudgetNotice(refusal_message(cost, limit, how_to_raise)),)
        return state, ()
    if share >= WARN_SHARE and not state.warned:
        return replace(state, warned=True), (BudgetNotice(warning_message(cost, limit)),)
    return state, ()


def connect_refusal(cost: float, budget: float | None, how_to_raise: str) -> str | None:
    """Why Connect is refused (the budget is used up), or None."""
    limit = effective_budget(budget)
    if limit and cost >= limit:
        return refusal_message(cost, limit, how_to_raise)
    return None


class UsageWatch:
    """Runs the budget rule and the usage store's upkeep next to a controller."""

    def __init__(
        self,
        controller: Controller,
        store: UsageStore,
        *,
        how_to_raise: str,
        on_notice: NoticeSink,
        clock: Clock = time.time,
        interval: float = WATCH_INTERVAL,
        status_poll: float = STATUS_POLL_INTERVAL,
    ) -> None:
        self.controller = controller
        self.store = store
        self.how_to_raise = how_to_raise
        self._on_notice = on_notice
        self._clock = clock
        self._interval = interval
        self._status_poll = status_poll
        self._state = BudgetState()
        self._lock = threading.Lock()
        self._last_poll = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- what the tray and the agent ask --------------------------------------

    @property
    def metered(self) -> bool:
        """Whether the server costs money (the lambda and ecs backends start it on demand)."""
        return self.controller.config.lifecycle in ON_DEMAND_LIFECYCLES

    def prices(self) -> Prices:
        config = self.controller.config
        return Prices(config.price_per_hour, config.price_per_gb_out)

    def summary(self, now: float | None = None) -> CostSummary:
        return summarise(self.store, self.prices(), self._clock() if now is None else now)

    def connect_refusal(self, now: float | None = None) -> str | None:
        """Why Connect should not go ahead now (budget used up, not confirmed), or None."""
        if not self.metered:
            return None
        with self._lock:
            confirmed = self._state.confirmed_session == self.controller.snapshot().session + 1
        if confirmed:
            return None
        cost = self.summary(now).month_cost
        return connect_refusal(cost, self.controller.config.monthly_budget, self.how_to_raise)

    def confirm_over_budget(self) -> None:
        """The user chose to connect anyway: the next session runs without the budget stop."""
        with self._lock:
            self._state = replace(self._state, confirmed_session=self.controller.snapshot().session + 1)

    # ----- one step ---------------------------------------------------------------

    def check(self, now: float | None = None) -> None:
        """Count, save, poll and apply the budget once (the thread calls this every second)."""
        now = self._clock() if now is None else now
        snap = self.controller.snapshot()
        metered = self.metered
        if metered and snap.state is State.CONNECTED:
            self.store.server_seen(now)  # a working tunnel is evidence the server runs
        self.store.tick(now)
        if not metered:
            return
        self._poll_status(now, busy=snap.busy or snap.stopping)
        summary = self.summary(now)
        with self._lock:
            self._state, actions = check_budget(
                self._state,
                month=summary.month,
                cost=summary.month_cost,
                budget=self.controller.config.monthly_budget,
                session=snap.session,
                busy=snap.busy,
                how_to_raise=self.how_to_raise,
            )
        for action in actions:
            if isinstance(action, BudgetStop):
                log.warning("monthly budget reached, stopping the server", extra={"cost": summary.month_cost})
                self.controller.post(SessionFailed(snap.session, "budget", action.message, stop_server=True))
            else:
                self._on_notice(action.message, True)

    def _poll_status(self, now: float, *, busy: bool) -> None:
        """Ask whether a server that runs without our tunnel still runs (at most once a minute)."""
        if busy or self.store.run is None or now - self._last_poll < self._status_poll:
            return
        self._last_poll = now
        try:
            self.controller.lifecycle.status()  # the metered backend records what it says
        except LifecycleError as error:
            log.info("cannot ask whether the server still runs", extra={"problem": error.message})

    # ----- the thread -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:
                log.exception("usage watch failed")

    def stop(self) -> None:
        """End the thread and save what is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.store.close()
