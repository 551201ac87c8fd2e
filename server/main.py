"""`fluidity-server --config configs/server.yaml`: run the tunnel server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from server import __version__
from server.config import ServerConfig
from server.config_loader import ConfigError, add_arguments, load_from_args
from server.json_logging import configure_logging
from server.tls import TlsSetupError

log = logging.getLogger("fluidity.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluidity-server",
        description="Fluidity tunnel server: accepts agents over mutual TLS 1.3 and relays their streams.",
    )
    parser.add_argument("--version", action="version", version=f"fluidity-server {__version__}")
    add_arguments(parser, ServerConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_from_args(ServerConfig, args)
    except ConfigError as exc:
        print(f"fluidity-server: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_file)
    return run(config)


def run(config: ServerConfig) -> int:
    from server.container_secrets import SecretError, write_pem_secrets
    from server.tunnel_server import TunnelServer

    try:
        written = write_pem_secrets(config)
    except (SecretError, OSError) as exc:
        log.error("cannot write certificates from secrets: %s", exc)
        print(f"fluidity-server: {exc}", file=sys.stderr)
        return 2
    if written:
        log.info("certificates written from secrets", extra={"files": [str(path) for path in written]})
    try:
        server = TunnelServer(config)
    except TlsSetupError as exc:
        log.error("cannot start: %s", exc)
        print(f"fluidity-server: {exc}", file=sys.stderr)
        return 2
    try:
        server.start()
    except OSError as exc:
        message = f"cannot listen on {config.listen_address}:{config.listen_port}: {exc.strerror or exc}"
        log.error(message)
        print(f"fluidity-server: {message}", file=sys.stderr)
        return 2

    publisher = None
    if config.emit_metrics:
        from server.metrics import MetricsSnapshot, publisher_from_config

        def snapshot() -> MetricsSnapshot:
            stats = server.stats()
            return MetricsSnapshot(stats.active_tunnels, stats.active_streams, stats.last_activity)

        publisher = publisher_from_config(config, snapshot)
        if publisher is not None:
            publisher.start()

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    if publisher is not None:
        publisher.stop(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
