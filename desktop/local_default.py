"""`fluidity-local`: the embedded local default, no AWS account needed.

Creates certificates if missing, starts a tunnel server on 127.0.0.1:8443 (loopback
allowed) through the ``local`` lifecycle backend and the agent's proxy on
127.0.0.1:8080, and stops both cleanly on Ctrl+C.
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "fluidity-local",
        "Run Fluidity entirely on this machine: a local tunnel server and the proxy in front of it.",
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
    configure_logging(config.log_level, config.log_file)
    proxy = f"http://{config.listen_address}:{config.listen_port}"
    banner = (
        f"\nFluidity is running locally: tunnel server {config.server_address}:{config.server_port}, "
        f"proxy {proxy}\n"
        f"  Try:   curl -x {proxy} http://example.com/\n"
        f"         curl -x {proxy} https://example.com/\n"
        f"  Certificates: {config.ca_file.parent}\n"
        "  Press Ctrl+C to stop both.\n"
    )
    return run_headless(config, banner=banner)


if __name__ == "__main__":
    sys.exit(main())
