"""The shape every server lifecycle backend has: wake it, ask how it is, kill it.

The tray and the agent only talk to this interface, so the embedded local server,
a fixed address, the Lambda control plane and direct ECS calls are interchangeable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.errors import FluidityError
from server.framing import ServerStatus


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the tunnel server can be reached right now (its address changes on every wake)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class LifecycleError(FluidityError):
    """Waking, polling or killing failed; ``code`` is stable, ``message`` is for the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WakeRefused(LifecycleError):
    """The wake request itself was turned down or never arrived: nothing was started.

    The controller then has no server to stop, so no second error about stopping it follows.
    """


class WakeCancelled(LifecycleError):
    def __init__(self) -> None:
        super().__init__("cancelled", "wake cancelled")


#: Called while waking with the latest status and the seconds elapsed since wake began.
ProgressCallback = Callable[[ServerStatus, float], None]


class ServerLifecycle(Protocol):
    """A backend; every call may block on the network, so callers run it off the UI thread."""

    name: str

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        """Start the server if needed and block until it accepts tunnels; raise LifecycleError."""

    def status(self) -> ServerStatus:
        """Report the server's state without changing it."""

    def kill(self) -> ServerStatus:
        """Stop the server (idempotent) so it costs nothing."""

    def close(self) -> None:
        """Release local resources (processes, HTTP sessions)."""
