"""Fixtures every test module may use: real certificates, a real tunnel server, a real agent,
and a moto server on loopback with Fluidity's ECS service in it."""

from cloud_fixtures import aws_env, cloud, moto_server  # noqa: F401  (re-exported fixtures)
from tunnel_fixtures import agent, pki, tunnel_server  # noqa: F401  (re-exported fixtures)
