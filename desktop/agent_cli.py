"""`fluidity-agent --config configs/agent.yaml`: the headless agent.

Wakes the server through the configured lifecycle backend, waits for it (bounded by
``connection_timeout``), runs the local proxy over the tunnel, re-wakes the server if it
disappears, and on Ctrl+C / SIGTERM stops the proxy and kills the server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from desktop.agent import Agent
from desktop.config import AgentConfig, default_agent_config_path
from desktop.lifecycle.base import Endpoint, LifecycleError, ServerLifecycle
from desktop.lifecycle.factory import create_lifecycle
from desktop.tunnel_client import LinkState
from server import __version__
from server.config_loader import ConfigError, add_arguments, load_from_args
from server.framing import ServerStatus
from server.json_logging import configure_logging
from server.tls import TlsSetupError

log = logging.getLogger("fluidity.agent")

#: Failed reconnects in a row after which the server is presumed gone and woken again.
REWAKE_AFTER_FAILURES = 3


def build_parser(prog: str = "fluidity-agent", description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description
        or "Fluidity agent: wakes the tunnel server and runs the local HTTP/HTTPS/WebSocket proxy over it.",
    )
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    add_arguments(parser, AgentConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_from_args(AgentConfig, args, default_path=default_agent_config_path())
    except ConfigError as exc:
        print(f"fluidity-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_file)
    return run_headless(config)


def run_headless(config: AgentConfig, *, banner: str | None = None) -> int:
    """Wake, serve until a signal arrives, then stop and (if configured) kill the server."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        lifecycle = create_lifecycle(config)
    except LifecycleError as exc:
        print(f"fluidity-agent: {exc.message}", file=sys.stderr)
        return 2
    agent = Agent(config)
    try:
        return _serve(config, lifecycle, agent, stop, banner)
    finally:
        agent.stop()
        _kill(config, lifecycle)
        lifecycle.close()


def _wake(config: AgentConfig, lifecycle: ServerLifecycle, stop: threading.Event) -> Endpoint:
    last_report = [-10.0]

    def progress(status: ServerStatus, elapsed: float) -> None:
        if elapsed - last_report[0] >= 5.0:
            last_report[0] = elapsed
            log.info(
                "waiting for the server",
                extra={"state": status.state.value, "elapsed_s": round(elapsed), "backend": lifecycle.name},
            )

    log.info("waking the server", extra={"backend": lifecycle.name})
    return lifecycle.wake(timeout=config.connection_timeout, cancel=stop, on_progress=progress)


def _serve(
    config: AgentConfig,
    lifecycle: ServerLifecycle,
    agent: Agent,
    stop: threading.Event,
    banner: str | None,
) -> int:
    try:
        endpoint = _wake(config, lifecycle, stop)
    except LifecycleError as exc:
        if stop.is_set():
            return 0
        log.error("cannot wake the server: %s", exc.message, extra={"code": exc.code})
        print(f"fluidity-agent: cannot wake the server: {exc.message}", file=sys.stderr)
        return 1
    try:
        agent.start(endpoint)
    except TlsSetupError as exc:
        print(f"fluidity-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = f"cannot listen on {config.listen_address}:{config.listen_port}: {exc.strerror or exc}"
        print(f"fluidity-agent: {message}", file=sys.stderr)
        return 2
    host, port = agent.proxy_address
    if not agent.wait_connected(config.connect_timeout + 5.0, stop) and not stop.is_set():
        log.warning("tunnel not up yet; requests will wait for it", extra={"error": agent.stats().last_error})
    print(banner or f"Fluidity proxy ready on http://{host}:{port} (Ctrl+C to stop)", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        stats = agent.stats()
        if (
            lifecycle.name != "static"
            and stats.link_state is not LinkState.CONNECTED
            and stats.consecutive_failures >= REWAKE_AFTER_FAILURES
        ):
            log.warning("server unreachable, waking it again", extra={"error": stats.last_error})
            try:
                agent.set_endpoint(_wake(config, lifecycle, stop))
            except LifecycleError as exc:
                log.error("re-wake failed: %s", exc.message, extra={"code": exc.code})
    return 0


def _kill(config: AgentConfig, lifecycle: ServerLifecycle) -> None:
    if not config.effective_kill_on_disconnect() and lifecycle.name != "local":
        return
    try:
        status = lifecycle.kill()
        log.info("server stopped", extra={"state": status.state.value, "backend": lifecycle.name})
    except LifecycleError as exc:
        log.error("kill failed: %s", exc.message, extra={"code": exc.code})


if __name__ == "__main__":
    sys.exit(main())
