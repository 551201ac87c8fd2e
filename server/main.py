"""`fluidity-server --config configs/server.yaml`: run the tunnel server until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import ssl
import sys
from collections.abc import Sequence

from server import __version__
from server.config import ServerConfig
from server.config_loader import ConfigError, add_arguments, load_from_args, program_parser
from server.json_logging import configure_logging, stream_format
from server.tls import TlsSetupError

log = logging.getLogger("fluidity.server")


def build_parser() -> argparse.ArgumentParser:
    parser = program_parser(
        "fluidity-server",
        "Fluidity tunnel server: accepts agents over mutual TLS 1.3 and relays their streams. "
        "Every setting below can also be given in the --config file or as FLUIDITY_<KEY>.",
        (
            "fluidity-server --config ./configs/server.yaml          as in the Fargate container",
            "fluidity-server --config ./configs/server.local.yaml --listen-port 9443",
        ),
    )
    parser.add_argument("--version", action="version", version=f"fluidity-server {__version__}")
    parser.add_argument(
        "--health-check",
        action="store_true",
        help="check that the server running with this config can take a tunnel (exit 0) or not (exit 1)",
    )
    add_arguments(parser, ServerConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_from_args(ServerConfig, args)
    except ConfigError as exc:
        print(f"fluidity-server: {exc}", file=sys.stderr)
        return 2
    if args.health_check:
        from server.health import health_problem

        problem = health_problem(config)
        print(f"fluidity-server: {problem or 'healthy'}", file=sys.stderr if problem else sys.stdout)
        return 1 if problem else 0
    configure_logging(config.log_level, config.log_file, log_format=config.log_format)
    return run(config)


def _fail(config: ServerConfig, log_message: str, plain: str) -> int:
    """Say why the server cannot start, once for whoever reads stderr.

    The log line is for CloudWatch and ``fluidity doctor``; the plain ``fluidity-server: ...``
    line is for people, and is left out when stderr already shows the log as text lines.
    """
    log.error(log_message)
    if stream_format(config.log_format, sys.stderr) == "json":
        print(f"fluidity-server: {plain}", file=sys.stderr)
    return 2


def run(config: ServerConfig) -> int:
    from server.container_secrets import SecretError, write_pem_secrets
    from server.tls import server_context

    try:
        written = write_pem_secrets(config)
    except (SecretError, OSError) as exc:
        return _fail(config, f"cannot write certificates from secrets: {exc}", str(exc))
    if written:
        log.info("certificates written from secrets", extra={"files": [str(path) for path in written]})
    try:
        context = server_context(config.ca_file, config.cert_file, config.key_file)
    except TlsSetupError as exc:
        return _fail(config, f"cannot start: {exc}", str(exc))
    raise_open_file_limit()
    return asyncio.run(serve(config, context))


def raise_open_file_limit() -> None:
    """Every tunnel and stream is a file descriptor: use what the hard limit allows (as Go does)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            pass


async def serve(config: ServerConfig, context: ssl.SSLContext) -> int:
    """Run the server on this loop until SIGTERM/SIGINT, then drain and stop."""
    from server.tunnel_server import TunnelServer

    server = TunnelServer(config, context=context)
    try:
        await server.start()
    except OSError as exc:
        message = f"cannot listen on {config.listen_address}:{config.listen_port}: {exc.strerror or exc}"
        return _fail(config, message, message)

    publisher = None
    if config.emit_metrics:
        from server.metrics import MetricsSnapshot, publisher_from_config

        def snapshot() -> MetricsSnapshot:
            stats = server.stats()
            return MetricsSnapshot(stats.active_tunnels, stats.active_streams, stats.last_activity)

        publisher = publisher_from_config(config, snapshot)
        if publisher is not None:
            publisher.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await server.shutdown()
    if publisher is not None:
        await loop.run_in_executor(None, functools.partial(publisher.stop, final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
