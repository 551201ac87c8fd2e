"""Fixtures every test module may use: real certificates, a real tunnel server, a real agent."""

from tunnel_fixtures import agent, pki, tunnel_server  # noqa: F401  (re-exported fixtures)
