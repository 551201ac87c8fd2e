"""Settings of the desktop agent (tray app and ``fluidity-agent``), with their defaults and rules."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import platformdirs

from desktop.bypass import DEFAULT_BYPASS, BypassRuleError, BypassRules
from desktop.usage import DEFAULT_PRICE_PER_GB_OUT, DEFAULT_PRICE_PER_HOUR
from server.config_loader import (
    APP_NAME,
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

Lifecycle = Literal["static", "local", "lambda", "ecs"]
#: ``system_proxy``: leave the OS proxy alone, set host and port, or point it at the PAC file.
SystemProxyMode = Literal["off", "manual", "pac"]

#: Backends that start a server on demand, and so should stop it when the agent goes away.
ON_DEMAND_LIFECYCLES = frozenset({"lambda", "ecs"})


def default_agent_config_path() -> Path:
    """The settings file the agent reads when no --config is given (if it exists)."""
    return platformdirs.user_config_path(APP_NAME, appauthor=False) / "agent.yaml"


def default_log_path() -> Path:
    """Where the tray app writes its log when log_file is not set."""
    return platformdirs.user_log_path(APP_NAME, appauthor=False) / "fluidity.log"


def system_proxy_state_path() -> Path:
    """The OS proxy settings Fluidity replaced, kept until they are restored (crash safety)."""
    return platformdirs.user_state_path(APP_NAME, appauthor=False) / "system-proxy.json"


#: The agent grants the server a bigger window than the server grants the agent: downloads
#: are the bulk direction and a desktop has memory to spare, while the Fargate task has
#: 512 MB. Measured on loopback: 4 MiB took one stream from ~540 to ~840 MB/s against
#: 1 MiB; 8 MiB added nothing more.
AGENT_INITIAL_WINDOW = 4 * DEFAULT_INITIAL_WINDOW


@dataclass(frozen=True, repr=False)
class AgentConfig(Settings):
    """Everything the agent reads at start-up."""

    server_address: str = setting(
        "", help="host or IP the tunnel dials (empty = the lifecycle backend finds it)"
    )
    server_port: int = setting(TUNNEL_PORT, kind="port", help="tunnel server port")
    server_name: str = setting(
        "fluidity-server", help="DNS name the server certificate must carry (never the dialed IP)"
    )
    listen_address: str = setting("127.0.0.1", help="address the local proxy binds")
    listen_port: int = setting(8080, kind="port", minimum=0, help="local proxy port (0 = any free port)")
    system_proxy: SystemProxyMode | None = setting(
        None,
        help="point the OS proxy at the agent while connected, and restore it after: off, manual or pac "
        "(unset = manual in the tray, off for fluidity-agent)",
    )
    bypass: list[str] = setting(
        default_factory=lambda: list(DEFAULT_BYPASS),
        kind="host_pattern",
        help="destinations dialed directly, not through the tunnel: names (localhost, *.corp.example, .lan), "
        "networks (192.168.0.0/16, fd00::/8) and <local> (names without a dot); [] = tunnel everything",
    )
    pac_fallback_direct: bool = setting(
        False,
        help="the PAC file lets browsers go DIRECT while the agent is down (off: they fail, nothing leaks)",
    )
    ca_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "ca.crt",
        kind="path",
        help="CA certificate the server certificate must chain to",
    )
    cert_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "client.crt",
        kind="path",
        help="client certificate presented to the server",
    )
    key_file: Path = setting(
        default_factory=lambda: default_cert_dir() / "client.key",
        kind="path",
        help="private key of the client certificate",
    )
    connection_timeout: float = duration("90s", help="whole budget to wake the server and connect to it")
    connect_timeout: float = duration("10s", help="one TCP + TLS connection attempt")
    keepalive_interval: float = duration("10s", help="send a PING when the tunnel has been quiet this long")
    keepalive_timeout: float = duration("30s", help="declare the tunnel dead after this long without a reply")
    reconnect_backoff_max: float = duration("30s", help="longest wait between reconnection attempts")
    request_wait: float = duration(
        "10s", help="how long a new request waits for a reconnecting tunnel before failing"
    )
    max_header_bytes: int = setting(
        65536, minimum=1024, help="largest HTTP request head the proxy accepts, in bytes"
    )
    header_timeout: float = duration("10s", help="how long a client may take to send its request head")
    idle_timeout: float = duration("60s", help="close a proxied connection idle for this long")
    optimistic_connect: bool = setting(
        True,
        help="answer CONNECT before the server has dialed, so the TLS hello rides behind the OPEN "
        "(a failed dial then closes the connection instead of answering 502)",
    )
    stats_interval: float = duration(
        "0s", allow_zero=True, help="fluidity-agent logs a traffic summary this often (0 = only at the end)"
    )
    max_connections: int = setting(
        4096, minimum=1, help="client connections the proxy serves at once; more are closed at once"
    )
    max_payload: int = setting(
        DEFAULT_MAX_PAYLOAD,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_PAYLOAD_LIMIT,
        help="largest frame payload in bytes this agent accepts",
    )
    initial_window: int = setting(
        AGENT_INITIAL_WINDOW,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_WINDOW,
        help="largest window: bytes the server may send on a stream before it must wait for a window update",
    )
    window_tuning: bool = setting(
        True,
        help="size each stream's receive window to the measured bandwidth-delay product "
        "(from 256 KiB up to initial_window), so a download does not queue seconds of data "
        "ahead of other replies; off: every stream gets initial_window",
    )
    connection_window: int = setting(
        DEFAULT_CONNECTION_WINDOW,
        minimum=MIN_PAYLOAD_LIMIT,
        maximum=MAX_WINDOW,
        help="bytes all streams of the tunnel together may have in flight towards this agent",
    )
    log_level: LogLevel = setting("info", help="least severe log level written")
    log_file: Path | None = setting(
        None, kind="path", help="write logs here, rotated at 1 MiB (tray default: the user log folder)"
    )
    log_format: LogFormat = setting(
        "auto", help="auto = short lines on a terminal, JSON in files and pipes; json or text forces one"
    )
    lifecycle: Lifecycle = setting(
        "static",
        help="how the server is found and started: static address, local process, Lambda API or ECS",
    )
    api_url: str | None = setting(
        None, kind="url", help="control-plane API URL (the ApiGatewayUrl output of the fluidity-lambda stack)"
    )
    api_key: str | None = setting(None, secret=True, help="control-plane API key, sent as x-api-key")
    aws_profile: str | None = setting(None, help="AWS profile for the ecs lifecycle")
    aws_region: str | None = setting(
        None, help="AWS region for the ecs lifecycle (default: from the profile)"
    )
    cluster_name: str = setting("fluidity", help="ECS cluster of the server (ecs lifecycle)")
    service_name: str = setting("fluidity-server", help="ECS service of the server (ecs lifecycle)")
    kill_on_disconnect: bool | None = setting(
        None, help="stop the server when the agent exits (unset = on for lambda and ecs, off otherwise)"
    )
    wake_poll_interval: float = duration("3s", help="how often to ask whether a waking server is ready")
    local_server_config: Path | None = setting(
        None, kind="path", help="server settings file the local lifecycle starts the server with"
    )
    price_per_hour: float = setting(
        DEFAULT_PRICE_PER_HOUR,
        minimum=0,
        help="USD per hour the server runs (Fargate 0.25 vCPU + 0.5 GB + public IPv4, us-east-1)",
    )
    price_per_gb_out: float = setting(
        DEFAULT_PRICE_PER_GB_OUT, minimum=0, help="USD per GB of traffic leaving AWS (us-east-1)"
    )
    monthly_budget: float | None = setting(
        None,
        minimum=0,
        help="USD a month: a notice at 80 %, at 100 % disconnect and stop the server (unset or 0 = none)",
    )

    def validate(self) -> None:
        for key in ("server_name", "listen_address"):
            if not getattr(self, key).strip():
                raise FieldError(key, "must not be empty")
        if self.lifecycle == "static" and not self.server_address.strip():
            raise FieldError("server_address", "lifecycle 'static' needs the server's host name or IP")
        if self.lifecycle == "lambda":
            if not self.api_url:
                raise FieldError(
                    "api_url",
                    "lifecycle 'lambda' needs the control-plane URL (the ApiGatewayUrl output of the "
                    "fluidity-lambda stack); set it in the file or in FLUIDITY_API_URL",
                )
            if not self.api_key:
                raise FieldError(
                    "api_key",
                    "lifecycle 'lambda' needs the control-plane API key; "
                    "set it in the file or in FLUIDITY_API_KEY",
                )
        try:
            BypassRules.parse(self.bypass)
        except BypassRuleError as error:
            raise FieldError("bypass", str(error)) from None
        if self.initial_window < self.max_payload:
            raise FieldError(
                "initial_window",
                f"must be at least max_payload ({self.max_payload}), got {self.initial_window}",
            )
        if self.keepalive_timeout <= self.keepalive_interval:
            raise FieldError(
                "keepalive_timeout",
                f"must be longer than keepalive_interval ({self.keepalive_interval:g}s), "
                f"got {self.keepalive_timeout:g}s",
            )
        if self.connection_timeout < self.connect_timeout:
            raise FieldError(
                "connection_timeout",
                f"must be at least connect_timeout ({self.connect_timeout:g}s), "
                f"got {self.connection_timeout:g}s",
            )

    def warnings(self) -> list[tuple[str, str]]:
        found = []
        if not _is_loopback(self.listen_address):
            found.append(
                (
                    "listen_address",
                    f"is {self.listen_address!r}: the proxy will accept connections from other machines",
                )
            )
        return found

    def effective_kill_on_disconnect(self) -> bool:
        """kill_on_disconnect, or its default: on for backends that start the server on demand."""
        if self.kill_on_disconnect is not None:
            return self.kill_on_disconnect
        return self.lifecycle in ON_DEMAND_LIFECYCLES

    def effective_system_proxy(self, program_default: SystemProxyMode) -> SystemProxyMode:
        """system_proxy, or the program's default (the tray: manual; fluidity-agent: off)."""
        return self.system_proxy if self.system_proxy is not None else program_default

    def bypass_rules(self) -> BypassRules:
        return BypassRules.parse(self.bypass)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def resolve_agent_config_path(path: Path | None) -> Path | None:
    """``path`` when given, else the default settings file if it exists, else None (defaults only)."""
    if path is not None:
        return path
    default = default_agent_config_path()
    return default if default.is_file() else None


def load_agent_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """AgentConfig from ``path`` (None = the default file if present), environment and overrides."""
    return load(AgentConfig, resolve_agent_config_path(path), env=env, overrides=overrides)
