"""The agent's one event loop, on a thread of its own beside the tray's UI loop.

Every proxy and tunnel socket of the process lives on this loop, so the tray (or any
other caller) never blocks on network I/O: it hands work over with ``run`` and gets the
result back, and the loop thread does nothing else.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Threads for the few blocking calls the loop must make (name resolution for direct dials).
BLOCKING_THREADS = 4


class LoopThread:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self, name: str = "fluidity-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix=f"{name}-io"))
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called on the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, callback: Any, *args: Any) -> None:
        """Schedule a plain callback on the loop (thread-safe, does not wait)."""
        self.loop.call_soon_threadsafe(callback, *args)

    @property
    def is_current(self) -> bool:
        return threading.current_thread() is self._thread


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """The process's event loop thread, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoopThread()
        return _shared
