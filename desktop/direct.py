"""Dialing from this machine instead of through the tunnel, and choosing between the two.

Destinations the ``bypass`` rules match (the LAN, loopback, plain intranet names) are
dialed directly by the agent; everything else goes through the tunnel. A direct dial uses
the tunnel server's own target dialer, so its failures carry the same reasons (and reach
the client as the same HTTP statuses or SOCKS replies).
"""

from __future__ import annotations

import logging

from desktop.bypass import BypassRules, Route
from desktop.dialing import ByteStream, Dialer, DialError
from desktop.socket_stream import SocketStream
from server.egress import EgressPolicy
from server.target_dialer import TargetDialError, dial_target_async

log = logging.getLogger("fluidity.proxy")

#: A bypassed destination is the user's own network: nothing is refused by policy here.
ANY_DESTINATION = EgressPolicy(["0.0.0.0/0", "::/0"])


class DirectDialer:
    """Connects from this machine, under ``policy``; the stream is a ``SocketStream``."""

    def __init__(self, policy: EgressPolicy = ANY_DESTINATION, timeout: float = 10.0) -> None:
        self.policy = policy
        self.timeout = timeout

    async def dial(self, host: str, port: int) -> SocketStream:
        try:
            sock = await dial_target_async(host, port, policy=self.policy, timeout=self.timeout)
        except TargetDialError as error:
            raise DialError(error.reason, error.message) from None
        return await SocketStream.connect(sock)


class RoutingDialer:
    """The agent's dialer: bypassed destinations directly, the rest through the tunnel."""

    def __init__(self, tunnel: Dialer, rules: BypassRules, direct: Dialer) -> None:
        self.tunnel = tunnel
        self.rules = rules
        self.direct = direct

    async def dial(self, host: str, port: int) -> ByteStream:
        if self.rules.route(host) is Route.DIRECT:
            log.debug("dialing %s:%d directly (bypass rules)", host, port)
            return await self.direct.dial(host, port)
        return await self.tunnel.dial(host, port)
