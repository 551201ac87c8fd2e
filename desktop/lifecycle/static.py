"""A server that is always there at a fixed address: nothing to wake, nothing to kill."""

from __future__ import annotations

import threading

from desktop.config import AgentConfig
from desktop.lifecycle.base import Endpoint, ProgressCallback, WakeCancelled
from server.framing import ServerState, ServerStatus


class StaticLifecycle:
    """``lifecycle: static``: the configured server_address/server_port, no control-plane calls."""

    name = "static"

    def __init__(self, config: AgentConfig) -> None:
        self._endpoint = Endpoint(config.server_address, config.server_port)

    def _status(self) -> ServerStatus:
        # We cannot know whether a server we do not manage is up; the tunnel tells us that.
        return ServerStatus(
            ServerState.RUNNING,
            desired_count=1,
            running_count=1,
            pending_count=0,
            public_ip=self._endpoint.host,
            port=self._endpoint.port,
            message="fixed server address (lifecycle: static)",
        )

    def wake(self, *, timeout: float, cancel: threading.Event, on_progress: ProgressCallback) -> Endpoint:
        if cancel.is_set():
            raise WakeCancelled()
        on_progress(self._status(), 0.0)
        return self._endpoint

    def status(self) -> ServerStatus:
        return self._status()

    def kill(self) -> ServerStatus:
        return self._status()

    def close(self) -> None:
        return None
