"""Settings of the tunnel server (``fluidity-server``), with their defaults and rules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.config_loader import (
    FieldError,
    Settings,
    default_cert_dir,
    duration,
    load,
    setting,
)
from server.framing import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_PAYLOAD,
    MAX_PAYLOAD_LIMIT,
    MAX_WINDOW,
    MIN_PAYLOAD_LIMIT,
    TUNNEL_PORT,
)
from server.json_logging import LogFormat, LogLevel

#: ECS sends SIGKILL this long after SIGTERM unless the task definition says otherwise.
ECS_STOP_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, repr=False)
class ServerConfig(Settings):
    """Everything the tunnel server reads at start-up."""

    listen_address: str = setting("0.0.0.0", help="address the tunnel listener binds")
    listen_port: int = setting(
        TUNNEL_PORT, kind="port", minimum=0, help="TCP port for agent tunnels (0 = any free port)"
    )
    ca_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "ca.crt",
        kind="path",
        help="CA certificate that agent client certificates must chain to",
    )
    cert_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "server.crt",
        kind="path",
        help="server certificate presented to agents",
    )
    key_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "server.key",
        kind="path",
        help="private key of the server certificate",
    )
    connect_timeout: float = duration("10s", help="how long to wait when dialing a target host")
    shutdown_grace: float = duration(
        "20s", help="on SIGTERM, how long open streams may finish before the tunnel closes"
    )
    agent_timeout: float = duration(
        "60s", help="close a tunnel that sent nothing, not even a PING, for this long"
    )
    emit_metrics: bool = setting(False, help="publish ActiveConnections and friends to CloudWatch")
    metrics_interval: float = duration("60s", help="how often metrics are published")
    metrics_namespace: str = setting("Fluidity", help="CloudWatch namespace for metrics")
    service_name: str = setting("fluidity-server", help="ECS service name (metric dimension)")
    cluster_name: str = setting("fluidity", help="ECS cluster name (metric dimension)")
    aws_region: str | None = setting(None, help="AWS region for CloudWatch (default: from the environment)")
    allow_networks: list[str] = setting(
        default_factory=list,
        kind="cidr",
        help="networks the egress policy allows even though they are private or loopback",
    )
    allow_ports: list[int] = setting(
        default_factory=list, kind="port", help="destination ports agents may open (empty = any port)"
    )
    max_streams_per_tunnel: int = setting(
        1024, minimum=1, help="most streams one tunnel may have open at once, dials in progress included"
    )
    max_tunnels: int = setting(64, minimum=1, help="most authenticated agent tunnels at once")
    max_handshakes: int = setting(
        256, minimum=1, help="most connections still in TLS + HELLO at once; more are closed at once"
    )
    max_handshakes_per_source: int = setting(
        32, minimum=0, help="most connections in TLS + HELLO from one IP address (0 = no per-address cap)"
    )
    handshake_timeout: float = duration(
        "5s", help="a connection must finish TLS and send HELLO within this, or it is closed"
    )
    stream_idle_timeout: float = duration(
        "1h", allow_zero=True, help="reset a stream with no data either way for this long (0 = never)"
    )
    connection_window: int = setting(
        DEFAULT_CONNECTION_WINDOW,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_WINDOW,
        help="bytes all streams of one tunnel together may have in flight towards this server",
    )
    resolver_threads: int = setting(
        8, minimum=1, maximum=256, help="threads that resolve target names (the only blocking calls)"
    )
    max_payload: int = setting(
        DEFAULT_MAX_PAYLOAD,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_PAYLOAD_LIMIT,
        help="largest frame payload in bytes this server accepts",
    )
    initial_window: int = setting(
        DEFAULT_INITIAL_WINDOW,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_WINDOW,
        help="largest window: bytes a peer may send on a stream before it must wait for a window update",
    )
    window_tuning: bool = setting(
        True,
        help="size each stream's receive window to the measured bandwidth-delay product "
        "(from 256 KiB up to initial_window), so a download does not queue seconds of data "
        "ahead of other replies; off: every stream gets initial_window",
    )
    heartbeat_file: Path | None = setting(
        None,
        kind="path",
        help="the event loop refreshes this file every 5 s; `fluidity-server --health-check` reads it",
    )
    log_level: LogLevel = setting("info", help="least severe log level written")
    log_file: Path | None = setting(
        None, kind="path", help="also write logs here, rotated at 1 MiB (default: stderr only)"
    )
    log_format: LogFormat = setting(
        "auto",
        help="auto = short lines on a terminal, JSON in files, pipes and containers; json or text forces one",
    )

    def validate(self) -> None:
        if not self.listen_address.strip():
            raise FieldError("listen_address", "must not be empty")
        if self.initial_window < self.max_payload:
            raise FieldError(
                "initial_window",
                f"must be at least max_payload ({self.max_payload}), got {self.initial_window}",
            )

    def warnings(self) -> list[tuple[str, str]]:
        found = []
        if self.shutdown_grace >= ECS_STOP_TIMEOUT_SECONDS:
            found.append(
                (
                    "shutdown_grace",
                    f"is {self.shutdown_grace:g}s; ECS kills the task {ECS_STOP_TIMEOUT_SECONDS:g}s "
                    "after SIGTERM, so streams may be cut before the grace period ends",
                )
            )
        return found


def load_server_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServerConfig:
    """ServerConfig from ``path`` (None = defaults only), environment and overrides."""
    return load(ServerConfig, path, env=env, overrides=overrides)
