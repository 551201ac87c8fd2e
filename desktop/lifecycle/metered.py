"""A backend wrapper that tells the usage store when the server was woken, ran and stopped.

Why a wrapper: every way the server's time is learnt already passes through the backend (a
wake and its progress replies, a status reply, a kill), so recording it here keeps the
controller unaware of money, and the Lambda and ECS backends are metered the same way.
"""

from __future__ import annotations

import threading
import time

from desktop.lifecycle.base import Endpoint, ProgressCallback, ServerLifecycle, WakeRefused
from desktop.usage import Clock, UsageStore
from server.framing import ServerState, ServerStatus


def _has_no_task(status: ServerStatus) -> bool:
    return status.state is not ServerState.RUNNING and status.running_count == 0


class MeteredLifecycle:
    """Delegates to ``inner``; each answer about the server becomes evidence in ``store``."""

    def __init__(self, inner: ServerLifecycle, store: UsageStore, *, clock: Clock = time.time) -> None:
        self.inner = inner
        self.name = inner.name
        self.store = store
        self._clock = clock

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        opened = self.store.run is None
        if opened:
            self.store.server_woken(self._clock())
        first = True

        def progress(status: ServerStatus, elapsed: float) -> None:
            nonlocal first
            now = self._clock()
            if first and not opened and _has_no_task(status):
                # The run we believed in had ended unseen (the Sleep Lambda scaled the service to
                # zero, or someone else did): close it at its last evidence, this wake starts anew.
                self.store.server_found_stopped("stopped while not watched (Sleep Lambda or AWS)")
                self.store.server_woken(now)
            first = False
            self.store.server_seen(now)
            on_progress(status, elapsed)

        try:
            endpoint = self.inner.wake(timeout=timeout, cancel=cancel, on_progress=progress)
        except WakeRefused:
            run = self.store.run
            if opened and run is not None:
                self.store.server_stopped("wake refused", at=run.woken_at)  # nothing was started
            raise
        self.store.server_running(self._clock())
        return endpoint

    def status(self) -> ServerStatus:
        status = self.inner.status()
        if self.store.run is not None:
            if status.state is ServerState.STOPPED:
                self.store.server_found_stopped()
            elif not _has_no_task(status):
                self.store.server_seen(self._clock())
        return status

    def kill(self) -> ServerStatus:
        status = self.inner.kill()
        self.store.server_stopped("stopped by Fluidity", self._clock())
        return status

    def close(self) -> None:
        self.inner.close()
