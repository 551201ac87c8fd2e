"""Reusable daemon threads, so a new stream or connection does not pay for a new thread.

Starting a Python thread costs ~70 us and blocks the caller until the thread has run
(``Thread.start`` waits for it): on the tunnel reader that stalls every other stream.
A pooled worker takes a task through one lock release. Idle workers exit after a while,
so a burst of connections does not pin threads forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fluidity.workers")

IDLE_TIMEOUT = 30.0
MAX_IDLE = 256


class _Worker:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.wake = threading.Lock()
        self.wake.acquire()
        self.task: tuple[Callable[..., Any], tuple[Any, ...]] | None = None

    def run(self) -> None:
        pool = self.pool
        while True:
            if not self.wake.acquire(timeout=pool.idle_timeout):
                with pool._lock:
                    if self in pool._idle:
                        pool._idle.remove(self)
                        return
                self.wake.acquire()  # popped just now: the task is on its way
            assert self.task is not None
            function, args = self.task
            self.task = None
            try:
                function(*args)
            except Exception:  # a task bug must not take the worker's caller down silently
                log.exception("task failed", extra={"pool": pool.name})
            with pool._lock:
                if len(pool._idle) >= pool.max_idle:
                    return
                pool._idle.append(self)


class WorkerPool:
    """``submit(fn, *args)`` runs ``fn`` on an idle worker, or on a new one if none is idle."""

    def __init__(self, name: str, *, idle_timeout: float = IDLE_TIMEOUT, max_idle: int = MAX_IDLE) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # LIFO: the most recently used worker is warm
        self._started = 0

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self._started += 1
                number = self._started
        if worker is not None:
            worker.task = (function, args)
            worker.wake.release()
            return
        worker = _Worker(self)
        worker.task = (function, args)
        worker.wake.release()
        threading.Thread(target=worker.run, name=f"{self.name}-{number}", daemon=True).start()

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)
