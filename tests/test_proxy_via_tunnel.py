"""Every local-proxy test again, with the real multiplexed mTLS tunnel as the dialer.

The proxy tests use a direct dialer so a failure points at the proxy; here the same
clients go through agent -> tunnel -> server process -> origin, and must see the same
results (the server's egress policy allows loopback, like the local default).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_proxy import *  # noqa: F403  (re-run the proxy suite)
from tunnel_fixtures import Pki, ServerProcess, agent_config, free_port, server_args

from desktop.lifecycle.base import Endpoint
from desktop.tunnel_client import TunnelClient


@pytest.fixture(scope="module")
def module_tunnel_server(pki: Pki) -> Iterator[ServerProcess]:
    server = ServerProcess(server_args(pki, "--connect-timeout", "2s"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dialer(pki: Pki, module_tunnel_server: ServerProcess) -> Iterator[TunnelClient]:  # noqa: F811
    client = TunnelClient(agent_config(pki, module_tunnel_server.port))
    client.start(Endpoint("127.0.0.1", module_tunnel_server.port))
    assert client.wait_connected(10.0), client.stats().last_error
    yield client
    client.stop()
