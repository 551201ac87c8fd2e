"""The agent: the local proxy plus the tunnel client under it, as one start/stop unit.

The tray app drives an ``Agent`` as a library; ``fluidity-agent`` (see ``agent_cli``)
runs one headless. The agent never decides where the server is: the lifecycle backend
wakes the server and hands over an ``Endpoint``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from desktop.config import AgentConfig
from desktop.direct import DirectDialer, RoutingDialer
from desktop.lifecycle.base import Endpoint
from desktop.proxy import LocalProxy
from desktop.tunnel_client import LinkObserver, LinkState, TunnelClient
from desktop.usage import Meter

log = logging.getLogger("fluidity.agent")


@dataclass(frozen=True, slots=True)
class AgentStats:
    link_state: LinkState
    active_streams: int
    connected_since: float | None
    last_error: str | None
    consecutive_failures: int
    proxy_connections: int
    permanent_error: str | None = None  # the tunnel was refused for good (a certificate)


class Agent:
    def __init__(
        self, config: AgentConfig, *, on_link_change: LinkObserver | None = None, meter: Meter | None = None
    ) -> None:
        self.config = config
        self._meter = meter
        self._on_link_change = on_link_change
        self._client: TunnelClient | None = None
        self._proxy: LocalProxy | None = None
        self._lock = threading.Lock()

    def listen(self) -> None:
        """Bind the local proxy (OSError if the port is taken) before the server is woken:
        a busy port is found before anything is paid for, and requests wait for the tunnel."""
        with self._lock:
            if self._proxy is not None:
                raise RuntimeError("agent already listening")
            client = TunnelClient(self.config, on_state=self._on_link_change)
            rules = self.config.bypass_rules()
            dialer = RoutingDialer(client, rules, DirectDialer(timeout=self.config.connect_timeout))
            proxy = LocalProxy(  # on the same event loop as the tunnel client
                dialer,
                self.config.listen_address,
                self.config.listen_port,
                max_header_bytes=self.config.max_header_bytes,
                header_timeout=self.config.header_timeout,
                idle_timeout=self.config.idle_timeout,
                max_connections=self.config.max_connections,
                pac_rules=rules,
                pac_fallback_direct=self.config.pac_fallback_direct,
                meter=self._meter,
                optimistic_connect=self.config.optimistic_connect,
                loop_thread=client.loop_thread,
            )
            proxy.start()
            self._client, self._proxy = client, proxy
        host, port = proxy.address
        log.info("proxy listening", extra={"address": f"http://{host}:{port}"})

    def start(self, endpoint: Endpoint) -> None:
        """Connect the tunnel to ``endpoint`` in the background (binding the proxy first if needed)."""
        bound_here = self._proxy is None
        if bound_here:
            self.listen()
        assert self._client is not None
        if self._meter is not None:
            self._meter.begin_session()
        try:
            self._client.start(endpoint)
        except BaseException:
            if bound_here:  # as if start had never been called
                self.stop()
            raise
        log.info("connecting", extra={"server": str(endpoint)})

    def set_endpoint(self, endpoint: Endpoint) -> None:
        if self._client is not None:
            self._client.set_endpoint(endpoint)

    def wait_connected(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        client = self._client
        return client is not None and client.wait_connected(timeout, cancel)

    def stop(self) -> None:
        with self._lock:
            proxy, client = self._proxy, self._client
            self._proxy = self._client = None
        if proxy is not None:
            proxy.stop()
        if client is not None:
            client.stop()

    @property
    def running(self) -> bool:
        return self._proxy is not None

    @property
    def link_state(self) -> LinkState:
        client = self._client
        return client.state if client is not None else LinkState.DISCONNECTED

    @property
    def proxy_address(self) -> tuple[str, int]:
        if self._proxy is None:
            return self.config.listen_address, self.config.listen_port
        return self._proxy.address

    def stats(self) -> AgentStats:
        client, proxy = self._client, self._proxy
        if client is None:
            return AgentStats(LinkState.DISCONNECTED, 0, None, None, 0, 0)
        tunnel = client.stats()
        return AgentStats(
            tunnel.state,
            tunnel.active_streams,
            tunnel.connected_since,
            tunnel.last_error,
            tunnel.consecutive_failures,
            proxy.active_connections if proxy is not None else 0,
            tunnel.permanent_error,
        )


def metered_agents(meter: Meter) -> Callable[[AgentConfig, LinkObserver], Agent]:
    """The controller's agent factory when the traffic meter counts what the proxy relays."""

    def make(config: AgentConfig, on_link_change: LinkObserver) -> Agent:
        return Agent(config, on_link_change=on_link_change, meter=meter)

    return make
