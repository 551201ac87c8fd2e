"""`fluidity-local`: the embedded local default, no AWS account needed.

Creates certificates if missing, starts a tunnel server on 127.0.0.1:8443 (loopback
allowed) through the ``local`` lifecycle backend and the agent's proxy on
127.0.0.1:8080, and stops both cleanly on Ctrl+C. The server flags it offers
(``--server-address``, ``--server-port``, the certificate files) reach the child server;
settings it decides itself (the backend, AWS and budget keys) are not offered at all.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from desktop.agent_cli import build_parser, run_headless
from desktop.config import AgentConfig
from server.config_loader import ConfigError, load_from_args
from server.json_logging import configure_logging

#: Used when run from a source checkout and no --config is given.
CHECKOUT_CONFIG = Path("configs/agent.local.yaml")
#: Agent settings that mean nothing here: the backend is always the local server, which
#: costs nothing and is always stopped on exit.
NOT_OFFERED = (
    "lifecycle",
    "api_url",
    "api_key",
    "aws_profile",
    "aws_region",
    "cluster_name",
    "service_name",
    "wake_poll_interval",
    "kill_on_disconnect",
    "price_per_hour",
    "price_per_gb_out",
    "monthly_budget",
)
EXAMPLES = (
    "fluidity-local                                   server on 127.0.0.1:8443, proxy on 127.0.0.1:8080",
    "fluidity-local --server-port 9443 --listen-port 3128 --ca-file ./certs/ca.crt",
)


def banner(config: AgentConfig) -> str:
    """How to use it, printed before anything else (the log lines follow)."""
    proxy = f"http://{config.listen_address}:{config.listen_port}"
    return (
        f"Fluidity local default: tunnel server {config.server_address}:{config.server_port} and "
        f"proxy {proxy}, both on this machine.\n"
        f"  Try:   curl -x {proxy} http://example.com/\n"
        f"         curl -x {proxy} https://example.com/\n"
        f"  Certificates: {config.ca_file.parent}\n"
        "  Press Ctrl+C to stop both.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "fluidity-local",
        "Run Fluidity entirely on this machine: a local tunnel server and the proxy in front of it.",
        examples=EXAMPLES,
        exclude=NOT_OFFERED,
    )
    args = parser.parse_args(argv)
    if args.config is None and CHECKOUT_CONFIG.is_file():
        args.config = CHECKOUT_CONFIG
    args.lifecycle = "local"
    if args.server_address is None:
        args.server_address = "127.0.0.1"
    try:
        config = load_from_args(AgentConfig, args)
    except ConfigError as exc:
        print(f"fluidity-local: {exc}", file=sys.stderr)
        return 2
    print(banner(config), file=sys.stderr, flush=True)
    configure_logging(config.log_level, config.log_file, log_format=config.log_format)
    return run_headless(config, prog="fluidity-local", source=str(args.config or "settings"))


if __name__ == "__main__":
    sys.exit(main())
