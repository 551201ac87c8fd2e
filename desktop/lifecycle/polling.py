"""Wait for a woken server to report "running" with an address, within a deadline.

The Lambda and ECS backends ask different APIs the same question in a loop; this is the
loop, so the deadline, cancellation and progress rules are written (and tested) once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from desktop.lifecycle.base import Endpoint, LifecycleError, ProgressCallback, WakeCancelled
from server.framing import ServerState, ServerStatus

#: Longest single control-plane request; a whole wake is bounded by connection_timeout.
REQUEST_TIMEOUT = 15.0
#: A poll needs at least this much of the deadline left to be worth sending.
MIN_POLL_BUDGET = 0.25


class TransientLifecycleError(LifecycleError):
    """A poll failed in a way that may pass (throttling, 5xx, a dropped connection): retry.

    ``nothing_done``: the request certainly did not run (no connection, throttled at the door),
    as opposed to a timeout or a 5xx, after which it may have.
    """

    def __init__(self, code: str, message: str, *, nothing_done: bool = False) -> None:
        super().__init__(code, message)
        self.nothing_done = nothing_done


def describe_status(status: ServerStatus) -> str:
    """One line for the status menu and the log, e.g. "starting: 0 of 1 tasks running"."""
    text = f"{status.state.value}: {status.running_count} of {status.desired_count} tasks running"
    if status.pending_count:
        text += f", {status.pending_count} pending"
    if status.state is ServerState.RUNNING and not status.public_ip:
        text += ", no public IP yet"
    return text


def wait_until_running(
    first: ServerStatus,
    fetch_status: Callable[[float], ServerStatus],
    *,
    timeout: float,
    interval: float,
    cancel: threading.Event,
    on_progress: ProgressCallback,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Endpoint:
    """Poll ``fetch_status(request_timeout)`` until running with a public IP; raise LifecycleError.

    ``first`` is the reply to the wake call itself. Transient poll failures are retried until
    the deadline and then named in the timeout message, so the user sees the real cause.
    """
    began = clock() if started is None else started
    deadline = began + timeout
    status: ServerStatus | None = first
    last_seen = describe_status(first)
    last_problem = ""
    while True:
        if status is not None:
            on_progress(status, clock() - began)
            if status.state is ServerState.RUNNING and status.public_ip:
                return Endpoint(status.public_ip, status.port)
        remaining = deadline - clock()
        if remaining > 0 and cancel.wait(min(interval, remaining)):
            raise WakeCancelled()
        remaining = deadline - clock()
        if cancel.is_set():
            raise WakeCancelled()
        if remaining < MIN_POLL_BUDGET:
            problem = f"; last poll: {last_problem}" if last_problem else ""
            raise LifecycleError(
                "timeout",
                f"the server was not ready within {timeout:g} s (last seen: {last_seen}{problem}); "
                "raise connection_timeout or check the ECS service",
            )
        try:
            status = fetch_status(min(REQUEST_TIMEOUT, remaining))
        except TransientLifecycleError as error:
            status = None
            last_problem = error.message
        else:
            last_seen = describe_status(status)
            last_problem = ""
        if cancel.is_set():
            raise WakeCancelled()
